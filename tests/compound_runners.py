"""Runners with two faults, or a fault on some ranks' rows only
(tests/test_compound_faults.py)."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.runner_base import Order
from scenarios.runners import MoERunner


class PadSliceRankDoublesShared(MoERunner):
    """Sequence parallel: a TP rank whose slice ends in padding rows doubles
    its shared output; the all-gather hands those rows to its peers, whose
    own rows stay right."""

    def maybe_reduce_shared(self, ops: Ops, shared: Any, routed_reduced: bool) -> Any:
        s = self.scenario
        d, t = s.coords(ops.rank)
        if (t + 1) * s.layer_rows(d) > s.dp_tokens(d):
            shared = ops.scale(shared, 2.0, name="pad_slice_double")
        return super().maybe_reduce_shared(ops, shared, routed_reduced)


class ClobberedSharedReducedTwice(MoERunner):
    """The shared MLP reads the buffer the in-place routed kernel overwrote,
    and its output is all-reduced before the final all-reduce sums it again."""

    def routed_inplace(self, order: Order) -> bool:
        return True

    def shared_after_routed(self, order: Order) -> bool:
        return True

    def maybe_reduce_shared(self, ops: Ops, shared: Any, routed_reduced: bool) -> Any:
        return ops.all_reduce(shared, "tp", name="shared_all_reduce_extra")


class LastRowDroppedScaledTwice(MoERunner):
    """The routed kernel is told one row fewer than it holds, and the routed
    scaling factor is applied twice."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        return ops.experts(x, routing, inplace=False, valid_rows=x.shape[0] - 1), None

    def join_outputs(self, ops: Ops, shared: Any, routed: Any) -> Any:
        routed = ops.scale(routed, self.scenario.model.routed_scaling_factor, name="extra_routed_scaling")
        return super().join_outputs(ops, shared, routed)


class RoutedNudged(MoERunner):
    """The routed output scaled by 1 + 1e-7."""

    def join_outputs(self, ops: Ops, shared: Any, routed: Any) -> Any:
        return super().join_outputs(ops, shared, ops.scale(routed, 1.0000001, name="nudge"))
