"""Verdict rules on hand-made traces (no ranks): reality decides."""

from hypothesis import given
from hypothesis import strategies as st

from scenarios.trace import Hazard, HazardKind, OutputCheck, Step, Trace, Verdict
from twin.check.verdicts import (
    judge_characterised,
    judge_failure,
    judge_lost_overlap,
    judge_reduction,
    output_summary,
    unpredicted,
)

KINDS = list(HazardKind)


def _traces(correct: bool, fit: dict[str, float] | None = None, kind: str | None = None):
    sim = Trace("sim", "s", "r", 2)
    real = Trace("real", "s", "r", 2)
    for r in (0, 1):
        sim.steps[r] = [Step(r, 0, "all_reduce", "final_all_reduce"), Step(r, 1, "layer_output", "layer_output")]
        real.steps[r] = [Step(r, 0, "all_reduce", "final_all_reduce", value=fit, residual=0.0 if fit else None),
                         Step(r, 1, "layer_output", "layer_output")]
        real.output_checks[r] = OutputCheck(r, correct, 1e-7 if correct else 0.5, 1e-7 if correct else 1.0,
                                            0 if correct else 4, 4, [], "" if correct else "routed doubled",
                                            None if correct else kind)
    return sim, real


def _with_value(sim: Trace, coeff: float) -> Trace:
    from sim import algebra

    terms = ((("routed", "tp0", None), coeff), (("routed", "tp1", None), coeff))
    v = algebra.Value((algebra.Block("d0", 4, terms),))
    sim.values = {0: {0: v}, 1: {0: v}}
    return sim


def test_reduction_confirmed_only_on_wrong_output_with_matching_fit():
    sim, real = _traces(False, {"routed@tp0": 2.0, "routed@tp1": 2.0}, "DOUBLE_REDUCTION")
    _with_value(sim, 2.0)
    h = Hazard(HazardKind.DOUBLE_REDUCTION, 0, "final_all_reduce", 0, "routed coefficient 2")
    assert judge_reduction(sim, real, h, 1.0).verdict == Verdict.CONFIRMED


def test_reduction_refuted_on_correct_output_even_if_fit_agrees():
    # The fit at the step says what the simulator predicted, but the output is right:
    # reality wins (the scale-then-sum idiom once came back CONFIRMED this way).
    sim, real = _traces(True, {"routed@tp0": 2.0, "routed@tp1": 2.0})
    _with_value(sim, 2.0)
    h = Hazard(HazardKind.DOUBLE_REDUCTION, 0, "final_all_reduce", 0, "routed coefficient 2")
    v = judge_reduction(sim, real, h, 1.0)
    assert v.verdict == Verdict.REFUTED and "exact reference" in v.reason


def test_reduction_wrong_output_but_other_coefficients_is_refuted():
    sim, real = _traces(False, {"routed@tp0": 1.5, "routed@tp1": 1.5}, "WRONG_INPUT")
    _with_value(sim, 2.0)
    h = Hazard(HazardKind.DOUBLE_REDUCTION, 0, "final_all_reduce", 0, "routed coefficient 2")
    v = judge_reduction(sim, real, h, 1.0)
    assert v.verdict == Verdict.REFUTED and "predicted" in v.reason


@given(st.sampled_from(KINDS), st.booleans(), st.integers(0, 1))
def test_never_confirmed_on_a_correct_output(kind, with_fit, step):
    """Whatever the hazard and whatever any fit says, a rank whose output
    equals the reference gets no CONFIRMED (LOST_OVERLAP is about time)."""
    sim, real = _traces(True, {"routed@tp0": 2.0} if with_fit else None)
    _with_value(sim, 2.0)
    h = Hazard(kind, step, "x", 0, "d")
    if kind in (HazardKind.DOUBLE_REDUCTION, HazardKind.MISSING_REDUCTION):
        v = judge_reduction(sim, real, h, 1.0)
    elif kind in (HazardKind.WRONG_TOKENS, HazardKind.WRONG_INPUT):
        v = judge_characterised(real, h)
    elif kind in (HazardKind.SHAPE_MISMATCH, HazardKind.RUNNER_ERROR, HazardKind.HANG):
        v = judge_failure(sim, real, h)
    else:
        return
    assert v.verdict != Verdict.CONFIRMED


