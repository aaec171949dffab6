"""The `conform` sub-command (registered on cli.py's parser through cli.SUBCOMMANDS)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from twin.textsafe import printable

EXIT_OK, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 2, 3


def add_parsers(sub: Any) -> None:
    sp = sub.add_parser("conform", help="compare the reference runner's decisions with the installed "
                                        "engine's own MoE layer code (needs scripts/install-engine.sh)")
    sp.add_argument("--engine", default="vllm", choices=["vllm"], help="engine (default: vllm)")
    sp.add_argument("--engine-version", default=None, metavar="X.Y.Z",
                    help="the installed release to probe (default: the pinned one; older releases "
                         "are compared with the twin's version='previous' rules)")
    sp.add_argument("--space", default="default", choices=["default", "wide"],
                    help="verify's scenario space (default: default)")
    sp.add_argument("--sample", type=int, default=None, metavar="N",
                    help="a seeded sample of N assignments instead of the whole space")
    sp.add_argument("--seed", type=int, default=0, help="seed of --sample (default: 0)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_conform)


def cmd_conform(args: argparse.Namespace) -> int:
    if args.sample is not None and args.sample < 1:
        print("conform: --sample must be >= 1", file=sys.stderr)
        return EXIT_BAD_INPUT
    from engines.vllm import PINNED_VERSION, EngineMissing
    from twin.check.conform import ProbeError, conform

    try:
        report = conform(args.space, sample=args.sample, seed=args.seed, progress=_progress(),
                         engine_version=args.engine_version or PINNED_VERSION)
    except EngineMissing as exc:
        print(f"conform: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ProbeError as exc:
        print(f"conform: {printable(str(exc), one_line=True)}", file=sys.stderr)
        return EXIT_INTERNAL
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print("\n".join(conform_report(report)))
    return EXIT_OK


def _progress() -> Any:
    last = [0]

    def show(done: int) -> None:
        if done % 100 == 0 and done != last[0]:  # called per assignment, skipped ones too
            last[0] = done
            print(f"conform: {done} scenarios compared", file=sys.stderr, flush=True)

    return show


def conform_report(d: dict[str, Any]) -> list[str]:
    lines = [f"conform: vllm {d['version']} (twin rules {d['twin_version']!r}), space {d['space']}"
             + (f", sample {d['sample']} seed {d['seed']}" if d["sample"] else "")
             + f": {d['scenarios']} scenarios probed, {d['both_run']} run on both sides; {d['elapsed_s']} s",
             f"  skipped: {d['invalid']} invalid assignments, "
             f"{sum(d['skipped'].values())} without an engine equivalent, {d['probe_error_count']} probe errors",
             "  agreement:"]
    for f, rate in d["agreement"].items():
        lines.append(f"    {f:<24} {'-' if rate is None else f'{100 * rate:.1f}%'}")
    if d["mismatches"]:
        lines.append("  mismatch classes (count, class, simplest scenario):")
    for m in d["mismatches"]:
        lines.append(printable(f"    {m['count']:>4}  {m['class']}", one_line=True))
        lines.append(printable(f"          {m['example']}", one_line=True))
    for why, n in d["skipped"].items():
        lines.append(printable(f"  skipped {n}: {why}", one_line=True))
    if d["standins"]:
        lines.append("  CPU stand-ins: " + "; ".join(d["standins"]))
    return lines
