"""Simulator throughput on hybrid expert layouts (parallel.ep_size) and the
SGLang block with attention DP vs the same-size one-axis vLLM layouts
(medians over repeats, and each layout's ratio to the first).

    .venv/bin/python benchmarks/bench_layout.py [--repeats N] [--per-repeat K] [--json]

Each repeat simulates K scenarios of every layout in turn (the fixed runner, seeds
varied so no cache is reused across scenarios) and reports scenarios/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("MOE_TWIN_NO_AUTOCALIBRATE", "1")

from scenarios.spec import ModelTraits, ParallelConfig, Scenario, Workload  # noqa: E402
from sim import simulate  # noqa: E402

MODEL = ModelTraits(hidden=256, moe_intermediate=128, num_experts=16, top_k=4, num_shared_experts=1)
# (layout, runner)
LAYOUTS: dict[str, tuple[ParallelConfig, str]] = {
    "tp8 (moe_tp=8, old)": (ParallelConfig(tp=8), "fixed"),
    "tp8 ep (moe_ep=8, old)": (ParallelConfig(tp=8, ep=True), "fixed"),
    "tp8 ep_size=2 (2x4, hybrid)": (ParallelConfig(tp=8, ep=True, ep_size=2), "fixed"),
    "tp8 ep_size=4 (4x2, hybrid)": (ParallelConfig(tp=8, ep=True, ep_size=4), "fixed"),
    "tp2 dp4 ep (moe_ep=8, old, SP)": (ParallelConfig(tp=2, dp=4, ep=True), "fixed"),
    "tp2 dp4 ep_size=4 (4x2, hybrid, SP)": (ParallelConfig(tp=2, dp=4, ep=True, ep_size=4), "fixed"),
    "sglang tp2 dp4 ep_size=4 (attn DP)": (ParallelConfig(tp=2, dp=4, ep=True, ep_size=4), "sglang"),
    "sglang tp1 dp8 ep (attn DP, rsv)": (ParallelConfig(tp=1, dp=8, ep=True), "sglang"),
}


def throughput(layout: tuple[ParallelConfig, str], repeat: int, k: int) -> float:
    parallel, runner = layout
    t0 = time.perf_counter()
    for i in range(k):
        s = Scenario(model=MODEL, parallel=parallel, workload=Workload(tokens=32, seed=1000 * repeat + i))
        trace = simulate(s, runner)
        assert not trace.hazards, [str(h) for h in trace.hazards]
    return k / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--per-repeat", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    throughput(LAYOUTS["tp8 (moe_tp=8, old)"], -1, 3)  # warm imports
    out: dict[str, Any] = {}
    # Layouts interleaved within each repeat: a load change on a shared
    # machine then hits every layout alike.
    runs_by: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for r in range(args.repeats):
        for name, par in LAYOUTS.items():
            runs_by[name].append(throughput(par, r, args.per_repeat))
    base = statistics.median(runs_by[next(iter(LAYOUTS))])
    for name, runs in runs_by.items():
        med = statistics.median(runs)
        out[name] = {"scenarios_per_s_median": round(med, 1), "min": round(min(runs), 1),
                     "max": round(max(runs), 1), "ratio_to_first": round(med / base, 2)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"sim throughput, 8 ranks ({args.repeats} repeats x {args.per_repeat} scenarios)")
    for name, r in out.items():
        print(f"  {name:38s} {r['scenarios_per_s_median']:7.1f} scenarios/s  x{r['ratio_to_first']:.2f}"
              f"  (min {r['min']}, max {r['max']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
