"""Runner families for the ground-truth tests: deliberately wrong runners (each
a short override of one decision, the way a hurried engineer might break it)
and correct-but-unusual runners that must come back clean.

Each entry names its scenario and the outcome the twin must reach. Rank
processes load these classes by file path (`families.py:Name`)."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.runners import MoERunner, Order
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, Workload

# ---- wrong ----


class SkipSpGatherOnRowGuess(MoERunner):
    """Guesses "sequence-sharded?" from the row count: at a 1-token decode the
    slice has as many rows as the batch, so the SP all-gather is skipped."""

    def model_forward(self, ops: Ops) -> Any:
        x = ops.layer_input()
        tokens = x.shape[0]
        if self.scenario.sp:
            x = ops.sp_slice(x)
        out = self.forward(ops, x)
        if out.shape[0] < tokens:
            out = ops.trim_rows(ops.all_gather(out, "tp", name="sp_all_gather"), tokens, name="sp_drop_pad_rows")
        return ops.layer_output(out)


class SharedOnLatent(MoERunner):
    """Feeds the shared MLP the latent-projected tensor, padded back to hidden."""

    def shared_input(self, ops: Ops, x: Any) -> Any:
        return ops.pad(ops.latent_down(x, name="shared_latent_down"), self.scenario.model.hidden, name="shared_pad")


class SharedAfterInplaceRouted(MoERunner):
    """Runs the shared MLP after an in-place routed kernel, on the same stream."""

    def shared_after_routed(self, order: Order) -> bool:
        return True

    def routed_inplace(self, order: Order) -> bool:
        return True


class AuxNoWait(MoERunner):
    """Launches the shared MLP on the aux stream without waiting for the main
    stream, while the routed kernel writes its input in place."""

    def routed_inplace(self, order: Order) -> bool:
        return True

    def launch_shared_on_aux(self, ops: Ops, x: Any, sharded: bool) -> tuple[Any, Any]:
        with ops.stream("aux"):
            shared = ops.shared_experts(x, sharded=sharded)
            return shared, ops.record_event("shared_done")


class DropFinalReduction(MoERunner):
    """Forgets the final all-reduce."""

    def needs_final_reduce(self, routed_reduced: bool) -> bool:
        return False


class SharedBeforeDispatch(MoERunner):
    """MK_INTERNAL overlap chosen, but the shared MLP is run before the
    dispatch is launched, so nothing is in flight while it computes."""

    def shared_before_dispatch(self) -> bool:
        return True


class SkipPreTransformReduce(MoERunner):
    """Skips the early routed reduction before a non-linear latent transform."""

    def needs_pre_transform_reduce(self, reduced: bool) -> bool:
        return False


class DeclarePaddedWidth(MoERunner):
    """The fused op's fake implementation promises the padded width even
    though the shared add needs the routed output trimmed first."""

    def declared_output_width(self) -> int:
        return self.scenario.model.kernel_width


class ScaleAfterSharedAdd(MoERunner):
    """Applies the routed scaling factor after the shared add (scales shared too)."""

    def join_outputs(self, ops: Ops, shared: Any, routed: Any) -> Any:
        out = ops.add(shared, routed, name="shared_add") if shared is not None else routed
        return ops.scale(out, self.scenario.model.routed_scaling_factor, name="routed_scaling")


class ReduceAndFuse(MoERunner):
    """Keeps its post-experts all-reduce although the next layer's fused
    all-reduce + residual + RMSNorm sums the output again."""

    def defer_post_experts_reduce(self) -> bool:
        return False


class DeferIgnoringTokenCap(MoERunner):
    """Leaves the sum to the next layer whenever fusion is on, forgetting that
    the fused kernel only runs up to 2048 tokens."""

    def defer_post_experts_reduce(self) -> bool:
        s = self.scenario
        return s.runtime.allreduce_fusion and s.parallel.tp > 1


class ReplicatedSharedAddedBeforeReduce(MoERunner):
    """Builds the shared MLP replicated (complete on every rank) but still adds
    it before the post-experts all-reduce, which sums tp copies of it."""

    def shared_experts_sharded(self) -> bool:
        return False


class SharedReducedInsideAndAgain(MoERunner):
    """Lets the shared MLP reduce its own output, then adds it before the
    post-experts all-reduce as if it were still a partial."""

    def shared_reduce_results(self) -> bool:
        return True


class AllReduceOverMoeEpOnly(MoERunner):
    """On a moe_ep x moe_tp layout, sums the routed output over moe_ep only
    (as if experts were only expert-parallel): moe_tp partials stay apart."""

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        if not self.needs_final_reduce(routed_reduced):
            return result
        return ops.all_reduce(result, "moe_ep", name="moe_ep_all_reduce")


class CudaOnlyMultiStream(MoERunner):
    """Takes "CUDA-alike" to mean `platform == "cuda"`: ROCm loses the
    multi-stream overlap the newest engine version gives it."""

    def shared_experts_order(self, num_tokens: int) -> Order:
        order = super().shared_experts_order(num_tokens)
        if order == Order.MULTI_STREAM_OVERLAPPED and self.scenario.runtime.platform != "cuda":
            return Order.NO_OVERLAP
        return order


class SharedReducedForNothing(MoERunner):
    """All-reduces the shared partials "to have them ready", then adds the
    unreduced ones anyway (the final all-reduce sums them): the early
    reduction's result is never used."""

    def maybe_reduce_shared(self, ops: Ops, shared: Any, routed_reduced: bool) -> Any:
        if shared is not None and self.needs_final_reduce(routed_reduced):
            ops.all_reduce(shared, "tp", name="early_shared_all_reduce")
        return super().maybe_reduce_shared(ops, shared, routed_reduced)


