"""model.quantized_input: the routed kernel quantizes its input into a new
buffer, so an in-place routed kernel never overwrites the shared experts'
input. Sim and real agree, and the wrong variant that needs the shared input
intact is caught without the flag and clean with it."""

from pathlib import Path

import families
import pytest

from scenarios.runners import FixedRunner, Order
from scenarios.spec import ScenarioError, scenario_from_dict
from sim import simulate

HERE = Path(__file__).parent
Q_TP2 = families.TP2.with_(**{"model.quantized_input": True})
Q_TP2_MULTI = families.TP2_MULTI.with_(**{"model.quantized_input": True})


def _spec(cls: type) -> str:
    return f"{HERE / 'families.py'}:{cls.__name__}"


def _names(trace, rank=0):
    return [st.name for st in trace.steps[rank] if st.op in ("quantize", "experts", "shared_experts")]


def test_fixed_goes_in_place_only_with_its_own_copy():
    assert not FixedRunner(families.TP2).routed_inplace(Order.NO_OVERLAP)
    assert FixedRunner(Q_TP2).routed_inplace(Order.NO_OVERLAP)


@pytest.mark.parametrize("scenario", [Q_TP2, Q_TP2_MULTI], ids=["serial", "multi-stream"])
def test_sim_fixed_in_place_on_quantized_copy_is_clean(scenario):
    trace = simulate(scenario, "fixed")
    assert not trace.hazards, [str(h) for h in trace.hazards]
    names = _names(trace)
    assert names.index("quantize_routed_input") + 1 == names.index("routed_experts")
    assert all(abs(c - 1.0) < 1e-9 for coeffs in trace.outputs.values() for c in coeffs.values())


def test_sim_shared_after_inplace_routed_needs_the_flag():
    without = simulate(families.TP2, families.SharedAfterInplaceRouted)
    assert {h.rank for h in without.hazards if h.kind.value == "WRONG_INPUT"} == {0, 1}
    with_flag = simulate(Q_TP2, families.SharedAfterInplaceRouted)
    assert not with_flag.hazards, [str(h) for h in with_flag.hazards]


def test_quantized_input_must_be_bool():
    with pytest.raises(ScenarioError, match="model.quantized_input"):
        scenario_from_dict({"model": {"quantized_input": "yes"}})


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["fixed", families.SharedAfterInplaceRouted], ids=["fixed", "shared-after"])
def test_real_in_place_on_quantized_copy_is_correct(runner):
    from twin.check.crosscheck import check

    res = check(Q_TP2, runner if isinstance(runner, str) else _spec(runner), timeout_s=120)
    checks = res.real.output_checks
    assert len(checks) == 2 and all(c.correct for c in checks.values()), [c.to_dict() for c in checks.values()]
    assert res.agree and not res.verdicts, [v.to_dict() for v in res.verdicts]
    quant = [st for st in res.real.steps[0] if st.name == "quantize_routed_input"]
    assert quant and "stands in for the fp8 quantization" in quant[0].detail
    assert any("quantize_routed_input" in n for n in res.real.notes), res.real.notes
