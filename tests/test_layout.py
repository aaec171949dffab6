"""Hybrid expert layout (parallel.ep_size: moe_ep x moe_tp): validation, groups,
shard labels, loads, and the simulator's verdicts on it."""

import pytest
from hypothesis import HealthCheck, given, settings

from scenarios import layout
from scenarios.loader import load, parse_toml
from scenarios.runners import MoERunner
from scenarios.spec import ParallelConfig, Scenario, ScenarioError, scenario_to_toml
from scenarios.strategies import hybrid_scenarios
from scenarios.workload import expert_loads, route_arrays
from sim import simulate
from twin.search.asserts import assert_no_hazard

TP4_EP2 = Scenario(parallel=ParallelConfig(tp=4, ep=True, ep_size=2))


def bad(**kw):
    with pytest.raises(ScenarioError) as exc:
        Scenario().with_(**kw)
    return str(exc.value)


def test_ep_size_validation_names_field_and_rule():
    assert bad(**{"parallel.tp": 4, "parallel.ep_size": 2}) == (
        "parallel.ep_size: needs expert parallelism (parallel.ep = true)")
    assert bad(**{"parallel.tp": 4, "parallel.ep": True, "parallel.ep_size": 3}) == (
        "parallel.ep_size: must divide the world tp x dp = 4, got 3")
    assert bad(**{"parallel.tp": 2, "parallel.dp": 2, "parallel.ep": True, "parallel.ep_size": 2,
                  "parallel.backend": "deepep_low_latency"}) == (
        "parallel.ep_size: deepep_low_latency routes tokens over every rank and needs ep_size = tp x dp = 4, got 2")
    assert bad(**{"parallel.tp": 4, "parallel.ep": True, "parallel.ep_size": 0}).startswith("parallel.ep_size: must be > 0")
    assert bad(**{"parallel.tp": 4, "parallel.ep": True, "parallel.ep_size": 4, "model.num_experts": 6}) == (
        "parallel.ep_size: 6 experts are not divisible by moe_ep=4")
    assert bad(**{"parallel.tp": 8, "parallel.ep": True, "parallel.ep_size": 2, "model.moe_intermediate": 10}) == (
        "parallel.ep_size: moe intermediate 10 is not divisible by moe_tp=4")
    with pytest.raises(ScenarioError, match=r"parallel\.ep_size: must be int"):
        parse_toml('[parallel]\ntp = 4\nep = true\nep_size = "2"')


def test_token_routing_backend_with_ep_size_world_is_valid():
    s = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, ep_size=4, backend="deepep_low_latency"))
    assert (s.moe_ep, s.moe_tp) == (4, 1)
    assert s == Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, backend="deepep_low_latency")).with_(
        **{"parallel.ep_size": 4})


def test_derived_and_summary_say_the_layout():
    d = TP4_EP2.derived()
    assert (d["moe_ep"], d["moe_tp"], d["ep_size"], d["local_experts"]) == (2, 2, 2, 4)
    assert "ep_size=2 (moe_ep=2 x moe_tp=2)" in TP4_EP2.summary_line()
    assert Scenario().derived()["ep_size"] is None and "ep_size" not in Scenario().summary_line()
    assert parse_toml(scenario_to_toml(TP4_EP2)) == TP4_EP2


def test_moe_groups_follow_sglang_rank_order():
    # index = ep_idx * moe_tp + tp_idx: moe_ep = same tp_idx, moe_tp = same ep_idx.
    assert [TP4_EP2.group("moe_ep", r) for r in range(4)] == [(0, 2), (1, 3), (0, 2), (1, 3)]
    assert [TP4_EP2.group("moe_tp", r) for r in range(4)] == [(0, 1), (0, 1), (2, 3), (2, 3)]
    s = Scenario(parallel=ParallelConfig(tp=2, dp=4, ep=True, ep_size=2))
    assert s.group("moe_ep", 5) == (1, 5) and s.group("moe_tp", 5) == (4, 5, 6, 7)
    assert s.group("ep", 5) == tuple(range(8))  # dispatch/combine still span the MoE group


