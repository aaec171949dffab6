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


class ShardedSharedAddedAfterReduce(SGLangRunner):
    """Under DP attention, adds the shared output after the post-experts
    all-reduce as if it were replicated, but it is this rank's world shard."""

    def shared_joins_after_reduce(self) -> bool:
        return self.dp_attention() or super().shared_joins_after_reduce()


def _s(name: str, model: dict, parallel: dict, runtime: dict | None = None,
       tokens: int | tuple[int, ...] = 4) -> Scenario:
    base = {"hidden": 128, "moe_intermediate": 64, "num_experts": 8, "top_k": 2, "num_shared_experts": 1}
    return Scenario(
        name=name, model=ModelTraits(**{**base, **model}), parallel=ParallelConfig(**parallel),
        runtime=Runtime(**(runtime or {})), workload=Workload(tokens=tokens, seed=3), kernel="torch",
        runner="sglang",
    )


# One scenario per path of the SGLang block (world <= 4).
DS_TP2 = _s("ds-tp2", {}, {"tp": 2})
DS_DPATTN_RSV = _s("ds-dp-attention-ep-reduce-scatterv", {}, {"dp": 2, "ep": True}, tokens=(3, 5))
DS_DPATTN_DEEPEP = _s("ds-dp-attention-deepep", {}, {"tp": 2, "dp": 2, "ep": True, "backend": "deepep_low_latency"},
                      {"platform": "cuda", "aux_stream": True})
QWEN3_HYBRID = _s("qwen3-hybrid-ep2-tp2", {"num_shared_experts": 0}, {"tp": 4, "ep": True, "ep_size": 2})
DS_DPATTN_ATTN_TP2 = _s("ds-dp-attention-attn-tp2", {}, {"tp": 2, "dp": 2, "ep": True}, tokens=(3, 5))
DS_FUSED_NEXT = _s("ds-fused-next-layer", {}, {"tp": 2}, {"allreduce_fusion": True}, tokens=8)

CLEAN = [DS_TP2, DS_DPATTN_RSV, DS_DPATTN_DEEPEP, QWEN3_HYBRID, DS_DPATTN_ATTN_TP2, DS_FUSED_NEXT]

# (runner, scenario, predicted kind, ranks, expected verdict)
WRONG = [
    (SkipReduceBeforeDpScatter, DS_DPATTN_ATTN_TP2, "MISSING_REDUCTION", (0, 1, 2, 3), "CONFIRMED"),
    (ScatterFirstRows, DS_DPATTN_ATTN_TP2, "WRONG_TOKENS", (2, 3), "CONFIRMED"),
    (GatherAsEqual, DS_DPATTN_ATTN_TP2, "SHAPE_MISMATCH", (0, 1, 2, 3), "CONFIRMED"),
    (FusedReduceOnMoeEp, DS_FUSED_NEXT, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
    (ShardedSharedAddedAfterReduce, DS_DPATTN_ATTN_TP2, "MISSING_REDUCTION", (0, 1, 2, 3), "CONFIRMED"),
]
