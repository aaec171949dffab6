"""SGLang's MoE block as a reference runner (`--runner sglang`).

The block of SGLang's DeepSeek-V2/V3 family (`DeepseekV2MoE`, shared experts)
and Qwen3-MoE family (`Qwen3MoeSparseMoeBlock`, none), with the layer
communicator around it, written from the facts in docs/moe_block.md
(sections 1-6), in this project's vocabulary:

- SGLang's TP group is the whole world here (tp x dp ranks); DP attention is
  on when dp > 1 (attn_dp = dp, attn_tp = tp); moe_ep x moe_tp as the
  scenario's layout gives them (`parallel.ep_size`).
- `moe_a2a_backend` is the scenario's backend when it routes tokens under EP,
  else "none". With an all-to-all the MLP runs SCATTERED (each attention-TP
  rank takes its slice of its DP rank's rows; dispatch and combine give
  complete per-token sums); otherwise FULL (DP attention gathers every DP
  rank's rows first, a post-experts all-reduce completes the sum, the
  communicator scatters back, or a reduce-scatterv does both).
- The DP gather pads every DP rank to the largest count (MAX_LEN) or gathers
  the true counts (SUM_LEN), by `workload.phase` and the counts (`dp_max_len`);
  the scatter back (or the reduce-scatterv) reads the same layout.
- Shared experts: replicated (TP1) with an all-to-all, else sharded over the
  whole TP group; TP1 output joins after the routed sum.
- The next layer's fused all-reduce + residual + RMSNorm takes the sum over
  when `runtime.allreduce_fusion` applies (no DP attention, tp > 1, T <= 2048)
  and the sum is one all-reduce (not both moe_ep and moe_tp > 1).

The dispatch follows SGLang's layout (`SGLangRules`, a DispatchLayout):
with an all-to-all, SCATTERED with or without DP attention (e.g. DeepSeek-V3
TP8 with DeepEP and dp = 1: each rank dispatches its 1/tp slice, over every
rank), for any token-routing backend. SGLang hands the backend the model's
hidden size unrounded (unlike vLLM, no 512-byte or compiled-size rounding):
the routed rows keep their width, and a width the library's kernels do not
take is a note, not a refusal.

Not modelled (declared by `unsupported`, refused in one line): latent MoE
(not in these blocks); an all-to-all with moe_tp > 1.
Shared-experts fusion (`runtime.shared_experts_fusion`, `shared_fused`): the
shared expert is one more slot of the routed kernel with weight
1 / (routed_scaling_factor x moe_ep). Also not modelled: two-batch overlap, MoE-DP, context parallelism, CUDA-graph capture (which always pads
the DP gather to MAX_LEN; decode batches here follow SGLang's cost rule).
"""

from __future__ import annotations

from typing import Any

from scenarios.backends import backend_info
from scenarios.ops import Ops
from scenarios.runner_base import EngineRules, MoERunner, Order
from scenarios.spec import Scenario

# ---- the engine's layout rules (functions of the scenario) ----


def a2a_backend(s: Scenario) -> str:
    """SGLang's moe_a2a_backend: the scenario's token-routing backend under EP."""
    p = s.parallel
    if p.ep and backend_info(p.backend).token_routing:
        return p.backend
    return "none"


def mlp_scattered(s: Scenario) -> bool:
    """The MLP's rows are SCATTERED (all-to-all) rather than FULL."""
    return a2a_backend(s) != "none"


def dp_max_len(s: Scenario) -> bool:
    """DpPaddingMode: MAX_LEN (pad every DP rank to the largest count, equal
    all-gather) or SUM_LEN (true counts). A prefill batch over several DP
    ranks takes SUM_LEN; otherwise the cheaper of the two, MAX_LEN on a tie
    (2 * sum >= max * dp). CUDA-graph capture (always MAX_LEN) is not a
    scenario field: decode batches follow the cost rule."""
    counts, dp = s.token_counts, s.parallel.dp
    if s.workload.phase == "prefill" and dp > 1:
        return False
    return 2 * sum(counts) >= max(counts) * dp


