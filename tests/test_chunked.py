"""A chunked MoE forward (take_rows / cat_rows): the layer run on a few rows
at a time. Correct chunk loops are clean in the simulator and on real ranks;
the loop's own bugs (a chunk dropped, the offset never advanced, another
chunk's routing, a chunk loop that is not a collective loop over DP ranks)
are predicted and judged. Runners: tests/chunked_runners.py."""

from __future__ import annotations

from pathlib import Path

import chunked_runners as cr
import hypothesis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.spec import Scenario
from scenarios.trace import HazardKind
from sim import RunnerUsageError, simulate

RUNNERS = str(Path(__file__).resolve().parent / "chunked_runners.py")
SMALL = {"model.hidden": 128, "model.moe_intermediate": 64, "model.num_experts": 8, "model.top_k": 2,
         "model.num_shared_experts": 1}
TP = Scenario(name="chunk-tp").with_(**SMALL, **{"parallel.tp": 2, "workload.tokens": 8, "workload.seed": 3})
DP_EP = Scenario(name="chunk-dp-ep").with_(**SMALL, **{"parallel.dp": 2, "parallel.ep": True,
                                                       "workload.tokens": [7, 5], "workload.seed": 5})
TP_DP_EP = Scenario(name="chunk-tp-dp-ep").with_(**SMALL, **{"parallel.tp": 2, "parallel.dp": 2, "parallel.ep": True,
                                                             "workload.tokens": [7, 4], "workload.seed": 6})
DEEPEP = Scenario(name="chunk-deepep").with_(**SMALL, **{
    "parallel.tp": 2, "parallel.dp": 2, "parallel.ep": True, "parallel.backend": "deepep_high_throughput",
    "runtime.platform": "cuda", "workload.tokens": 8, "workload.seed": 2})


def kinds(s: Scenario, runner: type) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for h in simulate(s, runner).hazards:
        out.setdefault(h.kind.value, []).append(f"{h.step_name}: {h.detail}")
    return out


@pytest.mark.parametrize("s,runner", [(TP, cr.Chunked), (TP, cr.RoutesOnceChunkRouting), (TP, cr.ChunkedSGLang),
                                      (TP, cr.JoinsRoutingChunks),
                                      (DP_EP, cr.ChunkedAcrossDP), (TP_DP_EP, cr.ChunkedAcrossDP),
                                      (DEEPEP, cr.ChunkedAcrossDP)])
def test_a_correct_chunk_loop_is_clean(s: Scenario, runner: type) -> None:
    assert kinds(s, runner) == {}


def test_a_dropped_last_chunk_is_a_shape_mismatch_at_the_output() -> None:
    (detail, *_) = kinds(TP, cr.DropsTheLastChunk)["SHAPE_MISMATCH"]
    assert detail == "layer_output: layer output [6, 128], the model expects [8, 128]"


def test_a_chunk_offset_never_advanced_returns_the_first_tokens_again() -> None:
    found = kinds(TP, cr.FirstChunkEveryTime)
    assert list(found) == ["WRONG_TOKENS"]
    assert "returns [d0t0, d0t1, d0t2, d0t0, d0t1] instead of [d0t3, d0t4, d0t5, d0t6, d0t7]" in found["WRONG_TOKENS"][0]


def test_another_chunks_routing_is_a_wrong_input_of_the_routed_experts() -> None:
    found = kinds(TP, cr.RoutesOnceStaleChunkRouting)
    assert list(found) == ["WRONG_INPUT"]
    assert "routed_experts: routed experts run rows d0[3:6] with the routing of rows d0[0:3]" in found["WRONG_INPUT"]


def test_a_chunk_loop_bounded_by_the_ranks_own_rows_hangs_under_uneven_dp() -> None:
    (detail,) = kinds(DP_EP, cr.Chunked)["HANG"]
    assert detail.startswith("dispatch: waits in all_gatherv over ranks [0, 1]")


