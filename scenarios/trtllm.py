"""TensorRT-LLM's MoE block as a reference runner (`--runner trtllm`).

The MoE layer of TensorRT-LLM's PyTorch backend for the DeepSeek-V3 family
(shared experts) and the Qwen3-MoE family (none), with the decoder layer's
all-reduce fusion around it, in this project's vocabulary. Facts used, read
from stored copies of NVIDIA/TensorRT-LLM (`tensorrt_llm/` paths; each file
at the commit noted, not one release, so the files may differ in age;
docs/moe_block.md section 9 has the same facts):

- `_torch/models/modeling_deepseekv3.py` (000561df):
  `Deepseekv3MoE` builds its experts with `reduce_results=False`; the shared
  MLP's TP size (`_compute_shared_expert_tp_size`) is 1 under attention DP,
  else gcd(shared_intermediate / block, tp), and when that is not tp the
  shared output is multiplied by `shared_output_scale = shared_tp / tp`
  right after the shared MLP (`_compute_shared_output`), so the tp/shared_tp
  replicas of each shard sum to one copy; routed (fn0, main stream) and
  shared (fn1, aux stream) go through `maybe_execute_in_parallel`; `forward`
  adds shared + routed and all-reduces the sum only if not attention DP and
  tp > 1, with `AllReduceParams(enable_allreduce = not (POST_MOE_FUSION or
  tp == 1))`. `DeepseekV3DecoderLayer`: `enable_fusion` (env
  `TRTLLM_DEEPSEEK_EAGER_FUSION_DISABLED` unset) and not attention DP;
  `POST_MOE_FUSION = enable_fusion and has_tp`; then the layer itself runs
  the all-reduce fused with residual add + next-layer RMSNorm
  (`AllReduceFusionOp.RESIDUAL_RMS_NORM`), or `MoEAllReduce`, which also
  fuses the experts' finalize (single node, TRTLLM-gen NVFP4, T <= max_token,
  P2P): either way one all-reduce over tp of the same sum.
- `_torch/models/modeling_qwen3_moe.py` (03441af1): `Qwen3MoE` (no shared experts),
  experts `reduce_results=False`, all-reduce over tp iff not attention DP
  and tp > 1, gated the same way; `POST_MOE_FUSION = PRE_MOE_FUSION and not
  has_pp` (no PP here).
- `_torch/modules/fused_moe/interface.py` (00a3c47d): `parallel_size = mapping.tp_size`
  ("all ranks participate in allreduce regardless of EP/TP combination");
  moe_tp x moe_ep = tp. `fused_moe_cutlass.py` (000a01de): under attention DP the routing
  is computed on the local tokens, then tokens and routing are all-gathered
  over the TP group (`allgather(..., sizes=all_rank_num_tokens)` unless DP
  padding, off in these models) and the output reduce-scattered with the
  same sizes (`reducescatter_or_allreduce`); without attention DP and with
  reduce_results=False it reduces nothing. `fused_moe_wide_ep.py` (01303b38): with
  `enable_alltoall` (attention DP, tp > 1, moe_ep >= top_k, MNNVL or DeepEP /
  DeepEP low-latency available) dispatch and combine replace the all-gather
  and the reduce-scatter (`reducescatter_or_allreduce` skips it).
- `_torch/modules/multi_stream_utils.py` (05b58881): `maybe_execute_in_parallel`
  uses the aux stream only when `do_multi_stream()` is set ("only enabled
  when cuda graph is turned on", its docstring); the aux stream waits on an
  event recorded before fn0. Otherwise fn0 (routed) then fn1 (shared) run on
  the main stream.
- `mapping.py`: moe_ep_rank = tp_rank % moe_ep (EP fastest).

Mapping onto the scenario:
- attention DP is on when `parallel.dp > 1`; TensorRT-LLM's attention DP has
  one DP rank per GPU (all_rank_num_tokens has one count per TP rank), so it
  needs `parallel.tp == 1`, and its TP group (the MoE group) is the world;
  without attention DP the world is `parallel.tp`.
- MoE EP x TP sizes are the scenario's moe_ep x moe_tp (`parallel.ep`,
  `ep_size`). The scenario orders ranks moe_tp-fastest, TensorRT-LLM
  EP-fastest; this changes which rank holds which shard, never a sum,
  because every reduction here spans the whole TP group.
- TensorRT-LLM's all-to-all (`enable_alltoall`) is the scenario's token-routing
  backend under attention DP and EP: `deepep_high_throughput` (DeepEP),
  `deepep_low_latency` (DeepEPLowLatency), `flashinfer_nvlink_one_sided` /
  `_two_sided` (MNNVL, whose kernels FlashInfer's NVLink all-to-all carries).
  Otherwise (`allgather_reducescatter`, no EP) the all-gather /
  reduce-scatter path, which is the naive DP dispatch/combine here.
- `runtime.allreduce_fusion` is the eager fusion being enabled (TensorRT-LLM
  enables it by default; false here means the env switch disables it); it
  applies with tp > 1 and no attention DP, for any token count.
- `model.weight_block_size` is the quantization block that caps shared_tp
  (None: 1, unquantized). CUDA graph capture (multi-stream) is taken as a
  batch of 0 < T <= `runtime.token_threshold` on every rank.

Not modelled (refused in one line by `unsupported`): shared_tp strictly
between 1 and tp (its shard groups are not one of the Ops groups); attention
DP with attention TP > 1; latent MoE; EPLB (the MoE load balancer); ROCm;
all-to-all backends TensorRT-LLM does not have. A token-routing backend with
moe_ep < top_k takes TensorRT-LLM's all-gather fallback: the dispatch follows
`TRTLLMRules` (a DispatchLayout), not the scenario's backend; its DeepEP buffers take the
model's hidden size unrounded (no vLLM-style rounding of the routed rows). Also not modelled: MoE chunking,
DP padding, the min-latency (do_finalize=False) path as a separate kernel,
the dense (non-MoE) layers' own TP size.
"""

