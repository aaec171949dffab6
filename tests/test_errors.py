"""Errors by type, infrastructure apart (real side).

Fast tests drive the classification and the root-cause rule with synthetic
rank results; slow ones run deliberately wrong runners (tests/error_runners.py)
on real ranks and compare with the simulator.
"""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path
from typing import Any

import pytest

from real.errors import (
    COLLECTIVE,
    RUNNER,
    SHAPE,
    USAGE,
    CollectiveFailure,
    RunnerUsageError,
    UpstreamFailure,
    error_kind,
    failure_hazards,
    rank_failures,
    root_of,
    usage_error,
)
from real.pool import (
    DEFAULT_STARTUP_TIMEOUT_S,
    PoolStartupError,
    set_default_startup_timeout,
    startup_cause,
)
from scenarios.ops import OpsShapeError, OpsUsageError
from scenarios.trace import HazardKind, Step

RUNNERS = Path(__file__).with_name("error_runners.py")


def spec(cls: str) -> str:
    return f"{RUNNERS}:{cls}"


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    from cli import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def fresh_pools():
    """Start from no cached pool, and leave the start-up default as found."""
    from real.runner import close_pools

    close_pools()
    yield
    close_pools()
    set_default_startup_timeout(DEFAULT_STARTUP_TIMEOUT_S)


# ---- fast: classification and the root-cause rule ----


def result(error: str | None = None, kind: str | None = None, step: int = 3, at: float | None = None,
           outside: bool = False) -> dict[str, Any]:
    steps = [Step(0, i, "op", f"s{i}") for i in range(6)]
    return {"steps": steps, "error": error, "error_step": step if error else None,
            "error_class": error.split(":")[0] if error else None, "error_kind": kind,
            "error_at": at, "error_outside_step": outside}


def test_error_kind_by_class_not_words() -> None:
    assert error_kind(ZeroDivisionError("pre_trim_width exploded: shape size width expects declared")) == RUNNER
    assert error_kind(OpsShapeError("[8, 4] + [8, 2]")) == SHAPE
    assert error_kind(OpsUsageError("x: unknown group kind 'tpp'")) == USAGE
    assert error_kind(RunnerUsageError("rank 0 ...")) == USAGE
    assert error_kind(CollectiveFailure("all_reduce: Connection closed by peer")) == COLLECTIVE
    assert error_kind(RuntimeError("size mismatch in shape")) == RUNNER
    # A relayed failure is the upstream step's.
    relayed = UpstreamFailure(7, OpsShapeError("shared MLP expects width 168, got 4"))
    assert error_kind(UpstreamFailure(9, relayed)) == SHAPE
    back = pickle.loads(pickle.dumps(relayed))
    assert back.step == 7 and isinstance(back.cause, OpsShapeError)


def test_runner_exception_is_exactly_one_runner_error() -> None:
    results = {0: result("ZeroDivisionError: pre_trim_width exploded", RUNNER),
               1: result("OpsShapeError: cannot pad width 192 down to 191", SHAPE)}
    hz = failure_hazards(rank_failures(2, results, {}, {}, {}))
    assert [(h.kind, h.rank, h.step, h.step_name) for h in hz] == [
        (HazardKind.RUNNER_ERROR, 0, 3, "s3"), (HazardKind.SHAPE_MISMATCH, 1, 3, "s3")]
    assert all(h.caused_by is None for h in hz)


def test_consequences_are_tied_to_the_rank_that_died() -> None:
    results = {0: result("CollectiveFailure: all_reduce: Connection closed by peer", COLLECTIVE, step=4, at=10.5)}
    failures = {1: "died with exit code 7", 2: "timed out: still running 1.2 s into the run, 1.0 s after rank 1 failed"}
    notes = {1: "step 3 custom_op_boundary", 2: "step 4 final_all_reduce"}
    infos = rank_failures(3, results, failures, notes, {1: 10.2, 2: 11.3})
    root = root_of(infos)
    assert root is not None and root.rank == 1
    hz = failure_hazards(infos)
    assert [h.rank for h in hz] == [1, 0, 2]  # the cause first
    assert hz[0].kind == HazardKind.RUNNER_ERROR and hz[0].caused_by is None and "exit code 7" in hz[0].detail
    assert (hz[0].step, hz[0].step_name) == (3, "custom_op_boundary")
    for h in hz[1:]:
        assert h.caused_by == 1
        assert h.detail.startswith("consequence of rank 1 dying at step 3 custom_op_boundary")
    assert hz[2].kind == HazardKind.HANG and hz[2].step == 4
    assert hz[1].to_dict()["caused_by"] == 1


