"""Wrong variants of the SGLang reference runner (each a short override of one
decision, the way a hurried engineer might break it) and the scenarios of
its layouts the tests run. Rank processes load these by file path."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.sglang import SGLangRunner
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, Workload


class SkipReduceBeforeDpScatter(SGLangRunner):
    """Under DP attention, skips the post-experts all-reduce as if the scatter
    back to the DP ranks summed (only the reduce-scatterv path does)."""

    def skip_post_experts_reduce(self) -> bool:
        return self.dp_attention() or super().skip_post_experts_reduce()


class ScatterFirstRows(SGLangRunner):
    """Returns the first T_d gathered rows instead of this DP rank's own rows."""

    def postprocess_layer(self, ops: Ops, out: Any, tokens: int) -> Any:
        if self.dp_attention() and not self.mlp_scattered() and not self.use_reduce_scatterv():
            return ops.trim_rows(out, tokens, name="dp_scatter")
        return super().postprocess_layer(ops, out, tokens)


class GatherAsEqual(SGLangRunner):
    """Gathers the DP ranks' tokens with a plain all-gather (equal counts assumed)."""

    def prepare_mlp(self, ops: Ops, x: Any) -> Any:
        if self.dp_attention() and not self.mlp_scattered():
            return ops.all_gather(x, "dp", name="dp_gather")
        return super().prepare_mlp(ops, x)


class FusedReduceOnMoeEp(SGLangRunner):
    """Hands the deferred sum to the next layer's fused all-reduce on moe_ep
    whatever the layout (without EP that group is this rank alone)."""

    def fused_reduce_group(self) -> str:
        return "moe_ep"


class ScatterAtSumLenOffset(SGLangRunner):
    """Copies its rows back from the true-count offset, as if the gather had
    been SUM_LEN, while the buffer is padded to the largest count (MAX_LEN)."""

    def postprocess_layer(self, ops: Ops, out: Any, tokens: int) -> Any:
        if self.dp_attention() and not self.mlp_scattered() and not self.use_reduce_scatterv():
            return ops.dp_scatter(out, name="dp_scatter", padded=False)
        return super().postprocess_layer(ops, out, tokens)


class ReduceScatterTrueCounts(SGLangRunner):
    """Reduce-scatters a MAX_LEN buffer by the DP ranks' true counts
    (global_num_tokens_cpu instead of the padded list)."""

    def dp_buffer_counts(self) -> tuple[int, ...]:
        return self.scenario.token_counts


class FusedSharedNoEpScale(SGLangRunner):
    """Fuses the shared expert into the routed kernel with weight 1/rsf only,
    forgetting that every EP rank computes the slot for every token."""

    def fused_shared_weight(self) -> float:
        return 1.0 / self.scenario.model.routed_scaling_factor if self.shared_fused() else 0.0


class FusedSharedScaledTwice(SGLangRunner):
    """Gives the fused shared slot weight 1 / moe_ep but not 1 / rsf, so the
    routed scaling applied to the kernel's output scales the shared expert too."""

    def fused_shared_weight(self) -> float:
        return 1.0 / self.scenario.moe_ep if self.shared_fused() else 0.0


class ShardedSharedAddedAfterReduce(SGLangRunner):
    """Under DP attention, adds the shared output after the post-experts
    all-reduce as if it were replicated, but it is this rank's world shard."""

    def shared_joins_after_reduce(self) -> bool:
        return self.dp_attention() or super().shared_joins_after_reduce()


class SharedShardedWithoutDpAttention(SGLangRunner):
    """Keys the replicated (TP1) shared experts on DP attention instead of on
    the all-to-all backend: without DP attention the shared MLP is sharded
    over TP, and its partials on the SCATTERED rows are never summed."""

    def shared_tp1(self) -> bool:
        return self.mlp_scattered() and self.dp_attention()


class AttnTpGatherOverWorld(SGLangRunner):
    """All-gathers the SCATTERED rows back over SGLang's TP group (the world)
    instead of the attention-TP group: under DP attention every rank keeps
    the first DP rank's tokens."""

    def postprocess_layer(self, ops: Ops, out: Any, tokens: int) -> Any:
        if not self.mlp_scattered():
            return super().postprocess_layer(ops, out, tokens)
        return ops.trim_rows(ops.all_gather(out, "world", name="attn_tp_all_gather"), tokens, name="attn_tp_drop_pad_rows")


def _s(name: str, model: dict, parallel: dict, runtime: dict | None = None,
       tokens: int | tuple[int, ...] = 4, phase: str = "decode") -> Scenario:
    base = {"hidden": 128, "moe_intermediate": 64, "num_experts": 8, "top_k": 2, "num_shared_experts": 1}
    return Scenario(
        name=name, model=ModelTraits(**{**base, **model}), parallel=ParallelConfig(**parallel),
        runtime=Runtime(**(runtime or {})), workload=Workload(tokens=tokens, seed=3, phase=phase), kernel="torch",
        runner="sglang",
    )


