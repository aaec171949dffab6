"""`verify`: bounded exhaustive enumeration of the discrete decision space.

Every assignment of the space's axes (scenarios/space.py) becomes one small
representative scenario (a decision class); each is simulated, or proved
equivalent to one already simulated and pruned. Pruning is concolic: a run
logs every scenario predicate it consulted and its value (twin/verify_record.py);
an assignment on which all of them have the same values runs the same
program and is judged the same way, so it is not simulated again. The
candidates are the assignments that differ from the simulated one only in
axes whose change alone left every consulted value unchanged; each candidate
is checked against the whole log before it is pruned.

Findings are those of `explore` (same signatures, same TOML files); the
first class that shows a signature is the simplest one (axes' values are
listed simplest first) and is polished like explore's findings.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from scenarios import contain
from scenarios.contain_forks import end_forked
from scenarios.dispatch_layout import VLLM_LAYOUT, engine_scenario
from scenarios.runners import MoERunner, load_runner, prepare_runner, unsupported_reason
from scenarios.space import (
    DEFAULT_MAX_WORLD,
    Axis,
    Enumeration,
    assignment_scenario,
    axes_dict,
    space_axes,
)
from scenarios.spec import MAX_WORLD, Scenario, ScenarioError
from twin.search.explore_store import ExploreInputError, Finding, FindingStore, prepare_out
from twin.search.explore_store import slug as _slug
from twin.search.verify_merge import merge, statement
from twin.search.verify_record import Reads, reads, recording, same_reads
from twin.search.verify_result import Outcome, VerifyResult

Assignment = dict[str, Any]
ProgressFn = Callable[[int, int, int], None]  # (assignments done, total, findings)

# Simulated classes in a row (in the order they end, over every worker) stopped
# by the wall-clock budget after which the enumeration gives up: a runner that
# loops on every class would otherwise cost a whole --sim-timeout per class.
MAX_WALL_STOPS = 3


# ---------------------------------------------------------------- one class (worker side)

_RUNNERS: dict[str, type[MoERunner]] = {}


# The wall-clock stops in a row shared by the workers of one parallel verify.
_WALL_STOPS: Any = None


def _init_worker(limits: contain.Limits, wall_stops: Any = None) -> None:
    global _WALL_STOPS
    contain.set_limits(limits)
    _WALL_STOPS = wall_stops


def simulate_class(spec: str, index: int, scenario: Scenario) -> Outcome:
    """Simulate one class with its reads logged (runs in a worker; torch-free)."""
    from twin.search.explore_oracle import simulate_safe, trace_findings

    cls = _RUNNERS.get(spec) or _RUNNERS.setdefault(spec, load_runner(spec))
    with reads() as log:
        trace = simulate_safe(recording(scenario), cls)
    found = {sig: (h.kind.value, str(h), h.step, h.rank) for sig, h in trace_findings(trace).items()}
    return Outcome(index, log, found, dict(trace.decisions), contain.budget_stop(trace.notes))


# ---------------------------------------------------------------- pruning


def equivalents(axes: tuple[Axis, ...], a: Assignment, log: Reads, runner: str,
                wanted: Callable[[tuple[Any, ...]], bool]) -> list[tuple[Any, ...]]:
    """Assignments (as value tuples, `wanted` ones only) on which every read of
    `log` has the same value as on `a`: candidates vary only axes whose change
    alone kept the reads, and each candidate is checked on the whole log."""
    if log.opaque:
        return []
    keep: list[list[Any]] = []
    for axis in axes:
        same = [a[axis.name]]
        for v in axis.values:
            if v != a[axis.name] and _same(axes, {**a, axis.name: v}, log, runner):
                same.append(v)
        keep.append(same)
    own = tuple(a[x.name] for x in axes)
    out = []
    for values in itertools.product(*keep):
        if values == own or not wanted(values):
            continue
        if _same(axes, dict(zip((x.name for x in axes), values)), log, runner):
            out.append(values)
    return out


def _same(axes: tuple[Axis, ...], a: Assignment, log: Reads, runner: str) -> bool:
    # The run read the scenario as its runner's engine sees it (the routed
    # width, the capacity): the candidate is compared under the same view.
    layout = getattr(_RUNNERS.get(runner) or _RUNNERS.setdefault(runner, load_runner(runner)), "engine_rules",
                     VLLM_LAYOUT)
    try:
        s = engine_scenario(assignment_scenario(axes, a, runner), layout)
    except ScenarioError:
        return False
    return same_reads(s, log)


# ---------------------------------------------------------------- the enumeration


def check_shard(shard: Any) -> tuple[int, int] | None:
    if shard is None:
        return None
    if isinstance(shard, str):
        i, sep, n = shard.partition("/")
        try:
            shard = (int(i), int(n)) if sep else None
        except ValueError:
            shard = None
    if not (isinstance(shard, tuple) and len(shard) == 2 and 1 <= shard[1] and 0 <= shard[0] < shard[1]):
        raise ExploreInputError(f"--shard: must be i/n with 0 <= i < n, got {shard!r}")
    return shard


def verify(
    runner: str | type[MoERunner],
    space: str | tuple[Axis, ...] = "default",
    max_world: int | None = None,
    jobs: int = 1,
    shard: str | tuple[int, int] | None = None,
    out: Path | str | None = None,
    prune: bool = True,
    progress: ProgressFn | None = None,
    keep_outcomes: bool = False,
    polish_findings: bool = True,
    store: FindingStore | None = None,
    should_stop: Callable[[], bool] | None = None,
    partial_on_interrupt: bool = False,
    name_prefix: str = "verify",
    max_wall_stops: int | None = MAX_WALL_STOPS,
) -> VerifyResult:
    """Enumerate `space` (tp x dp <= max_world) for `runner`; see the module docstring.

    `store`: record the findings there (explore's store: its files, its known
    signatures) instead of a store of this call's own under `out`.
    `should_stop`, polled before each assignment (jobs = 1 only): True ends
    the enumeration there, `complete` False. `name_prefix` names the findings'
    scenario files. `max_wall_stops`: that many simulated classes in a row
    stopped by the wall-clock budget (counted over every worker) end the
    enumeration too (`gave_up`, "stopped" in JSON, says so; None: never):
    each further class would cost the whole budget. A Ctrl-C ends it with
    the findings so far saved; `partial_on_interrupt` returns them
    (`interrupted`, `complete` False) instead of raising KeyboardInterrupt."""
    from twin.search.explore import resolve_runner

    t0 = time.perf_counter()
    axes = space_axes(space)
    if not isinstance(space, str):
        space, jobs = "custom", 1  # a table of its own: not re-created by name in a worker
    max_world = DEFAULT_MAX_WORLD.get(space, 4) if max_world is None else max_world
    if isinstance(max_world, bool) or not isinstance(max_world, int) or not 1 <= max_world <= MAX_WORLD:
        raise ExploreInputError(f"--max-world: must be a number of ranks from 1 to {MAX_WORLD}, got {max_world!r}")
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ExploreInputError(f"--jobs: must be a positive number of processes, got {jobs!r}")
    if should_stop is not None and jobs != 1:
        raise ExploreInputError("verify: should_stop needs jobs = 1 (the workers are not polled)")
    shard_t = check_shard(shard)
    if isinstance(runner, type):
        from twin.search.explore import check_interface

        runner_cls, spec = load_runner(runner), f"{runner.__module__}:{runner.__qualname__}"
        check_interface(runner_cls, spec)
        if spec.startswith("__main__:") or "<locals>" in spec:
            spec = runner_cls.__name__  # not importable by name: simulate in-process only
            jobs = 1
            _RUNNERS[spec] = runner_cls
    else:
        runner_cls, spec = resolve_runner(runner)
    _RUNNERS.setdefault(spec, runner_cls)
    if store is None:
        store = FindingStore(prepare_out(Path(out)) if out is not None else None, spec)
    res = VerifyResult(spec, space, max_world, axes_dict(axes, max_world), shard=shard_t, jobs=jobs,
                       outcomes={} if keep_outcomes else None)
    every = Enumeration(axes, max_world)
    lo, hi = _shard_range(len(every), shard_t)
    res.assignments_total = hi - lo
    say = progress or (lambda _d, _t, _f: None)
    walk = None
    try:
        if jobs == 1:
            walk = _Walk(axes, every, lo, hi, spec, runner_cls, res, store, prune, polish_findings, say,
                         should_stop, name_prefix)
            walk.max_wall_stops = max_wall_stops
            walk.run()
        else:
            _parallel(space, max_world, every, lo, hi, spec, res, store, prune, polish_findings, jobs, say,
                      max_wall_stops)
    except KeyboardInterrupt:
        res.interrupted, res.complete = True, False
    if walk is not None:
        res.assignments_done = walk.done
    res.findings = sorted(store.findings.values(), key=lambda f: f.signature)
    res.elapsed_s = time.perf_counter() - t0
    store.save()  # what was found before a Ctrl-C too
    if res.interrupted and not partial_on_interrupt:
        raise KeyboardInterrupt
    return res


# Blocks per worker: enough to balance the load (the first blocks, one rank,
# are the cheapest), few enough that pruning across block edges is not lost.
BLOCKS_PER_JOB = 3


def _parallel(space: str, max_world: int, every: Enumeration, lo: int, hi: int, spec: str,
              res: VerifyResult, store: FindingStore, prune: bool, polish_findings: bool, jobs: int,
              say: ProgressFn, max_wall_stops: int | None = MAX_WALL_STOPS) -> None:
    """Contiguous blocks of the range, each enumerated (and pruned) by one worker;
    the wall-clock stops in a row are counted over all of them (a shared counter)."""
    import multiprocessing as mp

    k = min(jobs * BLOCKS_PER_JOB, max(hi - lo, 1))
    bounds = [(lo + (hi - lo) * b // k, lo + (hi - lo) * (b + 1) // k) for b in range(k)]
    tasks = [(spec, space, max_world, a, b, prune, polish_findings, res.outcomes is not None, max_wall_stops)
             for a, b in bounds]
    done = 0
    ctx = mp.get_context("forkserver")  # no fork of a process that may run a progress thread
    wall_stops = ctx.Value("i", 0)
    with ctx.Pool(jobs, initializer=_init_worker, initargs=(contain.limits(), wall_stops)) as pool:
        for part in pool.imap(_walk_block, tasks):
            for key in ("classes", "pruned", "invalid", "opaque", "unsupported", "assignments_done"):
                setattr(res, key, getattr(res, key) + getattr(part, key))
            if part.gave_up and not res.gave_up:
                res.gave_up, res.complete = part.gave_up, False
            if res.outcomes is not None and part.outcomes is not None:
                res.outcomes.update(part.outcomes)
            res.absorb_found(part.finding_sets)
            for f in part.findings:  # blocks arrive in order: the first is the simplest
                if f.signature not in store.findings:
                    store.findings[f.signature] = f
                    store.write_scenario(f)
                    store.save()
            done += part.assignments_done
            say(done, hi - lo, len(store.findings))


def _walk_block(task: tuple[Any, ...]) -> VerifyResult:
    spec, space, max_world, lo, hi, prune, polish_findings, keep, max_wall_stops = task
    axes = space_axes(space)
    cls = _RUNNERS.get(spec) or _RUNNERS.setdefault(spec, load_runner(spec))
    part = VerifyResult(spec, space, max_world, {}, outcomes={} if keep else None)
    store = FindingStore(None, spec)
    walk = _Walk(axes, Enumeration(axes, max_world), lo, hi, spec, cls, part, store, prune, polish_findings,
                 lambda _d, _t, _f: None)
    walk.max_wall_stops, walk.wall_stops = max_wall_stops, _WALL_STOPS
    try:
        walk.run()
    finally:
        end_forked()  # a worker outlives its task: what runner code forked in it does not
    part.findings = list(store.findings.values())
    part.assignments_done = walk.done
    return part


def _shard_range(n: int, shard: tuple[int, int] | None) -> tuple[int, int]:
    # Contiguous blocks: a class's equivalents are mostly its neighbours in
    # the product order, so a block prunes almost as well as the whole space.
    if shard is None:
        return 0, n
    i, k = shard
    return n * i // k, n * (i + 1) // k


class _Walk:
    """The enumeration of one shard, in product order, `jobs` classes in flight."""

    def __init__(self, axes: tuple[Axis, ...], every: Enumeration, lo: int, hi: int, spec: str,
                 runner_cls: type[MoERunner], res: VerifyResult, store: FindingStore, prune: bool,
                 polish_findings: bool, progress: ProgressFn, should_stop: Callable[[], bool] | None = None,
                 name_prefix: str = "verify") -> None:
        self.axes, self.every, self.lo, self.hi = axes, every, lo, hi
        self.spec, self.runner_cls, self.res, self.store = spec, runner_cls, res, store
        self.prune, self.polish_findings, self.progress = prune, polish_findings, progress
        self.should_stop, self.name_prefix = should_stop, name_prefix
        self.covered: dict[int, int] = {}  # pruned index -> the simulated index it is equivalent to
        self.scenarios: dict[int, Scenario] = {}
        self.assignment: dict[int, Assignment] = {}  # of the classes in flight
        self.done = 0
        self.max_wall_stops: int | None = None
        self.wall_stops: Any = None  # a counter shared with other workers (multiprocessing Value), if any

    def run(self) -> None:
        for i, s in self._classes():
            self._record(simulate_class(self.spec, i, s))

    def _classes(self) -> Any:
        """The classes still to simulate (valid, not yet proved equivalent)."""
        for i in range(self.lo, self.hi):
            if (self.should_stop is not None and self.should_stop()) or self._give_up():
                self.res.complete = False
                return
            a = self.every.get(i)
            if a is None:  # tp x dp over max_world: not part of the space
                self._tick()
                continue
            if i in self.covered:
                continue
            try:
                s = assignment_scenario(self.axes, a, self.spec)
            except ScenarioError:
                self.res.invalid += 1
                self._tick()
                continue
            if self._refused(s):
                self.res.unsupported += 1
                self._tick()
                continue
            self.res.classes += 1
            self.scenarios[i], self.assignment[i] = s, a
            yield i, s

    def _give_up(self) -> bool:
        n = self.res.wall_stops_in_a_row if self.wall_stops is None else self.wall_stops.value
        limit = self.max_wall_stops
        if limit is None or n < limit:
            return False
        self.res.gave_up = f"the runner ran into the wall-clock budget on {n} classes in a row"
        return True

    def _refused(self, s: Scenario) -> bool:
        """The runner declares the scenario out of its scope. Its `unsupported()`
        is runner code: it runs under the wall-clock budget, and its failing
        (raising, exiting, looping past the budget) is left to the contained
        simulation to report. Its prepare_program() runs first, outside the
        budget, as simulate runs it (e.g. starting an engine's probe)."""
        try:
            if prepare_runner(self.runner_cls, s) is not None:
                return False  # the simulation reports its failure as a RUNNER_ERROR
            with contain.RunnerGuard(unsupported_reason.__code__, contain.limits().sim_timeout_s,
                                     "the runner's unsupported()"):
                return unsupported_reason(self.runner_cls, s) is not None
        except KeyboardInterrupt:
            if contain.user_interrupted():
                raise
            return False
        except BaseException:  # noqa: BLE001 - runner code's: the simulation reports it in its own terms
            return False

    def _tick(self, n: int = 1) -> None:
        self.done += n
        self.progress(self.done, self.hi - self.lo, len(self.store.findings))

    def _record(self, o: Outcome) -> None:
        s, a = self.scenarios.pop(o.index), self.assignment.pop(o.index)
        self.res.opaque += o.reads.opaque
        for sig, (kind, detail, step, rank) in o.findings.items():
            if sig not in self.store.findings:
                self._new_finding(sig, kind, detail, step, rank, s, o)
        if self.res.outcomes is not None:
            self.res.outcomes[o.index] = frozenset(o.findings)
        self.res.note_found(o.findings)
        self._count_wall_stop(o.budget_stop is not None and o.budget_stop.startswith(contain.WALL_CLOCK_BUDGET))
        self._tick()
        if self.prune:
            self._prune(o, a)

    def _count_wall_stop(self, wall: bool) -> None:
        """One more class in a row stopped by the wall-clock budget, or a class
        that ended: the count starts again (here and, shared, in every worker)."""
        self.res.wall_stops_in_a_row = self.res.wall_stops_in_a_row + 1 if wall else 0
        if self.wall_stops is not None:
            with self.wall_stops.get_lock():
                self.wall_stops.value = self.wall_stops.value + 1 if wall else 0

    def _prune(self, o: Outcome, a: Assignment) -> None:
        def wanted(values: tuple[Any, ...]) -> bool:
            j = self.every.index(values)
            return j is not None and o.index < j < self.hi and j not in self.covered

        for values in equivalents(self.axes, a, o.reads, self.spec, wanted):
            j = self.every.index(values)
            assert j is not None
            self.covered[j] = o.index
            self.res.classes += 1
            self.res.pruned += 1
            if self.res.outcomes is not None:
                self.res.outcomes[j] = frozenset(o.findings)
            self.res.note_found(o.findings)
            self._tick()

    def _new_finding(self, sig: str, kind: str, detail: str, step: int, rank: int, s: Scenario,
                     o: Outcome) -> None:
        named = s.with_(name=f"{self.name_prefix}-{_slug(sig)}", summary=detail)
        f = Finding(kind, sig, detail, named, found_at=self.done + 1, decisions=o.decisions,
                    step=step, rank=rank, found=named, found_by="enumeration")
        if o.budget_stop is not None:
            f.unshrinkable = f"stopped by a budget ({o.budget_stop})"
        elif self.polish_findings:
            self._polish(f)
        self.store.findings[sig] = f
        self.store.write_scenario(f)
        self.store.save()

    def _polish(self, f: Finding) -> None:
        from twin.search.explore_oracle import simulate_safe, trace_findings
        from twin.search.explore_shrink import polish

        def keep(c: Scenario) -> bool:
            return f.signature in trace_findings(simulate_safe(c, self.runner_cls))

        small = polish(f.scenario, keep, max_tries=60)
        h = trace_findings(simulate_safe(small, self.runner_cls)).get(f.signature)
        if h is not None:
            f.scenario = small.with_(summary=str(h))
            f.detail, f.step, f.rank, f.shrunk = str(h), h.step, h.rank, True


# ---------------------------------------------------------------- shards, helper


def assert_verified(runner: str | type[MoERunner], space: str | tuple[Axis, ...] = "default",
                    max_world: int | None = None,
                    jobs: int = 1) -> VerifyResult:
    """For users' test files: fail (AssertionError listing every finding with its
    scenario) unless `verify` proves the runner clean over the space."""
    res = verify(runner, space=space, max_world=max_world, jobs=jobs)
    if res.findings:
        lines = "\n".join(f"  {f.signature} on {f.scenario.summary_line()}\n    {f.detail}" for f in res.findings)
        raise AssertionError(f"{res.runner}: {res.statement()}:\n{lines}")
    return res


__all__ = ["Outcome", "VerifyResult", "assert_verified", "check_shard", "equivalents", "merge",
           "simulate_class", "statement", "verify"]
