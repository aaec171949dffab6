"""Runner code is contained: it cannot hang, exhaust, end or corrupt the tool.

Every case runs the real command line in a subprocess with a time limit (a
hung command fails the test instead of hanging it) and checks the documented
exit code, a one-line reason, and that stdout holds only the tool's output.
Runner fixtures: tests/hostile_runners.py, tests/hostile_modules/.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "tests/hostile_runners.py"
LIMIT_S = 60  # far above any case (each stops within its --sim-timeout plus start-up)
RSS_GROWTH_BOUND_MB = 150  # README "Budgets and bounds": measured +51 MB for the op loop


def moe_twin(*argv: str, timeout: float = LIMIT_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def runner_errors(doc: dict) -> list[str]:
    return [h["detail"] for h in doc["hazards"] if h["kind"] == "RUNNER_ERROR"]


# ---------------------------------------------------------------- budgets in the simulator


@pytest.mark.parametrize("runner", ["LoopForever", "Sleeper"])
def test_runner_that_never_issues_an_op_is_stopped_by_the_wall_clock_budget(runner):
    t0 = time.monotonic()
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:{runner}", "--sim-timeout", "1", "--json")
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 30
    (detail,) = runner_errors(json.loads(p.stdout))
    assert "wall-clock budget exceeded (--sim-timeout 1 s)" in detail
    assert "after step 3 layer_input" in detail  # the last step the runner issued


def test_fail_on_hazard_catches_a_budget_stop():
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:LoopForever", "--sim-timeout", "0.5",
                 "--fail-on-hazard")
    assert p.returncode == 1
    assert "RUNNER_ERROR" in p.stdout and "wall-clock budget" in p.stdout


def _max_rss_mb(*argv: str) -> tuple[float, subprocess.CompletedProcess[str]]:
    code = ("import io, contextlib, json, resource, sys, cli\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            f"    rc = cli.main({list(argv)!r})\n"
            "print(json.dumps({'rc': rc, 'rss_kb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
            " 'doc': json.loads(buf.getvalue())}))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    return d["rss_kb"] / 1024, p


def test_ops_in_a_loop_stop_at_the_op_budget_with_bounded_memory():
    base, _ = _max_rss_mb("simulate", "r3-tp-decode", "--runner", "fixed", "--json")
    rss, p = _max_rss_mb("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:OpsForever", "--json")
    (detail,) = runner_errors(json.loads(p.stdout)["doc"])
    assert "op budget exceeded (--max-ops 10000)" in detail and "after step 9999 clone" in detail
    # Before the budget: ~80 MB/s without end.
    assert rss - base < RSS_GROWTH_BOUND_MB, (base, rss)


def test_op_budget_flag():
    p = moe_twin("simulate", "r1-sp-deepep", "--runner", f"{HOSTILE}:OpsForever", "--max-ops", "50", "--json")
    (detail,) = runner_errors(json.loads(p.stdout))
    assert "--max-ops 50" in detail and "after step 49 clone" in detail
    # The fixed runner fits a small budget too: the budget is per rank, per layer.
    p = moe_twin("simulate", "r1-sp-deepep", "--runner", "fixed", "--max-ops", "200", "--json")
    assert json.loads(p.stdout)["hazards"] == []


def test_runner_code_cannot_lift_its_own_budget():
    p = moe_twin("simulate", "r1-sp-deepep", "--runner", f"{HOSTILE}:RaisesItsBudget", "--max-ops", "50", "--json")
    (detail,) = runner_errors(json.loads(p.stdout))
    assert "--max-ops 50" in detail and "after step 49 clone" in detail


def test_values_growing_geometrically_stop_at_the_value_size_cap():
    t0 = time.monotonic()
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:GatherForever", "--json")
    assert p.returncode == 0 and time.monotonic() - t0 < 30
    (detail,) = runner_errors(json.loads(p.stdout))
    assert "value size cap exceeded" in detail and "all_gather" in detail


def test_a_runner_that_swallows_every_stop_ends_the_process_with_one_line():
    t0 = time.monotonic()
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:Swallower", "--sim-timeout", "0.5", "--json")
    assert p.returncode == 2
    assert "could not be stopped" in one_line(p.stderr) and p.stdout == ""
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------- runner code cannot end or corrupt the tool


@pytest.mark.parametrize("runner,needle", [
    ("Exit0", "sys.exit(0)"),
    ("Exit5", "sys.exit(5)"),
    ("Interrupt", "raised KeyboardInterrupt itself"),
    ("RaisesGeneratorExit", "raised GeneratorExit, a BaseException that is not an Exception"),
    ("RaisesOwnBase", "raised HomeMadeBase, a BaseException that is not an Exception: not an error class"),
    ("RaisesGreenletExit", "raised GreenletExit, a BaseException that is not an Exception"),
])
def test_runner_exits_are_runner_errors(runner, needle):
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:{runner}", "--json")
    assert p.returncode == 0, p.stderr
    details = runner_errors(json.loads(p.stdout))
    assert details and all(needle in d for d in details)
    # No longer a silent success: --fail-on-hazard sees it.
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:{runner}", "--fail-on-hazard")
    assert p.returncode == 1


def test_runner_prints_go_to_stderr_not_the_json_document():
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:Printer", "--json")
    assert p.returncode == 0
    json.loads(p.stdout)  # nothing else on stdout, not even the raw fd-1 write
    assert "runner says hello" in p.stderr and "raw fd-1 write" in p.stderr


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_verify_reports_a_runner_raising_a_base_exception(jobs):
    """In a worker process it used to kill the worker and leave the pool waiting for ever."""
    p = moe_twin("verify", "--runner", f"{HOSTILE}:RaisesGeneratorExit", "--max-world", "1", "--jobs", jobs, "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(p.stdout)
    assert not doc["proved_clean"] and {f["kind"] for f in doc["findings"]} == {"RUNNER_ERROR"}


@pytest.mark.parametrize("runner,needle", [
    ("ChattyThread", "thread chatter"),
    ("PrintsAtExit", "atexit buffer write"),
])
def test_runner_code_running_after_its_guard_cannot_write_into_the_json_document(runner, needle):
    """A thread runner code left, exit handlers, finalisers: stdout is the tool's alone."""
    for cmd in (["simulate", "r3-tp-decode"], ["verify", "--max-world", "1", "--jobs", "1"]):
        p = moe_twin(*cmd, "--runner", f"{HOSTILE}:{runner}", "--json")
        assert p.returncode == 0, p.stderr[-2000:]
        json.loads(p.stdout)
        assert needle in p.stderr