# ---- correct but unusual ----


class CloneBeforeAuxFork(MoERunner):
    """An in-place routed kernel under multi-stream overlap, made safe by
    cloning the input for the aux stream before the fork."""

    def routed_inplace(self, order: Order) -> bool:
        return True

    def before_aux_fork(self, ops: Ops, x: Any) -> Any:
        return ops.clone(x, name="clone_for_aux")


class ScaleThenSumSharedReplicas(MoERunner):
    """Replicated (unsharded) shared experts on every TP rank, scaled by 1/tp,
    summed back to one copy by the final all-reduce."""

    def shared_experts_sharded(self) -> bool:
        return False

    def maybe_reduce_shared(self, ops: Ops, shared: Any, routed_reduced: bool) -> Any:
        if shared is not None and self.needs_final_reduce(routed_reduced):
            return ops.scale(shared, 1.0 / self.scenario.parallel.tp, name="shared_share_of_sum")
        return super().maybe_reduce_shared(ops, shared, routed_reduced)


class ReduceScatterAllGather(MoERunner):
    """The final all-reduce as a reduce-scatter followed by an all-gather."""

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        if not self.needs_final_reduce(routed_reduced):
            return result
        part = ops.reduce_scatter(result, "tp", name="final_reduce_scatter")
        return ops.all_gather(part, "tp", name="final_all_gather")


class SharedSummedWithReducedRouted(MoERunner):
    """A combine that already reduces, yet the shared partials are added first
    and summed by one TP all-reduce together with the routed output, which is
    scaled by 1/tp so the sum counts it once."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        routed, shared = super().routed_path(ops, x, routing, order, shared_inside)
        return ops.scale(routed, 1.0 / self.scenario.parallel.tp, name="routed_share_of_sum"), shared

    def maybe_reduce_shared(self, ops: Ops, shared: Any, routed_reduced: bool) -> Any:
        return shared

    def needs_final_reduce(self, routed_reduced: bool) -> bool:
        return not self.is_sequence_parallel() and self.scenario.parallel.tp > 1


class ReplicatedSharedJoinsAfterReduce(MoERunner):
    """SGLang's TP1 shared experts: replicated, added after the routed sum."""

    def shared_experts_sharded(self) -> bool:
        return False

    def shared_joins_after_reduce(self) -> bool:
        return True


class SharedReducedInsideJoinsAfter(MoERunner):
    """The shared MLP reduces its own output and joins the complete routed sum."""

    def shared_reduce_results(self) -> bool:
        return True

    def shared_joins_after_reduce(self) -> bool:
        return True


class Qwen3TwoReductions(MoERunner):
    """Qwen3's post-experts reductions: an all-reduce over moe_ep, then one
    over moe_tp (two collectives when both are > 1), instead of one over tp."""

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        if not self.needs_final_reduce(routed_reduced):
            return result
        s = self.scenario
        if s.moe_ep > 1:
            result = ops.all_reduce(result, "moe_ep", name="moe_ep_all_reduce")
        return ops.all_reduce(result, "moe_tp", name="moe_tp_all_reduce") if s.moe_tp > 1 else result


# ---- scenarios ----


def _s(name: str, model: dict, parallel: dict, runtime: dict | None = None, tokens: int = 4) -> Scenario:
    base = {"hidden": 128, "moe_intermediate": 64, "num_experts": 8, "top_k": 2, "num_shared_experts": 1}
    return Scenario(
        name=name,
        model=ModelTraits(**{**base, **model}),
        parallel=ParallelConfig(**parallel),
        runtime=Runtime(**(runtime or {})),
        workload=Workload(tokens=tokens, seed=3),
        kernel="torch",
    )


