"""Symmetry classes of rank timelines: simulate one rank per class, copy the rest.

The timing phase (sim/timing.py) replays each rank's issued steps. A
rank's timeline is a function of three things only: its own plans (stream,
duration, which of its own events each step waits for or records), the host
gap, and when each of its collectives completes, which is the latest arrival
over the collective's members. So two ranks have the same timeline if
(1) they issued the same plans up to relabelling of their own events, and
(2) at each of their collectives, the members are, as a set, the same
classes at the same plan positions.

`classes` finds the coarsest partition with (1) and (2) by refinement: start
from (1), then split any class whose members meet different class sets at some
collective, until nothing splits. In the result, by induction over simulated
time, every member of a class has its representative's timeline: the
representative starts each step when its own previous step and event waits
allow, which are the same plans, and completes each collective when the same
classes arrive at the same positions. The timing phase then runs one replay
set per class, and a collective rendezvous waits for one arrival per
(class, position) of its members.

What is proved and what is checked: nothing here trusts the runner's code.
Both conditions are checked on the plans every rank actually issued in the
program phase (every rank's program still runs there); only the timing
replay is shared. When in doubt it declines (returns None) and every rank is
replayed: collapse switched off, more classes than half the ranks, by the
plans, by a lower bound taken before any signature is built (_partner_bound)
or after a refinement step (token routing with a different load on
every rank: finding the classes would cost more than replaying every rank), a rank that did not finish, a collective some
member never reached, a wait on an event the rank did not record itself (a
runner handing events between ranks), or one class meeting itself at two
positions of one collective.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sim.engine import Simulation
    from sim.simops import SimOps


@dataclass
class Classes:
    """A stable partition of the ranks' timelines."""

    of: list[int]  # class id per rank
    reps: list[int]  # one representative rank per class, in class order
    # (representative, plan index) -> (rendezvous key, arrivals it waits for)
    rendezvous: dict[tuple[int, int], tuple[int, int]]

    @property
    def count(self) -> int:
        return len(self.reps)


def classes(sim: Simulation) -> Classes | None:
    """The timing classes of the simulated ranks, or None (replay every rank)."""
    ops_all = sim.rank_ops
    if not _eligible(sim):
        return None
    # Equal plans have equal durations: if the durations alone already set
    # most ranks apart (token routing, a different load on every rank), the
    # full signatures would too.
    by_dur = _numbered([tuple([pl.dur for pl in ops.plans]) for ops in ops_all])
    if 2 * (max(by_dur) + 1) > len(ops_all):
        return None
    if 2 * _partner_bound(ops_all, by_dur) > len(ops_all):
        return None
    sigs = [_own_signature(ops) for ops in ops_all]
    if any(sig is None for sig in sigs):
        return None
    of = _numbered(sigs)
    if 2 * (max(of) + 1) > len(ops_all):
        return None  # most ranks differ already: sharing the rest does not pay for the refinement
    found = _instances(sim)
    if found is None:
        return None
    instances, at = found
    while True:
        members = _member_sets(instances, of)
        if members is None:
            return None
        refined = _numbered([(of[r], tuple(members[k] for k in at[r])) for r in range(len(ops_all))])
        if max(refined) == max(of):
            break
        if 2 * (max(refined) + 1) > len(ops_all):
            return None  # refining only splits further: replaying every rank is cheaper
        of = refined
    return _with_rendezvous(of, ops_all, at, members)


def _eligible(sim: Simulation) -> bool:
    """Collapse on, several ranks, and every rank finished its program (a
    rank still blocked is not in `finished`; one that failed is not done)."""
    n = len(sim.rank_ops)
    return (sim.collapse and n > 1 and len(sim.finished) == n
            and all([v == "done" for v in sim.finished.values()]))


