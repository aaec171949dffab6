"""The TensorRT-LLM MoE block reference runner: clean on its layouts (sim and,
for world <= 4, real against the exact reference), its layout rules, what it
refuses, and its wrong variants predicted with the right kind and confirmed
on real ranks."""

from pathlib import Path

import families_trtllm as F
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scenarios.runners import RUNNERS, RunnerUnsupported, TRTLLMRunner, unsupported_reason
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, ScenarioError, Workload
from scenarios.strategies import hybrid_scenarios, moe_scenarios
from scenarios.trtllm import reference_order, shared_tp_size, uses_alltoall
from sim import simulate

HERE = Path(__file__).parent


def _names(trace, rank=0):
    return [st.name for st in trace.steps[rank]]


def test_registered_as_a_preset():
    assert RUNNERS["trtllm"] is TRTLLMRunner


@pytest.mark.parametrize("s", F.CLEAN, ids=lambda s: s.name)
def test_clean_on_each_path_in_sim(s):
    trace = simulate(s, "trtllm")
    assert not trace.hazards, [str(h) for h in trace.hazards]
    assert all(abs(c - 1.0) < 1e-9 for coeffs in trace.outputs.values() for c in coeffs.values())


def test_paths_issue_the_engines_collectives():
    tp = _names(simulate(F.DS_TP2, "trtllm"))
    assert "moe_all_reduce" in tp and "allreduce_residual_rmsnorm" not in tp
    assert tp.index("routed_experts") < tp.index("shared_experts")  # fn0, then fn1 without the aux stream
    fused = _names(simulate(F.DS_TP2_FUSED, "trtllm"))
    assert "allreduce_residual_rmsnorm" in fused and "moe_all_reduce" not in fused
    scaled = simulate(F.DS_TP2_SHARED_TP1, "trtllm")
    assert "shared_output_scale" in _names(scaled) and "shared@full" in scaled.outputs[0]
    adp = _names(simulate(F.DS_ADP_ALLGATHER, "trtllm"))
    assert {"allgather", "reducescatter"} <= set(adp) and "moe_all_reduce" not in adp
    a2a = _names(simulate(F.DS_ADP_DEEPEP, "trtllm"))
    assert {"dispatch", "combine", "join_shared"} <= set(a2a) and "reducescatter" not in a2a
    qwen = _names(simulate(F.QWEN3_HYBRID_FUSED, "trtllm"))
    assert qwen.count("allreduce_residual_rmsnorm") == 1 and "moe_all_reduce" not in qwen


def test_shared_tp_size_and_scale_follow_the_engine():
    block = F.DS_TP2.with_(**{"model.weight_block_size": 64, "parallel.tp": 4,
                              "model.shared_intermediate": 128, "model.moe_intermediate": 64})
    assert shared_tp_size(block) == 2  # gcd(128 / 64, 4): strictly between 1 and tp
    assert "strictly between" in unsupported_reason(TRTLLMRunner, block)
    assert shared_tp_size(F.DS_TP2) == 2 and TRTLLMRunner(F.DS_TP2).shared_output_scale() is None
    assert TRTLLMRunner(F.DS_TP2_SHARED_TP1).shared_output_scale() == 0.5
    assert shared_tp_size(F.DS_ADP_ALLGATHER) == 1 and TRTLLMRunner(F.DS_ADP_ALLGATHER).shared_output_scale() is None


def test_weight_block_size_is_validated():
    with pytest.raises(ScenarioError, match="weight_block_size"):
        ModelTraits(num_shared_experts=1, weight_block_size=48).validate()  # 64 is not a multiple of 48
    with pytest.raises(ScenarioError, match="weight_block_size"):
        ModelTraits(weight_block_size=0).validate()


def test_alltoall_needs_moe_ep_at_least_top_k():
    assert uses_alltoall(F.DS_ADP_DEEPEP)
    narrow = F.DS_ADP_DEEPEP.with_(**{"model.top_k": 8})  # moe_ep 4 < top_k 8
    assert not uses_alltoall(narrow) and unsupported_reason(TRTLLMRunner, narrow) is None


def test_fallback_dispatch_is_the_all_gather_not_the_scenarios_all_to_all():
    """moe_ep 2 < top_k 4 with DeepEP configured: TensorRT-LLM's layout gathers
    every rank's tokens (3 + 5 rows on both) and reduce-scatters them back,
    where vLLM's rules would route tokens with DeepEP."""
    s, rules = F.DS_ADP_DEEPEP_FALLBACK, TRTLLMRunner.engine_rules
    assert s.use_all2all_kernels and s.effective_backend == "deepep_high_throughput"  # vLLM's answer
    assert not rules.all2all_kernels(s) and rules.dispatch_backend(s) == "allgather_reducescatter"
    assert rules.dispatch_group(s, 1) == ((0, 1), False)
    trace = simulate(s, "trtllm")
    for r, own in ((0, 3), (1, 5)):
        steps = {st.name: st for st in trace.steps[r]}
        assert tuple(steps["allgather"].out_shape)[0] == 8 and tuple(steps["reducescatter"].out_shape)[0] == own
    assert not trace.hazards


