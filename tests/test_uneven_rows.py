"""Uneven, padded and sliced rows: the router routes the tokens rows hold (sim
and real), TP rank 0's SP slice taken by trim_rows is its own, and zero rows
where every source is missing confirm a MISSING_REDUCTION."""

from pathlib import Path

import pytest

from scenarios.runners import load_runner
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, Workload
from scenarios.trace import HazardKind, Verdict
from sim import simulate

RUNNERS = str(Path(__file__).resolve().parent / "uneven_runners.py")


def _runner(name: str) -> type:
    return load_runner(f"{RUNNERS}:{name}")


def _scenario(name: str, tokens: tuple[int, ...], tp: int, dp: int, shared: int = 1, backend: str | None = None,
              top_k: int = 2) -> Scenario:
    par = dict(tp=tp, dp=dp, ep=True) | ({"backend": backend} if backend else {})
    return Scenario(name=name, model=ModelTraits(hidden=128, moe_intermediate=64, num_experts=8, top_k=top_k,
                                                  num_shared_experts=shared),
                    parallel=ParallelConfig(**par), runtime=Runtime(platform="cuda"),
                    workload=Workload(tokens=list(tokens), seed=3))


DP_UNEVEN = _scenario("dp2-uneven", (2, 5), tp=1, dp=2, backend="allgather_reducescatter")
SP_UNEVEN = _scenario("sp-uneven", (5, 3), tp=2, dp=2, backend="allgather_reducescatter")
SG_DPATTN = _scenario("sg-dpattn", (3, 5), tp=1, dp=2, shared=0, top_k=4)


def _kinds(trace, rank=None) -> set[str]:
    return {h.kind.value for h in trace.hazards if rank is None or h.rank == rank}


def test_the_router_routes_gathered_rows_by_the_tokens_they_hold():
    assert not simulate(DP_UNEVEN, _runner("GathervRoutesGathered")).hazards


def test_rows_of_no_known_token_set_are_still_refused_by_the_router():
    """Rows an all-to-all dispatched name the group's tokens, not which of
    them arrived: the stand-in router cannot route them again."""
    from scenarios.runners import MoERunner

    class RoutesDispatched(MoERunner):
        def routed_path(self, ops, x, routing, order, shared_inside):
            xd, _rd = ops.dispatch(x, routing)
            ops.router(ops.trim(xd, 128), name="route_dispatched")
            return super().routed_path(ops, x, routing, order, shared_inside)

    trace = simulate(_scenario("a2a", (3, 5), tp=1, dp=2, backend="deepep_low_latency"), RoutesDispatched)
    assert {(h.kind, h.step_name) for h in trace.hazards} == {(HazardKind.SHAPE_MISMATCH, "route_dispatched")}
    assert all("not known tokens" in h.detail for h in trace.hazards)


def test_tp_rank_0_trimming_to_its_sp_slice_takes_its_own_rows():
    assert not simulate(SP_UNEVEN, _runner("SpRank0TrimsToItsSlice")).hazards


def test_every_rank_taking_the_first_slice_is_wrong_tokens_and_rank_0_read_its_own():
    trace = simulate(SP_UNEVEN, _runner("SpEveryRankFirstSlice"))
    assert "WRONG_TOKENS" in _kinds(trace)
    assert "WRONG_INPUT" not in _kinds(trace, 0) and "WRONG_INPUT" in _kinds(trace, 1)


def test_missing_rows_are_predicted_where_the_kernel_skips_them():
    trace = simulate(SG_DPATTN, _runner("ValidRowsLargestCount"))
    assert {(h.kind, h.rank) for h in trace.hazards} == {(HazardKind.MISSING_REDUCTION, 1)}


# ---- real ranks ----


def _check(s: Scenario, runner: str):
    from twin.check.crosscheck import check

    return check(s, f"{RUNNERS}:{runner}", timeout_s=120)


@pytest.mark.slow
def test_real_router_routes_gathered_rows_and_the_run_agrees():
    res = _check(DP_UNEVEN, "GathervRoutesGathered")
    assert not res.sim.hazards and all(o.correct for o in res.real.output_checks.values())
    assert res.agree


@pytest.mark.slow
def test_real_first_slice_bug_is_characterised_as_other_tokens_outputs():
    res = _check(SP_UNEVEN, "SpEveryRankFirstSlice")
    by = {(v.kind, v.rank): v for v in res.verdicts}
    assert all(v.verdict == Verdict.CONFIRMED for (k, _r), v in by.items() if k == "WRONG_TOKENS")
    # Wrong rows read on TP rank 1: its output shows other tokens' outputs, but
    # so does TP rank 0's (gathered): consistent, not proof.
    assert by[("WRONG_INPUT", 1)].verdict == Verdict.INCONCLUSIVE
    assert not res.agree


@pytest.mark.slow
def test_real_zero_rows_confirm_a_missing_reduction():
    res = _check(SG_DPATTN, "ValidRowsLargestCount")
    [v] = res.verdicts
    assert (v.kind, v.rank, v.verdict) == ("MISSING_REDUCTION", 1, Verdict.CONFIRMED), v.reason
    assert "every source that holds anything for them is missing" in v.reason
    assert res.real.output_checks[1].zero_tokens == [f"d1t{i}" for i in range(5)]


def test_a_decision_the_ranks_take_differently_is_noted():
    """The decisions shown are rank 0's; the ranks of an uneven DP split may
    decide the overlap on their own counts, and a note says so."""
    s = _scenario("dp2-thr", (300, 100), tp=1, dp=2, backend="allgather_reducescatter").with_(
        **{"runtime.aux_stream": True})
    trace = simulate(s, "fixed")
    split = [n for n in trace.notes if n.startswith("decision shared_experts_order differs by rank")]
    assert split == [f"decision shared_experts_order differs by rank: {trace.decisions['shared_experts_order']} "
                     "on rank 0; MULTI_STREAM_OVERLAPPED on rank 1"]
    assert not [n for n in simulate(DP_UNEVEN, "fixed").notes if "differs by rank" in n]
