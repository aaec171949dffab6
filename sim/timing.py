"""The timing phase: start and end of every issued step, and the latency.

A step's times are a max-plus function of what it depends on: it starts at
the latest of its stream's previous end (plus the host gap), the times of the
events it waits for, and, for a collective, the latest arrival of its
members; it ends `dur` later. That is what the SimPy model
(sim/timing_simpy.py) computes with an event queue; here each (rank, stream)
replay is a generator that runs without yielding until it needs a time not
known yet (an event not recorded, a collective not complete), so a step costs
a few additions instead of a few queue operations. The order processes run
in cannot change a max or a sum, so the times are the SimPy model's, bit for
bit (tests/test_symmetry.py compares them on generated scenarios), including
steps that never run (a hang: they keep start = end = 0) and the latency (the
latest time the SimPy clock would reach, host-gap waits included).

Ranks with the same timeline (sim/symmetry.py) are replayed once per class.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Generator
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from sim import symmetry
from sim.timing_simpy import copy_timelines, timing_phase_simpy

if TYPE_CHECKING:
    from sim.engine import Simulation
    from sim.simops import Plan

__all__ = ["timing_phase", "timing_phase_simpy"]


class _Meeting:
    """One collective rendezvous: arrivals so far, how many complete it, the
    latest arrival time, and the replays blocked in it."""

    __slots__ = ("arrived", "count", "latest", "waiting")

    def __init__(self, count: int) -> None:
        self.arrived = 0
        self.count = count
        self.latest: float = 0
        self.waiting: list[Generator] = []


def timing_phase(sim: Simulation) -> float:
    """Set every issued step's start and end; return the latency."""
    if sim.simpy_timing:
        return timing_phase_simpy(sim)
    cls = symmetry.classes(sim)
    gap = sim.profile.host_gap_us
    ev_time: dict[int, float] = {}
    ev_waiting: dict[int, list[Generator]] = {}
    meetings: dict[Any, _Meeting] = {}
    ready: deque[Generator] = deque()
    latest: list[float] = [0]  # the latest time any replay reached (SimPy's clock at the end)

    rendezvous = cls.rendezvous if cls is not None else None

    def proc(rank: int, plans: list[Plan]) -> Generator:
        # An int 0 like SimPy's clock: a step at time 0 reads 0, not 0.0.
        t: float = 0
        first = True
        for pl in plans:
            if first:
                first = False
            elif gap:
                t = t + gap
                if t > latest[0]:  # SimPy's clock reaches it even if the step then blocks for ever
                    latest[0] = t
            if pl.waits:
                for w in pl.waits:
                    at = ev_time.get(w)
                    if at is None:
                        yield ev_waiting.setdefault(w, [])
                        at = ev_time[w]
                    if at > t:
                        t = at
            coll = pl.coll
            if coll is not None:
                if rendezvous is None:
                    key, count = coll, len(coll[0])
                else:
                    key, count = rendezvous[(rank, pl.step.index)]
                m = meetings.get(key)
                if m is None:
                    m = meetings[key] = _Meeting(count)
                m.arrived += 1
                if m.arrived == 1 or t > m.latest:
                    m.latest = t
                if m.arrived == m.count:
                    ready.extend(m.waiting)
                    m.waiting = []
                else:
                    yield m.waiting
                t = m.latest
            start = t
            if pl.dur > 0:
                t = start + pl.dur
            st = pl.step
            st.start, st.end = start, t
            if t > latest[0]:
                latest[0] = t
            if pl.record is not None:
                ev_time[pl.record] = t
                woken = ev_waiting.pop(pl.record, None)
                if woken:
                    ready.extend(woken)

    replayed = range(len(sim.rank_ops)) if cls is None else cls.reps
    # Per plan shape, one getter per stream picking that stream's plans, in
    # first-use order: ranks of one shape share their clock dicts
    # (SimOps.assign_clocks), so the first one's identity names the shape and
    # its split into streams is found once, not per rank.
    splits: dict[int, list[Callable[[list[Plan]], Any]]] = {}
    for r in replayed:
        plans = sim.rank_ops[r].plans
        if not plans:
            continue
        if plans[0].vc is None:  # one stream (sim.simops.SimOps.assign_clocks): one replay of the list itself
            ready.append(proc(r, plans))
            continue
        getters = splits.get(id(plans[0].vc))
        if getters is None:
            by_stream: dict[str, list[int]] = {}
            for i, pl in enumerate(plans):
                by_stream.setdefault(pl.step.stream, []).append(i)
            getters = splits[id(plans[0].vc)] = [
                itemgetter(*idx) if len(idx) > 1 else (lambda ps, i=idx[0]: (ps[i],)) for idx in by_stream.values()]
        ready.extend([proc(r, get(plans)) for get in getters])
    while ready:
        g = ready.popleft()
        blocked_on = next(g, None)
        if blocked_on is not None:
            blocked_on.append(g)
    if cls is not None:
        copy_timelines(sim, cls)
    return float(latest[0])