def test_a_process_runner_code_forks_does_not_write_a_second_document():
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:Forks", "--json")
    assert p.returncode == 0
    json.loads(p.stdout)  # one document: the child ends where runner code hands back to the tool


def test_a_process_runner_code_forks_does_not_hold_the_readers_pipes_open():
    # The child sleeps 120 s: a reader waiting for the end of stdout or stderr
    # would time out. The command ends it with its own output, and says so.
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:ForkedChildSleeps", "--json")
    assert p.returncode == 0
    json.loads(p.stdout)
    (pid,) = re.findall(r"ended 1 process runner code forked and left running \(pid (\d+)\)", p.stderr)
    assert not Path(f"/proc/{pid}").exists() or "zombie" in Path(f"/proc/{pid}/status").read_text()


def test_a_reader_that_stops_reading_is_not_an_error():
    proc = subprocess.Popen([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "simulate",
                             "deepseek-v3", "--json", "--all-ranks"], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # as `| head -1` does
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=LIMIT_S) == 0, err
    assert "Traceback" not in err and "internal error" not in err


def test_signal_handlers_runner_code_changes_are_the_tools_again():
    import signal

    from scenarios.loader import load
    from scenarios.runners import load_runner
    from sim import simulate

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    simulate(load("r3-tp-decode"), load_runner(f"{HOSTILE}:IgnoresInterrupts"))
    after = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    assert signal.SIG_IGN not in after
    assert after[1] == before[1]


