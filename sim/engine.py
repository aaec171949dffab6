"""The simulator: an interpreter of runner programs over abstract values, timed like a SimPy model.

Two phases, both per scenario:

1. Program phase. Every rank's runner program runs in its own greenlet, in
   lock-step: a collective suspends the rank until every member of its group
   has arrived, then computes all members' abstract outputs at once. Values
   (sim/algebra.py), symbolic shapes and buffer accesses are computed as the
   ops are issued (sim/simops.py); shape errors raise inside the runner
   exactly where torch would; the per-op checks run as values are made
   (sim/checks.py). A rank that never arrives is a HANG, never a wait forever.
2. Timing phase (sim/timing.py). A replay per (rank, stream) of the issued
   steps with durations from the cost model: the SimPy model's times
   (sim/timing_simpy.py), computed without its event queue.

Hazard detectors that need a whole program run afterwards (sim/hazards.py).
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import count
from typing import Any

import greenlet
import numpy as np

from scenarios import contain
from scenarios.dispatch_layout import VLLM_LAYOUT, DispatchLayout, engine_scenario, layout_note
from scenarios.ops import OpsUsageError
from scenarios.runners import MoERunner, RunnerUnsupported, run_program
from scenarios.spec import Scenario
from scenarios.trace import Hazard, HazardKind, Step, Trace
from scenarios.workload import expert_loads, rank_token_ids, route_arrays, rows_per_owner
from sim import algebra
from sim.checks import Checks
from sim.cost import Profile
from sim.errors import CollectiveFailed, RunnerUsageError, SimShapeError, raised_inside_simulator
from sim.simops import MODEL, Access, Plan, SimEvent, SimOps, SimTensor
from sim.simtypes import Labels
from sim.timing import timing_phase

__all__ = [
    "MODEL",
    "Access",
    "CollectiveFailed",
    "Plan",
    "RunnerUsageError",
    "SimEvent",
    "SimOps",
    "SimShapeError",
    "SimTensor",
    "Simulation",
]


class _Abort(greenlet.GreenletExit):
    """Thrown into ranks still blocked when the program phase ends (hang)."""


@dataclass
class _Pending:
    kind: str
    group: tuple[int, ...]
    arrivals: dict[int, tuple[str, SimTensor, Step]] = field(default_factory=dict)
    sizes: dict[int, tuple[int, ...] | None] = field(default_factory=dict)  # reduce_scatterv's argument
    results: dict[int, Any] = field(default_factory=dict)
    number: int = 0  # its index in Simulation.meetings


class RankGroup(tuple):
    """A group's world ranks, hashed once: a wide group is a world-long tuple
    that every member's collective key and row lookups would rehash. Each
    member's position is looked up, not searched for (every member of a
    world-wide group asks for its own: world^2 comparisons otherwise)."""

    _hash: int
    _pos: dict[int, int] | None

    def __new__(cls, ranks: tuple[int, ...]) -> RankGroup:
        g = super().__new__(cls, ranks)
        g._hash = tuple.__hash__(g)
        g._pos = None
        return g

    def __hash__(self) -> int:
        return self._hash

    def __reduce__(self) -> tuple:
        # Rebuilt, not copied: a hash cached under another process's hash seed is wrong.
        return (RankGroup, (tuple(self),))

    def index(self, value: Any, start: int = 0, stop: int = sys.maxsize) -> int:
        if start or stop != sys.maxsize:
            return tuple.index(self, value, start, stop)
        pos = self._pos
        if pos is None:
            pos = self._pos = {}
            for i, r in enumerate(self):
                pos.setdefault(r, i)  # the first position, as tuple.index finds it
        found = pos.get(value)
        if found is None:
            return tuple.index(self, value)  # not a member (or an equal non-int): tuple's answer
        return found


@lru_cache(maxsize=1024)
def _received_rows(s: Scenario, group: tuple[int, ...], dl: DispatchLayout = VLLM_LAYOUT) -> tuple[int, ...]:
    """Per world rank: rows a token-routing dispatch over `group` delivers to
    it, one per member token with at least one expert on that rank (SP
    padding rows route like token 0)."""
    ids, _w = route_arrays(s)
    per = s.local_experts
    rows = []
    for m in group:
        d, _ = s.coords(m)
        toks = np.maximum(np.asarray(rank_token_ids(s, m, dl), dtype=np.int64), 0)
        rows.append(ids[d][toks] // per)
    return tuple(int(c) for c in rows_per_owner(rows, s.world))


@lru_cache(maxsize=1024)
def _member_rows(s: Scenario, group: tuple[int, ...], dl: DispatchLayout = VLLM_LAYOUT) -> tuple[int, ...]:
    """Layer rows of each member of `group`, in group order (what a naive
    gather collects and every combine hands back). Cached: every member of a
    wide group asks for the same tuple, which is world-long."""
    return tuple(dl.rank_rows(s, m) for m in group)


def _shape_problem(pend: _Pending, arrivals: list[tuple[str, SimTensor, Step]]) -> str | None:
    """Why the members' shapes (or reduce_scatterv sizes) cannot go together, or None."""
    group, kind = pend.group, pend.kind
    shapes = [tuple(a[1].shape) for a in arrivals]
    if kind in ("dispatch_a2a", "combine_a2a"):
        return None  # a2a rows differ per rank by design
    # all_gatherv: rows may differ, the width may not (torch's all_gather needs equal sizes).
    keyed = [sh[1:] for sh in shapes] if kind == "all_gatherv" else shapes
    if len(set(keyed)) > 1:
        return "ranks disagree on the shape: " + ", ".join(f"rank {r} {list(sh)}" for r, sh in zip(group, shapes))
    if kind == "reduce_scatter" and shapes[0][0] % len(group):
        return f"{shapes[0][0]} rows do not split over {len(group)} ranks"
    if kind == "reduce_scatterv":
        sizes = [pend.sizes[r] for r in group]
        if len(set(sizes)) > 1:
            return "ranks disagree on reduce_scatterv sizes: " + ", ".join(
                f"rank {r} {list(sz or ())}" for r, sz in zip(group, sizes))
        sz = sizes[0] or ()
        if len(sz) != len(group) or any(n < 0 for n in sz) or sum(sz) != shapes[0][0]:
            return f"reduce_scatterv sizes {list(sz)} do not split {shapes[0][0]} rows over {len(group)} ranks"
    return None