def test_characterised_kinds():
    _sim, real = _traces(False, None, "WRONG_TOKENS")
    h = Hazard(HazardKind.WRONG_TOKENS, 1, "layer_output", 1, "padding row")
    assert judge_characterised(real, h).verdict == Verdict.CONFIRMED
    h2 = Hazard(HazardKind.WRONG_INPUT, 1, "shared_experts", 1, "latent")
    assert judge_characterised(real, h2).verdict == Verdict.REFUTED
    real.output_checks[1].kind = None
    assert judge_characterised(real, h2).verdict == Verdict.INCONCLUSIVE


def test_failure_same_class_same_step():
    sim, real = _traces(False, None, None)
    real.hazards.append(Hazard(HazardKind.SHAPE_MISMATCH, 1, "layer_output", 0, "raised OpsShapeError"))
    h = Hazard(HazardKind.SHAPE_MISMATCH, 1, "layer_output", 0, "layer output [4, 96]")
    assert judge_failure(sim, real, h).verdict == Verdict.CONFIRMED
    # A runner error of another class at the same step is not "the same failure".
    real.hazards[0] = Hazard(HazardKind.RUNNER_ERROR, 1, "layer_output", 0, "raised ZeroDivisionError")
    assert judge_failure(sim, real, h).verdict == Verdict.REFUTED


def test_unpredicted_wrong_output_and_consequences():
    sim, real = _traces(False, None, "WRONG_TOKENS")
    real.hazards.append(Hazard(HazardKind.WRONG_TOKENS, 1, "layer_output", 1, "padding row instead of d0t0"))
    real.hazards.append(Hazard(HazardKind.RUNNER_ERROR, 0, "final_all_reduce", 0, "Connection closed", caused_by=1))
    items = unpredicted(sim, real)
    ranks = {(v.kind, v.rank) for v in items}
    assert ("WRONG_TOKENS", 1) in ranks
    # Rank 0's failure is a consequence of rank 1's: not a finding of its own.
    assert not any(v.rank == 0 for v in items)
    # A wrong output that no real hazard names is still listed.
    real.hazards.clear()
    assert {(v.kind, v.rank) for v in unpredicted(sim, real)} == {("WRONG_TOKENS", 0), ("WRONG_TOKENS", 1)}
    assert all(v.verdict == Verdict.UNPREDICTED for v in items)
    assert "WRONG" in output_summary(real)


def test_lost_overlap_says_it_is_about_time():
    _sim, real = _traces(True)
    real.overlap_us = {0: 0.0}
    h = Hazard(HazardKind.LOST_OVERLAP, 0, "shared_experts", 0, "serial")
    v = judge_lost_overlap(real, h, {0: 120.0}, 1000.0, 3)
    assert v.verdict == Verdict.CONFIRMED and "performance hazard" in v.reason


def test_predicted_hang_confirmed_by_a_consequence_hang():
    # Rank 1 raises, rank 0 waits for it forever: the simulator predicts both.
    sim, real = _traces(False, None, None)
    real.hazards.append(Hazard(HazardKind.HANG, 0, "final_all_reduce", 0, "timed out", caused_by=1))
    h = Hazard(HazardKind.HANG, 0, "final_all_reduce", 0, "waits in all_reduce")
    assert judge_failure(sim, real, h).verdict == Verdict.CONFIRMED


def test_agree_is_never_said_over_a_wrong_output():
    from scenarios.spec import Scenario
    from twin.check.crosscheck import CheckResult
    from twin.check.verdicts import VerdictItem

    sim, real = _traces(False, None, "WRONG_TOKENS")
    res = CheckResult(Scenario(), sim, real)
    assert not res.agree and not res.confirmed_as_predicted  # wrong, nothing predicted or confirmed
    res.verdicts = [VerdictItem("WRONG_TOKENS", Verdict.CONFIRMED, "x", 1, r) for r in (0, 1)]
    assert not res.agree and res.confirmed_as_predicted
    _sim, ok = _traces(True)
    assert CheckResult(Scenario(), sim, ok).agree


def test_reduction_not_confirmed_without_a_judged_output():
    # A fit that matches the prediction is no claim about reality on its own.
    sim, real = _traces(False, {"routed@tp0": 2.0, "routed@tp1": 2.0}, "DOUBLE_REDUCTION")
    _with_value(sim, 2.0)
    real.output_checks.clear()
    h = Hazard(HazardKind.DOUBLE_REDUCTION, 0, "final_all_reduce", 0, "routed coefficient 2")
    assert judge_reduction(sim, real, h, 1.0).verdict == Verdict.INCONCLUSIVE