def test_root_is_the_first_primary_failure() -> None:
    results = {0: result("OpsShapeError: x", SHAPE, at=20.0), 1: result("ZeroDivisionError: y", RUNNER, at=19.0),
               2: result("CollectiveFailure: z", COLLECTIVE, at=18.0)}  # earliest, but not a cause
    hz = {h.rank: h for h in failure_hazards(rank_failures(3, results, {}, {}, {}))}
    assert hz[0].caused_by is None and hz[1].caused_by is None  # every primary is its own finding
    assert hz[2].caused_by == 1 and "rank 1 raising ZeroDivisionError at step 3 s3" in hz[2].detail


def test_no_primary_no_attribution() -> None:
    hz = failure_hazards(rank_failures(2, {1: result()}, {0: "timed out after 1.5 s"}, {0: "step 9 final_all_reduce"}, {}))
    assert [(h.kind, h.rank, h.step, h.caused_by) for h in hz] == [(HazardKind.HANG, 0, 9, None)]
    hz = failure_hazards(rank_failures(2, {0: result("CollectiveFailure: a", COLLECTIVE), 1: result()}, {}, {}, {}))
    assert [(h.kind, h.caused_by) for h in hz] == [(HazardKind.RUNNER_ERROR, None)]


def test_usage_error_names_rank_and_step() -> None:
    assert usage_error({0: result(), 1: result("ZeroDivisionError: x", RUNNER)}) is None
    err = usage_error({0: result(), 1: result("OpsUsageError: bad_group_reduce: unknown group kind 'tpp'\nTraceback",
                                              USAGE, step=5, outside=True)})
    assert isinstance(err, RunnerUsageError) and isinstance(err, OpsUsageError)
    assert str(err) == ("runner misuses Ops on rank 1 after step 5 s5: "
                        "OpsUsageError: bad_group_reduce: unknown group kind 'tpp'")


def test_startup_error_is_one_line_naming_the_cause() -> None:
    failures = {0: "timed out after 0.0 s", 2: "died with exit code 1\nmore", 1: "timed out after 0.0 s"}
    cause = startup_cause(failures, {2: "importing torch"})
    assert cause == "rank 2 died with exit code 1 (last note: importing torch)"
    assert startup_cause({1: "timed out after 0.0 s", 0: "timed out after 0.0 s"}, {}) == "rank(s) 0, 1 not ready in time"
    err = PoolStartupError(4, 120.0, cause, failures)
    assert str(err) == "could not start 4 rank processes within 120 s: " + cause
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.failures == failures


