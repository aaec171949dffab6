"""The exact layer reference (real/reference.py) and the output judge
(real/judge.py) on hand-made tensors. Real ranks: tests/test_reference_real.py."""

import pytest
import torch
import torch.nn.functional as F

from real.judge import REL_TOL, judge_output
from real.model import LayerWeights, layer_input
from real.reference import ExactReference, exact_reference
from scenarios.spec import ModelTraits, ParallelConfig, Scenario, Workload
from scenarios.trace import Hazard, HazardKind, OutputCheck, Step, Trace
from scenarios.workload import routing


def scenario(tp=1, dp=1, ep=False, backend="allgather_reducescatter", tokens=4, seed=1, **model):
    traits = dict(hidden=64, moe_intermediate=32, num_experts=8, top_k=2)
    traits.update(model)
    return Scenario(model=ModelTraits(**traits), parallel=ParallelConfig(tp=tp, dp=dp, ep=ep, backend=backend),
                    workload=Workload(tokens=tokens, seed=seed))


def direct_output(s: Scenario, d: int) -> torch.Tensor:
    """The layer by hand, token by token and expert by expert, in float64."""
    m = s.model
    w = LayerWeights(s)
    x = layer_input(s, d).double()
    rows = []
    for tok in range(s.dp_tokens(d)):
        v = x[tok]
        if w.down is not None:
            v = w.down.double() @ v
        v = torch.cat([v, torch.zeros(m.kernel_width - v.shape[0], dtype=torch.float64)])
        acc = torch.zeros(m.kernel_width, dtype=torch.float64)
        ids, wts = routing(s)[d][tok]
        for e, wk in zip(ids, wts):
            w13, w2 = (t.double() for t in w.expert(e))
            h = w13 @ v
            i = m.moe_intermediate
            acc += wk * (w2 @ (h[:i] / (1 + torch.exp(-h[:i])) * h[i:]))
        out = m.routed_scaling_factor * acc[: m.routed_width]
        if w.up is not None:
            out = w.up.double() @ out
            if m.transform_nonlinear:
                out = out / (1 + torch.exp(-out))
        if m.has_shared:
            h = w.shared_w13.double() @ x[tok]
            i = m.shared_inter
            out = out + w.shared_w2.double() @ (h[:i] / (1 + torch.exp(-h[:i])) * h[i:])
        rows.append(out)
    return torch.stack(rows)


MODELS = {
    "plain": {},
    "shared": dict(num_shared_experts=2),
    "rsf": dict(routed_scaling_factor=2.5, num_shared_experts=1),
    "padded": dict(moe_hidden=80, num_shared_experts=1),
    "latent": dict(latent_dim=24, num_shared_experts=1),
    "latent-nonlinear-padded": dict(latent_dim=24, transform_nonlinear=True, moe_hidden=32, routed_scaling_factor=2.5),
}


@pytest.mark.parametrize("name", MODELS)
def test_reference_equals_a_direct_float64_loop(name):
    s = scenario(**MODELS[name])
    ref = ExactReference(s)
    assert ref.output(0).dtype == torch.float64 and ref.output(0).shape == (4, 64)
    assert torch.allclose(ref.output(0), direct_output(s, 0), rtol=0, atol=1e-12)


def test_padding_contributes_nothing():
    plain = ExactReference(scenario(num_shared_experts=1)).output(0)
    padded = ExactReference(scenario(num_shared_experts=1, moe_hidden=96)).output(0)
    assert torch.equal(plain, padded)


def test_reference_is_independent_of_parallelism():
    """The same layer and workload under TP, EP, SP: one reference."""
    base = ExactReference(scenario(dp=2, num_shared_experts=1, num_experts=8, moe_intermediate=32))
    for kw in (dict(tp=2), dict(tp=2, ep=True), dict(tp=2, ep=True, backend="deepep_high_throughput")):
        other = ExactReference(scenario(dp=2, num_shared_experts=1, **kw))
        for d in range(2):
            # DeepEP HT rounds the rows to 256 here: zero columns, but float64
            # sums in another order, so equal to rounding, not bit for bit.
            assert torch.allclose(base.output(d), other.output(d), rtol=0, atol=1e-13), kw


