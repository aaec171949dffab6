"""Benchmarks of `moe-twin verify` and of the decision-coverage strategy.

    .venv/bin/python benchmarks/bench_verify.py [--seeds N] [--jobs N] [--json] [--skip-rates]

1. verify over the default space, for `fixed` and every `before` runner:
   classes, pruned share, simulated classes, wall and CPU time of one process
   (the CPU time is what one core costs, whatever else loads the machine; with
   --jobs N > 1 also the wall time of N processes), and the distinct findings.
2. Detection rate: over seeds 0..N-1, the share of plain `@given(moe_scenarios())`
   runs (Hypothesis defaults: 100 examples, no shrinking) that meet a hazard,
   for the README example (`moe_scenarios(max_world=4)`) and every `before`
   runner (`moe_scenarios()` defaults).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scenarios.runners import BEFORE_RUNNERS, MoERunner  # noqa: E402
from twin.search.detection import detection_rate  # noqa: E402
from twin.search.verify import verify  # noqa: E402


class ReadmeRunner(MoERunner):
    """The README example's runner: the SP guard forgotten."""

    def maybe_reduce_shared(self, ops: Any, shared: Any, routed_reduced: bool) -> Any:
        if shared is not None and routed_reduced:
            return ops.all_reduce(shared, "tp", name="shared_all_reduce")
        return shared


def bench_verify(jobs: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for runner in ("fixed", *BEFORE_RUNNERS):
        cpu0 = time.process_time()
        res = verify(runner, jobs=1)
        cpu = time.process_time() - cpu0
        row = {"classes": res.classes, "pruned": res.pruned, "simulated": res.simulated,
               "pruned_share": round(res.pruned / res.classes, 3), "invalid": res.invalid,
               "wall_s_one_process": round(res.elapsed_s, 1), "cpu_s_one_process": round(cpu, 1),
               "findings": sorted(f.signature for f in res.findings)}
        if jobs > 1:
            row[f"wall_s_{jobs}_jobs"] = round(verify(runner, jobs=jobs).elapsed_s, 1)
        out[runner] = row
        print(f"verify {runner}: {row}", file=sys.stderr, flush=True)
    return out


def bench_rates(seeds: int) -> dict[str, Any]:
    from scenarios.strategies import moe_scenarios

    out: dict[str, Any] = {}
    t0 = time.perf_counter()
    out["readme-example"] = detection_rate(ReadmeRunner, seeds, moe_scenarios(max_world=4))
    print(f"rate readme-example: {out['readme-example']} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    for runner in BEFORE_RUNNERS:
        t0 = time.perf_counter()
        out[runner] = detection_rate(runner, seeds)
        print(f"rate {runner}: {out[runner]} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=100)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--skip-rates", action="store_true")
    ap.add_argument("--skip-verify", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    report: dict[str, Any] = {}
    if not args.skip_verify:
        report["verify_default_space"] = bench_verify(args.jobs)
    if not args.skip_rates:
        report[f"detection_rate_{args.seeds}_seeds"] = bench_rates(args.seeds)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