def test_a_thread_left_running_by_runner_code_does_not_keep_the_process_alive():
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:ThreadLeaker", "--json", timeout=30)
    assert p.returncode == 0
    assert json.loads(p.stdout)["hazards"] == []
    assert "runner code left" in one_line(p.stderr)


def test_users_ctrl_c_while_runner_code_runs_is_exit_130(tmp_path):
    in_loop = tmp_path / "in-loop"
    # A Ctrl-C reaches a foreground process, whose SIGINT is not ignored; a
    # suite started in the background (`... &` from a script, nohup) hands its
    # children SIGINT ignored, and the signal would then do nothing at all.
    proc = subprocess.Popen([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "simulate",
                             "r3-tp-decode", "--runner", f"{HOSTILE}:AnnouncedLoop", "--json"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "MOE_TWIN_TEST_IN_LOOP": str(in_loop)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        # Inside the runner's loop (the budget is 10 s), however slow start-up is.
        deadline = time.monotonic() + LIMIT_S
        while not in_loop.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "runner code never started"
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=LIMIT_S)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 130 and out == ""
    assert one_line(err) == "moe-twin: interrupted"


@pytest.mark.parametrize("module,needle", [
    ("loop_on_import.py:X", "took too long (wall-clock budget exceeded (--sim-timeout 1 s))"),
    ("exit_on_import.py:X", "sys.exit(7)"),
    ("interrupt_on_import.py:X", "raised KeyboardInterrupt itself"),
    ("generator_exit_on_import.py:X", "raised GeneratorExit"),
])
def test_loading_a_runner_is_contained(module, needle):
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"tests/hostile_modules/{module}",
                 "--sim-timeout", "1", "--json")
    assert p.returncode == 2 and p.stdout == ""
    assert needle in one_line(p.stderr)


def test_prints_while_loading_a_runner_stay_off_stdout():
    p = moe_twin("simulate", "r3-tp-decode", "--runner", "tests/hostile_modules/print_on_import.py:Quiet", "--json")
    assert p.returncode == 0
    assert json.loads(p.stdout)["hazards"] == []
    assert "printed while importing" in p.stderr and "fd-1 write while importing" in p.stderr


def test_the_alarm_is_disarmed_and_stdout_restored_after_runner_code(capsys):
    # In-process: after a stopped runner, tool code that takes longer than the
    # budget is never interrupted, and stdout is the caller's again.
    from scenarios import contain
    from scenarios.loader import load
    from sim import simulate

    fired: list[int] = []
    theirs = signal.signal(signal.SIGALRM, lambda signum, frame: fired.append(signum))  # someone else's
    stdout = sys.stdout
    contain.set_limits(contain.Limits(sim_timeout_s=0.2))
    try:
        signal.setitimer(signal.ITIMER_REAL, 30.0)  # their timer, running across ours
        trace = simulate(load("r3-tp-decode"), f"{HOSTILE}:LoopForever")
        assert contain.budget_stop(trace.notes)
        remaining = signal.getitimer(signal.ITIMER_REAL)[0]
        assert 25.0 < remaining <= 30.0  # their timer goes on, less the time spent
        assert signal.getsignal(signal.SIGALRM) is not contain._alarm_handler  # their handler again
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        time.sleep(0.3)
        assert fired == [signal.SIGALRM]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, theirs)
        contain.set_limits(contain.Limits())
    assert sys.stdout is stdout
    contain.set_limits(contain.Limits(sim_timeout_s=0.2))
    try:
        simulate(load("r3-tp-decode"), f"{HOSTILE}:LoopForever")
    finally:
        contain.set_limits(contain.Limits())
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # disarmed
    end = time.monotonic() + 0.6
    while time.monotonic() < end:  # pure-Python tool-side work past the old deadline
        pass
    print("still ours")
    assert capsys.readouterr().out == "still ours\n"


