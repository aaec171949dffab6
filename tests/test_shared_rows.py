"""The shared MLP is row-wise: a runner may run it on more rows than the rank
owns (before an SP slice or attention-TP scatter, on DP-gathered rows) and
narrow its output afterwards. That is correct on every engine; rows that are
never narrowed, narrowed to another rank's tokens, or over-counted are not."""

from __future__ import annotations

from pathlib import Path

import pytest

from scenarios.spec import Scenario
from scenarios.trace import HazardKind, Verdict
from sim import simulate
from twin.check.crosscheck import check

RUNNERS = str(Path(__file__).resolve().parent / "shared_rows_runners.py")

_MODEL = {"model.hidden": 128, "model.moe_intermediate": 64, "model.num_experts": 8, "model.top_k": 2,
          "model.num_shared_experts": 1}
# SP with rows not divisible by tp (the slice pads DP rank 0's 5 rows to 6).
SP = Scenario(name="shared-rows-sp").with_(**_MODEL, **{
    "parallel.tp": 2, "parallel.dp": 2, "parallel.ep": True, "parallel.backend": "allgather_reducescatter",
    "workload.tokens": [5, 3], "workload.seed": 1})
SGLANG_SCATTERED = Scenario(name="shared-rows-sglang").with_(**_MODEL, **{
    "parallel.tp": 2, "parallel.ep": True, "parallel.backend": "deepep_high_throughput",
    "runtime.platform": "cuda", "workload.tokens": 5, "workload.seed": 12})
TRTLLM_ADP = Scenario(name="shared-rows-trtllm").with_(**_MODEL, **{
    "parallel.tp": 1, "parallel.dp": 2, "parallel.ep": True, "runtime.platform": "cuda",
    "workload.tokens": [4, 4], "workload.seed": 8})
DP_TP1 = TRTLLM_ADP.with_(**{"workload.tokens": [3, 3]})


def _kinds(scenario: Scenario, runner: str) -> set[tuple[HazardKind, int]]:
    return {(h.kind, h.rank) for h in simulate(scenario, f"{RUNNERS}:{runner}").hazards}


@pytest.mark.parametrize("scenario,runner", [(SP, "SharedOnFullThenSlice"),
                                             (SGLANG_SCATTERED, "SglangSharedFullThenSlice"),
                                             (TRTLLM_ADP, "TrtllmSharedOnGathered")])
def test_shared_experts_on_more_rows_narrowed_after_are_clean(scenario: Scenario, runner: str) -> None:
    assert SP.sp and not SGLANG_SCATTERED.sp  # the layouts the runners take their branch on
    trace = simulate(scenario, f"{RUNNERS}:{runner}")
    assert any(s.name.startswith("shared_experts_") for s in trace.steps[0])  # the probe's own branch ran
    assert not trace.hazards, [h.detail for h in trace.hazards]


def test_shared_rows_never_narrowed_are_a_shape_error() -> None:
    assert _kinds(SP, "SharedOnFullUnsliced") == {(HazardKind.SHAPE_MISMATCH, r) for r in range(4)}


def test_gathered_shared_rows_summed_world_times_are_a_double_reduction() -> None:
    assert _kinds(TRTLLM_ADP, "TrtllmSharedOnGatheredUnscaled") == {(HazardKind.DOUBLE_REDUCTION, r) for r in (0, 1)}


def test_another_dp_ranks_rows_are_a_wrong_input_naming_the_rows() -> None:
    hazards = simulate(DP_TP1, f"{RUNNERS}:SharedOnFirstDpRanksRows").hazards
    wrong = [h for h in hazards if h.kind == HazardKind.WRONG_INPUT]
    assert [h.rank for h in wrong] == [1]  # DP rank 0's first rows are its own
    assert "input is x of rows d0; expected the layer input x of rows d1 or rows containing them" in wrong[0].detail


@pytest.mark.slow
@pytest.mark.parametrize("scenario,runner", [(SP, "SharedOnFullThenSlice"), (TRTLLM_ADP, "TrtllmSharedOnGathered")])
def test_shared_experts_on_more_rows_agree_on_real_ranks(scenario: Scenario, runner: str) -> None:
    result = check(scenario, f"{RUNNERS}:{runner}", timeout_s=60)
    assert result.agree and not result.sim.hazards and not result.real.hazards


@pytest.mark.slow
def test_another_dp_ranks_rows_are_confirmed_on_real_ranks() -> None:
    result = check(DP_TP1, f"{RUNNERS}:SharedOnFirstDpRanksRows", timeout_s=60)
    assert {(v.rank, v.verdict) for v in result.verdicts} == {(1, Verdict.CONFIRMED)}
