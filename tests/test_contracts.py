"""Kernel/transform contracts (trim past the width, view, backend hidden
rounding, kernels writing unpadded output) and the backend name and version
rules: unit tests, simulator predictions, and real ranks against the exact
float64 reference."""

from pathlib import Path

import contract_families as cf
import pytest

from scenarios.backends import BACKENDS, backend_info, rounded_hidden, sp_backends
from scenarios.loader import catalog, load, parse_toml
from scenarios.ops import view_shape
from scenarios.runners import MoERunner, reference_order
from scenarios.spec import Scenario, ScenarioError, scenario_from_dict, scenario_to_toml
from scenarios.trace import Verdict
from sim import simulate
from sim.errors import RunnerUsageError

HERE = Path(__file__).parent


def _spec(cls: type) -> str:
    return f"{HERE / 'contract_families.py'}:{cls.__name__}"


# ---- trim and view ----


class TrimPastWidth(MoERunner):
    def post_trim_width(self) -> int | None:
        return self.scenario.model.hidden + 8


def test_trim_past_the_width_is_a_shape_error_in_the_sim():
    s = Scenario().with_(**{"parallel.tp": 2})
    hits = [h for h in simulate(s, TrimPastWidth).hazards if h.kind.value == "SHAPE_MISMATCH"]
    assert {h.rank for h in hits} == {0, 1}
    assert hits[0].step_name == "post_trim" and "cannot trim width 128 to 136" in hits[0].detail


def test_view_shape_follows_torch():
    assert view_shape((4, 6), (4, 6)) == ((4, 6), None)
    assert view_shape((4, 6), (4, -1)) == ((4, 6), None)
    assert view_shape((4, 6), (-1, 6)) == ((4, 6), None)
    assert "invalid for input of size 24" in view_shape((4, 6), (4, 5))[1]
    assert "invalid for input of size 24" in view_shape((4, 6), (-1, 5))[1]
    assert "only one dimension can be inferred" in view_shape((4, 6), (-1, -1))[1]


class ViewKeepsRows(MoERunner):
    def final_reduce(self, ops, result, routed_reduced):  # noqa: ANN001, ANN201
        return ops.view(super().final_reduce(ops, result, routed_reduced), (result.shape[0], -1))


