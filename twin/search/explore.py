"""Search for hazards: Hypothesis drives `moe_scenarios`, the simulator is the oracle.

With `enumerate_first` (the `explore` command's default) the search starts
with `verify`'s enumeration of a decision space (twin/search/explore_enum.py):
every decision class once, bounded by time; the Hypothesis phase then draws
sizes and the continuous knobs the space leaves out.

One search (`explore`) runs the runner under test on generated scenarios and
collects every distinct finding (hazard kind + step, + the order decision for
overlap hazards) without failing the test body. The budget is spent as a
series of short Hypothesis runs (ROUND_SIZE examples, fresh seeds derived from
`seed`) over one example database. Each run reports graded severity signals
with `hypothesis.target` (output coefficients far from 1, the LOST_OVERLAP
cost, how much shapes disagree, how many distinct hazards at once), so the
target phase climbs from a hazardous scenario towards worse ones, and the
database keeps the pareto front of those scenarios for the next run and for a
resumed search. Each distinct finding is then shrunk to a minimal scenario
(`hypothesis.find` on "this signature occurs", then a greedy field-by-field
`polish`) and written as a TOML file the other commands load. With `confirm`,
every finding is run on the real ranks (`twin.check.crosscheck.check`) and gets a
verdict.

Everything found is on disk as soon as it is found (`findings.json` plus one
TOML per finding under `out`), so Ctrl-C or a crash loses nothing; a second
run with the same `out` reuses the example database and the findings already
on disk, and marks which findings are new.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scenarios.contain import budget_stop
from scenarios.runners import MoERunner, RunnerLoadError, load_runner
from scenarios.spec import Scenario
from twin.search.explore_enum import (
    DEFAULT_ENUMERATE_S,
    DEFAULT_SPACE,
    INTERRUPTED,
    enumerate_phase,
)
from twin.search.explore_oracle import (
    finding_signature,
    simulate_safe,
    target_signals,
    trace_findings,
)
from twin.search.explore_shrink import _candidates, polish, shrink  # noqa: F401 - _candidates re-exported for tests
from twin.search.explore_store import (
    FINDINGS_FILE,
    ExploreInputError,
    ExploreResult,
    Finding,
    FindingStore,
    prepare_out,
)
from twin.search.explore_store import slug as _slug

DB_DIR = "hypothesis-db"
DEFAULT_BUDGET = 300
DEFAULT_OUT = Path("explore-out")


# Methods the runner programs call on a runner (the interface a user's class
# must keep callable with the same arguments).
INTERFACE = tuple(
    name for name, member in vars(MoERunner).items() if callable(member) and not name.startswith("_")
)


@dataclass
class Progress:
    """What the search is doing, for a progress display (never on stdout)."""

    phase: str  # "search", "shrink", "confirm", "done"
    examples: int
    budget: int
    findings: int
    new_findings: int
    confirmed: int
    message: str = ""
    # The enumeration phase ("enumerate"): assignments done out of its total.
    done: int = 0
    total: int = 0


ProgressFn = Callable[[Progress], None]


# ---------------------------------------------------------------- input validation


def resolve_runner(spec: str) -> tuple[type[MoERunner], str]:
    """Load and check a runner spec; returns the class and the spec to write in
    TOML files (a `file.py:Class` path made absolute so the file loads from anywhere)."""
    if not isinstance(spec, str) or not spec:
        raise ExploreInputError("--runner: a preset name or module:Class is required")
    cls = load_runner(spec)
    check_interface(cls, spec)
    module, sep, attr = spec.rpartition(":")
    if sep and module.endswith(".py"):
        spec = f"{Path(module).resolve().as_posix()}:{attr}"
    return cls, spec


def check_interface(cls: type[MoERunner], spec: str) -> None:
    """Every method the programs call must still accept the base class's arguments."""
    for name in ("__init__", *INTERFACE):
        base = getattr(MoERunner, name)
        mine = getattr(cls, name, None)
        if not callable(mine):
            raise RunnerLoadError(
                f"runner {spec!r} does not implement the runner interface: {name} is not a method")
        if mine is base:
            continue
        base_sig = inspect.signature(base)
        try:
            sig = inspect.signature(mine)
        except (TypeError, ValueError):
            continue  # builtins / C callables: nothing to check
        try:
            sig.bind(*[None] * len(base_sig.parameters))
        except TypeError:
            raise RunnerLoadError(
                f"runner {spec!r} does not implement the runner interface: "
                f"{cls.__name__}.{name}{sig} cannot be called as {name}{base_sig}"
            ) from None