from __future__ import annotations

import math
from typing import Any

from scenarios.backends import backend_info
from scenarios.ops import Ops
from scenarios.runner_base import EngineRules, MoERunner, Order
from scenarios.spec import Scenario

# Scenario backends that are TensorRT-LLM all-to-all methods (AlltoallMethodType).
TRTLLM_ALLTOALL = {
    "deepep_high_throughput": "DeepEP",
    "deepep_low_latency": "DeepEPLowLatency",
    "flashinfer_nvlink_one_sided": "MNNVL",
    "flashinfer_nvlink_two_sided": "MNNVL",
}

# ---- the engine's layout rules (functions of the scenario) ----


def attention_dp(s: Scenario) -> bool:
    return s.parallel.dp > 1


def tp_size(s: Scenario) -> int:
    """TensorRT-LLM's mapping.tp_size: the whole world (every rank under
    attention DP, where parallel.tp is 1; parallel.tp ranks otherwise)."""
    return s.world


def token_routing(s: Scenario) -> bool:
    """The scenario's backend routes tokens (the twin's dispatch would)."""
    return s.use_all2all_kernels and backend_info(s.effective_backend).token_routing


def uses_alltoall(s: Scenario) -> bool:
    """WideEPMoE.enable_alltoall: attention DP, tp > 1 (world > 1 here),
    moe_ep >= top_k and an all-to-all method of TensorRT-LLM's."""
    return (attention_dp(s) and token_routing(s) and s.effective_backend in TRTLLM_ALLTOALL
            and s.moe_ep >= s.model.top_k)


def cuda_graph_batch(s: Scenario) -> bool:
    """Every rank runs a captured batch (0 < T <= token_threshold): under
    attention DP the ranks agree on graph use, so the largest count decides."""
    return 0 < max(s.token_counts) <= s.runtime.token_threshold


def reference_order(s: Scenario) -> Order:
    """maybe_execute_in_parallel: the aux stream only under CUDA graphs."""
    rt = s.runtime
    if s.model.has_shared and rt.platform == "cuda" and rt.aux_stream and cuda_graph_batch(s):
        return Order.MULTI_STREAM_OVERLAPPED
    return Order.NO_OVERLAP


