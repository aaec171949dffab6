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
FI_TP2_DP2 = _s("fi-two-sided-tp2-dp2", {}, {"tp": 2, "dp": 2, "ep": True, "backend": "flashinfer_nvlink_two_sided"})

# (runner, scenario, predicted kind, the ranks it must hit, expected verdict)
WRONG = [
    (SkipSpGatherOnRowGuess, SP_DECODE, "WRONG_TOKENS", (1, 3), "CONFIRMED"),
    (SharedOnLatent, LATENT_TP2, "WRONG_INPUT", (0, 1), "CONFIRMED"),
    (SharedAfterInplaceRouted, TP2, "WRONG_INPUT", (0, 1), "CONFIRMED"),
    (AuxNoWait, TP2_MULTI, "UNSAFE_OVERLAP", (0, 1), "CONFIRMED"),
    (DropFinalReduction, TP2, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
]

CORRECT = [
    (ScaleThenSumSharedReplicas, TP2),
    (ReduceScatterAllGather, TP2),
    (SharedSummedWithReducedRouted, FI_TP2_DP2),
]