def test_contract_rows_per_rank():
    s = scenario(tp=2, dp=2, ep=True, backend="deepep_high_throughput", tokens=3, num_shared_experts=1)
    assert s.sp
    ref = ExactReference(s)
    for rank in range(4):
        d, _t = s.coords(rank)
        # Under SP every TP rank of a DP group returns all of the group's tokens.
        assert torch.equal(ref.expected(rank), ref.output(d))
    assert not torch.equal(ref.output(0), ref.output(1))


@pytest.mark.parametrize("kw", [dict(tp=2, ep=True), dict(tp=2), dict(tp=4)])
def test_partials_sum_to_the_routed_output(kw):
    ref = ExactReference(scenario(dp=1, **kw))
    parts = ref.routed_partials(0)
    assert len(parts) == ref.s.world
    assert torch.allclose(sum(parts.values()), ref.routed_kernel[0], rtol=0, atol=1e-12)


def test_reference_is_cached_per_scenario():
    s = scenario(tokens=2)
    assert exact_reference(s) is exact_reference(s)


# ---- the judge on hand-made outputs ----

S = scenario(tp=2, num_shared_experts=1)


@pytest.fixture(scope="module")
def ref():
    return exact_reference(S)


def parts(ref):
    routed = ref.transform(ref.routed_kernel[0])
    return routed, ref.shared[0]


def test_fp32_copy_of_the_reference_is_correct_with_margin(ref):
    c = judge_output(S, 0, ref.expected(0).float(), ref)
    assert c.correct and c.wrong_rows == 0 and c.rows == 4 and c.cause == "" and c.kind is None
    assert c.max_rel_err < REL_TOL / 100


def test_one_percent_coefficient_error_fails(ref):
    routed, shared = parts(ref)
    sh1 = ref.shared_mlp(ref.x[0], 1, 2)
    for y in (1.01 * routed + shared, routed + shared + 0.01 * sh1):
        c = judge_output(S, 0, y.float(), ref)
        assert not c.correct and c.max_rel_err > 10 * REL_TOL
        assert "coefficient 1.01 (expected 1)" in c.cause


def test_none_is_a_wrong_output_with_its_cause(ref):
    c = judge_output(S, 1, None, ref, failure="raised ValueError: boom (step 3 router)", failure_kind=HazardKind.RUNNER_ERROR)
    assert not c.correct and c.wrong_rows == 4 and c.wrong_tokens == ["d0t0", "d0t1", "d0t2", "d0t3"]
    assert c.cause == "no output: raised ValueError: boom (step 3 router)" and c.kind == "RUNNER_ERROR"


def test_padding_row(ref):
    y = ref.expected(0).float()
    y[1] = 0
    c = judge_output(S, 0, y, ref)
    assert (c.correct, c.kind, c.wrong_rows, c.wrong_tokens) == (False, "WRONG_TOKENS", 1, ["d0t1"])
    assert c.cause == "rank 0 row 1: padding row instead of token d0t1"
    y = ref.expected(0).float()
    y[2:] = 0
    assert judge_output(S, 0, y, ref).cause == "rank 0 rows 2..3: padding rows instead of tokens d0t2..d0t3"


def test_swapped_tokens(ref):
    y = ref.expected(0).float()[[1, 0, 2, 3]]
    c = judge_output(S, 0, y, ref)
    assert c.kind == "WRONG_TOKENS" and c.wrong_tokens == ["d0t0", "d0t1"]
    assert "right tokens in the wrong order" in c.cause and "row 0 holds d0t1" in c.cause


