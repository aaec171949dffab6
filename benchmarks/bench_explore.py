"""Benchmarks of `moe-twin explore` and `moe-twin mutate` (medians over seeds).

    .venv/bin/python benchmarks/bench_explore.py [--repeats N] [--json] [--skip-mutate]

1. Per historical regression: examples and seconds to the first finding from a
   fresh database (aim: < 200 examples and < 10 s), and the full default
   search (300 examples + shrinking) time.
2. Search design ablation over the same runners: targeting on/off, one long
   Hypothesis run vs rounds of 20 examples.
3. Throughput: explore examples/s (fixed runner, nothing found) vs the raw
   simulator on the same scenarios: the overhead of Hypothesis itself.
4. Mutation: kill rate of `mutate` at its default budget, survivors by class.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scenarios.runners import BEFORE_RUNNERS  # noqa: E402
from twin.search.explore import DEFAULT_BUDGET, explore  # noqa: E402

MISS_BUDGET = 300  # a search that finds nothing in this many examples counts as a miss


def first_finding(runner: str, seed: int, **kw: Any) -> tuple[int | None, float]:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        res = explore(runner, budget=MISS_BUDGET, seed=seed, out=Path(d), do_shrink=False,
                      stop_on_first=True, **kw)
        return res.first_finding_at, time.perf_counter() - t0


def bench_first_findings(repeats: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for runner in BEFORE_RUNNERS:
        examples, seconds, misses = [], [], 0
        for seed in range(repeats):
            n, s = first_finding(runner, seed)
            misses += n is None
            examples.append(n if n is not None else MISS_BUDGET)
            seconds.append(s)
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            res = explore(runner, budget=DEFAULT_BUDGET, seed=0, out=Path(d))
            full = time.perf_counter() - t0
        out[runner] = {
            "examples_to_first_finding_median": statistics.median(examples),
            "examples_to_first_finding_max": max(examples),
            "seconds_to_first_finding_median": round(statistics.median(seconds), 3),
            "misses": misses,
            "full_search_seconds": round(full, 2),
            "full_search_findings": [f.signature for f in res.findings],
        }
    return out


# Mutants whose regions the search reaches least often (see `mutate`): where
# the search design shows.
HARD_MUTANTS = (
    "M_negate_backend_output_is_reduced", "M_negate_routed_inplace",
    "M_dropcond_maybe_reduce_shared_1", "M_dropcond_needs_final_reduce_3",
    "M_dropcond_pre_trim_width_4", "M_dropcond_forward_3", "M_dropcond_forward_7",
    "M_dropcond_overlap_disabled_2_2", "M_dropop_shared_all_reduce", "M_dropop_join_shared",
    "M_dropop_aux_waits_fork", "M_dropop_pre_transform_all_reduce",
)


def bench_ablation(repeats: int) -> dict[str, Any]:
    """Examples to the first finding (the six regressions) and distinct findings
    in a full search of 300 examples (the regressions + the hard mutants).
    Targeting only observes runs with a hazard (it grades severity), so it
    cannot change the first finding; it could change what is found after it."""
    from twin.search.mutate import MUTANTS

    configs = {
        "rounds of 20, targeting (default)": {},
        "rounds of 20, no targeting": {"targeting": False},
        "one run, targeting": {"round_size": None},
        "one run, no targeting": {"round_size": None, "targeting": False},
    }
    hard = list(BEFORE_RUNNERS) + [f"twin.search.mutate:{m}" for m in HARD_MUTANTS if m in MUTANTS]
    out: dict[str, Any] = {}
    for label, kw in configs.items():
        examples, misses = [], 0
        for runner in BEFORE_RUNNERS:
            for seed in range(repeats):
                n, _ = first_finding(runner, seed, **kw)
                misses += n is None
                examples.append(n if n is not None else MISS_BUDGET)
        found, runs_with = 0, 0
        for runner in hard:
            for seed in range(min(repeats, 3)):
                res = explore(runner, budget=MISS_BUDGET, seed=seed, out=None, do_shrink=False, **kw)
                found += len(res.findings)
                runs_with += bool(res.findings)
        out[label] = {"examples_to_first_finding_median": statistics.median(examples),
                      "mean": round(statistics.mean(examples), 1), "misses": misses,
                      "searches": len(examples), "distinct_findings": found,
                      "runners_with_a_finding": runs_with,
                      "full_searches": len(hard) * min(repeats, 3)}
    return out


def generated(n: int, seed: int) -> list[Any]:
    """The scenarios a plain (untargeted) Hypothesis run of the strategy draws."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from scenarios.strategies import moe_scenarios

    pool: list[Any] = []

    @hseed(seed)
    @settings(settings.get_profile("default"), max_examples=n, database=None,
              phases=(Phase.generate,), suppress_health_check=list(HealthCheck), deadline=None)
    @given(moe_scenarios())
    def collect(s: Any) -> None:
        pool.append(s)

    collect()
    return pool


