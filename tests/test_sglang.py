"""The SGLang MoE block reference runner: clean on its layouts (sim and, for
world <= 4, real against the exact reference), its communicator ops
(dp_gather, dp_scatter) in the algebra, what it refuses, and its wrong
variants predicted with the right kind and confirmed on real ranks."""

from pathlib import Path

import families_sglang as F
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scenarios.runners import RUNNERS, RunnerUnsupported, SGLangRunner, unsupported_reason
from scenarios.sglang import dp_max_len, moe_rows, reference_order
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, Workload
from scenarios.strategies import hybrid_scenarios, moe_scenarios
from sim import simulate

HERE = Path(__file__).parent


def _names(trace, rank=0):
    return [st.name for st in trace.steps[rank]]


def test_registered_as_a_preset():
    assert RUNNERS["sglang"] is SGLangRunner


@pytest.mark.parametrize("s", F.CLEAN, ids=lambda s: s.name)
def test_clean_on_each_path_in_sim(s):
    trace = simulate(s, "sglang")
    assert not trace.hazards, [str(h) for h in trace.hazards]
    assert all(abs(c - 1.0) < 1e-9 for coeffs in trace.outputs.values() for c in coeffs.values())


def test_paths_issue_the_engines_collectives():
    full = _names(simulate(F.DS_TP2, "sglang"))
    assert "post_experts_all_reduce" in full and "dp_gather" not in full
    rsv = simulate(F.DS_DPATTN_RSV, "sglang")
    assert {"dp_gather", "dp_reduce_scatterv"} <= set(_names(rsv)) and "post_experts_all_reduce" not in _names(rsv)
    attn_tp2 = _names(simulate(F.DS_DPATTN_ATTN_TP2, "sglang"))
    assert attn_tp2.index("post_experts_all_reduce") < attn_tp2.index("dp_scatter")
    deepep = _names(simulate(F.DS_DPATTN_DEEPEP, "sglang"))
    assert {"attn_tp_scatter", "dispatch", "combine", "attn_tp_all_gather", "shared_add_after_reduce"} <= set(deepep)
    qwen = _names(simulate(F.QWEN3_HYBRID, "sglang"))
    assert qwen.index("moe_ep_all_reduce") < qwen.index("moe_tp_all_reduce")
    fused = _names(simulate(F.DS_FUSED_NEXT, "sglang"))
    assert "next_layer_fused_all_reduce" in fused and "post_experts_all_reduce" not in fused


def test_shared_experts_sharded_over_the_world_under_dp_attention():
    trace = simulate(F.DS_DPATTN_ATTN_TP2, "sglang")
    assert set(trace.outputs[3]) >= {"shared@world0", "shared@world3"}


@pytest.mark.parametrize("phase, rows, op", [("decode", 10, "all_gather"), ("prefill", 8, "all_gatherv")])
def test_dp_gather_makes_every_dp_ranks_tokens_the_routed_ones(phase, rows, op):
    """Decode pads both DP ranks to 5 rows (MAX_LEN, 2 * 8 >= 5 * 2); prefill
    gathers the true 3 + 5 (SUM_LEN). Either way DP rank 1 gets its 5 back."""
    s = F.DS_DPATTN_ATTN_TP2.with_(**{"workload.phase": phase})
    trace = simulate(s, "sglang")
    st_ = next(st for st in trace.steps[2] if st.name == "dp_gather")
    router = next(st for st in trace.steps[2] if st.name == "router")
    assert st_.op == op and tuple(st_.out_shape) == (rows, 128) and tuple(router.out_shape) == (rows, 2)
    out = next(st for st in trace.steps[2] if st.name == "dp_scatter")
    assert tuple(out.out_shape) == (5, 128) and not trace.hazards


@pytest.mark.parametrize("counts, phase, max_len", [
    ((4, 4), "decode", True), ((3, 5), "decode", True), ((1, 9), "decode", True), ((0, 9, 1, 0), "decode", False),
    ((0, 4), "decode", True),
    ((0, 5, 0, 0), "decode", False), ((3, 5), "prefill", False), ((4,), "prefill", True),
])
def test_dp_padding_mode_is_the_engines(counts, phase, max_len):
    """MAX_LEN iff 2 * sum >= max * dp (always with two DP ranks), except a
    prefill batch over several DP ranks."""
    s = Scenario(parallel=ParallelConfig(dp=len(counts)), workload=Workload(tokens=counts, phase=phase))
    assert dp_max_len(s) is max_len


def test_max_len_padding_rows_are_dropped_before_the_output():
    """The reduce-scatterv path under MAX_LEN hands each DP rank its padded slot;
    the padding rows are dropped, and the idle rank of (0, 4) returns nothing."""
    s = F.DS_DPATTN_RSV.with_(**{"workload.tokens": (0, 4)})
    trace = simulate(s, "sglang")
    assert not trace.hazards and trace.outputs[0] == {}
    names = [st.name for st in trace.steps[1]]
    assert names.index("dp_reduce_scatterv") < names.index("dp_drop_pad_rows")


