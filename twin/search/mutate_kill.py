"""Killing mutants with `verify`'s enumeration instead of a search budget.

One walk per mutant enumerates the decision space the way `verify` does
(scenarios/space.py, one representative scenario per class, in product
order) and simulates each class twice, the mutant and its reference runner
(fixed, or sglang for the S_ mutants), under one read log. Pruning is
verify's concolic pruning on the union of both runs' reads: a pruned class
makes both programs run as on the class that stands for it, so comparing
the simulated classes compares every class.

- killed: on some class the mutant shows a finding whose signature the
  reference's own verify of the space does not have (or the reference does
  not show on that class). The walk stops there: the first such class in
  product order is the simplest.
- otherwise the classes where the two behave differently decide:
  none -> equivalent over the space;
  only the overlap schedule differs (same outputs, same hazards) and the
  mutant is never slower than the reference -> equivalent (a priority change
  that costs nothing, decided by simulating both; a slower one is a
  LOST_OVERLAP, which the simulator reports and so kills);
  anything else -> a blind spot, with the first class and how it differs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from scenarios.runners import MoERunner, Order
from scenarios.space import Axis, Enumeration, assignment_scenario, space_axes
from scenarios.spec import ScenarioError
from twin.search.verify import equivalents
from twin.search.verify_record import Reads, reads, recording

SLOWER_EPS_US = 1e-6


@dataclass
class Diff:
    """How the mutant differs from its reference on the space (no kill)."""

    classes: int = 0  # classes differing (simulated ones)
    first: str = ""  # where and how, in words
    schedule_only: bool = True  # every difference keeps outputs and hazards
    order_only: bool = True  # ... and only the shared-experts order decision differs
    slower: str = ""  # first schedule-only class where the mutant is slower
    faster_us: float = 0.0  # largest gain of the mutant over the reference
    unexecutable: str = ""  # first class where it picks an overlap the kernel cannot do


@dataclass
class PairWalk:
    """The outcome of one mutant's walk."""

    mutant: str
    reference: str
    classes: int = 0
    simulated: int = 0
    pruned: int = 0
    killed_by: tuple[str, str, str] | None = None  # (signature, detail, scenario summary)
    diff: Diff = field(default_factory=Diff)
    elapsed_s: float = 0.0

    rules: Any = None  # the reference's EngineRules

    @property
    def status(self) -> str:
        d = self.diff
        if self.killed_by:
            return "killed"
        if not d.classes or (d.schedule_only and not d.slower and not d.unexecutable):
            return "equivalent"
        return "blind_spot"

    def reason(self, space: str) -> str:
        d, where = self.diff, f"the {self.classes} classes of the {space} space"
        if self.killed_by:
            sig, detail, scen = self.killed_by
            return f"{detail} (on {scen})"
        if not d.classes:
            return (f"equivalent: no observable difference from {self.reference} on {where} (same "
                    "decisions, steps, shapes, streams, output coefficients and hazards)")
        if d.unexecutable:
            return f"blind spot: picks an overlap the kernel cannot execute on {where}, first {d.unexecutable}"
        what = ("only the shared-experts order differs (a changed priority)" if d.order_only else
                "a different program (other steps or collectives) with the same outputs and hazards")
        if d.schedule_only and not d.slower:
            return (f"equivalent: {what} on {d.classes} simulated class(es) of {where}, first {d.first}; "
                    f"simulating both shows it never slower than {self.reference} (up to {d.faster_us:.1f} us "
                    "faster)")
        if d.schedule_only:
            kind = ("LOST_OVERLAP does not apply (the reference order is no overlap)" if d.order_only else
                    "the twin has no hazard kind for a correct but slower program")
            return (f"blind spot: {what} on {where}, but it is slower and {kind}: {d.slower}")
        return f"blind spot: differs from {self.reference} on {d.classes} simulated class(es) of {where}, first {d.first}"


@dataclass(frozen=True)
class RefRun:
    """What the walk needs of the reference's run on one class (cached: every
    mutant of a runner is compared with the same runs)."""

    reads: Reads
    behaviour: tuple[Any, ...]
    signatures: frozenset[str]
    latency_us: float


# (reference, space label, max_world, class index) -> its run; per process.
_REF_CACHE: dict[tuple[str, str, int, int], RefRun] = {}


def _ref_run(key: tuple[str, str, int, int], s: Any, reference: type[MoERunner]) -> RefRun:
    from twin.search.explore_oracle import simulate_safe, trace_findings
    from twin.search.mutate_equiv import behaviour

    got = _REF_CACHE.get(key)
    if got is None:
        with reads() as log:
            trace = simulate_safe(recording(s), reference)
        got = RefRun(log, behaviour(trace), frozenset(trace_findings(trace)), trace.latency_us)
        _REF_CACHE[key] = got
    return got


ORDER = "shared_experts_order"


def walk_rules(walk: PairWalk) -> Any:
    from scenarios.runners import load_runner

    if walk.rules is None:
        walk.rules = load_runner(walk.reference).engine_rules
    return walk.rules