def moe_rows(s: Scenario) -> int:
    """Rows the MoE sees on the busiest rank: its attention-TP slice when
    SCATTERED, every DP rank's (padded) tokens when FULL under DP attention."""
    if mlp_scattered(s):
        tp = s.parallel.tp
        return max(-(-t // tp) for t in s.token_counts)
    if s.parallel.dp == 1:
        return s.token_counts[0]
    return max(s.token_counts) * s.parallel.dp if dp_max_len(s) else s.total_tokens


def has_alt_stream(s: Scenario) -> bool:
    """DeepseekV2Model's alt_stream: CUDA, or ROCm with the multi-stream env set
    (here: runtime.aux_stream on a CUDA-alike platform)."""
    return s.runtime.platform in ("cuda", "rocm") and s.runtime.aux_stream


def shared_fused(s: Scenario) -> bool:
    """Shared-experts fusion (determine_num_fused_shared_experts): asked for,
    one shared expert, not with a DeepEP-class all-to-all, and without expert
    parallelism except on ROCm (the AITER path)."""
    return (s.runtime.shared_experts_fusion and s.model.num_shared_experts == 1
            and not mlp_scattered(s) and (s.moe_ep == 1 or s.runtime.platform == "rocm"))


def reference_order(s: Scenario, num_tokens: int) -> Order:
    """Shared experts on the alternate stream: always with an all-to-all
    (forward_deepep), else the dual-stream path needs T > 0 and a captured
    (decode-sized, <= token_threshold) batch. Fused shared experts have no
    MLP of their own to overlap."""
    if not s.model.has_shared or not has_alt_stream(s) or shared_fused(s):
        return Order.NO_OVERLAP
    if mlp_scattered(s) or 0 < num_tokens <= s.runtime.token_threshold:
        return Order.MULTI_STREAM_OVERLAPPED
    return Order.NO_OVERLAP


class SGLangRules(EngineRules):
    """SGLang forbids no shared-expert overlap; its best order is its own rule.
    Its dispatch layout: all-to-all kernels whenever moe_a2a_backend is set
    (with or without DP attention), each attention-TP rank dispatching its
    own slice of its DP rank's tokens (SCATTERED), whatever the backend."""

    name = "sglang"

    def all2all_kernels(self, s: Scenario) -> bool:
        return mlp_scattered(s)

    def dispatch_backend(self, s: Scenario) -> str:
        """moe_a2a_backend when SCATTERED; FULL rows under DP attention see
        every DP rank's tokens (the communicator's dp_gather, no dispatch)."""
        if mlp_scattered(s):
            return a2a_backend(s)
        return "allgather_reducescatter" if s.parallel.dp > 1 else "none"

    def slices_tokens(self, s: Scenario) -> bool:
        return mlp_scattered(s) and s.parallel.tp > 1

    def rounds_hidden(self, s: Scenario) -> bool:
        """SGLang's DeepEP dispatcher sizes its buffers and kernels with the model's hidden_size:
        no rounding (a width the library's kernels do not take fails there)."""
        return False

    def overlap_forbidden(self, s: Scenario) -> bool:
        return False

    def best_safe_order(self, s: Scenario) -> Order:
        return reference_order(s, moe_rows(s))

    def async_overlap_possible(self, s: Scenario) -> bool:
        return False  # SGLang overlaps on the alternate stream, not inside the kernel

    def stream_available(self, s: Scenario, stream: str) -> bool:
        return has_alt_stream(s) if stream == "aux" else True

    def missing_stream_consequence(self, stream: str) -> str:
        # Read in SGLang's forward_normal_dual_stream; its all-to-all path is
        # taken to use the alternate stream the same unguarded way.
        return ("the engine crashes here: SGLang's dual-stream path calls alt_stream.wait_stream "
                "with alt_stream None (no CUDA-alike platform, or the ROCm multi-stream switch "
                "off): an AttributeError")


SGLANG_RULES = SGLangRules()


class SGLangRunner(MoERunner):
    name = "sglang"
    description = "SGLang MoE block reference (DeepSeek-V2/V3 and Qwen3-MoE, DP-attention communicator)"
    engine_rules = SGLANG_RULES
    # ---- what this reference models ----

    def unsupported(self) -> str | None:
        s, m = self.scenario, self.scenario.model
        if m.has_transform:
            return "latent MoE is not part of SGLang's DeepSeek-V2/V3 or Qwen3-MoE blocks"
        if s.parallel.ep_size is not None and self.a2a_backend() != "none" and s.moe_tp > 1:
            return "an all-to-all backend with moe_tp > 1 (SGLang sets ep_size = tp_size for it)"
        return None

    # ---- the layout (model side) ----

    def a2a_backend(self) -> str:
        return a2a_backend(self.scenario)

    def mlp_scattered(self) -> bool:
        return mlp_scattered(self.scenario)

    def dp_attention(self) -> bool:
        return self.scenario.parallel.dp > 1

    def use_reduce_scatterv(self) -> bool:
        """should_use_dp_reduce_scatterv: one reduce-scatterv over the TP group
        both sums and returns each DP rank its rows (attn_tp = 1, moe_ep = attn_dp)."""
        s = self.scenario
        return (not self.mlp_scattered() and self.dp_attention()
                and s.moe_ep == s.parallel.dp and s.parallel.tp == 1)

    def fuse_with_next_layer(self) -> bool:
        """should_fuse_mlp_allreduce_with_next_layer, where the sum is one all-reduce."""
        s = self.scenario
        return (s.next_layer_fuses_reduce and not self.mlp_scattered()
                and not (s.moe_ep > 1 and s.moe_tp > 1))

    def fused_reduce_group(self) -> str:
        """The next layer's fused all-reduce runs on moe_ep if moe_ep > 1, else moe_tp."""
        return "moe_ep" if self.scenario.moe_ep > 1 else "moe_tp"

    def skip_post_experts_reduce(self) -> bool:
        return self.fuse_with_next_layer() or self.use_reduce_scatterv()

    # ---- the program: the communicator around the MoE ----

    def model_forward(self, ops: Ops) -> Any:
        x = ops.layer_input()
        tokens = x.shape[0]
        h = self.prepare_mlp(ops, x)
        out = self.forward(ops, h)
        out = self.postprocess_layer(ops, out, tokens)
        if self.fuse_with_next_layer():
            out = self.next_layer_fused_reduce(ops, out)
        return ops.layer_output(out)

    def prepare_mlp(self, ops: Ops, x: Any) -> Any:
        """TP_ATTN_FULL -> the MLP's layout. The layer input is complete on
        every attention-TP rank, so scattering it is taking this rank's slice."""
        if self.mlp_scattered():
            return ops.sp_slice(x, name="attn_tp_scatter")
        if self.dp_attention():
            return ops.dp_gather(x, name="dp_gather", padded=self.dp_max_len())
        return x

    def postprocess_layer(self, ops: Ops, out: Any, tokens: int) -> Any:
        """The MLP's layout -> TP_ATTN_FULL."""
        if self.mlp_scattered():
            out = ops.all_gather(out, "tp", name="attn_tp_all_gather")
            return ops.trim_rows(out, tokens, name="attn_tp_drop_pad_rows")
        if not self.dp_attention():
            return out
        if self.use_reduce_scatterv():
            out = ops.reduce_scatterv(out, self.dp_buffer_counts(), "world", name="dp_reduce_scatterv")
            return ops.trim_rows(out, tokens, name="dp_drop_pad_rows") if self.dp_max_len() else out
        return ops.dp_scatter(out, name="dp_scatter", padded=self.dp_max_len())

    def dp_max_len(self) -> bool:
        """The DP gather's padding mode (MAX_LEN or SUM_LEN), for this batch."""
        return dp_max_len(self.scenario)

    def dp_buffer_counts(self) -> tuple[int, ...]:
        """Each DP rank's rows in the gathered buffer (get_dp_global_num_tokens):
        the padded counts under MAX_LEN, the true ones under SUM_LEN."""
        counts = self.scenario.token_counts
        return (max(counts),) * len(counts) if self.dp_max_len() else counts

    def next_layer_fused_reduce(self, ops: Ops, out: Any) -> Any:
        return ops.all_reduce(out, self.fused_reduce_group(), name="next_layer_fused_all_reduce")

    # ---- the MoE block's decisions ----

    def is_sequence_parallel(self) -> bool:
        # SCATTERED rows: each rank returns complete sums for its own slice.
        return self.mlp_scattered()

    def fused_output_is_reduced(self) -> bool:
        return self.mlp_scattered()  # the combine sums per token at its home rank

    def shared_fused(self) -> bool:
        return shared_fused(self.scenario)

    def fused_shared_weight(self) -> float:
        """The shared slot's top-k weight: 1 / routed_scaling_factor (the routed
        scaling is applied to the kernel's output, slot included), and 1 / moe_ep
        when every EP rank computes the slot for every token (the sum over
        moe_ep counts moe_ep copies: fused_shared_experts_scaling_factor)."""
        if not self.shared_fused():
            return 0.0
        return 1.0 / (self.scenario.model.routed_scaling_factor * self.scenario.moe_ep)

    def run_shared(self, ops: Ops, x: Any, sharded: bool) -> Any:
        return None if self.shared_fused() else super().run_shared(ops, x, sharded)

    def shared_tp1(self) -> bool:
        """Shared experts replicated (TP1): with an all-to-all backend."""
        return self.mlp_scattered()

    def shared_experts_sharded(self) -> bool:
        return not self.shared_tp1()

    def shared_experts_group(self) -> str:
        # Sharded over SGLang's whole TP group (the world); "tp" when that is it.
        return "tp" if self.scenario.parallel.dp == 1 else "world"

    def shared_joins_after_reduce(self) -> bool:
        return self.shared_tp1()

    def shared_experts_order(self, num_tokens: int) -> Order:
        return reference_order(self.scenario, num_tokens)

    def routed_inplace(self, order: Order) -> bool:
        return False

    def maybe_reduce_shared(self, ops: Ops, shared: Any, routed_reduced: bool) -> Any:
        return shared  # summed with the routed partials (sharded) or added after (TP1)

    def needs_final_reduce(self, routed_reduced: bool) -> bool:
        return (not self.mlp_scattered() and self.scenario.world > 1
                and not self.skip_post_experts_reduce())

    def defer_post_experts_reduce(self) -> bool:
        return self.fuse_with_next_layer()

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        """DeepSeek: one all-reduce over the TP group (the world). Qwen3 (no
        shared experts): over moe_ep, then over moe_tp."""
        if not self.needs_final_reduce(routed_reduced):
            return result
        s = self.scenario
        if s.model.has_shared:
            return ops.all_reduce(result, "world", name="post_experts_all_reduce")
        if s.moe_ep > 1:
            result = ops.all_reduce(result, "moe_ep", name="moe_ep_all_reduce")
        if s.moe_tp > 1:
            result = ops.all_reduce(result, "moe_tp", name="moe_tp_all_reduce")
        return result

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        """FULL rows: every rank's local experts on every gathered token (no
        dispatch); SCATTERED: dispatch, experts, combine (with or without DP
        attention, so not the base class's vLLM test of the backend)."""
        if not self.mlp_scattered():
            return ops.experts(x, routing, inplace=self.routed_inplace(order),
                               fused_shared=self.fused_shared_weight()), None
        if shared_inside is not None:
            return self.overlapped_routed_path(ops, x, routing, shared_inside)
        return self.dispatch_experts_combine(ops, x, routing), None

    def dispatch_experts_combine(self, ops: Ops, x: Any, routing: Any) -> Any:
        """forward_deepep's experts(): this rank's SCATTERED rows go to their
        experts' owners, come back as complete per-token sums."""
        xd, rd = ops.dispatch(x, routing)
        return ops.combine(ops.experts(xd, rd, inplace=False))
