"""Wrong runners whose real runs show their fault in ways a step-by-step
comparison of fitted values must allow for (tests/test_check_observed.py)."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.runner_base import Order
from scenarios.runners import MoERunner
from scenarios.sglang import SGLangRunner
from scenarios.trtllm import TRTLLMRunner


class NoJoinOnAux(MoERunner):
    """Shared experts on the aux stream, but the main stream never waits for
    them before the shared add (the join lost in a refactor)."""

    def shared_after_routed_path(self, ops: Ops, x: Any, order: Any, sharded: bool, shared: Any,
                                 shared_done: Any) -> Any:
        return super().shared_after_routed_path(ops, x, order, sharded, shared, None)


class IdleRankSkipsMoE(MoERunner):
    """An idle DP rank (no tokens) returns before the MoE collectives: its
    peer waits in the dispatch for ever."""

    def forward(self, ops: Ops, x: Any) -> Any:
        if x.shape[0] == 0:
            return x
        return super().forward(ops, x)


class RoutedInplaceBesideShared(SGLangRunner):
    """The routed kernel updates the hidden states in place while the shared
    experts read them on the aux stream."""

    def routed_inplace(self, order: Any) -> bool:
        return True


class GatherPartialOfReplicated(SGLangRunner):
    """Under DP attention with attention TP, the hidden states (already whole
    on every TP member) are summed over TP again before the DP gather: the
    router and experts get twice the input, which they do not pass on linearly."""

    def prepare_mlp(self, ops: Ops, x: Any) -> Any:
        if not self.mlp_scattered() and self.dp_attention() and self.scenario.parallel.tp > 1:
            x = ops.all_reduce(x, "tp", name="attn_tp_sum_again")
            return ops.dp_gather(x, name="dp_gather", padded=self.dp_max_len())
        return super().prepare_mlp(ops, x)


class MasksGatheredRowsWithLocalCount(SGLangRunner):
    """Under DP attention the experts run on every DP rank's gathered rows,
    but the kernel is told this rank's own token count as the number of
    valid rows: the other DP ranks' rows come out without routed output."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Any, shared_inside: Any) -> tuple[Any, Any]:
        if not self.mlp_scattered() and self.dp_attention():
            d, _ = self.scenario.coords(ops.rank)
            return ops.experts(x, routing, inplace=self.routed_inplace(order), fused_shared=self.fused_shared_weight(),
                               valid_rows=self.scenario.dp_tokens(d)), None
        return super().routed_path(ops, x, routing, order, shared_inside)


class MasksGatheredRowsWithTheirCount(MasksGatheredRowsWithLocalCount):
    """The same call told the gathered buffer's own row count: nothing masked."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Any, shared_inside: Any) -> tuple[Any, Any]:
        if not self.mlp_scattered() and self.dp_attention():
            return ops.experts(x, routing, inplace=self.routed_inplace(order), fused_shared=self.fused_shared_weight(),
                               valid_rows=x.shape[0]), None
        return super().routed_path(ops, x, routing, order, shared_inside)


class MasksPastItsRows(MasksGatheredRowsWithLocalCount):
    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Any, shared_inside: Any) -> tuple[Any, Any]:
        return ops.experts(x, routing, valid_rows=x.shape[0] + 1), None


class _RouterOnReducedInput:
    """An Ops that sums the router's input over TP first (it is whole already)."""

    def __init__(self, ops: Ops) -> None:
        self._ops = ops

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ops, name)

    def router(self, x: Any, name: str = "router") -> Any:
        return self._ops.router(self._ops.all_reduce(x, "tp", name="gate_input_all_reduce"), name=name)


class RouterOnReducedInput(MoERunner):
    """The gate's input is all-reduced over TP although every TP rank holds
    the whole hidden states: the router sees twice the input (the experts do not)."""

    def forward(self, ops: Ops, x: Any) -> Any:
        return super().forward(_RouterOnReducedInput(ops), x)


class SGLangNeverOverlaps(SGLangRunner):
    """SGLang's dual-stream shared experts switched off."""

    def shared_experts_order(self, num_tokens: int) -> Order:
        return Order.NO_OVERLAP


class TrtllmForcesTheAuxStream(TRTLLMRunner):
    """The shared MLP always on the aux stream, whether the platform has one or not."""

    def shared_experts_order(self, num_tokens: int) -> Order:
        return Order.MULTI_STREAM_OVERLAPPED


class VllmForcesTheAuxStream(MoERunner):
    def shared_experts_order(self, num_tokens: int) -> Order:
        return Order.MULTI_STREAM_OVERLAPPED


class TrtllmReducesUnderAttentionDp(TRTLLMRunner):
    """The MoE all-reduce left on under attention DP: each DP rank's rows are
    summed with the other DP rank's (different tokens)."""

    def needs_final_reduce(self, routed_reduced: bool) -> bool:
        return True


class BreaksTheRealRouter(MoERunner):
    """Fault injection, not a runner bug: empties the real interpreter's routing
    table, so the router op's own function fails inside the interpreter."""

    def forward(self, ops: Ops, x: Any) -> Any:
        if hasattr(ops, "route"):  # the real interpreter only
            ops.route = [[] for _ in ops.route]
        return super().forward(ops, x)


class FusesWithTheNextLayerUnderDpAttention(SGLangRunner):
    """The next layer's fused all-reduce taken under DP attention: the block
    skips its own reduction and the fused one sums rows of different DP
    ranks' tokens, partial sums of some shards each."""

    def fuse_with_next_layer(self) -> bool:
        s = self.scenario
        return s.runtime.allreduce_fusion and not self.mlp_scattered() and not (s.moe_ep > 1 and s.moe_tp > 1)


class SkipsFinalReduceUnderEp(MoERunner):
    """Under EP the post-experts all-reduce is skipped: each rank keeps only
    its own experts' share."""

    def needs_final_reduce(self, routed_reduced: bool) -> bool:
        return not self.scenario.parallel.ep and super().needs_final_reduce(routed_reduced)


class SharedReducesOnAuxJoinedLate(MoERunner):
    """The shared MLP all-reduces its own output on the aux stream, and the
    main stream waits for it only after its own post-experts all-reduce: two
    collectives over the TP group that nothing orders."""

    _pending: Any = None

    def shared_reduce_results(self) -> bool:
        return True

    def shared_joins_after_reduce(self) -> bool:
        return True

    def shared_after_routed_path(self, ops: Ops, x: Any, order: Any, sharded: bool, shared: Any,
                                 shared_done: Any) -> Any:
        self._pending = shared_done
        return super().shared_after_routed_path(ops, x, order, sharded, shared, None)

    def trim_output(self, ops: Ops, result: Any) -> Any:
        if self._pending is not None:
            ops.wait_event(self._pending, name="join_shared_late")
            self._pending = None
        return super().trim_output(ops, result)


class SharedReducesOnAuxJoinedFirst(SharedReducesOnAuxJoinedLate):
    """The same, with the wait before the post-experts all-reduce (ordered)."""

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        if self._pending is not None:
            ops.wait_event(self._pending, name="join_shared_first")
            self._pending = None
        return super().final_reduce(ops, result, routed_reduced)