class ViewChangesRows(MoERunner):
    def final_reduce(self, ops, result, routed_reduced):  # noqa: ANN001, ANN201
        return ops.view(super().final_reduce(ops, result, routed_reduced), (-1, result.shape[1] // 2))


def test_view_keeping_rows_is_clean_and_row_changing_view_is_named():
    s = Scenario().with_(**{"parallel.tp": 2})
    trace = simulate(s, ViewKeepsRows)
    assert not trace.hazards and all(c == 1.0 for o in trace.outputs.values() for c in o.values())
    # A misuse of the interface (the twin cannot track it), named, not a finding.
    with pytest.raises(RunnerUsageError, match="changes the row count"):
        simulate(s, ViewChangesRows)


# ---- backend hidden-size rounding ----


def test_rounding_rules():
    assert rounded_hidden("deepep_high_throughput", 2880) == 3072  # 5760 bytes -> 6144
    assert rounded_hidden("deepep_v2", 120) == 256
    assert rounded_hidden("deepep_high_throughput", 2048) == 2048
    assert rounded_hidden("deepep_low_latency", 2880) == 3072
    assert rounded_hidden("nixl_ep", 128) == 2048
    assert rounded_hidden("deepep_low_latency", 7168) == 7168
    assert rounded_hidden("nixl_ep", 8193) is None
    for b in ("allgather_reducescatter", "mori", "moonep", "flashinfer_nvlink_one_sided"):
        assert rounded_hidden(b, 2880) is None


def test_rounding_only_with_all2all_kernels_and_wider_of_model_and_backend():
    s = cf.DEEPEP_HT_120
    assert s.use_all2all_kernels and s.backend_width == 256 and s.kernel_width == 256 and s.padded
    assert not s.model.padded  # the model itself asks for no padding
    no_a2a = s.with_(**{"parallel.dp": 1})
    assert not no_a2a.use_all2all_kernels and no_a2a.kernel_width == 120 and not no_a2a.padded
    wider_model = s.with_(**{"model.moe_hidden": 384})
    assert wider_model.kernel_width == 384
    d = s.derived()
    assert d["kernel_width"] == 256 and d["backend_kernel_width"] == 256 and d["padded"] is True


def test_too_wide_for_low_latency_is_a_scenario_error():
    with pytest.raises(ScenarioError, match=r"model.hidden: width 8200 exceeds the largest size deepep_low_latency"):
        Scenario().with_(**{"model.hidden": 8200, "parallel.dp": 2, "parallel.ep": True,
                            "parallel.backend": "deepep_low_latency"})
    # Without the all-to-all kernels the backend's limit does not apply.
    Scenario().with_(**{"model.hidden": 8200, "parallel.ep": True, "parallel.backend": "deepep_low_latency"})


def test_catalog_scenarios_whose_kernel_width_the_backend_changes():
    changed = sorted(e.name for e in catalog() if load(e.name).kernel_width != load(e.name).model.kernel_width)
    assert changed == ["r1-sp-deepep", "r5-eplb-deepep-ll"]


def test_fixed_pads_for_the_backend_and_is_clean():
    for s in (cf.DEEPEP_HT_120, cf.DEEPEP_HT_120_SHARED):
        trace = simulate(s, "fixed")
        assert not trace.hazards, [str(h) for h in trace.hazards]
        pads = [st for st in trace.steps[0] if st.name == "pad_routed_input"]
        assert pads and pads[0].out_shape == (4, 256)


# ---- kernels writing unpadded output ----


def test_writes_unpadded_round_trips_and_defaults_off():
    s = cf.UNPADDED_TP2
    text = scenario_to_toml(s)
    assert "kernel_writes_unpadded = true" in text and 'kernel = "auto"' in text
    back = parse_toml(text)
    assert back == s and back.to_dict()["kernel_writes_unpadded"] is True
    assert scenario_from_dict(s.to_dict()) == s
    assert "kernel_writes_unpadded" not in scenario_to_toml(Scenario())
    with pytest.raises(ScenarioError, match="kernel_writes_unpadded: must be bool"):
        scenario_from_dict({"kernel_writes_unpadded": "yes"})


@pytest.mark.parametrize("s", [cf.UNPADDED_TP2, cf.UNPADDED_SHARED_TP2], ids=lambda s: s.name)
def test_fixed_does_not_trim_what_is_already_unpadded(s):
    trace = simulate(s, "fixed")
    assert not trace.hazards, [str(h) for h in trace.hazards]
    experts = next(st for st in trace.steps[0] if st.op == "experts")
    assert experts.in_shapes[0] == (4, 128) and experts.out_shape == (4, 120)
    assert not [st for st in trace.steps[0] if st.op == "trim"]
    boundary = next(st for st in trace.steps[0] if st.op == "boundary")
    assert boundary.out_shape == (4, 120)


# ---- backend names and version rules ----


def test_new_backend_names():
    for b in ("mori_high_throughput", "mori_low_latency", "moonep", "mori"):
        assert b in BACKENDS and backend_info(b).token_routing and backend_info(b).output_is_reduced
    assert "moonep" not in sp_backends("newest") and "moonep" not in sp_backends("previous")
    assert {"mori_high_throughput", "mori_low_latency"} <= sp_backends("newest")


def test_version_and_eplb_rules():
    with pytest.raises(ScenarioError, match=r"^parallel.backend: deepep_v2 exists in the newest version only"):
        Scenario().with_(**{"parallel.dp": 2, "parallel.ep": True, "parallel.backend": "deepep_v2",
                            "parallel.version": "previous"})
    with pytest.raises(ScenarioError, match=r"^parallel.eplb: EPLB needs more than one rank"):
        Scenario().with_(**{"parallel.ep": True, "parallel.eplb": True})


def test_token_routing_backend_without_ep_is_ignored():
    s = Scenario().with_(**{"parallel.dp": 2, "parallel.backend": "moonep"})
    assert s.parallel.backend_ignored and s.effective_backend == "allgather_reducescatter"
    assert Scenario().with_(**{"parallel.backend": "nixl_ep"}).effective_backend == "none"
    assert not Scenario().with_(**{"parallel.dp": 2}).parallel.backend_ignored


def test_eplb_overlap_decided_on_the_configured_backend():
    s = cf.EPLB_DP1
    assert s.effective_backend == "none"
    assert reference_order(s, 4).value == "NO_OVERLAP"
    assert reference_order(s.with_(**{"parallel.eplb": False}), 4).value == "MULTI_STREAM_OVERLAPPED"


def test_forbidden_overlap_names_the_configured_backend():
    h = simulate(cf.EPLB_DP1, cf.EplbOnEffectiveBackend).hazards[0]
    assert "EPLB is on and deepep_low_latency is not EPLB-overlap safe" in h.detail


def test_pre_transform_reduce_is_newest_only():
    s = cf.NONLINEAR_LATENT_TP2
    assert MoERunner(s).needs_pre_transform_reduce(False)
    assert not MoERunner(s).needs_pre_transform_reduce(True)
    prev = s.with_(**{"parallel.version": "previous"})
    assert not MoERunner(prev).needs_pre_transform_reduce(False)
    # The previous version transforms partial sums: the fixed runner models it, wrong.
    hits = [h for h in simulate(prev, "fixed").hazards if h.kind.value == "MISSING_REDUCTION"]
    assert hits and hits[0].step_name == "latent_up"
    assert not simulate(s, "fixed").hazards


# ---- wrong variants: predicted, then confirmed on real ranks ----


@pytest.mark.parametrize("cls,scenario,kind,step,ranks", cf.WRONG, ids=lambda x: getattr(x, "__name__", None))
def test_sim_predicts_the_wrong_variant(cls, scenario, kind, step, ranks):
    trace = simulate(scenario, cls)
    hits = [h for h in trace.hazards if h.kind.value == kind]
    assert {h.rank for h in hits} == set(ranks), [str(h) for h in trace.hazards]
    assert hits[0].step_name == step
    assert not simulate(scenario, "fixed").hazards


@pytest.mark.slow
@pytest.mark.parametrize("cls,scenario,kind,step,ranks", cf.WRONG[:4], ids=lambda x: getattr(x, "__name__", None))
def test_real_confirms_the_wrong_variant(cls, scenario, kind, step, ranks):
    from twin.check.crosscheck import check

    res = check(scenario, _spec(cls), timeout_s=120)
    vs = [v for v in res.verdicts if v.kind == kind]
    assert vs and all(v.verdict == Verdict.CONFIRMED for v in vs), [v.to_dict() for v in res.verdicts]
    assert {v.rank for v in vs} == set(ranks)
    assert not res.agree
    if kind == "SHAPE_MISMATCH":  # the real ranks raised the same exception type at the same step
        assert all("OpsShapeError" in v.reason or step in v.reason for v in vs), [v.reason for v in vs]
    for v in vs:
        if v.rank in res.real.output_checks:
            assert not res.real.output_checks[v.rank].correct


@pytest.mark.slow
def test_real_eplb_on_effective_backend_is_not_confirmed_on_correct_outputs():
    from twin.check.crosscheck import check

    cls, scenario = cf.EplbOnEffectiveBackend, cf.EPLB_DP1
    res = check(scenario, _spec(cls), timeout_s=120)
    assert all(c.correct for c in res.real.output_checks.values())
    assert not any(v.verdict == Verdict.CONFIRMED for v in res.verdicts), [v.to_dict() for v in res.verdicts]


@pytest.mark.slow
@pytest.mark.parametrize("s", [cf.DEEPEP_HT_120, cf.DEEPEP_HT_120_SHARED, cf.UNPADDED_TP2, cf.UNPADDED_SHARED_TP2],
                         ids=lambda s: s.name)
def test_real_fixed_matches_the_reference(s):
    from twin.check.crosscheck import check

    res = check(s, "fixed", timeout_s=120)
    assert len(res.real.output_checks) == s.world
    assert all(c.correct for c in res.real.output_checks.values()), [c.to_dict() for c in res.real.output_checks.values()]
    assert res.agree and not res.verdicts


@pytest.mark.slow
def test_real_confirms_the_previous_version_nonlinear_transform():
    from twin.check.crosscheck import check

    s = cf.NONLINEAR_LATENT_TP2.with_(**{"parallel.version": "previous"})
    res = check(s, "fixed", timeout_s=120)
    vs = [v for v in res.verdicts if v.kind == "MISSING_REDUCTION"]
    assert vs and all(v.verdict == Verdict.CONFIRMED for v in vs), [v.to_dict() for v in res.verdicts]
    assert not any(c.correct for c in res.real.output_checks.values())