def check_budget(budget: Any, flag: str = "--budget") -> int:
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise ExploreInputError(f"{flag}: must be a positive number of examples, got {budget!r}")
    return budget


# ---------------------------------------------------------------- confirmation


VERDICT_RANK = {"CONFIRMED": 0, "INCONCLUSIVE": 1, "REFUTED": 2}


def _verdict(f: Finding, scenario: Scenario, runner_spec: str, timeout_s: float,
             step: int | None, rank: int | None) -> tuple[str, str | None]:
    from twin.check.crosscheck import check

    try:
        result = check(scenario, runner_spec, timeout_s=timeout_s)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # noqa: BLE001 - a real run that cannot be done is a verdict too
        return f"ERROR: {type(exc).__name__}: {exc}".splitlines()[0], None
    items = [v for v in result.verdicts if v.kind == f.kind]
    if not items:
        others = "; ".join(f"{v.kind} {v.verdict.value}" for v in result.verdicts)
        return f"ERROR: the cross-check gave no verdict for {f.kind}", others or None
    # The verdict at the finding's own step and rank, else the most positive one.
    exact = [v for v in items if v.step == step and v.rank == rank]
    best = exact[0] if exact else min(items, key=lambda v: VERDICT_RANK.get(v.verdict.value, 3))
    return best.verdict.value, best.reason


def confirm_finding(f: Finding, runner_spec: str, timeout_s: float = 60.0) -> None:
    """Run the minimal scenario on the real ranks; attach the verdict for the finding's kind.

    A minimal scenario can be too small to measure (e.g. overlap of microsecond
    kernels on CPU threads): an INCONCLUSIVE verdict there is retried on the
    scenario the search found, and the reason says which scenario decided."""
    f.verdict, f.verdict_reason = _verdict(f, f.scenario, runner_spec, timeout_s, f.step, f.rank)
    if f.verdict != "INCONCLUSIVE" or f.found is None or f.found == f.scenario:
        return
    h = trace_findings(simulate_safe(f.found, load_runner(runner_spec))).get(f.signature)
    if h is None:
        return
    verdict, reason = _verdict(f, f.found, runner_spec, timeout_s, h.step, h.rank)
    if verdict in ("CONFIRMED", "REFUTED"):
        f.verdict_reason = (f"{reason} (on the scenario the search found, "
                            f"{f.found.summary_line()}; the minimal one was INCONCLUSIVE: "
                            f"{f.verdict_reason})")
        f.verdict = verdict


# ---------------------------------------------------------------- the search


class _Stop(Exception):
    """Raised in the test body to end the search at the first finding (mutate)."""


def _stop() -> None:
    # One raise site: Hypothesis tells failures apart by where they were raised,
    # and two sites would look like a flaky test.
    raise _Stop


def _db_key(runner_spec: str, strategy_kwargs: dict[str, Any]) -> bytes:
    text = json.dumps({"runner": runner_spec, "strategy": strategy_kwargs}, sort_keys=True)
    return hashlib.sha384(f"moe-twin explore {text}".encode()).digest()


