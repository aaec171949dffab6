"""Ground-truth benchmarks: verdict stability and the cost of the reference.

    .venv/bin/python benchmarks/bench_ground_truth.py [--runs N] [--json] [--skip-replay]

1. Race verdict stability: the same `check` run N times (default 10) for a
   missing-wait race on the aux stream (tests/families.py: AuxNoWait) and for
   the seeds' UNSAFE_OVERLAP case (R5: before-39222 on r5-eplb-deepep-ll);
   prints how many runs gave the most common verdict, and the wall times.
2. The runner families: false CONFIRMED on the correct-but-unusual family and
   silent wrong outputs (real output wrong, verdict neither CONFIRMED nor
   UNPREDICTED) on the wrong family. Both must be 0.
3. `replay --real` wall time (median of --replays runs).
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import families  # noqa: E402

from scenarios.loader import load  # noqa: E402
from twin.check.crosscheck import check  # noqa: E402


def _spec(cls: type) -> str:
    return f"{ROOT / 'tests' / 'families.py'}:{cls.__name__}"


def stability(scenario: Any, runner: str, kind: str, runs: int) -> dict[str, Any]:
    verdicts: list[str] = []
    times: list[float] = []
    for _ in range(runs):
        t0 = time.perf_counter()
        res = check(scenario, runner, timeout_s=120)
        times.append(time.perf_counter() - t0)
        vs = sorted({v.verdict.value for v in res.verdicts if v.kind == kind})
        verdicts.append("+".join(vs) or "none")
    counts = collections.Counter(verdicts)
    top, n = counts.most_common(1)[0]
    return {"verdicts": dict(counts), "stable": f"{n}/{runs}", "verdict": top,
            "median_s": round(statistics.median(times), 2)}


def families_report() -> dict[str, Any]:
    false_confirmed = 0
    silent = 0
    rows = []
    for cls, scenario in families.CORRECT:
        res = check(scenario, _spec(cls), timeout_s=120)
        n = sum(1 for v in res.verdicts if v.verdict.value == "CONFIRMED")
        false_confirmed += n
        rows.append((cls.__name__, "correct", n, [v.verdict.value for v in res.verdicts]))
    for cls, scenario, _kind, _ranks, _v in families.WRONG:
        res = check(scenario, _spec(cls), timeout_s=120)
        for r, chk in res.real.output_checks.items():
            said = {v.verdict.value for v in res.verdicts if v.rank == r}
            if not chk.correct and not said & {"CONFIRMED", "UNPREDICTED"}:
                silent += 1
        rows.append((cls.__name__, "wrong", None, [f"{v.kind}:{v.verdict.value}" for v in res.verdicts]))
    return {"false_confirmed_on_correct": false_confirmed, "silent_wrong_outputs": silent, "rows": rows}


def replay_time(n: int) -> float:
    from twin.check.replay_real import replay_real

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        replay_real(timeout_s=120)
        times.append(time.perf_counter() - t0)
    return round(statistics.median(times), 2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--replays", type=int, default=1)
    ap.add_argument("--skip-replay", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out: dict[str, Any] = {
        "race_aux_no_wait": stability(families.TP2_MULTI, _spec(families.AuxNoWait), "UNSAFE_OVERLAP", args.runs),
        "race_r5": stability(load("r5-eplb-deepep-ll"), "before-39222", "UNSAFE_OVERLAP", args.runs),
        "families": families_report(),
    }
    if not args.skip_replay:
        out["replay_real_s"] = replay_time(args.replays)
    if args.json:
        print(json.dumps(out, indent=2))
        return
    for key in ("race_aux_no_wait", "race_r5"):
        r = out[key]
        print(f"{key}: {r['verdict']} in {r['stable']} runs (all: {r['verdicts']}), median {r['median_s']} s per check")
    fam = out["families"]
    print(f"families: false CONFIRMED on correct runners {fam['false_confirmed_on_correct']}, "
          f"silent wrong outputs {fam['silent_wrong_outputs']}")
    for name, what, _n, vs in fam["rows"]:
        print(f"  {what:7} {name}: {', '.join(vs) or 'no verdict (clean)'}")
    if "replay_real_s" in out:
        print(f"replay --real: {out['replay_real_s']} s (median of {args.replays})")


if __name__ == "__main__":
    main()