# ---------------------------------------------------------------- commands carry on


def test_check_and_run_skip_the_real_run_with_the_reason():
    p = moe_twin("check", "r3-tp-decode", "--runner", f"{HOSTILE}:LoopForever", "--sim-timeout", "0.5", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    (v,) = d["verdicts"]
    assert v["kind"] == "RUNNER_ERROR" and v["verdict"] == "INCONCLUSIVE"
    assert "not run on real ranks" in v["reason"] and "wall-clock budget" in v["reason"]
    assert any("real run skipped" in n for n in d["real"]["notes"])
    p = moe_twin("run", "r3-tp-decode", "--runner", f"{HOSTILE}:OpsForever", "--max-ops", "100", "--json")
    assert p.returncode == 0
    d = json.loads(p.stdout)
    assert any("real run skipped" in n and "op budget" in n for n in d["notes"])


def test_explore_with_a_looping_runner_returns(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "cli", "explore", "--runner", f"{HOSTILE}:LoopForever",
                        "--no-enumerate", "--budget", "5", "--sim-timeout", "1", "--out", str(tmp_path), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 45
    d = json.loads(p.stdout)
    assert d["examples"] == 5  # every scenario was tried: a budget stop does not end the search
    # One finding per last step before the loop (layer_input, or sp_slice under SP).
    assert d["findings"]
    for f in d["findings"]:
        assert f["kind"] == "RUNNER_ERROR" and "wall-clock budget" in f["detail"]
        assert not f["shrunk"] and "budget" in f["unshrinkable"]  # not re-run hundreds of times


def test_explore_enumeration_with_a_looping_runner_stops_at_its_time_bound(tmp_path):
    # Every class runs until --sim-timeout: --enumerate-time bounds the phase.
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "cli", "explore", "--runner", f"{HOSTILE}:LoopForever",
                        "--enumerate-time", "3", "--budget", "2", "--sim-timeout", "1", "--out", str(tmp_path),
                        "--json"], cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 45
    d = json.loads(p.stdout)
    e = d["enumeration"]
    assert not e["complete"] and e["stopped"] == "time bound of 3 s" and 0 < e["simulated"] <= 5
    assert d["examples"] == 2
    for f in d["findings"]:
        assert f["kind"] == "RUNNER_ERROR" and "budget" in (f["unshrinkable"] or "")


def test_explore_gives_up_enumerating_a_runner_that_always_runs_into_the_wall_clock_budget(tmp_path):
    # Default enumeration bound (120 s): three classes in a row stopped by the
    # budget end the phase instead; the search still tries its examples.
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "cli", "explore", "--runner", f"{HOSTILE}:LoopForever",
                        "--budget", "2", "--sim-timeout", "1", "--out", str(tmp_path), "--json"],
                       cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 45
    d = json.loads(p.stdout)
    e = d["enumeration"]
    assert not e["complete"] and e["simulated"] == 3
    assert e["stopped"] == "the runner ran into the wall-clock budget on 3 classes in a row"
    assert d["examples"] == 2


def test_a_runner_stopped_in_the_simulator_is_not_run_nor_calibrated_for(tmp_path):
    # The first real use calibrates; a real run that does not happen is not a use.
    env = {**os.environ, "MOE_TWIN_NO_AUTOCALIBRATE": "0", "MOE_TWIN_HOME": str(tmp_path)}
    for verb in ("run", "check"):
        t0 = time.monotonic()
        p = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", verb, "r3-tp-decode",
                            "--runner", f"{HOSTILE}:LoopForever", "--sim-timeout", "0.5", "--timeout", "15"],
                           cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S, env=env)
        assert p.returncode == 0, p.stderr
        assert time.monotonic() - t0 < 30
        assert "calibrat" not in p.stderr and list(tmp_path.iterdir()) == []
        assert "real run skipped" in p.stdout or "not run on real ranks" in p.stdout
        if verb == "run":  # no "measured latency 0 us" for a run that did not happen
            assert "not run (see the notes below)" in p.stdout


