"""Wrong variants of the TensorRT-LLM reference runner (each a short override
of one decision, the way a hurried engineer might break it) and the
scenarios of its layouts the tests run. Rank processes load these by file path."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.runner_base import Order
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, Workload
from scenarios.trtllm import TRTLLMRunner, token_routing


class NoSharedOutputScale(TRTLLMRunner):
    """Drops shared_output_scale: the replicated shared MLP (shared_tp 1 < tp)
    goes into the tp all-reduce unscaled, so it is counted tp times."""

    def shared_output_scale(self) -> float | None:
        return None


class AllReduceKeptUnderFusion(TRTLLMRunner):
    """Keeps the MoE's own all-reduce (enable_allreduce = tp > 1) while the
    layer's fused all-reduce + RMSNorm also sums the output."""

    def moe_allreduce_enabled(self) -> bool:
        return self.scenario.parallel.tp > 1


class ReduceScatterSkipped(TRTLLMRunner):
    """Under attention DP, takes this rank's rows of the experts' output as if
    they were complete sums instead of reduce-scattering them."""

    def reducescatter_or_allreduce(self, ops: Ops, y: Any) -> Any:
        return ops.dp_scatter(y, name="reducescatter")


class AllReduceUnderAttentionDP(TRTLLMRunner):
    """Forgets the use_dp guard: all-reduces shared + routed over the TP group
    (the world) although the reduce-scatter already completed the sum and
    the shared experts are replicated."""

    def needs_final_reduce(self, routed_reduced: bool) -> bool:
        return self.moe_allreduce_enabled()


class SharedAddedAfterReduce(TRTLLMRunner):
    """Adds the shared output after the all-reduce, as for replicated shared
    experts, although it is sharded over tp (its partials are never summed)."""

    def shared_joins_after_reduce(self) -> bool:
        return True


class LocalExpertsWithoutAlltoall(TRTLLMRunner):
    """Under attention DP with a token-routing backend configured but the
    all-to-all off (moe_ep < top_k), runs its experts on its own tokens as if
    nothing needed gathering: the other ranks' experts never see them."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        if self.attention_dp() and token_routing(self.scenario) and not self.uses_alltoall():
            return ops.experts(x, routing, inplace=False), None
        return super().routed_path(ops, x, routing, order, shared_inside)


def _s(name: str, model: dict, parallel: dict, runtime: dict | None = None,
       tokens: int | tuple[int, ...] = 4) -> Scenario:
    base = {"hidden": 128, "moe_intermediate": 64, "num_experts": 8, "top_k": 2, "num_shared_experts": 1}
    return Scenario(
        name=name, model=ModelTraits(**{**base, **model}), parallel=ParallelConfig(**parallel),
        runtime=Runtime(**(runtime or {})), workload=Workload(tokens=tokens, seed=3), kernel="torch",
        runner="trtllm",
    )


# One scenario per path of the TensorRT-LLM block (world <= 4).
DS_TP2 = _s("ds-tp2", {}, {"tp": 2})
# FP8-style block of the whole shared intermediate: shared_tp = gcd(1, 2) = 1, scale 1/2.
DS_TP2_SHARED_TP1 = _s("ds-tp2-shared-tp1", {"weight_block_size": 64}, {"tp": 2})
DS_TP2_FUSED = _s("ds-tp2-post-moe-fusion", {}, {"tp": 2}, {"allreduce_fusion": True, "platform": "cuda",
                                                             "aux_stream": True})
QWEN3_HYBRID_FUSED = _s("qwen3-tp4-ep2-fusion", {"num_shared_experts": 0}, {"tp": 4, "ep": True, "ep_size": 2},
                        {"allreduce_fusion": True})
DS_ADP_ALLGATHER = _s("ds-adp-allgather-reducescatter", {}, {"dp": 2, "ep": True}, tokens=(3, 5))
DS_ADP_EVEN = _s("ds-adp-allgather-even", {}, {"dp": 2, "ep": True}, tokens=4)
DS_ADP_TP_MOE = _s("ds-adp-moe-tp", {}, {"dp": 2}, tokens=(4, 1))
DS_ADP_DEEPEP = _s("ds-adp-deepep-ll", {"hidden": 2048}, {"dp": 4, "ep": True, "backend": "deepep_low_latency"},
                   {"platform": "cuda", "aux_stream": True}, tokens=(3, 2, 0, 4))
# TensorRT-LLM's all-gather fallback: DeepEP configured, moe_ep 2 < top_k 4
# (no rounding of hidden 256 by DeepEP's 512-byte rule).
DS_ADP_DEEPEP_FALLBACK = _s("ds-adp-deepep-allgather-fallback", {"hidden": 256, "top_k": 4},
                            {"dp": 2, "ep": True, "backend": "deepep_high_throughput"}, tokens=(3, 5))

CLEAN = [DS_TP2, DS_TP2_SHARED_TP1, DS_TP2_FUSED, QWEN3_HYBRID_FUSED, DS_ADP_ALLGATHER, DS_ADP_EVEN, DS_ADP_TP_MOE,
         DS_ADP_DEEPEP, DS_ADP_DEEPEP_FALLBACK]

# (runner, scenario, predicted kind, ranks, expected verdict)
WRONG = [
    (NoSharedOutputScale, DS_TP2_SHARED_TP1, "DOUBLE_REDUCTION", (0, 1), "CONFIRMED"),
    (AllReduceKeptUnderFusion, DS_TP2_FUSED, "DOUBLE_REDUCTION", (0, 1), "CONFIRMED"),
    (ReduceScatterSkipped, DS_ADP_ALLGATHER, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
    (SharedAddedAfterReduce, DS_TP2, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
    # Equal token counts: other ranks' tokens summed into each row; unequal: the shapes disagree.
    (AllReduceUnderAttentionDP, DS_ADP_EVEN, "DOUBLE_REDUCTION", (0, 1), "CONFIRMED"),
    (AllReduceUnderAttentionDP, DS_ADP_DEEPEP, "SHAPE_MISMATCH", (0, 1, 2, 3), "CONFIRMED"),
    (LocalExpertsWithoutAlltoall, DS_ADP_DEEPEP_FALLBACK, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
]