def test_moe_groups_without_ep_size_are_todays_layout():
    ep = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, backend="deepep_low_latency"))
    assert ep.group("moe_ep", 1) == (0, 1, 2, 3) and ep.group("moe_tp", 1) == (1,)
    tp = Scenario(parallel=ParallelConfig(tp=4))
    assert tp.group("moe_tp", 1) == (0, 1, 2, 3) and tp.group("moe_ep", 1) == (1,)
    with pytest.raises(ValueError, match="moe_ep, moe_tp"):
        tp.group("moe", 0)


def test_routed_shard_labels():
    assert layout.routed_shards(TP4_EP2) == ("ep0.tp0", "ep0.tp1", "ep1.tp0", "ep1.tp1")
    # One axis only: today's labels, unchanged.
    assert layout.routed_shards(Scenario(parallel=ParallelConfig(tp=4))) == ("tp0", "tp1", "tp2", "tp3")
    ep = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, backend="deepep_low_latency"))
    assert layout.routed_shards(ep) == ("ep0", "ep1", "ep2", "ep3")
    assert layout.routed_shards(Scenario(parallel=ParallelConfig(ep=True))) == ("ep0",)
    assert layout.routed_shards(Scenario()) == ("tp0",)
    assert layout.routed_shards(Scenario(parallel=ParallelConfig(tp=2, ep=True, ep_size=1))) == ("tp0", "tp1")
    assert layout.shard_coords(TP4_EP2, "ep1.tp0") == (1, 0)


def test_sim_sources_are_sharded_on_both_axes():
    trace = simulate(TP4_EP2, "fixed")
    assert not trace.hazards
    assert trace.outputs[0] == {f"routed@ep{e}.tp{t}": 1.0 for e in (0, 1) for t in (0, 1)}


def test_expert_loads_follow_ownership():
    s = TP4_EP2.with_(**{"workload.tokens": 16})
    ids = route_arrays(s)[0][0]
    loads = expert_loads(s)
    for r in range(4):
        lo, hi = layout.expert_range(s, r // 2)
        assert loads[r][0] == int(((ids >= lo) & (ids < hi)).sum())
    assert loads[0] == loads[1] and loads[2] == loads[3]


class AllReduceOverMoeEpOnly(MoERunner):
    def final_reduce(self, ops, result, routed_reduced):
        return ops.all_reduce(result, "moe_ep", name="ep_all_reduce")


def test_missing_reduction_names_the_unsummed_group():
    trace = simulate(TP4_EP2, AllReduceOverMoeEpOnly)
    hs = {h.rank: h for h in trace.hazards if h.kind.value == "MISSING_REDUCTION"}
    assert set(hs) == {0, 1, 2, 3}
    assert hs[0].detail == ("output holds routed@ep0.tp1,ep1.tp1 coefficient 0, expected 1: "
                            "routed partials of moe_tp never summed")
    assert trace.outputs[1] == {"routed@ep0.tp0": 0.0, "routed@ep0.tp1": 1.0, "routed@ep1.tp0": 0.0, "routed@ep1.tp1": 1.0}


def test_missing_reduction_names_moe_ep_when_moe_tp_was_summed():
    class MoeTpOnly(MoERunner):
        def final_reduce(self, ops, result, routed_reduced):
            return ops.all_reduce(result, "moe_tp", name="tp_all_reduce")

    s = Scenario(parallel=ParallelConfig(tp=8, ep=True, ep_size=4))
    h = next(h for h in simulate(s, MoeTpOnly).hazards if h.rank == 5)
    assert h.detail.endswith(": routed partials of moe_ep never summed"), h.detail


def test_missing_reduction_with_nothing_summed_names_the_whole_group():
    class Drop(MoERunner):
        def needs_final_reduce(self, routed_reduced):
            return False

    s = TP4_EP2.with_(**{"model.num_shared_experts": 1})
    h = next(h for h in simulate(s, Drop).hazards if h.rank == 0)
    assert h.detail.endswith(": routed and shared partials of tp never summed"), h.detail


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hybrid_scenarios())
def test_fixed_is_clean_on_hybrid_layouts(s):
    assert layout.hybrid(s)
    assert_no_hazard("fixed", s)


