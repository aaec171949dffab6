"""Runners on uneven, padded and sliced rows (tests/test_uneven_rows.py)."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.runner_base import Order
from scenarios.runners import MoERunner
from scenarios.sglang import SGLangRunner


def _per_rank(tokens: int, tp: int) -> int:
    return -(-tokens // tp)


class GathervRoutesGathered(MoERunner):
    """Correct: the naive DP path by hand, the router on the all_gatherv'd
    rows (routing is row-wise: every row routes as its token does), then the
    experts and a reduce_scatterv back to each DP rank's count."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        if self.scenario.effective_backend != "allgather_reducescatter" or self.scenario.sp:
            return super().routed_path(ops, x, routing, order, shared_inside)
        xg = ops.all_gatherv(x, "dp", name="gatherv_rows")
        y = ops.experts(xg, ops.router(xg, name="route_gathered"), inplace=False)
        return ops.reduce_scatterv(y, self.scenario.group_rows("dp", ops.rank), "dp", name="scatterv_rows"), None


class _SpSliceByHand(MoERunner):
    """SP with the slice taken by `take` instead of ops.sp_slice."""

    def take(self, ops: Ops, x: Any, per: int) -> Any:
        raise NotImplementedError

    def model_forward(self, ops: Ops) -> Any:
        x = ops.layer_input()
        tokens = x.shape[0]
        if self.scenario.sp:
            x = self.take(ops, x, _per_rank(tokens, self.scenario.parallel.tp))
        out = self.forward(ops, x)
        if self.scenario.sp:
            out = ops.trim_rows(ops.all_gather(out, "tp", name="sp_all_gather"), tokens, name="sp_drop_pad_rows")
        return ops.layer_output(out)


class SpEveryRankFirstSlice(_SpSliceByHand):
    """Bug: under SP every TP rank keeps the FIRST slice's rows (TP rank 0's)
    instead of its own."""

    def take(self, ops: Ops, x: Any, per: int) -> Any:
        return ops.trim_rows(x, per, name="first_slice")


class SpRank0TrimsToItsSlice(_SpSliceByHand):
    """Correct: TP rank 0 takes its SP slice as the first rows (trim_rows),
    the others by sp_slice."""

    def take(self, ops: Ops, x: Any, per: int) -> Any:
        if self.scenario.coords(ops.rank)[1] == 0 and x.shape[0] >= per:
            return ops.trim_rows(x, per, name="slice_by_trim")
        return ops.sp_slice(x)


class ValidRowsLargestCount(SGLangRunner):
    """Bug: with DP attention the expert kernel is told the largest DP
    rank's count of rows are valid where the gathered buffer's total is:
    the later DP ranks' rows get no routed output."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        if self.mlp_scattered() or not self.dp_attention():
            return super().routed_path(ops, x, routing, order, shared_inside)
        return ops.experts(x, routing, inplace=False, fused_shared=self.fused_shared_weight(),
                           valid_rows=max(self.scenario.token_counts)), None