def _compare(walk: PairWalk, s: Any, mine: Any, ref: Any) -> None:
    """Record how `mine` (a trace) differs from `ref` (a trace or a RefRun)."""
    from twin.search.mutate_equiv import behaviour, first_difference

    bm = behaviour(mine)
    br = ref.behaviour if isinstance(ref, RefRun) else behaviour(ref)
    if bm == br:
        return
    d = walk.diff
    d.classes += 1
    where = f"on {s.summary_line()}: {first_difference(bm, br)}"
    d.first = d.first or where
    if bm[2] != br[2] or bm[3] != br[3]:
        d.schedule_only = False
        return
    decided = dict(bm[0]), dict(br[0])
    if {k for k in set(decided[0]) | set(decided[1]) if decided[0].get(k) != decided[1].get(k)} != {ORDER}:
        d.order_only = False
    order = decided[0].get(ORDER)
    if (order == Order.MK_INTERNAL_OVERLAPPED.value and not d.unexecutable
            and not walk_rules(walk).async_overlap_possible(s)):
        # The simulator times the kernel's overlap for any all-to-all kernel;
        # a backend that cannot overlap inside the kernel does not, and what
        # the engine then does is not modelled: not an equivalence.
        d.unexecutable = (f"{where}: {s.effective_backend} cannot overlap shared experts inside the "
                          "kernel, yet the simulator times that overlap (what the engine does then is "
                          "not modelled)")
    gain = ref.latency_us - mine.latency_us
    if gain < -SLOWER_EPS_US and not d.slower:
        d.slower = f"{where}; layer {mine.latency_us:.1f} us vs {ref.latency_us:.1f} us"
    d.faster_us = max(d.faster_us, gain)


def pair_walk(mutant: type[MoERunner], reference: type[MoERunner], axes: tuple[Axis, ...], max_world: int,
              ref_signatures: frozenset[str], space_label: str | None = None) -> PairWalk:
    """See the module docstring; `ref_signatures`: the reference's verify findings."""
    from twin.search.explore_oracle import simulate_safe, trace_findings

    t0 = time.perf_counter()
    walk = PairWalk(mutant.__name__, getattr(reference, "name", reference.__name__))
    spec = walk.reference
    every = Enumeration(axes, max_world)
    covered: set[int] = set()
    for i in range(len(every)):
        a = every.get(i)
        if a is None or i in covered:
            continue
        try:
            s = assignment_scenario(axes, a, spec)
        except ScenarioError:
            continue
        walk.classes += 1
        walk.simulated += 1
        # Only a named space is cached (a custom table may differ between calls).
        ref = (_ref_run((spec, space_label, max_world, i), s, reference) if space_label
               else _ref_run_uncached(s, reference))
        with reads() as log:
            mine = simulate_safe(recording(s), mutant)
        log.values.update(ref.reads.values)  # the union: both programs are the same on a pruned class
        log.opaque = log.opaque or ref.reads.opaque
        found = trace_findings(mine)
        new = [sig for sig in found if sig not in ref_signatures and sig not in ref.signatures]
        if new:
            walk.killed_by = (new[0], str(found[new[0]]), s.summary_line())
            break
        _compare(walk, s, mine, ref)

        def wanted(values: tuple[Any, ...], i: int = i) -> bool:
            j = every.index(values)
            return j is not None and j > i and j not in covered

        for values in equivalents(axes, a, log, spec, wanted):
            j = every.index(values)
            assert j is not None
            covered.add(j)
            walk.classes += 1
            walk.pruned += 1
    walk.elapsed_s = time.perf_counter() - t0
    return walk


def _ref_run_uncached(s: Any, reference: type[MoERunner]) -> RefRun:
    key = ("", "", 0, -1)
    _REF_CACHE.pop(key, None)
    out = _ref_run(key, s, reference)
    _REF_CACHE.pop(key, None)
    return out


def reference_signatures(reference: str, space: str | tuple[Axis, ...], max_world: int | None) -> frozenset[str]:
    """The reference runner's own verify findings on the space."""
    from twin.search.verify import verify

    res = verify(reference, space=space, max_world=max_world, jobs=1, polish_findings=False)
    return frozenset(f.signature for f in res.findings)


def kill_task(task: tuple[str, str, Any, int, frozenset[str]]) -> dict[str, Any]:
    """One mutant's walk (a pool worker's job): plain data back."""
    from scenarios.runners import load_runner
    from twin.search import mutate

    name, reference, space, max_world, ref_sigs = task
    axes = space_axes(space)
    label = space if isinstance(space, str) else "custom"
    walk = pair_walk(mutate.MUTANTS[name], load_runner(reference), axes, max_world, ref_sigs,
                     space if isinstance(space, str) else None)
    return {"mutant": name, "status": walk.status, "reason": walk.reason(label),
            "signature": walk.killed_by[0] if walk.killed_by else None,
            "scenario": walk.killed_by[2] if walk.killed_by else None,
            "classes": walk.classes, "simulated": walk.simulated, "pruned": walk.pruned,
            "elapsed_s": round(walk.elapsed_s, 3)}


__all__ = ["Diff", "PairWalk", "kill_task", "pair_walk", "reference_signatures"]
