"""The two drivers of `run_mutation`: kill by verify's enumeration (with an
optional pool check of the survivors) and kill by a search budget."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from scenarios.runners import MoERunner, load_runner
from twin.search.mutate import INFO, KNOWN_EQUIVALENT, MUTANTS, MutantResult, MutationReport
from twin.search.mutate_equiv import behaviour, check_equivalence, equivalence_pool
from twin.search.mutate_kill import PairWalk, _compare, kill_task, reference_signatures


def _reference(name: str) -> str:
    return INFO[name].runner


def _with_known(name: str, reason: str) -> str:
    why = KNOWN_EQUIVALENT.get(name)
    return reason.replace("equivalent: ", f"equivalent: {why} (", 1) + ")" if why else reason


def run_verify_mutation(names: list[str], space: Any, max_world: int | None, jobs: int,
                        pool_examples: int | None, seed: int,
                        progress: Callable[[str], None] | None) -> MutationReport:
    from scenarios.space import DEFAULT_MAX_WORLD, space_axes
    from twin.search.explore import ExploreInputError

    t0 = time.perf_counter()
    say = progress or (lambda _m: None)
    space_axes(space)  # an unknown space name fails here, before any work
    label = space if isinstance(space, str) else "custom"
    mw = DEFAULT_MAX_WORLD.get(label, 4) if max_world is None else max_world
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ExploreInputError(f"--jobs: must be a positive number of processes, got {jobs!r}")
    refs: dict[str, frozenset[str]] = {}
    for ref in sorted({_reference(n) for n in names}):
        say(f"verify {ref} on the {label} space (the reference outcome)")
        refs[ref] = reference_signatures(ref, space, mw)
    tasks = [(n, _reference(n), space, mw, refs[_reference(n)]) for n in names]
    outs: list[dict[str, Any]] = []
    if jobs == 1 or len(tasks) < 2 or label == "custom":
        for i, task in enumerate(tasks):
            outs.append(kill_task(task))
            say(f"[{i + 1}/{len(tasks)}] {task[0]}: {outs[-1]['status']}")
    else:
        import multiprocessing as mp

        with mp.get_context("forkserver").Pool(jobs) as workers:
            for i, out in enumerate(workers.imap(kill_task, tasks)):
                outs.append(out)
                say(f"[{i + 1}/{len(tasks)}] {out['mutant']}: {out['status']}")
    results = [_result(o) for o in outs]
    pool_size = 0
    survivors = [r for r in results if r.status == "equivalent"]
    if pool_examples is not None and survivors:
        say(f"pool check of {len(survivors)} survivor(s) equivalent on the space")
        pool = equivalence_pool(pool_examples, seed)
        pool_size = len(pool)
        for r in survivors:
            _pool_check(r, pool, label)
    return MutationReport(results, 0, False, time.perf_counter() - t0, pool_size, kill="verify",
                          space=label, reference_findings={k: sorted(v) for k, v in refs.items()})


def _result(o: dict[str, Any]) -> MutantResult:
    name = o["mutant"]
    r = MutantResult(name, INFO[name].description, o["status"] == "killed", signature=o["signature"],
                     scenario=o["scenario"], status=o["status"], runner=_reference(name),
                     classes=o["classes"], elapsed_s=o["elapsed_s"])
    r.equivalent = None if r.killed else r.status == "equivalent"
    r.reason = _with_known(name, o["reason"]) if r.equivalent else o["reason"]
    return r


def _pool_check(r: MutantResult, pool: list[Any], space: str) -> None:
    """A survivor equivalent on the space, compared with its reference where
    the space does not reach (same rules as on the space)."""
    from twin.search.explore_oracle import simulate_safe, trace_findings

    mutant, reference = MUTANTS[r.mutant], load_runner(r.runner)
    walk = PairWalk(r.mutant, r.runner)
    for s in pool:
        mine, ref = simulate_safe(s, mutant), simulate_safe(s, reference)
        found, ref_found = trace_findings(mine), trace_findings(ref)
        new = [sig for sig in found if sig not in ref_found]
        if new:
            r.status, r.equivalent = "outside_space", False
            r.reason = (f"outside the {space} space: the same as {r.runner} on every class of the space, but "
                        f"on {s.summary_line()} the twin predicts {found[new[0]]}")
            return
        _compare(walk, s, mine, ref)
    if walk.status == "equivalent":
        if walk.diff.classes:
            r.reason += (f"; on {len(pool)} pool scenarios beyond the space only the schedule differs, never "
                         f"slower (first {walk.diff.first})")
        else:
            r.reason += f"; also no difference on {len(pool)} pool scenarios beyond the space"
        return
    r.status, r.equivalent = "outside_space", False
    detail = walk.diff.slower if walk.diff.schedule_only else walk.diff.first
    what = "slower schedule, no hazard predicted" if walk.diff.schedule_only else "behaves differently"
    r.reason = (f"outside the {space} space: the same as {r.runner} on every class of the space, but "
                f"{what} on pool scenarios beyond it: {detail}")


def run_search_mutation(names: list[str], budget: int, confirm: bool, seed: int, equivalence_examples: int,
                        progress: Callable[[str], None] | None, timeout_s: float) -> MutationReport:
    """Explore every mutant with `budget` examples; the survivors are checked for
    equivalence with their reference on a pool of scenarios."""
    from twin.search.explore import check_budget, explore, simulate_safe

    t0 = time.perf_counter()
    budget = check_budget(budget)
    say = progress or (lambda _m: None)
    results: list[MutantResult] = []
    pool: list[Any] | None = None
    baselines: dict[str, list[tuple[Any, ...]]] = {}
    for i, name in enumerate(names):
        info = INFO[name]
        say(f"[{i + 1}/{len(names)}] {name}")
        res = explore(f"twin.search.mutate:{name}", budget=budget, seed=seed, out=None, confirm=confirm,
                      stop_on_first=True, do_shrink=confirm, timeout_s=timeout_s)
        r = MutantResult(name, info.description, False, examples=res.examples, runner=info.runner)
        if res.findings:
            f = res.findings[0]
            r.signature, r.verdict, r.scenario = f.signature, f.verdict, f.scenario.summary_line()
            r.killed = (f.verdict == "CONFIRMED") if confirm else True
            r.status = ("killed" if r.killed else
                        "refuted" if f.verdict == "REFUTED" else "unconfirmed")
            r.reason = f.detail if r.killed else (
                f"predicted {f.signature} but the real run says {f.verdict}"
                + (f": {f.verdict_reason}" if f.verdict_reason else ""))
        if not r.killed and r.signature is None:
            if pool is None:
                pool = equivalence_pool(equivalence_examples, seed)
            if info.runner not in baselines:
                say(f"equivalence pool: simulating {info.runner}")
                ref_cls: type[MoERunner] = load_runner(info.runner)
                baselines[info.runner] = [behaviour(simulate_safe(s, ref_cls)) for s in pool]
            r.status, where = check_equivalence(MUTANTS[name], pool, baselines[info.runner])
            r.equivalent = r.status == "equivalent"
            if r.status == "equivalent":
                checked = (f"no observable difference from {info.runner} on {len(pool)} scenarios (same "
                           "decisions, steps, shapes, streams and output coefficients)")
                why = KNOWN_EQUIVALENT.get(name)
                r.reason = f"equivalent: {why} ({checked})" if why else f"equivalent: {checked}"
            elif r.status == "missed":
                r.reason = (f"missed by the search ({budget} examples): the twin predicts a hazard "
                            f"{where}")
            else:
                r.reason = (f"blind spot: behaves differently from {info.runner} {where}; "
                            f"no hazard is predicted on any of the {len(pool)} scenarios")
        elif not r.killed:
            r.equivalent = False
        say(f"{name}: {'killed' if r.killed else 'survived'}")
        results.append(r)
    return MutationReport(results, budget, confirm, time.perf_counter() - t0,
                          len(pool) if pool is not None else 0)


__all__ = ["run_search_mutation", "run_verify_mutation"]
