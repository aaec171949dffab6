"""The timing phase: SimPy replays every rank's issued steps per stream.

Durations come from the cost model (sim/cost.py); event waits and collective
rendezvous are SimPy events. This gives start/end per step and the latency.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import simpy

if TYPE_CHECKING:
    from sim.engine import Simulation
    from sim.simops import Plan, SimOps


def timing_phase(sim: Simulation) -> float:
    env = simpy.Environment()
    events: dict[int, simpy.Event] = {}
    rendezvous: dict[tuple, list] = {}

    def ev(i: int) -> simpy.Event:
        e = events.get(i)
        if e is None:
            e = events[i] = env.event()
        return e

    sym = symmetric(sim)
    gap = sim.profile.host_gap_us

    def proc(plans: list[Plan]):  # noqa: ANN202 - SimPy generator
        for n, pl in enumerate(plans):
            if gap and n:
                yield env.timeout(gap)
            for w in pl.waits:
                e = ev(w)
                if not e.triggered:
                    yield e
            if pl.coll is not None:
                rv = rendezvous.get(pl.coll)
                if rv is None:
                    # Symmetric ranks arrive together: the representative completes it.
                    n = 1 if sym else len(pl.coll[0])
                    rv = rendezvous[pl.coll] = [0, env.event(), n]
                rv[0] += 1
                if rv[0] == rv[2]:
                    rv[1].succeed()
                else:
                    yield rv[1]
            start = env.now
            if pl.dur > 0:
                yield env.timeout(pl.dur)
            pl.step.start, pl.step.end = start, env.now
            if pl.record is not None:
                ev(pl.record).succeed()

    simulated = sim.rank_ops[:1] if sym else sim.rank_ops
    for ops in simulated:
        by_stream: dict[str, list[Plan]] = {}
        for pl in ops.plans:
            by_stream.setdefault(pl.step.stream, []).append(pl)
        for plans in by_stream.values():
            env.process(proc(plans))
    env.run()
    if sym:
        rep = sim.rank_ops[0].steps
        for ops in sim.rank_ops[1:]:
            for a, b in zip(rep, ops.steps):
                b.start, b.end = a.start, a.end
        sim.notes.append(f"timing: {len(sim.rank_ops)} identical rank programs simulated once")
    return float(env.now)


def symmetric(sim: Simulation) -> bool:
    """True when every rank issued the same program with the same costs
    (then their timelines are identical and one SimPy rank stands for all)."""
    if not sim.collapse or len(sim.rank_ops) < 2 or any(v != "done" for v in sim.finished.values()):
        return False

    def signature(ops: SimOps) -> tuple:
        rec_pos = {pl.record: i for i, pl in enumerate(ops.plans) if pl.record is not None}
        return tuple(
            (pl.step.stream, pl.dur, tuple(rec_pos.get(w, -1) for w in pl.waits),
             pl.record is not None, None if pl.coll is None else len(pl.coll[0]))
            for pl in ops.plans
        )

    first = signature(sim.rank_ops[0])
    return all(signature(ops) == first for ops in sim.rank_ops[1:])