def test_unsupported_scenarios_are_refused_in_one_line():
    adp_tp2 = Scenario(parallel=ParallelConfig(tp=2, dp=2))
    assert "attention TP > 1" in unsupported_reason(TRTLLMRunner, adp_tp2)
    with pytest.raises(RunnerUnsupported, match="does not model this scenario: attention DP"):
        simulate(adp_tp2, "trtllm")
    mori = Scenario(parallel=ParallelConfig(dp=2, ep=True, backend="mori_low_latency"),
                    model=ModelTraits(top_k=2))
    assert "not one of TensorRT-LLM's" in unsupported_reason(TRTLLMRunner, mori)
    assert "ROCm" in unsupported_reason(TRTLLMRunner, Scenario(runtime=Runtime(platform="rocm")))
    assert "latent" in unsupported_reason(TRTLLMRunner, Scenario(model=ModelTraits(latent_dim=64)))
    assert unsupported_reason(RUNNERS["fixed"], adp_tp2) is None


def test_cli_refuses_an_unsupported_scenario(tmp_path, capsys):
    import cli

    f = tmp_path / "adp.toml"
    f.write_text('[parallel]\ntp = 2\ndp = 2\n')
    code = cli.main(["simulate", str(f), "--runner", "trtllm"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "does not model this scenario" in err[0]


def test_reference_order_is_the_engines():
    cuda = Scenario(model=ModelTraits(num_shared_experts=1), parallel=ParallelConfig(tp=2),
                    runtime=Runtime(platform="cuda", aux_stream=True, token_threshold=4),
                    workload=Workload(tokens=4))
    assert reference_order(cuda).value == "MULTI_STREAM_OVERLAPPED"
    assert reference_order(cuda.with_(**{"workload.tokens": 5})).value == "NO_OVERLAP"  # no CUDA graph
    adp = cuda.with_(**{"parallel.tp": 1, "parallel.dp": 2, "workload.tokens": (1, 5)})
    assert reference_order(adp).value == "NO_OVERLAP"  # the ranks agree: the largest batch decides
    assert reference_order(cuda.with_(**{"runtime.aux_stream": False})).value == "NO_OVERLAP"


def _with_block(s: Scenario, pick: int) -> Scenario:
    """A weight block of none, the whole shared intermediate (shared_tp 1) or half of it."""
    m = s.model
    if not m.has_shared or pick == 0:
        return s
    block = m.shared_inter if pick == 1 else m.shared_inter // 2
    return s.with_(**{"model.weight_block_size": block}) if block > 0 and m.shared_inter % block == 0 else s


def _in_its_blocks(s: Scenario) -> Scenario:
    """Drop what neither block has (latent MoE, EPLB), so most draws are run."""
    changes = {"parallel.eplb": False}
    if s.model.has_transform:
        changes.update({"model.latent_dim": None, "model.transform_nonlinear": False, "model.moe_hidden": None})
    try:
        return s.with_(**changes)
    except ScenarioError:
        return s


def _trtllm_layouts():
    adp = moe_scenarios(tp=[1], dp=[2, 4, 8], platforms=("cpu", "cuda"))
    no_adp = st.one_of(moe_scenarios(dp=[1], platforms=("cpu", "cuda")), hybrid_scenarios().filter(
        lambda s: s.parallel.dp == 1 or s.parallel.tp == 1))
    return st.tuples(st.one_of(no_adp, adp), st.booleans(), st.integers(0, 2)).map(
        lambda p: _with_block(_in_its_blocks(p[0]).with_(**{"runtime.allreduce_fusion": p[1]}), p[2]))


@given(_trtllm_layouts())
def test_clean_on_generated_scenarios_of_its_layouts(s):
    if unsupported_reason(TRTLLMRunner, s):
        return
    trace = simulate(s, "trtllm")
    assert not trace.hazards, (s.summary_line(), [str(h) for h in trace.hazards])


@pytest.mark.parametrize("cls,scenario,kind,ranks,_v", F.WRONG, ids=lambda x: getattr(x, "__name__", None))
def test_sim_predicts_the_wrong_variant(cls, scenario, kind, ranks, _v):
    trace = simulate(scenario, cls)
    assert {h.rank for h in trace.hazards if h.kind.value == kind} == set(ranks), [str(h) for h in trace.hazards]


@pytest.mark.slow
@pytest.mark.parametrize("s", F.CLEAN, ids=lambda s: s.name)
def test_real_equals_the_reference(s):
    from twin.check.crosscheck import check

    res = check(s, "trtllm", timeout_s=120)
    assert all(c.correct for c in res.real.output_checks.values()), [c.to_dict() for c in res.real.output_checks.values()]
    assert res.agree and not res.verdicts, res.to_dict()


@pytest.mark.slow
@pytest.mark.parametrize("cls,scenario,kind,ranks,verdict", F.WRONG, ids=lambda x: getattr(x, "__name__", None))
def test_real_confirms_the_wrong_variant(cls, scenario, kind, ranks, verdict):
    from twin.check.crosscheck import check

    res = check(scenario, f"{HERE / 'families_trtllm.py'}:{cls.__name__}", timeout_s=120)
    vs = [v for v in res.verdicts if v.kind == kind]
    assert vs and all(v.verdict.value == verdict for v in vs), [v.to_dict() for v in res.verdicts]
    wrong = {r for r, c in res.real.output_checks.items() if not c.correct}
    if kind != "SHAPE_MISMATCH":
        assert wrong == set(ranks), [c.to_dict() for c in res.real.output_checks.values()]
    assert not res.agree


def test_explore_skips_what_the_runner_does_not_model(tmp_path):
    from twin.search.explore import explore

    res = explore("trtllm", budget=40, seed=1, out=tmp_path)
    assert not res.findings, [f.summary for f in res.findings]
