"""Overlap and redundancy findings are measured against the runner's own
engine, judged on correct outputs only, and say when alternatives exclude
each other."""

from __future__ import annotations

from pathlib import Path

from scenarios.spec import Scenario
from scenarios.trace import Hazard, HazardKind, OutputCheck, Step, Trace, Verdict
from sim import simulate
from twin.check.verdicts import judge_lost_overlap, judge_missing_stream

RUNNERS = str(Path(__file__).resolve().parent / "stream_runners.py")

_MODEL = {"model.hidden": 128, "model.moe_intermediate": 64, "model.num_experts": 8, "model.top_k": 2,
          "model.num_shared_experts": 1}
DP_ATTN_AUX = Scenario(name="stream-dp-attention").with_(**_MODEL, **{
    "parallel.tp": 2, "parallel.dp": 2, "runtime.platform": "cuda", "runtime.aux_stream": True,
    "workload.tokens": [4, 3], "workload.seed": 6})
SCATTERED = DP_ATTN_AUX.with_(**{"parallel.ep": True, "parallel.backend": "deepep_high_throughput",
                                 "workload.tokens": [5, 3], "workload.seed": 12})


def test_a_lost_overlap_is_measured_against_the_engines_own_program() -> None:
    # vLLM's program is slower than this one here: against it nothing was lost.
    lost = [h for h in simulate(DP_ATTN_AUX, f"{RUNNERS}:SglangJoinsAtOnce").hazards
            if h.kind == HazardKind.LOST_OVERLAP]
    assert lost and all("with the sglang runner" in h.detail for h in lost)


def test_redundant_alternatives_say_they_cannot_all_go() -> None:
    found = [h for h in simulate(SCATTERED, f"{RUNNERS}:SglangGathersTwice").hazards
             if h.kind == HazardKind.REDUNDANT_COLLECTIVE]
    assert {h.step_name for h in found} == {"attn_tp_all_gather", "extra_all_gather"}
    assert all("but not all of attn_tp_all_gather, extra_all_gather at once" in h.detail for h in found)
    alone = [h for h in simulate(SCATTERED, "sglang").hazards if h.kind == HazardKind.REDUNDANT_COLLECTIVE]
    assert not alone


def _real(correct: bool) -> Trace:
    real = Trace("real", "s", "r", 1)
    real.steps[0] = [Step(0, 0, "shared_experts", "shared", stream="aux")]
    real.output_checks[0] = OutputCheck(0, correct, 0.0 if correct else 1.0, 0.0 if correct else 1.0,
                                        0 if correct else 4, 4, [], "" if correct else "wrong", None, None)
    return real


def test_a_lost_overlap_on_a_wrong_output_is_not_confirmed() -> None:
    h = Hazard(HazardKind.LOST_OVERLAP, 0, "shared", 0, "serial")
    assert judge_lost_overlap(_real(True), h, {0: 50.0}, 100.0, 3).verdict == Verdict.CONFIRMED
    item = judge_lost_overlap(_real(False), h, {0: 50.0}, 100.0, 3)
    assert item.verdict == Verdict.INCONCLUSIVE and "judged on a correct output only" in item.reason


def test_a_missing_stream_verdict_does_not_claim_a_crash_for_every_engine() -> None:
    sim = Trace("sim", "s", "r", 1)
    sim.steps[0] = [Step(0, 0, "shared_experts", "shared", stream="aux")]
    h = Hazard(HazardKind.MISSING_STREAM, 0, "shared", 0, "serialises")
    reason = judge_missing_stream(sim, _real(True), h).reason
    assert "the crash is the engine's" not in reason and "a crash, or running both halves serially" in reason
