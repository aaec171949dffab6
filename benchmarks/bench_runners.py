"""Simulator throughput of the three engines' reference runners (`fixed`,
`sglang`, `trtllm`) on the same 8-rank layouts, medians over repeats.

    .venv/bin/python benchmarks/bench_runners.py [--repeats N] [--per-repeat K] [--json]

Each repeat simulates K scenarios (seeds varied, so no routing cache is
reused) of every (layout, runner) pair in turn and reports scenarios/s; a
runner that does not model a layout (its `unsupported()`) is listed as such.
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

from scenarios.runners import load_runner, unsupported_reason  # noqa: E402
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, Workload  # noqa: E402
from sim import simulate  # noqa: E402

MODEL = ModelTraits(hidden=256, moe_intermediate=128, num_experts=16, top_k=4, num_shared_experts=1)
CUDA = Runtime(platform="cuda", aux_stream=True)
LAYOUTS: dict[str, tuple[ParallelConfig, Runtime]] = {
    "tp8": (ParallelConfig(tp=8), CUDA),
    "tp8 ep, all-reduce fusion": (ParallelConfig(tp=8, ep=True), Runtime(platform="cuda", aux_stream=True,
                                                                          allreduce_fusion=True)),
    "dp8 ep (attention DP, gather)": (ParallelConfig(dp=8, ep=True), CUDA),
    "dp8 ep deepep_low_latency": (ParallelConfig(dp=8, ep=True, backend="deepep_low_latency"), CUDA),
}
RUNNER_NAMES = ("fixed", "sglang", "trtllm")


def _scenario(parallel: ParallelConfig, runtime: Runtime, seed: int) -> Scenario:
    # 2048 wide so DeepEP low-latency needs no padding (its compiled sizes).
    model = ModelTraits(**{**MODEL.__dict__, "hidden": 2048})
    return Scenario(model=model, parallel=parallel, runtime=runtime, workload=Workload(tokens=16, seed=seed))


def throughput(layout: tuple[ParallelConfig, Runtime], runner: str, repeat: int, k: int) -> float:
    cls = load_runner(runner)
    t0 = time.perf_counter()
    for i in range(k):
        trace = simulate(_scenario(*layout, seed=1000 * repeat + i), cls)
        assert not trace.hazards, [str(h) for h in trace.hazards]
    return k / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--per-repeat", type=int, default=20)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    pairs = [(lay, r) for lay in LAYOUTS for r in RUNNER_NAMES]
    refused = {p: unsupported_reason(load_runner(p[1]), _scenario(*LAYOUTS[p[0]], seed=0)) for p in pairs}
    live = [p for p in pairs if not refused[p]]
    for lay, r in live:
        throughput(LAYOUTS[lay], r, -1, 2)  # warm imports and caches
    # Pairs interleaved within each repeat: a load change on the shared machine hits all alike.
    runs: dict[tuple[str, str], list[float]] = {p: [] for p in live}
    for rep in range(args.repeats):
        for lay, r in live:
            runs[(lay, r)].append(throughput(LAYOUTS[lay], r, rep, args.per_repeat))
    out: dict[str, Any] = {}
    for lay, r in pairs:
        key = f"{lay} / {r}"
        if refused[(lay, r)]:
            out[key] = {"refused": refused[(lay, r)]}
        else:
            v = runs[(lay, r)]
            out[key] = {"scenarios_per_s_median": round(statistics.median(v), 1),
                        "min": round(min(v), 1), "max": round(max(v), 1)}
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"sim throughput per runner, 8 ranks ({args.repeats} repeats x {args.per_repeat} scenarios)")
    for key, r in out.items():
        if "refused" in r:
            print(f"  {key:46s} refused: {r['refused'][:70]}")
        else:
            print(f"  {key:46s} {r['scenarios_per_s_median']:7.1f} scenarios/s  (min {r['min']}, max {r['max']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