def test_another_tokens_row(ref):
    y = ref.expected(0).float()
    y[0] = y[2]
    c = judge_output(S, 0, y, ref)
    assert c.kind == "WRONG_TOKENS" and c.cause == "rank 0 row 0: token d0t2's output instead of d0t0"


def test_another_ranks_token():
    s = scenario(dp=2, num_shared_experts=1)
    r = exact_reference(s)
    y = r.expected(0).float()
    y[3] = r.output(1)[3].float()
    c = judge_output(s, 0, y, r)
    assert c.kind == "WRONG_TOKENS" and c.cause == "rank 0 row 3: token d1t3's output instead of d0t3"


def test_scaled_by_two_is_a_double_reduction(ref):
    routed, shared = parts(ref)
    c = judge_output(S, 0, (2 * routed + shared).float(), ref)
    assert c.kind == "DOUBLE_REDUCTION" and c.wrong_rows == 4
    assert c.cause == "routed@tp0,tp1 coefficient 2 (expected 1)"
    c = judge_output(S, 0, (2 * routed + 2 * shared).float(), ref)
    assert "routed@tp0,tp1 coefficient 2 (expected 1)" in c.cause and "shared@tp0,tp1 coefficient 2" in c.cause


def test_missing_components_are_all_named(ref):
    routed, shared = parts(ref)
    p = ref.routed_partials(0)
    y = routed - ref.transform(p["tp1"]) + shared - ref.shared_mlp(ref.x[0], 1, 2)
    c = judge_output(S, 0, y.float(), ref)
    assert c.kind == "MISSING_REDUCTION"
    assert c.cause == "routed@tp1 coefficient 0 (expected 1); shared@tp1 coefficient 0 (expected 1)"


def test_shared_on_latent_input():
    s = scenario(tp=2, latent_dim=24, num_shared_experts=1)
    r = exact_reference(s)
    xl = F.pad(r.x[0] @ r.weights.down.double().t(), (0, 64 - 24))
    y = r.transform(r.routed_kernel[0]) + r.shared_mlp(xl)
    c = judge_output(s, 0, y.float(), r)
    assert c.kind == "WRONG_INPUT" and c.cause.startswith("shared experts applied to the latent-projected input")
    assert "coefficient 0." not in c.cause  # no fractional "reduction"


def test_shared_on_routed_output_in_place(ref):
    routed, _shared = parts(ref)
    p = ref.routed_partials(0)
    clobbered = sum(ref.shared_mlp(p[f"tp{t}"], t, 2) for t in range(2))
    c = judge_output(S, 0, (routed + clobbered).float(), ref)
    assert c.kind == "WRONG_INPUT"
    assert c.cause.startswith("shared experts applied to the routed output (in-place clobber")


def test_shared_of_other_sp_slices_summed_in():
    """R1's shape: under SP the shared output reduced over TP adds the token
    at the same position of the other sequence slice."""
    s = scenario(tp=2, dp=2, ep=True, backend="deepep_high_throughput", num_shared_experts=1)
    r = exact_reference(s)
    per = s.sp_tokens
    partner = [(t + per) % (2 * per) for t in range(4)]
    y = r.output(0) + r.shared[0][partner]
    c = judge_output(s, 1, y.float(), r)
    assert c.kind == "DOUBLE_REDUCTION" and c.wrong_rows == 4
    assert "other tokens summed in" in c.cause
    assert "shared@full[tokens d0s0] coefficient 1 (expected 0)" in c.cause
    assert "shared@full[tokens d0s1] coefficient 1 (expected 0)" in c.cause


def test_non_linear_transform_of_partials_and_reduced_twice():
    s = scenario(tp=2, latent_dim=24, transform_nonlinear=True, num_shared_experts=1)
    r = exact_reference(s)
    p = r.routed_partials(0)
    y = r.transform(p["tp0"]) + r.transform(p["tp1"]) + r.shared[0]
    c = judge_output(s, 0, y.float(), r)
    assert c.kind == "MISSING_REDUCTION" and "non-linear routed transform applied to partial" in c.cause
    y = r.transform(2 * r.routed_kernel[0]) + r.shared[0]
    c = judge_output(s, 0, y.float(), r)
    assert c.kind == "DOUBLE_REDUCTION" and "coefficient 2 (expected 1) before the non-linear transform" in c.cause