def _scatter(kind: str, values: list[algebra.Value], sizes: tuple[int, ...] | None) -> list[algebra.Value] | None:
    """Each member's part of a reduce-scatter-like collective (None for other kinds).
    Members keep their own rows (reduce_scatterv, a combine); equal sizes, or a
    combine whose value no longer holds every member's rows, are a plain
    reduce-scatter, whose work shared over members wide worlds need."""
    if kind not in ("reduce_scatter", "reduce_scatterv", "combine_a2a"):
        return None
    if sizes is None or len(set(sizes)) == 1 or sum(sizes) != values[0].rows:
        return algebra.reduce_scatter_all(values)
    return algebra.reduce_scatterv(values, sizes)


def _ranks_words(ranks: list[int]) -> str:
    shown = ",".join(map(str, ranks[:8])) + (f",... ({len(ranks)} ranks)" if len(ranks) > 8 else "")
    return f"rank{'s' if len(ranks) > 1 else ''} {shown}"


class Simulation:
    """Simulates one scenario with one runner class."""

    collapse = True  # simulate identical rank programs once (tests turn it off to compare)
    simpy_timing = False  # time the steps with the SimPy model (the reference tests compare with)

    def __init__(self, scenario: Scenario, runner_cls: type[MoERunner], profile: Profile, runner_label: str) -> None:
        # The engine's dispatch layout (the runner class's rules; vLLM's for a
        # class that names none): what dispatch, combine, the loads and the
        # routed rows' width follow.
        self.layout: DispatchLayout = getattr(runner_cls, "engine_rules", VLLM_LAYOUT)
        scenario = engine_scenario(scenario, self.layout)
        self.scenario = scenario
        self.runner_cls = runner_cls
        self.runner_label = runner_label
        self.profile = profile
        self.view_us = profile.elementwise_us * 0.25
        self.hazards: list[Hazard] = []
        self.notes: list[str] = []
        self.decisions: dict[str, str] = {}  # rank 0's (the signatures' and the reports' decision)
        self.decided: dict[str, dict[str, list[int]]] = {}  # point -> value -> ranks that decided it
        self.accesses: list[Access] = []
        # (rank, buffer) of every access issued on a stream other than main:
        # the only buffers that can race (sim/hazards.py), kept as they are made.
        self.side_buffers: set[tuple[int, int]] = set()
        self.pending: dict[tuple, _Pending] = {}
        # Per collective, in the order first reached: (rank, plan index) of each
        # arrival (sim/symmetry.py reads it; keys hold world-long groups).
        self.meetings: list[list[tuple[int, int]]] = []
        self.rank_ops: list[SimOps] = []
        self.finished: dict[int, str] = {}
        self.usage_error: OpsUsageError | RunnerUnsupported | None = None
        self.budget_stop: str | None = None  # why a budget stopped the program phase
        self.sent_other_rows = False  # a dispatch sent other rows than a layer's (sim/simcomm.py)
        self.chunk_sizes: dict[tuple, Any] = {}  # per dispatch/combine of such rows: every member's rows
        self.side_collectives: set[int] = set()  # ranks that issued a collective on a stream other than main
        self.took_rows = False  # some rank took a chunk of rows (ops.take_rows)
        # Buffer and event numbers 1, 2, ...: a counter's C-level __next__
        # (several per op) instead of a method call each.
        self.new_buffer: Callable[[], int] = count(1).__next__
        self.new_event: Callable[[], int] = count(1).__next__
        # Streams matter only if a runner uses more than one; tracked always so a
        # user's runner that opens a stream late is still checked.
        self.track_streams = True
        self.checks = Checks(self)
        self.expected_scale = self.checks.expected_scale
        self.loads = expert_loads(scenario, self.layout)  # hashing the scenario once, not per op
        self._groups: dict[tuple[str, int], RankGroup] = {}
        self._dispatch: dict[int, tuple[RankGroup, bool]] = {}
        self._labels: dict[tuple[str, int], Labels] = {}
        self._rows: dict[tuple[Any, int], tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def release(self) -> None:
        """Break the cycles a finished simulation is made of (its ranks' Ops and
        its checks point back at it), so that dropping it frees its records at
        once instead of leaving a wide world's worth of them for the cyclic
        collector to walk. The trace it made stays whole; the simulation
        itself is unusable afterwards."""
        for ops in self.rank_ops:
            del ops.sim
        del self.checks.sim
        self.pending.clear()

    def add_hazard(self, kind: HazardKind, rank: int, st: Step, detail: str, cost: float | None = None,
                   opaque_from: int | None = None, consumers: list[str] | None = None) -> None:
        self.hazards.append(Hazard(kind, st.index, st.name, rank, detail, cost, opaque_from=opaque_from,
                                   consumers=consumers))

    # ---- collectives ----

    # Groups of one kind partition the ranks (tests/test_symmetry.py checks
    # it for every kind): a group found for one member is every member's, so
    # a world-wide group is built once, not once per rank.

    def group(self, kind: str, rank: int) -> tuple[int, ...]:
        """Scenario.group, one shared object per group."""
        if not isinstance(kind, str):  # a runner's bad argument: Scenario.group says why
            return self.scenario.group(kind, rank)
        g = self._groups.get((kind, rank))
        if g is None:
            g = RankGroup(self.scenario.group(kind, rank))
            for m in g:
                self._groups[(kind, m)] = g
        return g

    def dispatch_group(self, rank: int) -> tuple[tuple[int, ...], bool]:
        """The layout's dispatch_group, one shared object per group."""
        found = self._dispatch.get(rank)
        if found is None:
            members, token_routing = self.layout.dispatch_group(self.scenario, rank)
            found = (RankGroup(members), token_routing)
            for m in members:
                self._dispatch[m] = found
        return found

    def shard_labels(self, prefix: str, n: int) -> Labels:
        """("tp0", ..., "tp{n-1}"): one shared object per prefix and size
        (every member of a wide group would build and hash its own)."""
        found = self._labels.get((prefix, n))
        if found is None:
            found = self._labels[(prefix, n)] = Labels([f"{prefix}{i}" for i in range(n)])
        return found

    def received_rows(self, rank: int, group: tuple[int, ...]) -> int:
        """Rows a token-routing dispatch delivers to `rank`: each member's tokens
        with at least one expert on this rank."""
        return self._per_group(_received_rows, group)[rank]

    def member_rows(self, group: tuple[int, ...]) -> tuple[int, ...]:
        """Layer rows of each member of `group` (the DP metadata's counts)."""
        return self._per_group(_member_rows, group)

    def _per_group(self, fn: Any, group: tuple[int, ...]) -> tuple[int, ...]:
        """fn's cached answer for `group`, looked up once per simulation: the
        cross-simulation cache holds an earlier simulation's equal group, and
        matching it compares the world-long tuples element by element (per
        member of a world-wide group: world^2 comparisons)."""
        key = (fn, id(group))
        found = self._rows.get(key)
        if found is None or found[0] is not group:
            found = self._rows[key] = (group, fn(self.scenario, group, self.layout))
        return found[1]

    def arrive(self, ops: SimOps, key: tuple, kind: str, x: SimTensor, st: Step,
               sizes: tuple[int, ...] | None = None) -> Any:
        group = key[0]
        pend = self.pending.get(key)
        if pend is None:
            pend = self.pending[key] = _Pending(kind, group, number=len(self.meetings))
            self.meetings.append([])
        self.meetings[pend.number].append((ops.rank, len(ops.plans) - 1))
        pend.arrivals[ops.rank] = (kind, x, st)
        pend.sizes[ops.rank] = sizes
        if len(pend.arrivals) == len(group):
            self._complete(pend, ops.rank)
            del self.pending[key]
        else:
            self._main.switch()  # blocked until the last member arrives
        return pend.results[ops.rank]

    def _complete(self, pend: _Pending, current: int) -> None:
        group = pend.group
        arrivals = [pend.arrivals[r] for r in group]
        kinds = {a[0] for a in arrivals}
        problem = None
        if len(kinds) > 1:
            problem = "ranks disagree on the collective: " + ", ".join(
                f"rank {r} {a[0]} ({a[2].name})" for r, a in zip(group, arrivals)
            )
        else:
            problem = _shape_problem(pend, arrivals)
        if problem is not None:
            for r, (_k, _x, st) in zip(group, arrivals):
                self.add_hazard(HazardKind.SHAPE_MISMATCH, r, st, problem)
                pend.results[r] = CollectiveFailed(f"{st.name}: {problem}")
                if r != current:
                    self._ready.append(r)
            return
        values = [a[1].value for a in arrivals]
        kind = pend.kind
        shared_sum = None
        sizes = pend.sizes[group[0]]
        scattered = _scatter(kind, values, sizes)
        if kind == "all_reduce":
            keys = {v.keys() for v in values}
            if len(keys) == 1:
                # Same rows on every member (TP): one sum serves them all.
                shared_sum = algebra.add(values, own=0)
        gathered = algebra.concat(values) if kind in ("all_gather", "all_gatherv", "dispatch_a2a") else None
        total_rows = sum([a[1].shape[0] for a in arrivals])
        for i, r in enumerate(group):
            x = arrivals[i][1]
            if kind == "all_reduce":
                out = (x.shape, shared_sum if shared_sum is not None else algebra.add(values, own=i))
            elif kind == "all_gatherv":  # every member's own rows, in group order
                out = ((total_rows, *x.shape[1:]), gathered)
            elif kind == "reduce_scatterv":
                assert scattered is not None and sizes is not None
                out = ((sizes[i], *x.shape[1:]), scattered[i])
            elif gathered is not None:  # every member receives the same value
                out = ((x.shape[0] * len(group), *x.shape[1:]), gathered)
            else:  # reduce_scatter, combine_a2a
                v = scattered[i] if scattered is not None else algebra.reduce_scatter(values, i)
                rows = v.rows if kind == "combine_a2a" else x.shape[0] // len(group)
                out = ((rows, *x.shape[1:]), v)
            pend.results[r] = out
            if r != current:
                self._ready.append(r)

    # ---- the program phase ----

    def _rank_body(self, ops: SimOps) -> None:
        rank = ops.rank
        try:
            run_program(self.runner_cls, self.scenario, ops)
            self.finished[rank] = "done"
        except (SimShapeError, CollectiveFailed) as exc:
            self.finished[rank] = f"failed: {exc}"
        except (OpsUsageError, RunnerUnsupported) as exc:  # misuse, or out of the runner's scope: not a finding
            if self.usage_error is None:
                self.usage_error = exc
            self.finished[rank] = f"misused Ops: {exc}"
        except _Abort:  # the engine's own, ending a rank still blocked (a runner's GreenletExit is its error)
            raise
        except contain.BudgetExceeded as exc:  # the whole program phase stops here
            st = self._runner_error(ops, exc, f"runner stopped: {exc}")
            self.budget_stop = f"{exc} on rank {rank} after step {st.index} {st.name}"
            self._ready.clear()
        except Exception as exc:  # a runner bug: report it with its step
            self._runner_error(ops, exc, f"runner raised {type(exc).__name__}: {exc}{raised_inside_simulator(exc)}")
        except BaseException as exc:  # sys.exit, KeyboardInterrupt, GeneratorExit, GreenletExit, ...
            if isinstance(exc, KeyboardInterrupt) and contain.user_interrupted():
                raise  # the user's Ctrl-C ends the command
            self._runner_error(ops, exc, str(contain.runner_exit(exc)))

    def _runner_error(self, ops: SimOps, exc: BaseException, message: str) -> Step:
        """A RUNNER_ERROR at the rank's last step."""
        st = ops.steps[-1] if ops.steps else Step(ops.rank, 0, "construct", "construct")
        st.error = f"{type(exc).__name__}: {exc}"
        self.add_hazard(HazardKind.RUNNER_ERROR, ops.rank, st, f"{message} (after step {st.index} {st.name})")
        self.finished[ops.rank] = f"raised {type(exc).__name__}"
        return st

    def _program_phase(self) -> None:
        s = self.scenario
        self._main = greenlet.getcurrent()
        self._ready: deque[int] = deque()
        lets: list[greenlet.greenlet] = []
        budget = contain.current_budget()  # one for every rank: they start under one guard
        for r in range(s.world):
            ops = SimOps(self, r, budget)
            self.rank_ops.append(ops)
            lets.append(greenlet.greenlet(lambda ops=ops: self._rank_body(ops), parent=self._main))
            self._ready.append(r)
        while self._ready and self.usage_error is None:
            r = self._ready.popleft()
            if not lets[r].dead:
                lets[r].switch()
        if self.usage_error is None and self.budget_stop is None:  # a budget stopped them all: no hang
            self._report_hangs()
        for g in lets:
            if not g.dead:
                g.throw(_Abort)
        self.pending.clear()
        if self.usage_error is not None:
            err = self.usage_error
            if isinstance(err, RunnerUsageError | RunnerUnsupported):
                raise err
            raise RunnerUsageError("?", -1, str(err), self.runner_label)

    def _after_program(self) -> None:
        """Tool work over the issued programs, outside the runner's guard: a
        world stopped at its op budget holds up to world x --max-ops steps, and
        walking them must not count against the runner's wall clock (past it,
        the guard's watchdog ends the process)."""
        self.checks.finish()
        shared_clocks: dict[tuple, list[dict[str, int]]] = {}
        for ops in self.rank_ops:
            ops.assign_clocks(shared_clocks)

    def _split_decisions(self) -> list[str]:
        """A note per decision the ranks took differently (the decisions shown
        are rank 0's), e.g. an overlap decided on each DP rank's own count."""
        out = []
        for point, by_value in self.decided.items():
            if len(by_value) > 1:
                each = "; ".join(f"{v} on {_ranks_words(rs)}" for v, rs in by_value.items())
                out.append(f"decision {point} differs by rank: {each}")
        return out

    def _report_hangs(self) -> None:
        """Ranks still blocked in a collective: hang."""
        for key, pend in list(self.pending.items()):
            group = key[0]
            missing = [r for r in group if r not in pend.arrivals]
            for r, (_k, _x, st) in pend.arrivals.items():
                why = "; ".join(f"rank {m} {self.finished.get(m, 'is blocked elsewhere')}" for m in missing)
                st.error = "hang"
                self.add_hazard(
                    HazardKind.HANG, r, st,
                    f"waits in {pend.kind} over ranks {list(group)}; never reached by {why}",
                )

    # ---- both phases ----

    def run(self) -> Trace:
        # Runner code runs only in the program phase: budgets and stdout apply there.
        with contain.RunnerGuard(run_program.__code__, contain.limits().sim_timeout_s):
            self._program_phase()
        self._after_program()
        if self.budget_stop is not None:
            self.notes.append(contain.BUDGET_NOTE + self.budget_stop)
        self.notes.extend(self._split_decisions())
        note = layout_note(self.layout, self.scenario, getattr(self.layout, "name", "engine"))
        if note is not None:
            self.notes.append(note)
        width_note = self.layout.library_width_note(self.scenario)
        if width_note is not None:
            self.notes.append(width_note)
        latency = timing_phase(self)
        trace = Trace(
            source="sim",
            scenario=self.scenario.name,
            runner=self.runner_label,
            world=self.scenario.world,
            hazards=self.hazards,
            latency_us=latency,
            decisions=self.decisions,
            notes=self.notes,
        )
        for ops in self.rank_ops:
            trace.steps[ops.rank] = ops.steps
            trace.values[ops.rank] = ops.values
            if ops.output is not None and ops.output.value.rows == 0:
                trace.outputs[ops.rank] = {}  # an idle DP rank: no row holds any source
            elif ops.output is not None:
                # Every expected source appears, a missing one as 0.
                coeffs = self.checks.output_coefficients(ops.output.value, self.checks.output_labels(ops))
                trace.outputs[ops.rank] = dict(coeffs)
        return trace