def test_startup_timeout_flag_is_validated(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = cli(capsys, "run", "r4-gpt-oss-padded", "--startup-timeout", "0")
    assert code == 2 and "--startup-timeout" in err and len(err.strip().splitlines()) == 1


def test_spawn_failure_exits_3_in_one_line(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                           fresh_pools: None) -> None:
    import real.pool

    def broken(*_a: Any, **_k: Any) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(real.pool._Generation, "__init__", broken)
    code, _, err = cli(capsys, "run", "r4-gpt-oss-padded", "--runner", "fixed")
    assert code == 3 and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "could not start 2 rank processes within 120 s: spawning failed: OSError" in err
    assert "Too many open files" in err


# ---- slow: real ranks ----


def reports_failure(rank: int, world: int, finishing: bool) -> dict[str, Any]:
    """Rank 1 reports an error it caught; rank 0 is still busy for a while,
    either past its collectives (its note says so) or not."""
    from real.pool import FINISHING_NOTE, note

    if rank == 1:
        return {"error": "OpsShapeError: x"}
    if finishing:
        note(f"{FINISHING_NOTE}: checking results")
        time.sleep(2.5)
    else:
        note("step 9 final_all_reduce")
        time.sleep(30.0)
    return {"error": None}


@pytest.mark.slow
def test_failure_grace_keeps_results_of_ranks_past_their_collectives() -> None:
    from real.pool import RankFailure, RankPool

    def failed(res: Any) -> bool:
        return bool(res["error"])

    with RankPool(2, timeout_s=60.0, failure_grace_s=1.0) as pool:
        out = pool.run(reports_failure, True, failed=failed)  # rank 0 outlives the grace, but finishing
        assert out == [{"error": None}, {"error": "OpsShapeError: x"}]
        t0 = time.monotonic()
        with pytest.raises(RankFailure) as info:
            pool.run(reports_failure, False, failed=failed)  # rank 0 looks stuck: cut after the grace
        assert time.monotonic() - t0 < 25.0
    err = info.value
    assert err.partial == {1: {"error": "OpsShapeError: x"}} and "after rank 1 failed" in err.failures[0]
    assert err.notes[0] == "step 9 final_all_reduce" and set(err.times) == {0, 1}


def slow_after_collectives(rank: int, world: int, finishing: bool, seconds: float) -> int:
    """Every rank is slow after the run: past its collectives (its note says
    so: the twin's analysis) or, with finishing=False, still inside the run."""
    from real.pool import FINISHING_NOTE, note

    note(f"{FINISHING_NOTE}: fits and output" if finishing else "step 9 final_all_reduce")
    time.sleep(seconds)
    return rank


@pytest.mark.slow
def test_slow_analysis_past_the_collectives_is_never_a_hang() -> None:
    from real.pool import ANALYSIS_OVER_BUDGET, AnalysisOverBudget, RankFailure, RankPool

    with RankPool(2, timeout_s=1.0, analysis_timeout_s=30.0) as pool:
        pool.start()
        # The analysis outlives the run's timeout: the results count.
        assert pool.run(slow_after_collectives, True, 2.5) == [0, 1]
        # Still inside the run at the timeout: timed out (a HANG), analysis budget or not.
        with pytest.raises(RankFailure) as hung:
            pool.run(slow_after_collectives, False, 2.5)
        assert all(w.startswith("timed out") for w in hung.value.failures.values())
        # The analysis outlives its own budget too: the twin's limit, not a RankFailure.
        pool.analysis_timeout_s = 0.5
        with pytest.raises(AnalysisOverBudget) as over:
            pool.run(slow_after_collectives, True, 10.0)
    assert all(w.startswith(ANALYSIS_OVER_BUDGET) for w in over.value.failures.values())
    assert "did not end within its budget of 0.5 s" in str(over.value)


SHAPE_CASES = [("r4-gpt-oss-padded", spec(c)) for c in (
    "PadBelowWidth", "WrongBoundary", "WrongOutputRows", "AddUnequal", "NarrowRouter", "NarrowKernel",
    "FewerRowsThanRouting", "OddReduceScatter", "Rank1FewerRows", "Rank1GathersInstead")] + [
    ("r4-nemotron-padded", spec("NarrowShared")),  # on the aux stream
    ("r4-latent-padded", spec("NarrowLatentDown")),
    ("r4-latent-padded", spec("WideLatentUp")),
] + [(s, r) for s in ("r4-gpt-oss-padded", "r4-nemotron-padded", "r4-latent-padded")
     for r in ("before-40865", "no-early-trim-40865", "first-fix-40865")]


def _failures(trace: Any, kinds: tuple[str, ...] = ("SHAPE_MISMATCH", "RUNNER_ERROR", "HANG")) -> list[tuple]:
    return sorted((h.kind.value, h.rank, h.step, h.step_name) for h in trace.hazards if h.kind.value in kinds)


@pytest.mark.slow
@pytest.mark.parametrize("scenario,runner", SHAPE_CASES, ids=[f"{s}-{r.rpartition(':')[2]}" for s, r in SHAPE_CASES])
def test_shape_errors_same_class_same_step_as_the_simulator(scenario: str, runner: str) -> None:
    from real.runner import run_real
    from scenarios.loader import load
    from sim import simulate

    s = load(scenario)
    pred = simulate(s, runner)
    res = run_real(s, runner, prediction=pred, timeout_s=60)
    assert _failures(res.trace) == _failures(pred)
    if any(h.kind == HazardKind.SHAPE_MISMATCH for h in pred.hazards):
        assert res.errors and all(e.startswith("OpsShapeError: ") for _, e in res.errors.values())


@pytest.mark.slow
def test_runner_zero_division_is_one_runner_error_per_rank() -> None:
    from real.runner import run_real
    from scenarios.loader import load
    from sim import simulate

    s = load("r4-gpt-oss-padded")
    pred = simulate(s, spec("ExplodingTrim"))
    trace = run_real(s, spec("ExplodingTrim"), prediction=pred, timeout_s=60).trace
    assert [(h.kind, h.rank) for h in trace.hazards] == [(HazardKind.RUNNER_ERROR, 0), (HazardKind.RUNNER_ERROR, 1)]
    assert all("ZeroDivisionError: pre_trim_width exploded" in h.detail for h in trace.hazards)
    assert _failures(trace) == _failures(pred)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["run", "check"])