def _partner_bound(ops_all: list[SimOps], by_dur: list[int]) -> int:
    """A lower bound on the number of stable classes, cheap enough to decline
    before any signature is built (wide EP under token routing: 40 duration
    classes at 256 ranks, split into 214 by the loads of each rank's TP
    partner).

    Ranks of one stable class have equal durations and, at each collective in
    program order, the same set of member classes, hence the same set of the
    members' duration classes (a set: members of one class at one position
    count once). So ranks that differ in (duration class, per collective the
    set of its group's duration classes) are in different stable classes: the
    count of those keys never exceeds the stable count."""
    # Each group's set as a small number (by the identity of the shared
    # group object): rank keys then hash a few ints, not world-long tuples.
    of_group: dict[int, int] = {}
    class_sets: dict[tuple[int, ...], int] = {}
    keys = set()
    for r, ops in enumerate(ops_all):
        key = [by_dur[r]]
        for pl in ops.plans:
            if pl.coll is not None:
                group = pl.coll[0]
                met = of_group.get(id(group))
                if met is None:
                    ds = tuple(sorted({by_dur[m] for m in group}))
                    met = of_group[id(group)] = class_sets.setdefault(ds, len(class_sets))
                key.append(met)
        keys.add(tuple(key))
    return len(keys)


def _own_signature(ops: SimOps) -> tuple | None:
    """A rank's plans with its own events as positions (None: a wait on an
    event it did not record, whose time another rank decides)."""
    rec_pos = {pl.record: i for i, pl in enumerate(ops.plans) if pl.record is not None}
    out = []
    for pl in ops.plans:
        waits = ()
        if pl.waits:
            waits = tuple(rec_pos.get(w, -1) for w in pl.waits)
            if -1 in waits:
                return None
        out.append((pl.step.stream, pl.dur, waits, pl.record is not None,
                    None if pl.coll is None else len(pl.coll[0])))
    return tuple(out)


def _instances(sim: Simulation) -> tuple[list[list[tuple[int, int]]], list[list[int]]] | None:
    """Per collective (numbered by the engine): the (rank, plan index) of each
    arrival, and per rank its collectives' numbers in program order; None
    when some member never arrived."""
    inst = sim.meetings
    ops_all = sim.rank_ops
    mine: list[list[tuple[int, int]]] = [[] for _ in ops_all]
    for n, arrivals in enumerate(inst):
        for r, i in arrivals:
            mine[r].append((i, n))
    for r, ops in enumerate(ops_all):
        coll = [i for i, pl in enumerate(ops.plans) if pl.coll is not None]
        mine[r].sort()
        if [i for i, _ in mine[r]] != coll:
            return None
        for i, n in mine[r]:
            group = ops.plans[i].coll[0]  # type: ignore[index]
            if len(inst[n]) != len(group):
                return None
    return inst, [[n for _, n in m] for m in mine]


def _member_sets(instances: list[list[tuple[int, int]]], of: list[int]) -> list[frozenset] | None:
    """Per collective: the set of (class, plan index) of its members, interned
    (equal sets are one object, so rank signatures compare cheaply). None when
    one class meets itself at two positions of one collective."""
    interned: dict[frozenset, frozenset] = {}
    out = []
    for arrivals in instances:
        fs = frozenset((of[r], i) for r, i in arrivals)
        if len({c for c, _ in fs}) != len(fs):
            return None
        out.append(interned.setdefault(fs, fs))
    return out


def _numbered(sigs: list) -> list[int]:
    """Class ids by first appearance of each distinct signature."""
    ids: dict = {}
    return [ids.setdefault(sig, len(ids)) for sig in sigs]


def _with_rendezvous(of: list[int], ops_all: list[SimOps], at: list[list[int]],
                     members: list[frozenset]) -> Classes:
    reps: dict[int, int] = {}
    for r, c in enumerate(of):
        reps.setdefault(c, r)
    keys: dict[int, int] = {}  # by the identity of the interned member set
    rendezvous = {}
    for r in reps.values():
        positions = [i for i, pl in enumerate(ops_all[r].plans) if pl.coll is not None]
        for i, n in zip(positions, at[r], strict=True):
            fs = members[n]
            rendezvous[(r, i)] = (keys.setdefault(id(fs), len(keys)), len(fs))
    return Classes(of, list(reps.values()), rendezvous)