# One scenario per path of the SGLang block (world <= 4).
DS_TP2 = _s("ds-tp2", {}, {"tp": 2})
DS_DPATTN_RSV = _s("ds-dp-attention-ep-reduce-scatterv", {}, {"dp": 2, "ep": True}, tokens=(3, 5))
DS_DPATTN_DEEPEP = _s("ds-dp-attention-deepep", {}, {"tp": 2, "dp": 2, "ep": True, "backend": "deepep_low_latency"},
                      {"platform": "cuda", "aux_stream": True})
# Prefill under DP attention gathers the true counts (SUM_LEN); decode pads (MAX_LEN).
DS_DPATTN_RSV_PREFILL = _s("ds-dp-attention-ep-reduce-scatterv-prefill", {}, {"dp": 2, "ep": True},
                           tokens=(3, 5), phase="prefill")
QWEN3_HYBRID = _s("qwen3-hybrid-ep2-tp2", {"num_shared_experts": 0}, {"tp": 4, "ep": True, "ep_size": 2})
DS_DPATTN_ATTN_TP2 = _s("ds-dp-attention-attn-tp2", {}, {"tp": 2, "dp": 2, "ep": True}, tokens=(3, 5))
# Shared-experts fusion: TP (one slot split over moe_tp) and ROCm EP (the slot on every EP rank).
DS_FUSED_SHARED_TP2 = _s("ds-fused-shared-tp2", {"routed_scaling_factor": 2.5}, {"tp": 2},
                         {"shared_experts_fusion": True})
DS_FUSED_SHARED_ROCM_EP = _s("ds-fused-shared-rocm-ep2", {"routed_scaling_factor": 2.5}, {"tp": 2, "ep": True},
                             {"shared_experts_fusion": True, "platform": "rocm"})
DS_FUSED_NEXT = _s("ds-fused-next-layer", {}, {"tp": 2}, {"allreduce_fusion": True}, tokens=8)
# All-to-all layouts of SGLang's own (not vLLM's): DeepEP without DP attention
# (SCATTERED over tp, dispatch over every rank), and an all-to-all outside
# vLLM's sequence-parallel list with attention TP 2 under DP attention.
DS_DEEPEP_TP2 = _s("ds-tp2-deepep-no-dp-attention", {}, {"tp": 2, "ep": True, "backend": "deepep_high_throughput"},
                   {"platform": "cuda", "aux_stream": True}, tokens=5)
QWEN3_DEEPEP_TP4 = _s("qwen3-tp4-deepep-ll-no-dp-attention", {"num_shared_experts": 0},
                      {"tp": 4, "ep": True, "backend": "deepep_low_latency"}, tokens=7)
DS_DPATTN_MOONEP_ATTN_TP2 = _s("ds-dp-attention-moonep-attn-tp2", {}, {"tp": 2, "dp": 2, "ep": True, "backend": "moonep"},
                               tokens=(3, 5))
DS_DPATTN_MOONEP_EVEN = DS_DPATTN_MOONEP_ATTN_TP2.with_(name="ds-dp-attention-moonep-attn-tp2-even",
                                                        **{"workload.tokens": 4})
A2A_LAYOUTS = [DS_DEEPEP_TP2, QWEN3_DEEPEP_TP4, DS_DPATTN_MOONEP_ATTN_TP2]

CLEAN = [DS_TP2, DS_DPATTN_RSV, DS_DPATTN_RSV_PREFILL, DS_DPATTN_DEEPEP, QWEN3_HYBRID, DS_DPATTN_ATTN_TP2, DS_FUSED_NEXT,
         DS_FUSED_SHARED_TP2, DS_FUSED_SHARED_ROCM_EP, *A2A_LAYOUTS]

# (runner, scenario, predicted kind, ranks, expected verdict)
WRONG = [
    (SkipReduceBeforeDpScatter, DS_DPATTN_ATTN_TP2, "MISSING_REDUCTION", (0, 1, 2, 3), "CONFIRMED"),
    (ScatterFirstRows, DS_DPATTN_ATTN_TP2, "WRONG_TOKENS", (2, 3), "CONFIRMED"),
    (GatherAsEqual, DS_DPATTN_ATTN_TP2, "SHAPE_MISMATCH", (0, 1, 2, 3), "CONFIRMED"),
    (FusedReduceOnMoeEp, DS_FUSED_NEXT, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
    (ScatterAtSumLenOffset, DS_DPATTN_ATTN_TP2, "WRONG_TOKENS", (2, 3), "CONFIRMED"),
    (ReduceScatterTrueCounts, DS_DPATTN_RSV, "SHAPE_MISMATCH", (0, 1), "CONFIRMED"),
    (FusedSharedNoEpScale, DS_FUSED_SHARED_ROCM_EP, "DOUBLE_REDUCTION", (0, 1), "CONFIRMED"),
    (FusedSharedScaledTwice, DS_FUSED_SHARED_TP2, "DOUBLE_REDUCTION", (0, 1), "CONFIRMED"),
    (ShardedSharedAddedAfterReduce, DS_DPATTN_ATTN_TP2, "MISSING_REDUCTION", (0, 1, 2, 3), "CONFIRMED"),
    (SharedShardedWithoutDpAttention, DS_DEEPEP_TP2, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
    (AttnTpGatherOverWorld, DS_DPATTN_MOONEP_EVEN, "WRONG_TOKENS", (2, 3), "CONFIRMED"),
]