def shared_tp_size(s: Scenario) -> int:
    """_compute_shared_expert_tp_size: 1 under attention DP, else gcd(I/block, tp)."""
    if attention_dp(s):
        return 1
    block = s.model.weight_block_size or 1
    return math.gcd(s.model.shared_inter // block, tp_size(s))


def post_moe_fusion(s: Scenario) -> bool:
    """POST_MOE_FUSION = enable_fusion (not under attention DP) and has_tp."""
    return s.runtime.allreduce_fusion and not attention_dp(s) and tp_size(s) > 1


class TRTLLMRules(EngineRules):
    """TensorRT-LLM forbids no shared-expert overlap; its best order is its own.
    Its dispatch layout: all-to-all kernels only where enable_alltoall holds;
    otherwise, under attention DP, the all-gather / reduce-scatter path
    (the naive dispatch) whatever backend the scenario names; never sliced
    tokens (attention DP has attention TP 1)."""

    name = "trtllm"

    def all2all_kernels(self, s: Scenario) -> bool:
        return uses_alltoall(s)

    def dispatch_backend(self, s: Scenario) -> str:
        if uses_alltoall(s):
            return s.effective_backend
        return "allgather_reducescatter" if attention_dp(s) else "none"

    def slices_tokens(self, s: Scenario) -> bool:
        return False

    def rounds_hidden(self, s: Scenario) -> bool:
        """WideEPMoE reserves its DeepEP buffers with the model's hidden_size:
        no rounding (a width the library's kernels do not take fails there)."""
        return False

    def overlap_forbidden(self, s: Scenario) -> bool:
        return False

    def best_safe_order(self, s: Scenario) -> Order:
        return reference_order(s)

    def async_overlap_possible(self, s: Scenario) -> bool:
        return False  # the shared MLP overlaps on the aux stream, never inside the kernel

    def missing_stream_consequence(self, stream: str) -> str:
        # maybe_execute_in_parallel (multi_stream_utils.py) takes aux_stream=None as "run serially".
        return ("TensorRT-LLM would not launch it there: its maybe_execute_in_parallel runs both halves one "
                "after the other on the current stream when it has no aux stream (no crash); the overlap this "
                "program asks for does not exist on that platform")


TRTLLM_RULES = TRTLLMRules()


class TRTLLMRunner(MoERunner):
    name = "trtllm"
    description = "TensorRT-LLM MoE block reference (DeepSeek-V3 and Qwen3-MoE, attention DP, all-reduce fusion)"
    engine_rules = TRTLLM_RULES

    # ---- what this reference models ----

    def unsupported(self) -> str | None:
        s = self.scenario
        p, m = s.parallel, s.model
        if s.runtime.platform == "rocm":
            return "ROCm: TensorRT-LLM runs on CUDA only"
        if m.has_transform:
            return "latent MoE is not part of TensorRT-LLM's DeepSeek-V3 or Qwen3-MoE blocks"
        if p.eplb:
            return "EPLB (TensorRT-LLM's MoE load balancer) is not modelled"
        if attention_dp(s) and p.tp > 1:
            return "attention DP with attention TP > 1: TensorRT-LLM's attention DP has one DP rank per GPU (parallel.tp = 1)"
        if token_routing(s) and s.effective_backend not in TRTLLM_ALLTOALL:
            return f"{s.effective_backend} is not one of TensorRT-LLM's all-to-all methods (DeepEP, DeepEP low-latency, MNNVL)"
        if m.has_shared and 1 < shared_tp_size(s) < tp_size(s):
            return (f"shared-expert TP size {shared_tp_size(s)} strictly between 1 and tp {tp_size(s)}: "
                    "its shard groups are not one of the twin's groups")
        return None

    # ---- the layout ----

    def attention_dp(self) -> bool:
        return attention_dp(self.scenario)

    def uses_alltoall(self) -> bool:
        return uses_alltoall(self.scenario)

    def post_moe_fusion(self) -> bool:
        return post_moe_fusion(self.scenario)

    def moe_allreduce_enabled(self) -> bool:
        """The AllReduceParams the decoder layer hands the MoE:
        enable_allreduce = not (POST_MOE_FUSION or tp == 1)."""
        return not (self.post_moe_fusion() or tp_size(self.scenario) == 1)

    def shared_tp_size(self) -> int:
        return shared_tp_size(self.scenario)

    def shared_output_scale(self) -> float | None:
        """shared_tp / tp when the shared MLP's TP size is not tp (never under attention DP)."""
        tp = tp_size(self.scenario)
        if self.attention_dp() or self.shared_tp_size() == tp:
            return None
        return self.shared_tp_size() / tp

    # ---- the program: the decoder layer around the MoE ----

    def model_forward(self, ops: Ops) -> Any:
        x = ops.layer_input()
        out = self.forward(ops, x)
        if self.post_moe_fusion():
            out = self.fused_allreduce(ops, out)
        return ops.layer_output(out)

    def fused_allreduce(self, ops: Ops, out: Any) -> Any:
        """POST_MOE_FUSION: the layer's AllReduce with RESIDUAL_RMS_NORM (or
        MoEAllReduce) sums the MoE output over tp; residual add and the
        next layer's RMSNorm are not modelled, the sum is judged after it."""
        return ops.all_reduce(out, self.tp_group(), name="allreduce_residual_rmsnorm")

    # ---- the MoE block's decisions ----

    def is_sequence_parallel(self) -> bool:
        return False

    def fused_output_is_reduced(self) -> bool:
        # Under attention DP the reduce-scatter (or the combine) leaves complete sums.
        return self.attention_dp()

    def tp_group(self) -> str:
        """TensorRT-LLM's TP group, over which every reduction here runs: the world."""
        return "world"

    def shared_experts_sharded(self) -> bool:
        return self.shared_tp_size() > 1

    def shared_experts_group(self) -> str:
        return self.tp_group()  # sharded only when shared_tp = tp

    def shared_experts_order(self, num_tokens: int) -> Order:
        return reference_order(self.scenario)

    def shared_after_routed(self, order: Order) -> bool:
        return True  # maybe_execute_in_parallel without the aux stream: fn0 (routed), then fn1 (shared)

    def routed_inplace(self, order: Order) -> bool:
        return False  # the fused MoE op writes a new output

    def run_shared(self, ops: Ops, x: Any, sharded: bool) -> Any:
        """_compute_shared_output: the MLP, then shared_output_scale on the same stream."""
        out = super().run_shared(ops, x, sharded)
        scale = self.shared_output_scale()
        if scale is not None:
            out = ops.scale(out, scale, name="shared_output_scale")
        return out

    def maybe_reduce_shared(self, ops: Ops, shared: Any, routed_reduced: bool) -> Any:
        return shared  # summed with the routed output, never reduced on its own

    def needs_final_reduce(self, routed_reduced: bool) -> bool:
        return not self.attention_dp() and self.moe_allreduce_enabled()

    def defer_post_experts_reduce(self) -> bool:
        return self.post_moe_fusion()

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        if self.needs_final_reduce(routed_reduced):
            return ops.all_reduce(result, self.tp_group(), name="moe_all_reduce")
        return result

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        """No attention DP: this rank's experts on its tokens (a partial sum).
        Attention DP: all-to-all dispatch/combine, or all-gather of tokens and
        routing, experts, reduce-scatter back to each rank's own rows."""
        if not self.attention_dp():
            return ops.experts(x, routing, inplace=self.routed_inplace(order)), None
        if self.uses_alltoall():
            return super().routed_path(ops, x, routing, order, shared_inside)
        xg, rg = ops.dispatch(x, routing, name="allgather")
        y = ops.experts(xg, rg, inplace=False)
        return self.reducescatter_or_allreduce(ops, y), None

    def reducescatter_or_allreduce(self, ops: Ops, y: Any) -> Any:
        """Under attention DP: reduce-scatter with all_rank_num_tokens (the
        naive combine: a reduce_scatterv over the gathered ranks)."""
        return ops.combine(y, name="reducescatter")