def test_ops_misuse_exits_2_naming_the_step(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, err = cli(capsys, command, "r4-gpt-oss-padded", "--runner", spec("UnknownGroup"), "--json")
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "bad_group_reduce" in err and "'tpp'" in err
    assert out == ""


@pytest.mark.slow
def test_startup_timeout_failure_exits_3_not_a_hang(capsys: pytest.CaptureFixture[str], fresh_pools: None) -> None:
    code, out, err = cli(capsys, "check", "r4-gpt-oss-padded", "--runner", "fixed", "--timeout", "60",
                         "--startup-timeout", "0.01", "--fail-on-hazard", "--json")
    assert code == 3 and out == ""
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert "could not start 2 rank processes within 0.01 s" in err and "HANG" not in err


@pytest.mark.slow
def test_slow_startup_does_not_count_against_the_run_timeout(capsys: pytest.CaptureFixture[str],
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             fresh_pools: None) -> None:
    """Start-up made longer than --timeout: the run is judged on its own clock."""
    from real.pool import RankPool

    start = RankPool.start
    timeout = 5.0

    def slow_start(self: RankPool) -> None:
        if self.pids == []:
            time.sleep(timeout + 1.0)  # a loaded machine, deliberately slower than --timeout
        start(self)

    monkeypatch.setattr(RankPool, "start", slow_start)
    t0 = time.monotonic()
    code, out, err = cli(capsys, "check", "r4-gpt-oss-padded", "--runner", "fixed", "--timeout", str(timeout),
                         "--fail-on-hazard", "--json")
    assert time.monotonic() - t0 > timeout
    assert code == 0, err
    d = json.loads(out)
    assert d["observed"] == [] and d["verdicts"] == []


@pytest.mark.slow
def test_rank_exit_peers_attributed_not_unpredicted(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys, "check", "r4-gpt-oss-padded", "--runner", spec("Rank1Exits"), "--json")
    assert code == 0, err
    d = json.loads(out)
    root = [h for h in d["observed"] if h["rank"] == 1]
    assert len(root) == 1 and "caused_by" not in root[0] and "died with exit code 7" in root[0]["detail"]
    peers = [h for h in d["observed"] if h["rank"] == 0]
    assert peers and all(h["caused_by"] == 1 and h["detail"].startswith("consequence of rank 1 dying") for h in peers)
    unpredicted = [(v["kind"], v["rank"]) for v in d["verdicts"] if v["verdict"] == "UNPREDICTED"]
    assert unpredicted == [("RUNNER_ERROR", 1)]
    # The surviving rank's result is kept: its steps up to the failed collective.
    steps0 = d["real"]["steps"]["0"]
    assert steps0 and steps0[-1]["name"] == "final_all_reduce" and steps0[-1]["error"]


@pytest.mark.slow
def test_rank_raise_peer_hang_is_its_consequence() -> None:
    from real.runner import get_pool, resolve_kernel, run_real, start_ranks
    from scenarios.loader import load
    from sim import simulate
    from twin.check.crosscheck import check

    s = load("r4-gpt-oss-padded")
    result = check(s, spec("Rank1Raises"), timeout_s=60)
    hz = {h.rank: h for h in result.real.hazards}
    assert hz[1].kind == HazardKind.RUNNER_ERROR and hz[1].caused_by is None
    assert hz[0].kind == HazardKind.HANG and hz[0].caused_by == 1 and hz[0].step_name == "final_all_reduce"
    # The simulator predicts both (rank 0 waits for rank 1 forever): both confirmed, nothing unpredicted.
    assert {(v.kind, v.rank, v.verdict.value) for v in result.verdicts} == {
        ("RUNNER_ERROR", 1, "CONFIRMED"), ("HANG", 0, "CONFIRMED")}
    # The failed rank's own result is kept, and its error (caught by the rank,
    # reported in its result) started the peer's short grace: not the run timeout.
    pred = simulate(s, spec("Rank1Raises"))
    kernel = resolve_kernel(s, None)
    start_ranks(get_pool(s.world), s, kernel)  # start-up is not timed here
    t0 = time.monotonic()
    res = run_real(s, spec("Rank1Raises"), prediction=pred, timeout_s=600)
    assert time.monotonic() - t0 < 300
    assert res.trace.steps[1] and res.trace.steps[1][-1].name == "custom_op_boundary" and not res.trace.steps[0]
    assert "1.0 s after rank 1 failed" in res.failures[0]