def test_a_dispatched_chunk_receives_the_rows_its_tokens_route_here() -> None:
    """Under an all-to-all the rows a rank receives come from the tokens the
    members sent in this chunk, not from their whole layer: counted here by
    brute force from the workload's routing."""
    from scenarios.workload import rank_token_ids, route_arrays

    s = DEEPEP.with_(**{"parallel.tp": 1, "workload.tokens": [7, 5]})
    trace = simulate(s, cr.ChunkedAcrossDP)
    assert not trace.hazards
    ids, per = route_arrays(s)[0], s.local_experts
    n_chunks = -(-7 // cr.CHUNK)
    for r in range(s.world):
        got = [st.out_shape[0] for st in trace.steps[r] if st.op == "dispatch"]
        want = []
        for c in range(n_chunks):
            n = 0
            for m in range(s.world):
                d = s.coords(m)[0]
                toks = rank_token_ids(s, m)[c * cr.CHUNK:(c + 1) * cr.CHUNK]
                n += sum(1 for t in toks if r in {int(e) // per for e in ids[d][max(t, 0)]})
            want.append(n)
        assert got == want, (r, got, want)


def test_a_chunk_dispatched_with_another_chunks_routing_is_a_wrong_input_of_the_dispatch() -> None:
    assert kinds(DP_EP, cr.DispatchesChunksRoutedOnce) == {}
    found = kinds(DP_EP, cr.DispatchesChunksWithStaleRouting)
    assert list(found) == ["WRONG_INPUT"]
    assert "dispatch: dispatch sends rows d0[3:6] with the routing of rows d0[0:3]" in found["WRONG_INPUT"]


def test_chunks_of_rows_an_all_to_all_dispatched_are_refused_by_name() -> None:
    from scenarios.runners import MoERunner

    class ChunksAfterDispatch(MoERunner):
        def forward(self, ops, x):  # noqa: ANN001, ANN202 - a runner under test
            xd, rd = ops.dispatch(x, ops.router(x))
            return ops.take_rows(xd, 0, 1)

    with pytest.raises(RunnerUsageError, match="take chunks of rows before the dispatch"):
        simulate(DEEPEP, ChunksAfterDispatch)


@given(chunk=st.integers(1, 9), tokens=st.lists(st.integers(0, 8), min_size=2, max_size=2), seed=st.integers(0, 50))
@settings(max_examples=25, deadline=None)
def test_any_chunk_size_of_a_collective_chunk_loop_is_clean(chunk: int, tokens: list[int], seed: int) -> None:
    class Sized(cr.ChunkedAcrossDP):
        pass

    Sized.chunk = chunk
    hypothesis.assume(sum(tokens) > 0)
    s = TP_DP_EP.with_(**{"workload.tokens": tokens, "workload.seed": seed})
    assert kinds(s, Sized) == {}


def test_chunk_ops_misused_or_misshaped() -> None:
    from scenarios.runners import MoERunner

    class Backwards(MoERunner):
        def forward(self, ops, x):  # noqa: ANN001, ANN202 - a runner under test
            return ops.take_rows(x, 3, 1)

    class PastTheEnd(MoERunner):
        def forward(self, ops, x):  # noqa: ANN001, ANN202
            return super().forward(ops, ops.take_rows(x, 0, x.shape[0] + 1))

    class WidthsDiffer(MoERunner):
        def forward(self, ops, x):  # noqa: ANN001, ANN202
            y = super().forward(ops, x)
            return ops.cat_rows([ops.take_rows(y, 0, 1), ops.pad(ops.take_rows(y, 1, y.shape[0]), 256)])

    with pytest.raises(RunnerUsageError, match=r"rows \[3, 1\) are not a range of rows"):
        simulate(TP, Backwards)
    assert "rows [0, 9) of a tensor of 8 rows" in kinds(TP, PastTheEnd)["SHAPE_MISMATCH"][0]
    assert "parts of widths [[128], [256]]" in kinds(TP, WidthsDiffer)["SHAPE_MISMATCH"][0]


# ---------------------------------------------------------------- real ranks


@pytest.mark.slow
@pytest.mark.parametrize("s,runner", [(TP, "Chunked"), (TP_DP_EP, "ChunkedAcrossDP"), (DEEPEP, "ChunkedAcrossDP"),
                                      (DP_EP, "DispatchesChunksRoutedOnce"), (TP, "JoinsRoutingChunks")])
def test_a_correct_chunk_loop_agrees_on_real_ranks(s: Scenario, runner: str) -> None:
    from twin.check.crosscheck import check

    res = check(s, f"{RUNNERS}:{runner}", timeout_s=60)
    assert res.agree and res.divergence is None, ([v.to_dict() for v in res.verdicts], res.divergence)


@pytest.mark.slow
def test_chunk_loop_bugs_are_confirmed_on_real_ranks() -> None:
    from twin.check.crosscheck import check

    res = check(TP, f"{RUNNERS}:FirstChunkEveryTime", timeout_s=60)
    assert {(v.kind, v.verdict.value) for v in res.verdicts} == {("WRONG_TOKENS", "CONFIRMED")}
    assert res.confirmed_as_predicted
    res = check(DP_EP, f"{RUNNERS}:Chunked", timeout_s=10)
    assert [(v.kind, v.rank, v.verdict.value) for v in res.verdicts] == [("HANG", 0, "CONFIRMED")]
    # Another chunk's routing: the later chunks' rows are their tokens routed as the first chunk's.
    res = check(TP, f"{RUNNERS}:RoutesOnceStaleChunkRouting", timeout_s=60)
    wrong = [c for c in res.real.output_checks.values() if not c.correct]
    assert len(wrong) == 2 and all(c.wrong_rows == 5 for c in wrong)
    assert all("routing: d0t3 as d0t0, d0t4 as d0t1, d0t5 as d0t2, d0t6 as d0t0 (+1)" in c.cause for c in wrong)
    assert {(v.kind, v.verdict.value) for v in res.verdicts} == {(HazardKind.WRONG_INPUT.value, "CONFIRMED")}
    assert res.confirmed_as_predicted
    # The same through a dispatch: the rows travel by the stale routing on real ranks too.
    res = check(DP_EP, f"{RUNNERS}:DispatchesChunksWithStaleRouting", timeout_s=60)
    assert res.divergence is None and res.confirmed_as_predicted, ([v.to_dict() for v in res.verdicts], res.divergence)


def test_a_routing_cause_confirms_only_a_routing_hazard() -> None:
    from scenarios.trace import ROUTED_AS_OTHER, Hazard, OutputCheck, Trace
    from twin.check.verdicts import judge_characterised

    real = Trace("real", "s", "r", 1)
    real.output_checks[0] = OutputCheck(0, False, 1.0, 1.0, 1, 4, ["d0t3"], f"rank 0 row d0t3: {ROUTED_AS_OTHER}: d0t3 as d0t0",
                                        HazardKind.WRONG_INPUT.value)
    routing = Hazard(HazardKind.WRONG_INPUT, 5, "routed_experts", 0, "routed experts run rows d0[3:4] with the routing of rows d0[0:1]")
    latent = Hazard(HazardKind.WRONG_INPUT, 5, "shared_experts", 0, "shared experts input is xlat; expected the layer input x")
    assert judge_characterised(real, routing).verdict.value == "CONFIRMED"
    other = judge_characterised(real, latent)
    assert other.verdict.value == "INCONCLUSIVE" and "not the one predicted" in other.reason
