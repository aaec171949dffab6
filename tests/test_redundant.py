"""REDUNDANT_COLLECTIVE: a collective whose removal leaves every rank's
output unchanged and correct, priced by a what-if simulation and checked on
real ranks by running the runner without it."""

from pathlib import Path

import families
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.loader import catalog, load
from scenarios.runners import RUNNERS, MoERunner, unsupported_reason
from scenarios.strategies import moe_scenarios
from scenarios.whatif import Removed, removed_at, without_collective
from sim import simulate

HERE = Path(__file__).parent
KIND = "REDUNDANT_COLLECTIVE"


def _redundant(trace):
    return [h for h in trace.hazards if h.kind.value == KIND]


@pytest.mark.parametrize("scenario", [families.TP2, families.TP2_MULTI], ids=["serial", "multi-stream"])
def test_sim_predicts_the_unused_reduction(scenario):
    trace = simulate(scenario, families.SharedReducedForNothing)
    hits = _redundant(trace)
    assert {h.rank for h in hits} == {0, 1}, [str(h) for h in trace.hazards]
    assert all(h.step_name == "early_shared_all_reduce" and h.cost_us > 0 for h in hits)
    assert len(hits) == len(trace.hazards)
    # The cost is what the what-if without it saves.
    alt = simulate(scenario, without_collective(families.SharedReducedForNothing,
                                                Removed("all_reduce", "early_shared_all_reduce")), what_if=False)
    assert hits[0].cost_us == pytest.approx(trace.latency_us - alt.latency_us)


def test_needed_collectives_are_not_redundant():
    # The fixed runner's final all-reduce on the same scenario is needed.
    assert not simulate(families.TP2, "fixed").hazards


def test_not_looked_for_beside_a_correctness_hazard():
    class DropFinalAndReduceForNothing(families.SharedReducedForNothing):
        def needs_final_reduce(self, routed_reduced: bool) -> bool:
            return False

        def maybe_reduce_shared(self, ops, shared, routed_reduced):
            ops.all_reduce(shared, "tp", name="early_shared_all_reduce")
            return shared

    trace = simulate(families.TP2, DropFinalAndReduceForNothing)
    assert trace.hazards and not _redundant(trace)


@pytest.mark.parametrize("entry", catalog(), ids=lambda e: e.name)
def test_no_preset_runner_gets_it_on_the_catalog(entry):
    s = load(entry.name)
    for name, cls in RUNNERS.items():
        if unsupported_reason(cls, s) is None:  # a runner of another engine may not model it
            assert not _redundant(simulate(s, name)), name


def test_removed_at_counts_calls_of_the_same_name():
    trace = simulate(families.TP2, families.SharedReducedForNothing)
    steps = trace.steps[0]
    idx = next(st.index for st in steps if st.name == "final_all_reduce")
    assert removed_at(steps, idx) == Removed("all_reduce", "final_all_reduce", 0)


def test_without_collective_refuses_other_ops():
    with pytest.raises(ValueError, match="only all_reduce"):
        without_collective(MoERunner, Removed("dispatch", "dispatch"))


@pytest.mark.slow
def test_real_confirms_by_running_without_it():
    from twin.check.crosscheck import check

    res = check(families.TP2, f"{HERE / 'families.py'}:SharedReducedForNothing", timeout_s=120)
    assert all(c.correct for c in res.real.output_checks.values())
    vs = [v for v in res.verdicts if v.kind == KIND]
    assert {v.rank for v in vs} == {0, 1}
    assert all(v.verdict.value == "CONFIRMED" and "without it" in v.reason for v in vs), [v.to_dict() for v in vs]
    (run,) = res.whatif_runs.values()  # one real run without the collective, shared by both ranks
    assert not any(st.name == "early_shared_all_reduce" for st in run.steps[0])
    assert all(c.correct for c in run.output_checks.values()) and len(run.output_checks) == 2


@pytest.mark.slow
def test_real_refutes_when_the_output_goes_wrong_without_it():
    # The verdict rests on the real run: removing the fixed runner's final
    # all-reduce makes the output wrong, so a claim that it is redundant fails.
    from real.runner import run_real
    from scenarios.trace import Hazard, HazardKind
    from twin.check.verdicts import judge_redundant_collective

    base = run_real(families.TP2, "fixed", prediction=simulate(families.TP2, "fixed"), timeout_s=120).trace
    target = Removed("all_reduce", "final_all_reduce")
    pred = simulate(families.TP2, without_collective(RUNNERS["fixed"], target), what_if=False)
    without = run_real(families.TP2, "fixed", prediction=pred, timeout_s=120, without=target).trace
    idx = next(st.index for st in base.steps[0] if st.name == "final_all_reduce")
    claim = Hazard(HazardKind.REDUNDANT_COLLECTIVE, idx, "final_all_reduce", 0, "claimed")
    v = judge_redundant_collective(base, claim, without)
    assert v.verdict.value == "REFUTED" and "wrong" in v.reason, v.to_dict()
    assert any("what-if run" in n for n in without.notes)


@settings(max_examples=40, deadline=None)
@given(moe_scenarios(max_world=4, platforms=("cpu", "cuda", "rocm")),
       st.sampled_from(["fixed", "before-38990", families.SharedReducedForNothing]))
def test_shortcut_never_hides_a_redundant_collective(scenario, runner):
    import sim.redundant as red

    fast = [str(h) for h in _redundant(simulate(scenario, runner))]
    real_check = red.surely_needed
    red.surely_needed = lambda *_a: False  # every collective through the what-if
    try:
        slow = [str(h) for h in _redundant(simulate(scenario, runner))]
    finally:
        red.surely_needed = real_check
    assert fast == slow