def test_unsupported_scenarios_are_refused_in_one_line():
    latent = Scenario(model=ModelTraits(latent_dim=64), parallel=ParallelConfig(tp=2))
    assert "latent" in unsupported_reason(SGLangRunner, latent)
    with pytest.raises(RunnerUnsupported, match="does not model this scenario: latent MoE"):
        simulate(latent, "sglang")
    assert unsupported_reason(RUNNERS["fixed"], latent) is None


def test_all_to_all_layouts_follow_sglang_not_vllm():
    """DeepEP without DP attention and an all-to-all outside vLLM's SP list
    with attention TP > 1 are SGLang layouts (SCATTERED): no longer refused;
    the dispatch spans every rank and each rank hands it its own slice."""
    rules = SGLangRunner.engine_rules
    for s in (F.DS_DEEPEP_TP2, F.QWEN3_DEEPEP_TP4, F.DS_DPATTN_MOONEP_ATTN_TP2):
        assert unsupported_reason(SGLangRunner, s) is None
        assert not s.sp and rules.all2all_kernels(s) and rules.slices_tokens(s)
        assert rules.dispatch_backend(s) == s.parallel.backend
        assert all(rules.dispatch_group(s, r) == (tuple(range(s.world)), True) for r in range(s.world))
    assert not F.DS_DEEPEP_TP2.use_all2all_kernels and F.DS_DEEPEP_TP2.effective_backend == "none"  # vLLM's
    trace = simulate(F.QWEN3_DEEPEP_TP4, "sglang")
    for r in range(4):  # 7 tokens over tp 4: slices of 2 rows (the last one padded), complete sums back
        steps = {st.name: st for st in trace.steps[r]}
        assert tuple(steps["attn_tp_scatter"].out_shape)[0] == 2 and tuple(steps["combine"].out_shape)[0] == 2
        assert tuple(steps["layer_output"].out_shape)[0] == 7
    # The FULL path keeps vLLM's answers (the DP gather is the communicator's).
    assert rules.dispatch_backend(F.DS_DPATTN_RSV) == "allgather_reducescatter" and not rules.slices_tokens(F.DS_TP2)