def test_catalog_hybrid_entry():
    s = load("qwen3-30b-a3b-hybrid")
    assert (s.moe_ep, s.moe_tp) == (2, 2) and layout.hybrid(s)
    assert not simulate(s, "fixed").hazards



def test_real_shards_sum_to_the_exact_layer():
    import torch

    from real.model import LayerWeights, Reference
    from real.reference import ExactReference

    s = TP4_EP2.with_(**{"workload.tokens": 4, "model.num_shared_experts": 1})
    w = LayerWeights(s)
    w13, w2, offset = w.local_experts(3)  # ep1.tp1: experts 4..7, second half of the intermediate
    assert offset == 4 and w13.shape == (4, 64, 128) and w2.shape == (4, 128, 32)
    assert torch.equal(w13[0, :32], w.expert(4)[0][32:64]) and torch.equal(w2[0], w.expert(4)[1][:, 32:])
    exact, ref = ExactReference(s), Reference(s, w)
    parts = exact.routed_partials(0)
    assert sorted(parts) == ["ep0.tp0", "ep0.tp1", "ep1.tp0", "ep1.tp1"]
    assert torch.allclose(sum(parts.values()), exact.routed_kernel[0], atol=1e-9)
    for tok in range(4):
        for shard, part in parts.items():
            assert torch.allclose(ref.partial("routed", shard, 0, tok), part[tok], atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("parallel,shared", [
    ({"tp": 4, "ep": True, "ep_size": 2}, 1),
    ({"tp": 2, "dp": 2, "ep": True, "ep_size": 2}, 1),  # SP: naive gather and reduce-scatter over every rank
    ({"tp": 1, "dp": 4, "ep": True, "ep_size": 2}, 0),  # DP gather, no SP
], ids=["tp4-ep2", "tp2-dp2-ep2-sp", "dp4-ep2"])
def test_real_fixed_is_exact_on_hybrid_layouts(parallel, shared):
    from twin.check.crosscheck import check

    s = Scenario(parallel=ParallelConfig(**parallel), kernel="torch").with_(
        **{"model.num_shared_experts": shared, "workload.tokens": 4, "workload.seed": 3})
    assert layout.hybrid(s)
    res = check(s, "fixed", timeout_s=120)
    assert len(res.real.output_checks) == s.world
    assert all(c.correct for c in res.real.output_checks.values()), [c.to_dict() for c in res.real.output_checks.values()]
    assert not res.sim.hazards and not res.verdicts and res.agree


def test_hybrid_labels_sort_naturally():
    from sim import algebra

    assert algebra.group_label("routed", ["ep10.tp0", "ep2.tp1", "ep2.tp0", "ep1.tp3"]) == (
        "routed@ep1.tp3,ep2.tp0,ep2.tp1,ep10.tp0")
    assert algebra.group_label("routed", ["ep3", "ep1", "ep2", "ep0"]) == "routed@ep0..ep3"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hybrid_scenarios(dp=[1]))
def test_two_stage_reduction_is_clean_on_one_dp_rank(s):
    import families

    # Qwen3's moe_ep then moe_tp all-reduces sum every shard once, whatever the split.
    assert_no_hazard(families.Qwen3TwoReductions, s)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hybrid_scenarios())
def test_symmetric_collapse_does_not_change_hybrid_timing(s):
    from sim.engine import Simulation

    collapsed = simulate(s, "fixed")
    Simulation.collapse = False
    try:
        full = simulate(s, "fixed")
    finally:
        Simulation.collapse = True
    assert abs(collapsed.latency_us - full.latency_us) < 1e-6
    assert [str(h) for h in collapsed.hazards] == [str(h) for h in full.hazards]
