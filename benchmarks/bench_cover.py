"""Detection rate of the engine knobs' wrong decisions by a plain
`@given(moe_scenarios())` run (Hypothesis defaults: 100 examples, no
shrinking), over seeds 0..N-1: the row-parallel latent up-projection,
SGLang's shared-experts fusion and prefill padding mode, TensorRT-LLM's
weight block (the wrong runners of tests/test_knob_coverage.py, each drawn
from moe_scenarios() less what its runner refuses).

    .venv/bin/python benchmarks/bench_cover.py [--seeds N] [--knob K ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_knob_coverage import GIVEN, in_scope  # noqa: E402

from twin.search.detection import detects  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--knob", action="append", help="only these knobs (row, fusion, fusion_rocm, phase, weight_block)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, dict[str, float]] = {}
    for knob, runner, kwargs in GIVEN:
        if args.knob and knob not in args.knob:
            continue
        t0 = time.perf_counter()
        hits = sum(detects(runner, seed, in_scope(runner, **kwargs)) for seed in range(args.seeds))
        row = {"rate": hits / args.seeds, "seconds": round(time.perf_counter() - t0, 1)}
        out[f"{knob}:{runner.__name__}"] = row
        print(f"{knob} {runner.__name__}: {hits}/{args.seeds} seeds ({row['seconds']} s)", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