# ---------------------------------------------------------------- real ranks (slow)


@pytest.mark.slow
def test_a_runner_looping_on_real_ranks_is_a_hang_with_its_step():
    # Well-behaved in the simulator, spins on the ranks: the pool's --timeout
    # ends it, the ranks are rebuilt for the next run.
    p = moe_twin("run", "r3-tp-decode", "--runner", f"{HOSTILE}:LoopOnRealRanks", "--timeout", "10", "--json",
                 timeout=300)
    assert p.returncode == 0, p.stderr
    hangs = [h for h in json.loads(p.stdout)["hazards"] if h["kind"] == "HANG"]
    assert hangs and all(h["step_name"] == "before_the_loop" for h in hangs)


@pytest.mark.slow
def test_a_process_runner_code_forks_on_a_rank_ends_at_its_next_op():
    """It may not talk on the rank's groups (its peers would see two of it)."""
    p = moe_twin("check", "r3-tp-decode", "--runner", f"{HOSTILE}:ForksOnRealRanks", "--timeout", "30", "--json",
                 timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(p.stdout)
    assert doc["agree"] and all(o["correct"] for o in doc["real_output"]), doc["real_output"]


@pytest.mark.slow
def test_a_rank_hanging_in_its_own_code_is_the_cause_of_its_peers_hang():
    p = moe_twin("run", "r3-tp-decode", "--runner", f"{HOSTILE}:Rank1SleepsOnRealRanks", "--timeout", "10",
                 "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    hangs = {h["rank"]: h for h in json.loads(p.stdout)["hazards"] if h["kind"] == "HANG"}
    assert hangs[1]["step_name"] == "before_the_sleep" and hangs[1].get("caused_by") is None
    assert hangs[0]["caused_by"] == 1 and "hanging in runner code after step" in hangs[0]["detail"]


@pytest.mark.slow
def test_the_op_budget_applies_on_real_ranks_and_prints_stay_off_stdout():
    p = moe_twin("run", "r3-tp-decode", "--runner", f"{HOSTILE}:OpsForeverOnRealRanks", "--max-ops", "200",
                 "--timeout", "120", "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    details = runner_errors(json.loads(p.stdout))
    assert details and all("op budget exceeded (--max-ops 200)" in d for d in details)
    p = moe_twin("run", "r3-tp-decode", "--runner", f"{HOSTILE}:RaisesItsBudgetOnRealRanks", "--max-ops", "200",
                 "--timeout", "120", "--json", timeout=300)
    details = runner_errors(json.loads(p.stdout))  # not lifted: stopped at the budget it started with
    assert details and all("op budget exceeded (--max-ops 200)" in d for d in details)
    p = moe_twin("run", "r3-tp-decode", "--runner", f"{HOSTILE}:Printer", "--timeout", "120", "--json", timeout=300)
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)  # the ranks' prints went to stderr
    assert "runner says hello" in p.stderr



@pytest.mark.slow
def test_the_ranks_are_rebuilt_after_a_runner_looped_on_them():
    # One process, two runs: the hung ranks are replaced, the next run is clean.
    code = ("import json\n"
            "from scenarios.loader import load\n"
            "from sim import simulate\n"
            "from real.runner import run_real\n"
            "s = load('r3-tp-decode')\n"
            f"h = '{HOSTILE}:LoopOnRealRanks'\n"
            "first = run_real(s, h, prediction=simulate(s, h), timeout_s=10).trace\n"
            "second = run_real(s, 'fixed', prediction=simulate(s, 'fixed'), timeout_s=60).trace\n"
            "print(json.dumps([[(h.kind.value, h.step_name) for h in t.hazards] for t in (first, second)]))\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    first, second = json.loads(p.stdout.strip().splitlines()[-1])
    assert first == [["HANG", "before_the_loop"]] * 2
    assert second == []


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_verify_gives_up_on_a_runner_that_always_runs_into_the_wall_clock_budget(tmp_path, jobs):
    # Without the give-up every class of the space (hundreds) would run for
    # its whole --sim-timeout; with it, three in a row end the enumeration,
    # counted over every worker.
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "cli", "verify", "--runner", f"{HOSTILE}:LoopForever",
                        "--sim-timeout", "1", "--jobs", jobs, "--out", str(tmp_path), "--json", "--fail-on-hazard"],
                       cwd=ROOT, capture_output=True, text=True, timeout=LIMIT_S)
    assert p.returncode == 1, p.stderr  # as for a runner error found with --fail-on-hazard
    assert time.monotonic() - t0 < 45
    d = json.loads(p.stdout)
    # (with two workers, the other's class in flight may end in the budget too)
    n = int(d["stopped"].removeprefix("the runner ran into the wall-clock budget on ").split()[0])
    assert d["stopped"].endswith(" classes in a row") and 3 <= n <= 2 + int(jobs)
    assert not d["complete"] and not d["proved_clean"] and 3 <= d["simulated"] <= 3 + int(jobs)
    assert all(f["kind"] == "RUNNER_ERROR" for f in d["findings"])
    text = subprocess.run([sys.executable, "-m", "cli", "verify", "--runner", f"{HOSTILE}:LoopForever",
                           "--sim-timeout", "0.5", "--jobs", jobs], cwd=ROOT, capture_output=True, text=True,
                          timeout=LIMIT_S)
    assert text.returncode == 0, text.stderr
    assert "stopped: the runner ran into the wall-clock budget on " in text.stdout


# ---------------------------------------------------------------- the watchdog's grace is owed in CPU time

_WATCHDOG_CHILD = """
import sys, time
from scenarios import contain
contain._Watchdog.POLL_S = 0.05
contain._watchdog.arm(time.monotonic() - contain.HARD_GRACE_S - 1, "moe-twin: error: stopped by the watchdog")
if sys.argv[1] == "burn":  # a process that runs on past its budget: the grace is used up
    t0 = time.monotonic()
    while time.process_time() < contain.HARD_GRACE_CPU_S + 1 and time.monotonic() - t0 < 40:
        pass
else:  # a process that got no CPU since its budget passed (starved, or stopped)
    time.sleep(1.0)
print("alive")
"""


@pytest.mark.parametrize("mode,code", [("idle", 0), ("burn", 2)])
def test_the_watchdog_ends_a_process_only_once_it_had_cpu_to_stop(mode: str, code: int) -> None:
    # Armed 6 s past the budget. A process given no CPU since then (a busy
    # machine starving it) is not ended: it had no chance to stop itself.
    p = subprocess.run([sys.executable, "-c", _WATCHDOG_CHILD, mode], cwd=ROOT, capture_output=True,
                       text=True, timeout=LIMIT_S)
    assert p.returncode == code, p.stderr
    if code == 0:
        assert p.stdout.strip() == "alive" and p.stderr == ""
    else:
        assert one_line(p.stderr) == "moe-twin: error: stopped by the watchdog" and p.stdout == ""


def test_the_watchdog_waits_for_cpu_but_not_for_ever() -> None:
    from scenarios.contain import HARD_GRACE_CPU_S, HARD_GRACE_S, HARD_GRACE_WALL_MAX_S, _Watchdog
    assert not _Watchdog.overdue(HARD_GRACE_S / 2, 100.0)  # within the grace
    assert not _Watchdog.overdue(HARD_GRACE_S + 30, HARD_GRACE_CPU_S / 10)  # starved: still waiting
    assert _Watchdog.overdue(HARD_GRACE_S + 1, HARD_GRACE_CPU_S)
    assert _Watchdog.overdue(HARD_GRACE_WALL_MAX_S + 1, 0.0)  # blocked without CPU: ended anyway