def bench_throughput(repeats: int) -> dict[str, Any]:
    from sim import simulate

    budget = 300
    rates, raw_rates = [], []
    for seed in range(repeats):
        t0 = time.perf_counter()
        res = explore("fixed", budget=budget, seed=seed, out=None)
        rates.append(res.examples / (time.perf_counter() - t0))
        pool = generated(budget, seed)
        t0 = time.perf_counter()
        for s in pool:
            simulate(s, "fixed")
        raw_rates.append(len(pool) / (time.perf_counter() - t0))
    e, r = statistics.median(rates), statistics.median(raw_rates)
    return {"explore_examples_per_s": round(e, 1), "simulate_per_s": round(r, 1),
            "hypothesis_overhead": f"{100 * (r / e - 1):.0f}% (explore runs at {100 * e / r:.0f}% "
                                   "of raw simulator speed)"}


def bench_mutation() -> dict[str, Any]:
    from twin.search.mutate import run_mutation

    t0 = time.perf_counter()
    d = run_mutation(budget=200, seed=0).to_dict()
    return {
        "mutants": d["mutants"], "killed": d["killed"], "kill_rate": d["kill_rate"],
        "kill_rate_non_equivalent": d["kill_rate_non_equivalent"],
        "equivalent": d["equivalent"], "blind_spots": d["blind_spots"], "missed": d["missed"],
        "seconds": round(time.perf_counter() - t0, 1),
        "survivors": {r["mutant"]: r["status"] for r in d["results"] if not r["killed"]},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=5, help="seeds per median (default 5)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--skip-mutate", action="store_true")
    p.add_argument("--skip-ablation", action="store_true")
    args = p.parse_args(argv)
    figures: dict[str, Any] = {"repeats": args.repeats}
    figures["first_finding"] = bench_first_findings(args.repeats)
    if not args.skip_ablation:
        figures["ablation"] = bench_ablation(args.repeats)
    figures["throughput"] = bench_throughput(args.repeats)
    if not args.skip_mutate:
        figures["mutation"] = bench_mutation()
    if args.json:
        print(json.dumps(figures, indent=2))
        return 0
    print(f"moe-twin explore benchmarks (medians over {args.repeats} seeds)")
    print("\nfirst finding from a fresh database (miss = nothing in "
          f"{MISS_BUDGET} examples; full = default search of {DEFAULT_BUDGET} + shrinking):")
    for runner, f in figures["first_finding"].items():
        print(f"  {runner:20s} {f['examples_to_first_finding_median']:6.0f} examples "
              f"(max {f['examples_to_first_finding_max']:3d})  {f['seconds_to_first_finding_median']:6.2f} s  "
              f"misses {f['misses']}  full {f['full_search_seconds']:5.2f} s: "
              f"{', '.join(f['full_search_findings'])}")
    if "ablation" in figures:
        print("\nsearch design: examples to the first finding (six regressions); distinct findings "
              f"in full searches of {MISS_BUDGET} examples (regressions + hard mutants):")
        for label, f in figures["ablation"].items():
            print(f"  {label:36s} median {f['examples_to_first_finding_median']:5.1f}  "
                  f"mean {f['mean']:6.1f}  misses {f['misses']}/{f['searches']};  "
                  f"{f['distinct_findings']} findings, {f['runners_with_a_finding']}/"
                  f"{f['full_searches']} searches found something")
    t = figures["throughput"]
    print(f"\nthroughput: explore {t['explore_examples_per_s']} examples/s, raw simulator "
          f"{t['simulate_per_s']} scenarios/s; Hypothesis overhead {t['hypothesis_overhead']}")
    if "mutation" in figures:
        m = figures["mutation"]
        print(f"\nmutation (budget 200 per mutant, {m['seconds']} s): {m['killed']}/{m['mutants']} killed "
              f"(kill rate {m['kill_rate']:.1%}, {m['kill_rate_non_equivalent']:.1%} of non-equivalent); "
              f"{m['equivalent']} equivalent, {m['blind_spots']} blind spots, {m['missed']} missed")
        for name, status in m["survivors"].items():
            print(f"    {status:11s} {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
