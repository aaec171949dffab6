"""Wrong runners whose real runs show their fault in ways a step-by-step
comparison of fitted values must allow for (tests/test_check_observed.py)."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.runners import MoERunner
from scenarios.sglang import SGLangRunner


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
