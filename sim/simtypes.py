"""The simulator's per-rank records: tensor handles, events, step plans, buffer accesses."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from scenarios.trace import Step
from sim import algebra


@dataclass(slots=True)
class SimTensor:
    shape: tuple[int, ...]
    value: algebra.Value
    buf: int
    step: int  # index of the producing step
    version: int = 0  # version of the buffer this handle's contents are
    rows_from: int = -1  # the step that last changed the row set
    clobbered_by: int | None = None  # in-place write that replaced the contents
    clobber_partial: bool = False  # that write covered other rows than this handle's


@dataclass(slots=True)
class Sent:
    """What one rank handed its dispatches (one SimOps attribute: a few more
    would push SimOps past CPython's shared-key instance layout, and every
    attribute read on the hot path would get slower)."""

    rows: int = 0  # rows of the latest dispatch
    routing: algebra.Value | None = None  # the routing sent with them
    layer_rows: int | None = None  # rows a dispatch of the whole layer sends (looked up once)


@dataclass(slots=True)
class SimEvent:
    id: int
    stream: str


@dataclass(slots=True)
class Plan:
    """What the timing phase needs to replay one step."""

    step: Step
    dur: float
    coll: tuple | None = None
    waits: tuple[int, ...] = ()
    record: int | None = None
    vc: dict[str, int] | None = None


class Labels(tuple):
    """A tuple of labels whose hash is computed once. Shard and output label
    tuples are world-long in wide worlds and key per-rank cache lookups: a
    plain tuple would be rehashed (every label) on every lookup."""

    _hash: int

    def __new__(cls, labels: tuple[str, ...] | list[str]) -> Labels:
        t = super().__new__(cls, labels)
        t._hash = tuple.__hash__(t)
        return t

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple:
        # Rebuilt, not copied: a hash cached under another process's hash seed is wrong.
        return (Labels, (tuple(self),))


class Access(NamedTuple):
    """One buffer access. Recorded per op (several per step), so as the
    cheapest immutable record: Simulation.accesses holds these tuples."""

    rank: int
    step: int
    buf: int
    write: bool
