"""Verdicts when faults are not alone or not uniform: a fault on some rows
only, a second fault upstream of the first, a row loss beside an over-count."""

from __future__ import annotations

from pathlib import Path

import pytest

from scenarios.spec import Scenario
from scenarios.trace import Hazard, HazardKind, OutputCheck, Step, Trace, Verdict
from sim import simulate
from twin.check.crosscheck import check
from twin.check.verdicts import judge_reduction

RUNNERS = str(Path(__file__).resolve().parent / "compound_runners.py")

_MODEL = {"model.hidden": 128, "model.moe_intermediate": 64, "model.num_experts": 8, "model.top_k": 2,
          "model.num_shared_experts": 1}
TP = Scenario(name="compound-tp").with_(**_MODEL, **{
    "parallel.tp": 2, "runtime.platform": "cuda", "workload.tokens": 6, "workload.seed": 4})
RSF = TP.with_(**{"model.routed_scaling_factor": 2.5, "workload.seed": 3})
SP = Scenario(name="compound-sp").with_(**_MODEL, **{
    "parallel.tp": 2, "parallel.dp": 2, "parallel.ep": True, "parallel.backend": "allgather_reducescatter",
    "workload.tokens": [5, 3], "workload.seed": 1})


def _hazards(scenario: Scenario, runner: str) -> dict[tuple[str, int], str]:
    return {(h.kind.value, h.rank): h.detail for h in simulate(scenario, f"{RUNNERS}:{runner}").hazards}


def test_rows_lacking_a_source_are_missing_although_other_rows_over_count_it() -> None:
    found = _hazards(RSF, "LastRowDroppedScaledTwice")
    assert set(found) == {(k, r) for k in ("MISSING_REDUCTION", "DOUBLE_REDUCTION") for r in (0, 1)}
    assert found[("MISSING_REDUCTION", 0)].endswith("routed@tp0,tp1 coefficient 0, expected 1 in rows [d0t5]")


def test_a_coefficient_is_never_printed_rounded_onto_the_expected_one() -> None:
    found = _hazards(RSF, "RoutedNudged")
    assert "routed@tp0 coefficient 1.0000001, expected 1" in found[("DOUBLE_REDUCTION", 0)]


def test_an_unexplained_fit_at_the_step_neither_confirms_nor_refutes() -> None:
    sim, real = Trace("sim", "s", "r", 1), Trace("real", "s", "r", 1)
    sim.steps[0] = [Step(0, i, "add", f"s{i}") for i in range(3)]
    real.steps[0] = [Step(0, i, "add", f"s{i}") for i in range(3)]
    real.output_checks[0] = OutputCheck(0, False, 1.0, 1.0, 4, 4, [], "wrong", "WRONG_INPUT", None)
    h = Hazard(HazardKind.DOUBLE_REDUCTION, 2, "s2", 0, "shared coefficient 2, expected 1")
    real.steps[0][2].value, real.steps[0][2].residual = {"shared@tp0": 1.3}, 0.23
    assert judge_reduction(sim, real, h, 1.0).verdict == Verdict.INCONCLUSIVE
    real.steps[0][2].residual = 1e-7  # explained, with other coefficients than predicted
    assert judge_reduction(sim, real, h, 1.0).verdict == Verdict.REFUTED


@pytest.mark.slow
def test_a_fault_in_some_rows_is_confirmed_on_every_rank_it_reaches() -> None:
    result = check(SP, f"{RUNNERS}:PadSliceRankDoublesShared", timeout_s=60)
    assert {(v.kind, v.verdict) for v in result.verdicts} == {("DOUBLE_REDUCTION", Verdict.CONFIRMED)}
    assert {v.rank for v in result.verdicts} == {0, 1, 2, 3} and result.divergence is None


@pytest.mark.slow
def test_a_reduction_after_a_wrong_input_is_not_refuted_by_it() -> None:
    result = check(TP, f"{RUNNERS}:ClobberedSharedReducedTwice", timeout_s=60)
    got = {(v.kind, v.verdict) for v in result.verdicts}
    assert got == {("WRONG_INPUT", Verdict.CONFIRMED), ("DOUBLE_REDUCTION", Verdict.INCONCLUSIVE)}


@pytest.mark.slow
def test_a_row_loss_beside_an_over_count_is_confirmed_with_it() -> None:
    result = check(RSF, f"{RUNNERS}:LastRowDroppedScaledTwice", timeout_s=60)
    assert {(v.kind, v.verdict) for v in result.verdicts} == {
        ("MISSING_REDUCTION", Verdict.CONFIRMED), ("DOUBLE_REDUCTION", Verdict.CONFIRMED)}
    # No one fit explains rows that went wrong in two ways: each is named with its rows.
    cause = result.real.output_checks[0].cause
    assert "routed@tp0,tp1 coefficient 2.5 (expected 1); row d0t5: routed@tp0,tp1 coefficient 0" in cause, cause
