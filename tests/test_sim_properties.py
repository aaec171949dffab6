"""Hypothesis properties of the simulator over generated scenarios."""

from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.runners import BEFORE_RUNNERS
from scenarios.strategies import moe_scenarios
from sim import simulate
from twin.search.asserts import assert_no_hazard


@given(moe_scenarios())
@settings(max_examples=300)
def test_fixed_runner_predicts_no_hazard(s):
    assert_no_hazard("fixed", s)


@given(moe_scenarios())
@settings(max_examples=150)
def test_fixed_output_reduced_exactly_once(s):
    trace = simulate(s, "fixed")
    assert set(trace.outputs) == set(range(s.world))
    for r, coeffs in trace.outputs.items():
        if s.rank_rows(r) == 0:  # an idle DP rank: no row holds any source
            assert coeffs == {}
            continue
        assert coeffs and all(abs(c - 1.0) < 1e-9 for c in coeffs.values()), coeffs
        assert any(label.startswith("routed@") for label in coeffs)
        assert any(label.startswith("shared@") for label in coeffs) == s.model.has_shared


@given(moe_scenarios(), st.sampled_from(BEFORE_RUNNERS))
@settings(max_examples=150)
def test_before_runners_never_crash_the_simulator(s, runner):
    trace = simulate(s, runner)
    assert trace.world == s.world
    for h in trace.hazards:
        assert 0 <= h.rank < s.world and h.step >= 0 and h.detail


@given(moe_scenarios(), st.sampled_from(("fixed",) + BEFORE_RUNNERS))
@settings(max_examples=80)
def test_symmetric_collapse_does_not_change_timing(s, runner):
    from sim.engine import Simulation

    collapsed = simulate(s, runner)
    Simulation.collapse = False
    try:
        full = simulate(s, runner)
    finally:
        Simulation.collapse = True
    assert abs(collapsed.latency_us - full.latency_us) < 1e-6
    for r in range(s.world):
        for a, b in zip(collapsed.steps[r], full.steps[r]):
            assert (a.name, round(a.start, 6), round(a.end, 6)) == (b.name, round(b.start, 6), round(b.end, 6))
    assert [str(h) for h in collapsed.hazards] == [str(h) for h in full.hazards]
