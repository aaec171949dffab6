"""Instructions per simulation, counted by valgrind (exact, where wall clock on
a shared machine moves by 10-50%): compare two revisions of the simulator.

    .venv/bin/python benchmarks/bench_instructions.py ep8|tp64|EP_RANKS [N] [--repo DIR]

`ep8` is `bench sim`'s tp=2 x dp=4 EP scenario, `tpW` a TP-only world,
a number the wide-EP layout at that many ranks. N simulations (default 2)
run inside one `functools.reduce` call and only that call is counted
(`--toggle-collect`), so interpreter start-up and imports are left out: the
figure repeats to the last digit with PYTHONHASHSEED fixed. Needs valgrind.
"""

from __future__ import annotations

import argparse
import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _scenario(which: str):  # noqa: ANN202 - a Scenario (imported late: the child process builds it)
    from twin.bench import _tp_scenario, ep_scenario

    if which == "ep8":
        return _tp_scenario(8, dp=4).with_(**{"parallel.ep": True, "parallel.backend": "deepep_low_latency"})
    if which.startswith("tp"):
        return _tp_scenario(int(which[2:]))
    return ep_scenario(int(which))


def _child(which: str, n: int) -> None:
    from sim import simulate

    s = _scenario(which)
    simulate(s, "fixed")
    simulate(s, "fixed")  # warm: routing and loads are cached per scenario, as in a session
    functools.reduce(lambda _a, _b: simulate(s, "fixed"), range(n), None)


def count(which: str, n: int, repo: Path) -> float:
    """Instructions per simulation (millions) of the simulator in `repo`."""
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONPATH=str(repo))
    cmd = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", "--toggle-collect=functools_reduce",
           sys.executable, str(Path(__file__).resolve()), "--child", which, str(n)]
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, check=False)
    m = re.search(r"Collected : (\d+)", p.stderr)
    if p.returncode != 0 or m is None:
        raise SystemExit(f"bench_instructions: valgrind run failed: {p.stderr.strip().splitlines()[-1:]}")
    return int(m.group(1)) / n / 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", help="ep8, tpW (TP-only world of W ranks) or a wide-EP world size")
    ap.add_argument("n", nargs="?", type=int, default=2, help="simulations counted (default 2)")
    ap.add_argument("--repo", type=Path, default=ROOT, help="checkout whose simulator is counted")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        _child(args.which, args.n)
        return
    if shutil.which("valgrind") is None:
        raise SystemExit("bench_instructions: valgrind is not installed")
    print(f"{args.which}: {count(args.which, args.n, args.repo.resolve()):.3f} M instructions per simulation")


if __name__ == "__main__":
    main()