def test_cli_refuses_an_unsupported_scenario(tmp_path, capsys):
    import cli

    f = tmp_path / "latent.toml"
    f.write_text('[model]\nlatent_dim = 64\n[parallel]\ntp = 2\n')
    code = cli.main(["simulate", str(f), "--runner", "sglang"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not model this scenario" in err[0]


def test_reference_order_is_the_engines():
    cuda = Scenario(model=ModelTraits(num_shared_experts=1), parallel=ParallelConfig(tp=2),
                    runtime=Runtime(platform="cuda", aux_stream=True, token_threshold=4), )
    assert reference_order(cuda, 4).value == "MULTI_STREAM_OVERLAPPED"
    assert reference_order(cuda, 5).value == "NO_OVERLAP"  # not a captured batch
    dp = cuda.with_(**{"parallel.dp": 2, "parallel.ep": True, "workload.tokens": 3})
    assert moe_rows(dp) == 6  # the gathered tokens of both DP ranks
    a2a = dp.with_(**{"parallel.backend": "deepep_low_latency"})
    assert reference_order(a2a, 100).value == "MULTI_STREAM_OVERLAPPED"  # forward_deepep: always


def _sglang_layouts():
    return st.tuples(
        st.one_of(moe_scenarios(platforms=("cpu", "cuda", "rocm")), hybrid_scenarios()), st.booleans()
    ).map(lambda p: p[0].with_(**{"runtime.allreduce_fusion": p[1]}))


@given(_sglang_layouts())
def test_clean_on_generated_scenarios_of_its_layouts(s):
    if unsupported_reason(SGLangRunner, s):
        return
    trace = simulate(s, "sglang")
    assert not trace.hazards, (s.summary_line(), [str(h) for h in trace.hazards])


@pytest.mark.parametrize("cls,scenario,kind,ranks,_v", F.WRONG, ids=lambda x: getattr(x, "__name__", None))
def test_sim_predicts_the_wrong_variant(cls, scenario, kind, ranks, _v):
    trace = simulate(scenario, cls)
    assert {h.rank for h in trace.hazards if h.kind.value == kind} == set(ranks), [str(h) for h in trace.hazards]


@pytest.mark.slow
@pytest.mark.parametrize("s", F.CLEAN, ids=lambda s: s.name)
def test_real_equals_the_reference(s):
    from twin.check.crosscheck import check

    res = check(s, "sglang", timeout_s=120)
    assert all(c.correct for c in res.real.output_checks.values()), [c.to_dict() for c in res.real.output_checks.values()]
    assert res.agree and not res.verdicts, res.to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("cls,scenario,kind,ranks,verdict", F.WRONG, ids=lambda x: getattr(x, "__name__", None))
def test_real_confirms_the_wrong_variant(cls, scenario, kind, ranks, verdict):
    from twin.check.crosscheck import check

    res = check(scenario, f"{HERE / 'families_sglang.py'}:{cls.__name__}", timeout_s=120)
    vs = [v for v in res.verdicts if v.kind == kind]
    assert vs and all(v.verdict.value == verdict for v in vs), [v.to_dict() for v in res.verdicts]
    wrong = {r for r, c in res.real.output_checks.items() if not c.correct}
    if kind != "SHAPE_MISMATCH":
        assert wrong == set(ranks), [c.to_dict() for c in res.real.output_checks.values()]
    assert not res.agree


def test_explore_skips_what_the_runner_does_not_model(tmp_path):
    from twin.search.explore import explore

    res = explore("sglang", budget=40, seed=1, out=tmp_path)
    assert not res.findings, [f.summary for f in res.findings]


@pytest.mark.parametrize("s, shared", [
    (F.DS_FUSED_SHARED_TP2, {"shared@moe_tp0", "shared@moe_tp1"}),  # one slot split over moe_tp
    (F.DS_FUSED_SHARED_ROCM_EP, {"shared@full"}),  # the whole slot on every EP rank, weight 1/moe_ep
])
def test_fused_shared_experts_are_a_slot_of_the_routed_kernel(s, shared):
    trace = simulate(s, "sglang")
    assert not trace.hazards and "shared_experts" not in _names(trace)
    assert {k for k in trace.outputs[0] if k.startswith("shared")} == shared
    assert all(v == 1.0 for v in trace.outputs[0].values())


def test_no_fusion_with_a_deepep_class_all_to_all_or_ep_off_rocm():
    on = {"runtime.shared_experts_fusion": True}
    assert not SGLangRunner(F.DS_DPATTN_DEEPEP.with_(**on)).shared_fused()
    assert not SGLangRunner(F.DS_FUSED_SHARED_ROCM_EP.with_(**{"runtime.platform": "cuda"})).shared_fused()
    assert SGLangRunner(F.DS_FUSED_SHARED_ROCM_EP).shared_fused()


@pytest.mark.parametrize("weight, why", [(-1.0, "finite weight"), (float("nan"), "finite weight"), ("1", "finite weight")])
def test_fused_shared_weight_must_be_a_finite_non_negative_number(weight, why):
    from sim.errors import RunnerUsageError

    class BadWeight(SGLangRunner):
        def fused_shared_weight(self):
            return weight

    with pytest.raises(RunnerUsageError, match=why):
        simulate(F.DS_FUSED_SHARED_TP2, BadWeight)


def test_fused_shared_needs_shared_experts():
    from sim.errors import RunnerUsageError

    class FusesNothing(SGLangRunner):
        def fused_shared_weight(self):
            return 1.0

    with pytest.raises(RunnerUsageError, match="needs shared experts"):
        simulate(F.QWEN3_HYBRID, FusesNothing)


@pytest.mark.slow
def test_world_sharded_shared_missing_reduction_is_characterised_and_confirmed():
    """Under DP attention the shared MLP is split over the world: a rank that
    adds only its own shard after the reduce is characterised over the world
    shards, and confirmed from that characterisation alone where no fit exists."""
    from twin.check.crosscheck import check
    from twin.check.verdicts import judge_reduction

    res = check(F.DS_DPATTN_ATTN_TP2, f"{HERE / 'families_sglang.py'}:ShardedSharedAddedAfterReduce", timeout_s=120)
    real = res.real
    assert {r: [st.detail for st in steps if st.op == "shared_experts"] for r, steps in real.steps.items()} == {
        r: [f"shared@world{r}"] for r in range(4)}
    for r, c in real.output_checks.items():
        others = ",".join(f"world{j}" for j in range(4) if j != r).replace("world0,world1,world2", "world0..world2")
        others = others.replace("world1,world2,world3", "world1..world3")
        assert c.kind == "MISSING_REDUCTION" and c.cause == f"shared@{others} coefficient 0 (expected 1)", c.to_dict()
    hazards = [h for h in res.sim.hazards if h.kind.value == "MISSING_REDUCTION"]
    assert {h.rank for h in hazards} == {0, 1, 2, 3}
    assert all(v.verdict.value == "CONFIRMED" for v in res.verdicts if v.kind == "MISSING_REDUCTION")
    for h in hazards:  # the predicted step without a fit: the characterised kind decides
        next(st for st in real.steps[h.rank] if st.index == h.step).value = None
        assert judge_reduction(res.sim, real, h, 1.0).verdict.value == "CONFIRMED"
