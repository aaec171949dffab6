"""What-if programs: a runner with one collective removed.

`without_collective(cls, target)` is `cls` whose program skips the
`occurrence`-th call (0-based) of `ops.<op>(..., name=...)` on every rank,
handing back the collective's input as its output. Both interpreters run it
(the simulator to price a REDUNDANT_COLLECTIVE, real ranks to check that the
layer output stays correct without it). Only the Ops handed to the program
change, so any runner, preset or user's, can be run this way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scenarios.ops import Ops
from scenarios.runners import MoERunner

REMOVABLE = ("all_reduce", "all_gather", "reduce_scatter")


@dataclass(frozen=True)
class Removed:
    """One collective call of the program: its op, step name and occurrence."""

    op: str
    name: str
    occurrence: int = 0

    def __str__(self) -> str:
        nth = f" (call {self.occurrence + 1})" if self.occurrence else ""
        return f"{self.name}{nth}"


class _OpsWithout:
    """Delegates every attribute to the real Ops but answers the removed call
    with its input (no step recorded, no communication)."""

    def __init__(self, ops: Ops, target: Removed) -> None:
        self._ops = ops
        self._target = target
        self._seen = 0

    def __getattr__(self, attr: str) -> Any:
        inner = getattr(self._ops, attr)
        if attr != self._target.op:
            return inner

        def call(x: Any, group: str = "tp", name: str = attr) -> Any:
            if name == self._target.name:
                self._seen += 1
                if self._seen - 1 == self._target.occurrence:
                    return x
            return inner(x, group, name=name)

        return call


def without_collective(cls: type[MoERunner], target: Removed) -> type[MoERunner]:
    """`cls` with `target` removed from its program (see module doc)."""
    if target.op not in REMOVABLE:
        raise ValueError(f"only {', '.join(REMOVABLE)} can be removed, not {target.op}")

    def model_forward(self: MoERunner, ops: Ops) -> Any:
        return cls.model_forward(self, _OpsWithout(ops, target))  # type: ignore[arg-type]

    return type(f"{cls.__name__}Without_{target.name}", (cls,), {"model_forward": model_forward})


__all__ = ["REMOVABLE", "Removed", "without_collective"]


def removed_at(steps: list[Any], index: int) -> Removed:
    """The collective call at step `index` of one rank's steps, as a Removed."""
    st = steps[index]
    before = sum(1 for s in steps[:index] if s.op == st.op and s.name == st.name)
    return Removed(st.op, st.name, before)