def test_missing_rows(ref):
    c = judge_output(S, 0, ref.expected(0).float()[:2], ref)
    assert c.kind == "WRONG_TOKENS" and c.shape == (2, 64) and c.wrong_rows == 2
    assert c.cause == "rank 0 returned 2 rows for 4 tokens; missing d0t2, d0t3"


def test_wrong_shape(ref):
    y = ref.expected(0).float()
    c = judge_output(S, 0, y[:, :32], ref)
    assert c.kind == "SHAPE_MISMATCH" and c.cause == "rank 0 returned shape [4, 32]; the layer must return [4, 64]"
    c = judge_output(S, 0, F.pad(y, (0, 16)), ref)
    assert c.kind == "SHAPE_MISMATCH" and "not trimmed from width 80 to 64" in c.cause
    assert not judge_output(S, 0, y[None], ref).correct


def test_nan_and_noise_are_wrong_and_unexplained(ref):
    y = ref.expected(0).float()
    y[2] = float("nan")
    c = judge_output(S, 0, y, ref)
    assert not c.correct and c.wrong_tokens == ["d0t2"] and "non-finite" in c.cause
    assert c.to_dict()["max_rel_err"] == "nan"
    c = judge_output(S, 0, torch.randn(4, 64, generator=torch.Generator().manual_seed(0)), ref)
    assert not c.correct and c.kind == "WRONG_OUTPUT"
    assert c.cause.startswith("not explained by any known source; residual")


# ---- run_real's use of the judge (no processes) ----


def test_judge_outputs_fills_every_rank_and_one_hazard_per_wrong_output(ref):
    from real.runner import RealResult, _judge_outputs

    trace = Trace(source="real", scenario=S.name, runner="x", world=2)
    for r in range(2):
        trace.steps[r] = [Step(rank=r, index=0, op="layer_input", name="layer_input"),
                          Step(rank=r, index=1, op="layer_output", name="layer_output")]
    trace.hazards.append(Hazard(HazardKind.RUNNER_ERROR, 0, "layer_input", 1, "raised ValueError: boom"))
    routed, shared = parts(ref)
    result = RealResult(trace, outputs={0: (2 * routed + shared).float()}, errors={1: (0, "ValueError: boom")})
    _judge_outputs(S, result)
    checks = trace.output_checks
    assert set(checks) == {0, 1} and all(isinstance(c, OutputCheck) for c in checks.values())
    assert checks[0].kind == "DOUBLE_REDUCTION" and not checks[1].correct
    assert checks[1].cause.startswith("no output: raised ValueError: boom") and checks[1].kind == "RUNNER_ERROR"
    new = trace.hazards[1:]
    assert [(h.kind, h.rank, h.step, h.step_name) for h in new] == [(HazardKind.DOUBLE_REDUCTION, 0, 1, "layer_output")]
    assert new[0].detail == checks[0].cause
    # A correct output adds no hazard.
    trace.hazards, trace.output_checks = [], {}
    _judge_outputs(S, RealResult(trace, outputs={0: ref.expected(0).float(), 1: ref.expected(1).float()}))
    assert not trace.hazards and all(c.correct for c in trace.output_checks.values())


# ---- shared experts sharded over another group than TP ----


def _world_sharded():
    # SGLang's DP-attention layout: the shared MLP is split over all 4 ranks
    # ("shared@world0".."shared@world3"), not over the TP group of 2.
    return scenario(tp=2, dp=2, ep=True, tokens=3, num_shared_experts=1)