def _rounds(budget: int, size: int | None) -> list[int]:
    if not size or size >= budget:
        return [budget]
    return [size] * (budget // size) + ([budget % size] if budget % size else [])


# Examples per Hypothesis run. After its first 10 examples a run mutates each
# new example up to 5 times (copying choices between spans), so a long run
# spends most of its budget on near-duplicates; a series of short runs from
# fresh seeds over one database met the hard regions about twice as often for
# the same number of examples (benchmarks/bench_explore.py, "round size").
ROUND_SIZE = 20


def explore(
    runner: str,
    budget: int = DEFAULT_BUDGET,
    seed: int | None = None,
    out: Path | str | None = DEFAULT_OUT,
    confirm: bool = False,
    progress: ProgressFn | None = None,
    strategy_kwargs: dict[str, Any] | None = None,
    do_shrink: bool = True,
    stop_on_first: bool = False,
    targeting: bool = True,
    round_size: int | None = ROUND_SIZE,
    timeout_s: float = 60.0,
    partial_on_interrupt: bool = False,
    stop_requested: Callable[[], bool] | None = None,
    enumerate_first: bool = False,
    enumerate_space: Any = DEFAULT_SPACE,
    enumerate_s: float = DEFAULT_ENUMERATE_S,
) -> ExploreResult:
    """Search `runner` for hazards over generated scenarios; see the module docstring.

    `out=None` keeps everything in memory (no database, no files). Ctrl-C
    raises KeyboardInterrupt after saving what was found and counted; with
    `partial_on_interrupt` it returns that instead (`interrupted` set).
    `stop_requested` is polled before every example (and between findings
    when shrinking or confirming): True stops the search like a Ctrl-C, at a
    point where no library is mid-way through its own bookkeeping.
    `enumerate_first`: run verify's enumeration of `enumerate_space` (a space
    name or a table of axes) first, for at most `enumerate_s` seconds; off by
    default here so library callers (mutate, the benchmarks) keep a pure
    Hypothesis budget."""
    t0 = time.perf_counter()
    budget = check_budget(budget)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ExploreInputError(f"--seed: must be an integer, got {seed!r}")
    runner_cls, spec = resolve_runner(runner)
    out_path = prepare_out(Path(out)) if out is not None else None
    store = FindingStore(out_path, spec)
    kwargs = dict(strategy_kwargs or {})
    kwargs["runner"] = spec
    say = progress or (lambda _p: None)
    polled = stop_requested or (lambda: False)

    if enumerate_first and (isinstance(enumerate_s, bool) or not isinstance(enumerate_s, int | float)
                            or not 0 < enumerate_s < float("inf")):
        raise ExploreInputError(f"--enumerate-time: must be a positive number of seconds, got {enumerate_s!r}")
    state: dict[str, Any] = {"examples": 0, "first": None, "confirmed": 0, "stopped": False, "search_s": 0.0,
                             "enumeration": None}

    def progress_now(phase: str, message: str = "", done: int = 0, total: int = 0) -> Progress:
        new = sum(1 for f in store.findings.values() if f.new)
        return Progress(phase, state["examples"], budget, len(store.findings), new, state["confirmed"], message,
                        done, total)

    def report(phase: str, message: str = "", done: int = 0, total: int = 0) -> None:
        if polled():  # a stop request ends the search here, like a Ctrl-C
            raise KeyboardInterrupt
        if phase:
            say(progress_now(phase, message, done, total))

    interrupted = False
    try:
        # Findings from an earlier run: still there with today's runner code?
        for f in store.findings.values():
            f.reproduces = f.signature in trace_findings(simulate_safe(f.scenario, runner_cls))
        if enumerate_first:
            _enumerate(spec, store, state, report, enumerate_space, enumerate_s)
        _search(runner_cls, spec, kwargs, budget, seed, targeting, round_size, stop_on_first,
                out_path, store, state, report)
        state["search_s"] = time.perf_counter() - t0
        store.save()
        if do_shrink:
            _shrink_all(runner_cls, kwargs, budget, seed, store, report)
        if confirm:
            _confirm_all(spec, timeout_s, store, state, report)
    except KeyboardInterrupt:
        if not partial_on_interrupt:
            raise
        interrupted = True
    finally:
        store.tried(state["examples"])
        store.save()  # the count of an interrupted search too
    findings = sorted(store.findings.values(), key=lambda f: (not f.new, f.signature))
    say(progress_now("interrupted" if interrupted else "done"))
    enumeration = state["enumeration"]
    return ExploreResult(spec, state["examples"], findings, out_path, state["first"],
                         time.perf_counter() - t0, state["search_s"] or time.perf_counter() - t0,
                         interrupted=interrupted, enumeration=enumeration.to_dict() if enumeration else None)


def _enumerate(spec: str, store: FindingStore, state: dict[str, Any], report: Callable[..., None],
               space: Any, time_s: float) -> None:
    """The enumeration phase; its summary is kept even when a stop request ends it."""
    summary = enumerate_phase(spec, store, report, space=space, time_s=time_s)
    state["enumeration"] = summary
    store.save()
    if summary.stopped == INTERRUPTED:
        raise KeyboardInterrupt
    report("enumerate", summary.line(), done=summary.assignments_done, total=summary.assignments_total)


def _search(runner_cls: type[MoERunner], spec: str, kwargs: dict[str, Any], budget: int, seed: int | None,
            targeting: bool, round_size: int | None, stop_on_first: bool, out_path: Path | None,
            store: FindingStore, state: dict[str, Any], report: Callable[..., None]) -> None:
    """The Hypothesis runs: every example simulated, every new signature recorded."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings, target
    from hypothesis import seed as hseed
    from hypothesis.database import DirectoryBasedExampleDatabase, InMemoryExampleDatabase

    from scenarios.strategies import moe_scenarios

    # The body never fails except to stop early, so there is nothing to shrink
    # in-run; findings are shrunk afterwards, one signature at a time.
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if targeting:
        phases.append(Phase.target)
    db = (DirectoryBasedExampleDatabase(str(out_path / DB_DIR)) if out_path is not None
          else InMemoryExampleDatabase())

    def body(s: Scenario) -> None:
        if state["stopped"]:
            # Sticky: Hypothesis replays the "failing" example before raising it.
            _stop()
        report("")  # only polls for a stop request, before the example
        state["examples"] += 1
        trace = simulate_safe(s, runner_cls)
        if targeting:
            for label, value in target_signals(trace).items():
                # Only positive observations: a target observed at 0 on every
                # clean run would make the optimiser spend budget climbing a
                # flat plateau (measured: fewer findings per example).
                if value > 0:
                    target(value, label=label)
        fresh = ""
        for sig, h in trace_findings(trace).items():
            if sig in store.findings:
                continue
            named = s.with_(name=f"explore-{_slug(sig)}", summary=str(h))
            f = Finding(h.kind.value, sig, str(h), named, found_at=state["examples"],
                        decisions=dict(trace.decisions), step=h.step, rank=h.rank, found=named,
                        found_by="search")
            stop = budget_stop(trace.notes)
            if stop is not None:
                f.unshrinkable = f"stopped by a budget ({stop})"
            store.findings[sig] = f
            if state["first"] is None:
                state["first"] = state["examples"]
            # On disk now: an interrupted search keeps it (shrunk later, on resume).
            store.write_scenario(f)
            store.tried(state["examples"])
            store.save()
            fresh = f"new finding {sig}"
        store.tried(state["examples"])  # the count on disk follows the search (saved every second)
        report("search", fresh)
        if fresh and stop_on_first:
            state["stopped"] = True
            _stop()

    for i, n in enumerate(_rounds(budget, round_size)):
        search = given(moe_scenarios(**kwargs))(body)
        if seed is not None:
            # Seed first: @seed also switches the database off, and the
            # settings applied after it switch it back on (resume needs it).
            search = hseed(seed * 1000 + i)(search)
        search = settings(
            settings.get_profile("default"),  # not the caller's profile (CI derandomize...)
            max_examples=n, database=db, deadline=None, phases=phases,
            suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet,
            print_blob=False, report_multiple_bugs=False,
        )(search)
        # Scope the database entries by runner and strategy (the default key is
        # the source of `body`, the same for every runner).
        search._hypothesis_internal_database_key = _db_key(spec, kwargs)  # type: ignore[attr-defined]
        try:
            search()
        except _Stop:
            break


def _shrink_all(runner_cls: type[MoERunner], kwargs: dict[str, Any], budget: int, seed: int | None,
                store: FindingStore, report: Callable[..., None]) -> None:
    for f in store.findings.values():
        if f.shrunk or not f.reproduces or f.unshrinkable:
            continue
        report("shrink", f"shrinking {f.signature}")
        small = shrink(runner_cls, f.signature, f.scenario, kwargs, seed=seed,
                       max_examples=max(100, min(budget, 500)))
        h = trace_findings(simulate_safe(small, runner_cls)).get(f.signature)
        if h is None:  # the runner changed since the finding was made
            f.reproduces = False
            continue
        f.scenario = small.with_(summary=str(h))
        f.detail, f.step, f.rank, f.shrunk = str(h), h.step, h.rank, True
        store.write_scenario(f)
        store.save()


def _confirm_all(spec: str, timeout_s: float, store: FindingStore, state: dict[str, Any],
                 report: Callable[..., None]) -> None:
    for f in store.findings.values():
        if not f.reproduces or (f.verdict is not None and not f.verdict.startswith("ERROR")):
            continue
        if f.unshrinkable:  # the runner would spin on the ranks until --timeout
            f.verdict, f.verdict_reason = "INCONCLUSIVE", f"not run on real ranks: {f.unshrinkable}"
            continue
        report("confirm", f"real run of {f.signature}")
        confirm_finding(f, spec, timeout_s=timeout_s)
        if f.verdict == "CONFIRMED":
            state["confirmed"] += 1
        store.save()
        report("confirm", f"{f.signature}: {f.verdict}")


__all__ = [
    "DEFAULT_BUDGET",
    "FINDINGS_FILE",
    "DEFAULT_OUT",
    "ExploreInputError",
    "ExploreResult",
    "Finding",
    "Progress",
    "check_budget",
    "check_interface",
    "confirm_finding",
    "explore",
    "finding_signature",
    "polish",
    "resolve_runner",
    "shrink",
    "simulate_safe",
    "target_signals",
    "trace_findings",
]