MULTI_STREAM = {"platform": "cuda", "aux_stream": True}
ROCM_TP2_MULTI = _s("rocm-tp2-multistream", {}, {"tp": 2}, {"platform": "rocm", "aux_stream": True})
SP_DECODE = _s("sp-decode-1-token", {}, {"tp": 2, "dp": 2, "ep": True, "backend": "deepep_low_latency"}, tokens=1)
LATENT_TP2 = _s("latent-tp2-multistream", {"latent_dim": 64}, {"tp": 2}, MULTI_STREAM)
TP2 = _s("tp2", {}, {"tp": 2}, tokens=8)
TP2_MULTI = _s("tp2-multistream", {}, {"tp": 2}, MULTI_STREAM)
MK_DP2 = _s("mk-internal-dp2", {}, {"dp": 2, "ep": True, "backend": "deepep_low_latency"})
LATENT_NL_TP2 = _s("latent-nonlinear-tp2", {"latent_dim": 64, "transform_nonlinear": True}, {"tp": 2})
PADDED_TP2 = _s("padded-shared-tp2", {"moe_hidden": 192}, {"tp": 2})
RSF_TP2 = _s("rsf-tp2", {"routed_scaling_factor": 2.5}, {"tp": 2})
FUSED_NEXT_TP2 = _s("fused-next-layer-tp2", {}, {"tp": 2}, {"allreduce_fusion": True}, tokens=8)
FUSION_OFF_BY_SIZE = _s("fusion-too-many-tokens-tp2", {}, {"tp": 2}, {"allreduce_fusion": True}, tokens=2056)
# Qwen3-like (no shared experts), experts over moe_ep=2 x moe_tp=2.
HYBRID_TP4 = _s("tp4-ep-size-2", {"num_shared_experts": 0}, {"tp": 4, "ep": True, "ep_size": 2})
FI_TP2_DP2 = _s("fi-two-sided-tp2-dp2", {}, {"tp": 2, "dp": 2, "ep": True, "backend": "flashinfer_nvlink_two_sided"})

# (runner, scenario, predicted kind, the ranks it must hit, expected verdict)
WRONG = [
    (SkipSpGatherOnRowGuess, SP_DECODE, "WRONG_TOKENS", (1, 3), "CONFIRMED"),
    (SharedOnLatent, LATENT_TP2, "WRONG_INPUT", (0, 1), "CONFIRMED"),
    (SharedAfterInplaceRouted, TP2, "WRONG_INPUT", (0, 1), "CONFIRMED"),
    (AuxNoWait, TP2_MULTI, "UNSAFE_OVERLAP", (0, 1), "CONFIRMED"),
    (DropFinalReduction, TP2, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
    (SharedBeforeDispatch, MK_DP2, "LOST_OVERLAP", (0, 1), "CONFIRMED"),
    (SkipPreTransformReduce, LATENT_NL_TP2, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
    (DeclarePaddedWidth, PADDED_TP2, "SHAPE_MISMATCH", (0, 1), "CONFIRMED"),
    (ScaleAfterSharedAdd, RSF_TP2, "DOUBLE_REDUCTION", (0, 1), "CONFIRMED"),
    (ReduceAndFuse, FUSED_NEXT_TP2, "DOUBLE_REDUCTION", (0, 1), "CONFIRMED"),
    (DeferIgnoringTokenCap, FUSION_OFF_BY_SIZE, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
    (ReplicatedSharedAddedBeforeReduce, TP2, "DOUBLE_REDUCTION", (0, 1), "CONFIRMED"),
    (SharedReducedInsideAndAgain, TP2, "DOUBLE_REDUCTION", (0, 1), "CONFIRMED"),
    (AllReduceOverMoeEpOnly, HYBRID_TP4, "MISSING_REDUCTION", (0, 1, 2, 3), "CONFIRMED"),
]

CORRECT = [
    (ScaleThenSumSharedReplicas, TP2),
    (ReduceScatterAllGather, TP2),
    (CloneBeforeAuxFork, TP2_MULTI),
    (MoERunner, FUSED_NEXT_TP2),
    (ReplicatedSharedJoinsAfterReduce, TP2),
    (SharedReducedInsideJoinsAfter, TP2_MULTI),
    (SharedSummedWithReducedRouted, FI_TP2_DP2),
    (Qwen3TwoReductions, HYBRID_TP4),
]
