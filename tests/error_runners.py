"""Deliberately wrong runners for the error tests (loaded by path in rank processes).

Each breaks one Ops rule the simulator checks (shapes), misuses Ops, raises
its own exception, or kills its rank process, through an ordinary decision
point of `MoERunner`.
"""

from __future__ import annotations

import os
from typing import Any

from scenarios.ops import Ops
from scenarios.runners import MoERunner, Order


def _real(ops: Ops) -> bool:
    # Process-killing runners act on real ranks only (the simulator runs in-process).
    return type(ops).__name__ == "RealOps"


class PadBelowWidth(MoERunner):
    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        return ops.pad(result, result.shape[-1] - 1, name="bad_pad")


class WrongBoundary(MoERunner):
    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        return ops.boundary(result, (result.shape[0], result.shape[-1] + 1), name="bad_boundary")


class WrongOutputRows(MoERunner):
    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        out = super().final_reduce(ops, result, routed_reduced)
        return ops.trim_rows(out, 1, name="drop_rows")


class AddUnequal(MoERunner):
    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        return ops.add(result, ops.trim(result, 4, name="narrow"), name="bad_add")


class NarrowRouter(MoERunner):
    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        ops.router(ops.trim(result, 4, name="narrow"), name="bad_router")
        return super().final_reduce(ops, result, routed_reduced)


class NarrowKernel(MoERunner):
    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        return super().routed_path(ops, ops.trim(x, 4, name="narrow"), routing, order, shared_inside)


class FewerRowsThanRouting(MoERunner):
    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        return super().routed_path(ops, ops.trim_rows(x, 1, name="one_row"), routing, order, shared_inside)


class NarrowShared(MoERunner):
    def shared_input(self, ops: Ops, x: Any) -> Any:
        return ops.trim(x, 4, name="narrow")

    def shared_experts_order(self, num_tokens: int) -> Order:
        return Order.MULTI_STREAM_OVERLAPPED  # shared_input is used on the aux stream


class NarrowLatentDown(MoERunner):
    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        ops.latent_down(ops.trim(result, 4, name="narrow"), name="bad_latent_down")
        return super().final_reduce(ops, result, routed_reduced)


class WideLatentUp(MoERunner):
    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        ops.latent_up(result, name="bad_latent_up")
        return super().final_reduce(ops, result, routed_reduced)


class OddReduceScatter(MoERunner):
    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        ops.reduce_scatter(ops.trim_rows(result, 3, name="three_rows"), "tp", name="bad_reduce_scatter")
        return super().final_reduce(ops, result, routed_reduced)


class ExplodingTrim(MoERunner):
    """A runner's own bug in a decision method (message full of 'width')."""

    def pre_trim_width(self) -> int | None:
        raise ZeroDivisionError("pre_trim_width exploded")


class UnknownGroup(MoERunner):
    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        return ops.all_reduce(result, "tpp", name="bad_group_reduce")


class Rank1Raises(MoERunner):
    """Rank 1 raises before the final all-reduce its peers wait in."""

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        if ops.rank == 1:
            raise RuntimeError("rank 1 gave up")
        return super().final_reduce(ops, result, routed_reduced)


class Rank1Exits(MoERunner):
    """Rank 1's process exits before the final all-reduce (real ranks only)."""

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        if ops.rank == 1 and _real(ops):
            os._exit(7)
        return super().final_reduce(ops, result, routed_reduced)


class Rank1FewerRows(MoERunner):
    """Rank 1 reduces fewer rows than its peer: the members disagree on the shape."""

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        if ops.rank == 1:
            result = ops.trim_rows(result, 4, name="rank1_trims")
        return super().final_reduce(ops, result, routed_reduced)


class Rank1GathersInstead(MoERunner):
    """Rank 1 all-gathers where its peer all-reduces: they disagree on the collective."""

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        if ops.rank == 1:
            return ops.trim_rows(ops.all_gather(result, "tp", name="final_gather"), result.shape[0])
        return super().final_reduce(ops, result, routed_reduced)
