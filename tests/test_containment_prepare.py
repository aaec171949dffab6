"""A runner's prepare_program() is runner code too (the simulator and a real
run call it once per scenario in the tool's own process): budgeted, its
failures reported as RUNNER_ERRORs, its prints kept off stdout."""

from __future__ import annotations

import json
import time

import pytest
from test_containment import HOSTILE, moe_twin, runner_errors

from scenarios.loader import load
from scenarios.runners import load_runner, prepare_runner


def test_a_looping_prepare_program_is_stopped_by_the_wall_clock_budget():
    t0 = time.monotonic()
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:PrepareLoops", "--sim-timeout", "1", "--json")
    assert p.returncode == 0, p.stderr
    assert time.monotonic() - t0 < 30
    doc = json.loads(p.stdout)
    (detail,) = runner_errors(doc)
    assert "prepare_program() was stopped" in detail and "wall-clock budget" in detail
    assert not doc["steps"] or not any(doc["steps"].values())  # no program ran


@pytest.mark.parametrize("runner,needle", [
    ("PrepareRaises", "prepare_program() raised ValueError: prepare broke"),
    ("PrepareExits", "sys.exit(3)"),
])
def test_a_failing_prepare_program_is_a_runner_error(runner, needle):
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:{runner}", "--json", "--fail-on-hazard")
    assert p.returncode == 1, p.stderr
    (detail,) = runner_errors(json.loads(p.stdout))
    assert needle in detail


def test_prints_of_prepare_program_stay_off_stdout():
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:PreparePrints", "--json")
    assert p.returncode == 0, p.stderr
    json.loads(p.stdout)
    assert "prepare says hello" in p.stderr


def test_check_skips_the_real_run_of_a_prepare_program_the_budget_stopped():
    p = moe_twin("check", "r3-tp-decode", "--runner", f"{HOSTILE}:PrepareLoops", "--sim-timeout", "0.5", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    (v,) = d["verdicts"]
    assert v["kind"] == "RUNNER_ERROR" and v["verdict"] == "INCONCLUSIVE"
    assert any("real run skipped" in n for n in d["real"]["notes"])


def test_the_tools_own_prepare_program_runs_unguarded_and_a_users_guarded():
    s = load("r3-tp-decode")
    assert prepare_runner(load_runner("fixed"), s) is None
    import hostile_runners

    assert "prepare broke" in (prepare_runner(hostile_runners.PrepareRaises, s) or "")


def test_verify_reports_a_failing_prepare_program():
    p = moe_twin("verify", "--runner", f"{HOSTILE}:PrepareRaises", "--max-world", "1", "--jobs", "1", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(p.stdout)
    assert not doc["proved_clean"] and {f["kind"] for f in doc["findings"]} == {"RUNNER_ERROR"}


def test_check_reports_a_raising_prepare_program_once_without_starting_ranks():
    """A real run calls prepare_program() in the launching process too: it
    fails there the same way, no rank starts, and the other ranks' missing
    outputs are its consequence, not findings of their own."""
    p = moe_twin("check", "r3-tp-decode", "--runner", f"{HOSTILE}:PrepareRaises", "--json")
    assert p.returncode == 0, p.stderr
    d = json.loads(p.stdout)
    assert [(v["kind"], v["rank"], v["verdict"]) for v in d["verdicts"]] == [("RUNNER_ERROR", 0, "CONFIRMED")]
    assert [c["correct"] for c in d["real_output"]] == [False, False]
    assert "consequence of rank 0" in d["real_output"][1]["cause"]


def test_verify_gives_up_on_a_prepare_program_that_always_overruns():
    p = moe_twin("verify", "--runner", f"{HOSTILE}:PrepareLoops", "--max-world", "1", "--jobs", "1",
                 "--sim-timeout", "0.2", "--json")
    doc = json.loads(p.stdout)
    assert "wall-clock budget on 3 classes in a row" in (doc["stopped"] or "") and not doc["proved_clean"]


def test_a_users_prepare_program_runs_once_per_scenario(monkeypatch):
    import hostile_runners

    from sim import simulate

    s = load("r3-tp-decode")
    hostile_runners.PREPARED.clear()
    simulate(s, hostile_runners.CountsPrepares)
    simulate(s, hostile_runners.CountsPrepares)
    assert hostile_runners.PREPARED == [s]


def test_the_tools_own_prepare_program_is_not_guarded(monkeypatch):
    from scenarios import contain

    entered = []

    class Counting(contain.RunnerGuard):
        def __enter__(self):  # noqa: ANN204
            entered.append(self.what)
            return super().__enter__()

    monkeypatch.setattr(contain, "RunnerGuard", Counting)
    import hostile_runners

    from scenarios import runners

    monkeypatch.setattr(runners, "_PREPARED", {})  # a fresh answer, not one an earlier test left

    assert prepare_runner(load_runner("fixed"), load("r3-tp-decode")) is None and entered == []
    assert prepare_runner(hostile_runners.PreparePrints, load("r3-tp-decode")) is None
    assert entered == ["the runner's prepare_program()"]


def test_an_exception_the_simulator_raises_for_runner_code_says_where():
    """Named as raised inside the simulator (the runner's misuse or the
    simulator's own bug), not as the runner's own; a runner's own raise is not."""
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:BreaksAHandle", "--json")
    details = runner_errors(json.loads(p.stdout))
    assert details and all("raised inside the simulator at sim/" in d for d in details)
    p = moe_twin("simulate", "r3-tp-decode", "--runner", f"{HOSTILE}:EvilNames", "--json")
    details = runner_errors(json.loads(p.stdout))
    assert details and all("RuntimeError" in d and "inside the simulator" not in d for d in details)
