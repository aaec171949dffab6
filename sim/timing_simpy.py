"""The timing phase as a SimPy model: a process per (rank, stream) replays
the issued steps; event waits and collective rendezvous are SimPy events.

The reference replay: sim/timing.py computes the same times without an event
queue, and tests/test_symmetry.py checks that both agree step by step
(`Simulation.simpy_timing` selects this one).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import simpy

from sim import symmetry

if TYPE_CHECKING:
    from sim.engine import Simulation
    from sim.simops import Plan


def timing_phase_simpy(sim: Simulation) -> float:
    env = simpy.Environment()
    events: dict[int, simpy.Event] = {}
    rendezvous: dict[object, list] = {}

    def ev(i: int) -> simpy.Event:
        e = events.get(i)
        if e is None:
            e = events[i] = env.event()
        return e

    cls = symmetry.classes(sim)
    gap = sim.profile.host_gap_us

    def meeting(rank: int, index: int, pl: Plan) -> tuple[object, int]:
        """A collective's rendezvous key and how many arrivals complete it."""
        if cls is None:
            return pl.coll, len(pl.coll[0])  # type: ignore[index]
        return cls.rendezvous[(rank, index)]

    def proc(rank: int, plans: list[tuple[int, Plan]]):  # noqa: ANN202 - SimPy generator
        for n, (index, pl) in enumerate(plans):
            if gap and n:
                yield env.timeout(gap)
            for w in pl.waits:
                e = ev(w)
                if not e.triggered:
                    yield e
            if pl.coll is not None:
                key, count = meeting(rank, index, pl)
                rv = rendezvous.get(key)
                if rv is None:
                    rv = rendezvous[key] = [0, env.event(), count]
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

    replayed = range(len(sim.rank_ops)) if cls is None else cls.reps
    for r in replayed:
        by_stream: dict[str, list[tuple[int, Plan]]] = {}
        for i, pl in enumerate(sim.rank_ops[r].plans):
            by_stream.setdefault(pl.step.stream, []).append((i, pl))
        for plans in by_stream.values():
            env.process(proc(r, plans))
    env.run()
    if cls is not None:
        copy_timelines(sim, cls)
    return float(env.now)


def copy_timelines(sim: Simulation, cls: symmetry.Classes) -> None:
    """Every rank takes its class representative's step times."""
    for r, c in enumerate(cls.of):
        rep = cls.reps[c]
        if r != rep:
            for a, b in zip(sim.rank_ops[rep].steps, sim.rank_ops[r].steps):
                b.start, b.end = a.start, a.end
    if cls.count == 1:
        sim.notes.append(f"timing: {len(sim.rank_ops)} identical rank programs simulated once")
    elif cls.count < len(sim.rank_ops):
        sim.notes.append(f"timing: {len(sim.rank_ops)} rank programs simulated as {cls.count} classes")