def test_world_sharded_shared_shards_missing_are_named():
    s = _world_sharded()
    r = exact_reference(s)
    x = r.x[1]  # rank 2 holds DP rank 1's tokens
    y = r.expected(2) - sum(r.shared_mlp(x, j, 4) for j in (0, 1, 3))  # only its own shard
    c = judge_output(s, 2, y.float(), r, shared_group="world")
    assert c.kind == "MISSING_REDUCTION" and c.wrong_rows == 3
    assert c.cause == "shared@world0,world1,world3 coefficient 0 (expected 1)"
    # Over the TP shards the same rows are not explained: why the run's group matters.
    assert judge_output(s, 2, y.float(), r).kind == "WRONG_OUTPUT"


def test_world_sharded_shared_shard_added_twice_is_a_double_reduction():
    s = _world_sharded()
    r = exact_reference(s)
    y = r.expected(0) + r.shared_mlp(r.x[0], 0, 4)
    c = judge_output(s, 0, y.float(), r, shared_group="world")
    assert c.kind == "DOUBLE_REDUCTION" and c.cause == "shared@world0 coefficient 2 (expected 1)"


def test_world_sharded_correct_output_stays_correct():
    s = _world_sharded()
    r = exact_reference(s)
    for rank in range(4):
        assert judge_output(s, rank, r.expected(rank).float(), r, shared_group="world").correct


def test_shared_group_of_reads_the_shard_labels_of_the_real_steps():
    from real.judge import shared_group_of

    def trace(details):
        t = Trace(source="real", scenario="s", runner="x", world=len(details))
        for r, ds in enumerate(details):
            t.steps[r] = [Step(rank=r, index=i, op="shared_experts", name="shared", detail=d)
                          for i, d in enumerate(ds)]
        return t

    assert shared_group_of(trace([[f"shared@world{r}"] for r in range(4)])) == "world"
    assert shared_group_of(trace([["shared@tp0"], ["shared@tp1"]])) == "tp"
    assert shared_group_of(trace([["shared@full"]])) == "full"
    assert shared_group_of(trace([["shared@tp0"], ["shared@world1"]])) is None  # mixed: unknown
    assert shared_group_of(trace([[]])) is None


def test_fit_partials_batched_agree_with_the_exact_layer_and_run_each_expert_once(monkeypatch):
    """The fits' float64 partials (real.model.Reference), batched per DP rank,
    equal the exact reference's pieces; every expert's MLP runs once per DP
    rank for all its MoE-TP shards (per token and per shard it took about a
    minute per rank on latent-moe, past the run's timeout)."""
    from real.model import Reference

    s = scenario(tp=2, dp=1, tokens=6, latent_dim=24, num_shared_experts=1)
    exact = ExactReference(s)
    parts = exact.routed_partials(0)
    w = LayerWeights(s)
    calls = []
    real_expert = LayerWeights.expert
    monkeypatch.setattr(LayerWeights, "expert", lambda self, e, cache=True: calls.append(e) or real_expert(self, e, cache))
    ref = Reference(s, w)
    rsf = s.model.routed_scaling_factor
    assert sorted(parts) == ["tp0", "tp1"]
    for shard, part in parts.items():
        assert torch.allclose(ref.partials("routed", shard, 0), rsf * part, atol=1e-9)
    assert sorted(calls) == sorted(set(calls))  # both shards from one pass over the experts
    up = sum(ref.partials("routed", sh, 0, up=True) for sh in parts)
    assert torch.allclose(up + ref.partials("shared", "full", 0), exact.output(0), atol=1e-9)
    assert torch.allclose(ref.partials("shared", "tp1", 0), exact.shared_mlp(exact.x[0], 1, 2), atol=1e-9)
    rows = ref.rows("routed", "tp1", 0, [2, -1, 0])
    assert torch.equal(rows[0], ref.partial("routed", "tp1", 0, 2)) and not rows[1].any()
    assert torch.equal(rows[2], ref.partial("routed", "tp1", 0, 0))
