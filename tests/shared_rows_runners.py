"""Runners that give the shared MLP more rows than the rank owns and narrow
its output afterwards (correct: the MLP is row-wise), and wrong variants that
do not narrow, narrow to another rank's rows, or over-count
(tests/test_shared_rows.py)."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.runner_base import Order
from scenarios.runners import MoERunner
from scenarios.sglang import SGLangRunner
from scenarios.trtllm import TRTLLMRunner


class SharedOnFullThenSlice(MoERunner):
    """Sequence parallel: the unsharded shared MLP runs on the DP group's
    whole layer input; its output is sp-sliced like the routed input."""

    _full: Any = None
    narrow: bool = True

    def model_forward(self, ops: Ops) -> Any:
        self._full = ops.layer_input() if self.scenario.sp else None
        return super().model_forward(ops)

    def run_shared(self, ops: Ops, x: Any, sharded: bool) -> Any:
        if self._full is None:
            return super().run_shared(ops, x, sharded)
        full = ops.shared_experts(self._full, sharded=False, name="shared_experts_full")
        return ops.sp_slice(full, name="shared_sp_slice") if self.narrow else full


class SharedOnFullUnsliced(SharedOnFullThenSlice):
    """As above, but the full-rows shared output is added unsliced."""

    narrow = False


class SglangSharedFullThenSlice(SGLangRunner):
    """SGLang SCATTERED rows: the replicated shared MLP runs on the full layer
    input before the attention-TP scatter; its output is sliced the same way."""

    _full: Any = None

    def prepare_mlp(self, ops: Ops, x: Any) -> Any:
        if self.mlp_scattered():
            self._full = x
        return super().prepare_mlp(ops, x)

    def run_shared(self, ops: Ops, x: Any, sharded: bool) -> Any:
        if self._full is None or self.shared_fused():
            return super().run_shared(ops, x, sharded)
        full = ops.shared_experts(self._full, sharded=False, name="shared_experts_full")
        return ops.sp_slice(full, name="shared_attn_tp_slice")


class TrtllmSharedOnGathered(TRTLLMRunner):
    """TRT-LLM attention DP, all-gather path: the replicated shared MLP runs on
    the gathered tokens, scaled 1/world, and rides the reduce-scatter with the
    routed output."""

    share: float | None = None  # None: 1/world (right)

    def forward(self, ops: Ops, x: Any) -> Any:
        s = self.scenario
        if not (self.attention_dp() and not self.uses_alltoall() and s.model.has_shared):
            return super().forward(ops, x)
        routing = ops.router(x)
        ops.decide("shared_experts_order", Order.NO_OVERLAP.value)
        xg, rg = ops.dispatch(x, routing, name="allgather")
        y = ops.experts(xg, rg, inplace=False)
        sh = ops.shared_experts(xg, sharded=False, name="shared_experts_gathered")
        sh = ops.scale(sh, 1.0 / s.world if self.share is None else self.share, name="shared_world_share")
        y = ops.add(y, sh, name="shared_add_gathered")
        out = ops.combine(y, name="reducescatter")
        return ops.boundary(out, (x.shape[0], s.model.hidden))


class TrtllmSharedOnGatheredUnscaled(TrtllmSharedOnGathered):
    """As above without the 1/world share: every rank's shared output is
    summed world times by the reduce-scatter."""

    share = 1.0


class SharedOnFirstDpRanksRows(MoERunner):
    """The shared MLP takes the first rows of a DP all-gather (DP rank 0's
    tokens) on every DP rank: right on DP rank 0 only."""

    def run_shared(self, ops: Ops, x: Any, sharded: bool) -> Any:
        gathered = ops.all_gatherv(x, "dp", name="shared_input_gather")
        mine = ops.trim_rows(gathered, x.shape[0], name="shared_input_first_rows")
        return ops.shared_experts(mine, sharded=sharded, name="shared_experts")
