"""The `verify` sub-command (registered on cli.py's parser by `add_parsers`).

Progress goes to stderr (a rich bar when stderr is a terminal, a plain line
every PLAIN_EVERY_PCT percent otherwise); stdout carries only the report or,
with --json, one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from twin.cli_flags import BadInput
from twin.search.explore_cli import LiveBar
from twin.textsafe import printable

PLAIN_EVERY_PCT = 10


def add_parsers(sub: Any) -> None:
    from twin.cli_flags import add_budgets

    sp = sub.add_parser("verify", help="enumerate the decision space (one small scenario per class); "
                                       "every distinct finding, or a proof of none")
    sp.add_argument("--runner", default="fixed", help="runner preset or module:Class (default: fixed)")
    sp.add_argument("--space", default="default", choices=["default", "wide", "a2a"],
                    help="which axes and values (default: default)")
    sp.add_argument("--max-world", type=int, default=None, metavar="N",
                    help="largest tp x dp enumerated (default: 4 for default and a2a, 8 for wide)")
    sp.add_argument("--jobs", type=int, default=None, metavar="N",
                    help="worker processes (default: every core)")
    sp.add_argument("--shard", default=None, metavar="i/n",
                    help="enumerate only block i of n (0-based); merge the shards' --json with --merge")
    sp.add_argument("--out", default=None, metavar="DIR",
                    help="write findings.json and a TOML per finding here (shards may share it)")
    sp.add_argument("--merge", nargs="+", metavar="SHARD.json",
                    help="merge the --json outputs of shards into one report (nothing is simulated)")
    sp.add_argument("--fail-on-hazard", action="store_true", help="exit 1 when there is a finding")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    add_budgets(sp)
    sp.set_defaults(func=cmd_verify)


class VerifyProgress(LiveBar):
    """Classes done out of the shard's assignments: a bar on a terminal, lines otherwise."""

    def __init__(self, title: str, stream: Any = None) -> None:
        super().__init__(title, stream)
        self._pct = -PLAIN_EVERY_PCT

    def __call__(self, done: int, total: int, findings: int) -> None:
        status = f"{findings} finding(s)"
        if self._bar is not None:
            self._bar.update(self._task, completed=done, total=total, status=status)
            return
        pct = 100 * done // max(total, 1)
        if pct - self._pct >= PLAIN_EVERY_PCT or done == total:
            self._pct = pct
            print(printable(f"{self.title}: {done}/{total} assignments ({pct}%), {status}", one_line=True),
                  file=self.stream, flush=True)


def verify_report(d: dict[str, Any]) -> list[str]:
    """The text report (rich markup; everything from the data is escaped)."""
    from rich.markup import escape as e

    classes = d["classes"]
    share = 100 * d["pruned"] / classes if classes else 0.0
    lines = [f"[bold]verify {e(d['runner'])}[/bold]: {e(d['statement'])}",
             f"  {classes} classes: {d['classes'] - d['pruned']} simulated, {d['pruned']} pruned "
             f"({share:.1f}%: same values of every consulted predicate), {d['invalid']} invalid "
             f"assignments skipped, {d.get('unsupported', 0)} refused by the runner; {d['elapsed_s']:.1f} s"]
    if d.get("shard"):
        lines[1] += f"; shard {d['shard'][0]}/{d['shard'][1]}"
    if d.get("stopped"):
        lines.append(f"  [bold]stopped[/bold]: {e(d['stopped'])}; the remaining classes were not enumerated "
                     "(nothing is proved about them)")
    for f in d["findings"]:
        lines.append(f" [bold]{e(f['signature'])}[/bold]")
        lines.append(f"     {e(f.get('scenario_file') or '(not written: use --out)')}: {e(f['summary'])}")
        lines.append(f"     {e(f['detail'])}")
        lines.extend(_found_line(f, classes))
    return lines


def _found_line(f: dict[str, Any], classes: int) -> list[str]:
    """In how many classes, and which other findings each of them showed too
    (rich markup: the signatures are escaped)."""
    from rich.markup import escape

    if not f.get("classes_found"):
        return []
    also = f.get("found_with") or []
    tail = f"; each of them also showed {escape(', '.join(also))}" if also else ""
    return [f"     found in {f['classes_found']} of {classes} classes{tail}"]


def cmd_verify(args: argparse.Namespace) -> int:
    from twin.search.explore_cli import _print_lines
    from twin.search.verify import merge, verify

    if args.merge:
        d = merge([_read_json(p) for p in args.merge])
    else:
        jobs = args.jobs if args.jobs is not None else (os.cpu_count() or 1)
        with VerifyProgress(f"verify {args.runner}") as progress:
            res = verify(args.runner, space=args.space, max_world=args.max_world, jobs=jobs,
                         shard=args.shard, out=Path(args.out) if args.out else None, progress=progress,
                         partial_on_interrupt=True)
        d = res.to_dict()
    if args.json:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
    else:
        _print_lines(verify_report(d))
    if d.get("interrupted"):
        print(f"moe-twin: verify interrupted after {d.get('classes', 0)} classes; the findings so far are "
              "reported and saved", file=sys.stderr)
        return 130
    # A stopped enumeration is the runner's failure (every class ran into the
    # budget): the exit code is that of a runner error, a finding.
    return 1 if (args.fail_on_hazard and (d["findings"] or d.get("stopped"))) else 0


def _read_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise BadInput(f"--merge {path}: not a verify --json output ({exc})") from None
    if not isinstance(data, dict) or "classes" not in data or "findings" not in data:
        raise BadInput(f"--merge {path}: not a verify --json output (no classes/findings)")
    return data


__all__ = ["add_parsers", "cmd_verify", "verify_report"]
