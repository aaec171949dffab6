"""The `explore` and `mutate` sub-commands (registered on cli.py's parser by `add_parsers`).

Progress goes to stderr (rich when stderr is a terminal, plain lines otherwise);
stdout carries only the report or, with --json, one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from scenarios.space import SPACES as SPACE_NAMES
from scenarios.spec_sections import MAX_WORLD
from twin.cli_flags import BadInput
from twin.search.explore import DEFAULT_BUDGET, DEFAULT_OUT, ExploreResult, Progress
from twin.search.explore_enum import DEFAULT_ENUMERATE_S, DEFAULT_SPACE
from twin.textsafe import printable

MUTATE_BUDGET = 200
PLAIN_EVERY = 50  # examples between two plain progress lines
PLAIN_EVERY_PCT = 10  # of the enumeration's assignments between two plain progress lines


def add_parsers(sub: Any, common_json_flag_fn: Callable[[argparse.ArgumentParser], None] | None = None) -> None:
    """Register `explore` and `mutate` on cli.py's sub-parsers object."""
    from twin.cli_flags import add_budgets, add_timeout, seconds

    def json_flag(sp: argparse.ArgumentParser) -> None:
        if common_json_flag_fn is not None:
            common_json_flag_fn(sp)
        else:
            sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("explore", help="enumerate the decision classes of a space, then search generated "
                                        "scenarios for hazards of a runner; a minimal scenario file per finding")
    sp.add_argument("--runner", default="fixed", help="runner preset or module:Class (default: fixed)")
    sp.add_argument("--budget", type=int, default=DEFAULT_BUDGET,
                    help=f"examples to try (default {DEFAULT_BUDGET})")
    sp.add_argument("--seed", type=int, default=None, help="make the search reproducible")
    sp.add_argument("--confirm", action="store_true",
                    help="run every finding on real ranks and attach the verdict")
    sp.add_argument("--out", default=str(DEFAULT_OUT),
                    help=f"directory for findings, scenario files and the example database "
                         f"(default ./{DEFAULT_OUT}); a second run resumes from it")
    add_timeout(sp, 60.0, "a real rank counts as hung (--confirm)")
    add_budgets(sp)
    sp.add_argument("--no-target", action="store_true",
                    help="plain generation: no hypothesis.target() severity climbing")
    sp.add_argument("--no-enumerate", action="store_true",
                    help="skip the first phase (verify's enumeration of the decision space): Hypothesis only")
    sp.add_argument("--enumerate-space", default=DEFAULT_SPACE, choices=["default", "wide"],
                    help=f"the space the first phase enumerates (default: {DEFAULT_SPACE})")
    sp.add_argument("--enumerate-time", type=seconds(1.0, 86_400.0), default=DEFAULT_ENUMERATE_S, metavar="S",
                    help=f"seconds the first phase may take; past them it stops and says how much of the "
                         f"space it covered (default {DEFAULT_ENUMERATE_S:g})")
    sp.add_argument("--fail-on-hazard", action="store_true", help="exit 1 when there is a finding")
    json_flag(sp)
    sp.set_defaults(func=cmd_explore)

    sp = sub.add_parser("mutate", help="mutants of the runners' decision points: which ones does verify "
                                       "(or a search) kill, and why the others survive")
    sp.add_argument("--kill", choices=["verify", "search"], default=None,
                    help="verify: enumerate a decision space per mutant beside its reference (the "
                         "default); search: explore with --budget examples per mutant (the default "
                         "with --confirm, whose real runs need a search's findings)")
    sp.add_argument("--runner", choices=["fixed", "sglang", "all"], default="all",
                    help="whose mutants: fixed (M_*), sglang (S_*) or all (default)")
    sp.add_argument("--space", default="default", choices=sorted(SPACE_NAMES),
                    help="--kill verify: the decision space (default: default)")
    sp.add_argument("--max-world", type=int, default=None, metavar="N",
                    help="--kill verify: largest tp x dp enumerated (default: the space's)")
    sp.add_argument("--jobs", type=int, default=1, metavar="N",
                    help="--kill verify: mutants enumerated at once, one process each (default 1)")
    sp.add_argument("--no-pool", action="store_true",
                    help="--kill verify: judge survivors on the space only (no pool of scenarios beyond it)")
    sp.add_argument("--budget", type=int, default=MUTATE_BUDGET,
                    help=f"--kill search: examples per mutant (default {MUTATE_BUDGET})")
    sp.add_argument("--seed", type=int, default=0, help="seed of every search (default 0)")
    sp.add_argument("--confirm", action="store_true",
                    help="a mutant counts as killed only when the real run confirms the hazard")
    sp.add_argument("--mutant", action="append", metavar="PATTERN",
                    help="only mutants matching this glob (repeatable), e.g. 'M_dropop_*'")
    sp.add_argument("--equivalence", type=int, default=300, metavar="N",
                    help="generated scenarios (besides the catalog and the corner grid) a "
                         "survivor is compared with its reference on (default 300)")
    add_timeout(sp, 60.0, "a real rank counts as hung (--confirm)")
    add_budgets(sp)
    json_flag(sp)
    sp.set_defaults(func=cmd_mutate)


# ---------------------------------------------------------------- progress


class LiveBar:
    """A live progress bar on stderr when it is a terminal (subclasses print
    plain lines otherwise): the set-up explore and verify share."""

    def __init__(self, title: str, stream: Any = None) -> None:
        self.title = title
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> LiveBar:
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as Bar

            console = Console(file=self.stream, highlight=False)
            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                            console=console, transient=True)
            self._bar.start()
            self._task = self._bar.add_task(printable(self.title, one_line=True), total=None, status="")
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._bar is not None:
            self._bar.stop()


class ExploreProgress(LiveBar):
    """Examples tried, findings, confirmations: a live bar on a terminal, lines otherwise."""

    def __init__(self, title: str, stream: Any = None) -> None:
        super().__init__(title, stream)
        self._last_line = -PLAIN_EVERY
        self._phase = ""

    def __call__(self, p: Progress) -> None:
        status = f"{p.findings} finding(s), {p.new_findings} new"
        if p.confirmed:
            status += f", {p.confirmed} confirmed"
        enumerating = p.phase == "enumerate"
        done, total = (p.done, p.total) if enumerating else (min(p.examples, p.budget), p.budget)
        if self._bar is not None:
            from rich.text import Text

            self._bar.update(self._task, completed=done, total=total,
                             description=printable(f"{self.title}: {p.phase}", one_line=True), status=status)
            if p.message:  # runner text (signatures carry step names): never markup
                self._bar.console.print(Text(printable(f"  {p.message}", one_line=True)))
            return
        if enumerating:
            due = 100 * (p.done - self._last_line) >= PLAIN_EVERY_PCT * max(p.total, 1)
            count = f"{p.done}/{p.total} assignments"
        else:
            due = p.examples - self._last_line >= PLAIN_EVERY
            count = f"{p.examples}/{p.budget} examples"
        if p.message or due or p.phase != self._phase:
            self._last_line = p.done if enumerating else p.examples
            self._phase = p.phase
            line = f"{self.title}: {p.phase}: {count}, {status}"
            line += f": {p.message}" if p.message else ""
            print(printable(line, one_line=True), file=self.stream, flush=True)


class MessageProgress:
    """One status line per message: a spinner on a terminal, plain lines otherwise."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self._status: Any = None

    def __enter__(self) -> MessageProgress:
        if self.tty:
            from rich.console import Console

            self._status = Console(file=self.stream, highlight=False).status("mutate")
            self._status.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._status is not None:
            self._status.stop()

    def __call__(self, message: str) -> None:
        if self._status is not None:
            from rich.markup import escape

            self._status.update(escape(printable(f"mutate: {message}", one_line=True)))
        else:
            print(printable(f"mutate: {message}", one_line=True), file=self.stream, flush=True)


# ---------------------------------------------------------------- commands


def _print_lines(lines: list[str]) -> None:
    """Report lines (markup of our own, data escaped) with no control character
    from the data reaching the terminal."""
    from rich.console import Console
    from rich.text import Text

    from twin.textsafe import Sanitized

    console = Console(highlight=False, soft_wrap=True)
    for line in lines:
        console.print(Sanitized(Text.from_markup(line)))


def explore_report(res: ExploreResult) -> list[str]:
    """The text report (rich markup; everything from the data is escaped)."""
    from rich.markup import escape as e

    new = len(res.new_findings)
    where = f" ({e(res.out.as_posix())})" if res.out is not None else ""
    head = f"[bold]explore {e(res.runner)}[/bold]: {res.examples} examples{' (interrupted)' if res.interrupted else ''}, "
    enum = [f"  {e(_enumeration_line(res.enumeration))}"] if res.enumeration else []
    if not res.findings:
        return [head + f"[green]no hazard found[/green]{where}", *enum]
    lines = [head + f"{len(res.findings)} finding(s), {new} new{where}", *enum]
    for f in res.findings:
        tag = "[bold yellow]NEW[/bold yellow]" if f.new else "old"
        verdict = e(f" [{f.verdict}]") if f.verdict else ""
        stale = "" if f.reproduces else " [dim](no longer reproduces with this runner)[/dim]"
        by = e(f" (by the {f.found_by})") if f.found_by and f.new else ""
        lines.append(f" {tag} [bold]{e(f.signature)}[/bold]{verdict}{stale}{by}")
        lines.append(f"     {e(f.scenario_file or '(not written)')}: {e(f.scenario.summary_line())}")
        lines.append(f"     {e(f.detail)}")
        if f.unshrinkable:
            lines.append(f"     not shrunk: {e(f.unshrinkable)}")
        if f.verdict_reason:
            lines.append(f"     real: {e(f.verdict_reason)}")
    return lines


def _enumeration_line(d: dict[str, Any]) -> str:
    from twin.search.explore_enum import EnumerationSummary

    return EnumerationSummary.from_dict(d).line()


def cmd_explore(args: argparse.Namespace) -> int:
    from scenarios.contain import GracefulInterrupts
    from twin.search.explore import explore

    # Ctrl-C: the search stops before its next example (a second Ctrl-C: at
    # once), saves, and returns what it has: printed below, then exit 130.
    notice = "moe-twin: stopping after this example (Ctrl-C again to stop at once)"
    with ExploreProgress(f"explore {args.runner}") as progress, GracefulInterrupts(notice) as stop:
        res = explore(args.runner, budget=args.budget, seed=args.seed,
                      out=Path(args.out), confirm=args.confirm, progress=progress,
                      timeout_s=getattr(args, "timeout", 60.0),
                      targeting=not getattr(args, "no_target", False), partial_on_interrupt=True,
                      stop_requested=stop, enumerate_first=not args.no_enumerate,
                      enumerate_space=args.enumerate_space, enumerate_s=args.enumerate_time)
    if args.json:
        sys.stdout.write(json.dumps(res.to_dict(), indent=2) + "\n")
    else:
        _print_lines(explore_report(res))
    if res.interrupted:
        print(f"moe-twin: interrupted after {res.examples} example(s); findings and counts are saved",
              file=sys.stderr)
        return 130
    live = [f for f in res.findings if f.reproduces]
    return 1 if (getattr(args, "fail_on_hazard", False) and live) else 0


def mutate_report(d: dict[str, Any]) -> list[str]:
    """The text report (rich markup; everything from the data is escaped)."""
    from rich.markup import escape as e

    non_eq = d["mutants"] - d["equivalent"]
    runners = "/".join(sorted({r.get("runner", "fixed") for r in d["results"]})) or "fixed"
    head = (f"[bold]mutate[/bold]: {d['mutants']} mutants of {e(runners)}, {d['killed']} killed "
            f"(kill rate {100 * d['kill_rate']:.1f}%")
    if d["kill_rate_non_equivalent"] is not None:
        head += f"; {100 * d['kill_rate_non_equivalent']:.1f}% of the {non_eq} non-equivalent"
    if d.get("kill") == "verify":
        head += f"), by verify over the {e(str(d.get('space')))} space; {d['elapsed_s']:.0f} s"
    else:
        head += f"), {d['budget']} examples each"
    if d["confirm"]:
        head += ", kills confirmed on real ranks"
    survivors = (f"survivors: {d['equivalent']} equivalent, {d['blind_spots']} blind spot(s), "
                 + (f"{d.get('outside_space', 0)} outside the space" if d.get("kill") == "verify"
                    else f"{d['missed']} missed by the search"))
    if d["refuted"] or d["unconfirmed"]:
        survivors += f", {d['refuted']} refuted and {d['unconfirmed']} unconfirmed on real ranks"
    lines = [head, survivors]
    label = {"equivalent": "[green]equivalent[/green]", "blind_spot": "[bold red]blind spot[/bold red]",
             "missed": "[yellow]missed[/yellow]", "outside_space": "[yellow]outside the space[/yellow]", "refuted": "[yellow]refuted[/yellow]",
             "unconfirmed": "[yellow]unconfirmed[/yellow]"}
    for r in d["results"]:
        if not r["killed"]:
            lines.append(f"  {label.get(r['status'], e(r['status']))} [bold]{e(r['mutant'])}[/bold]: "
                         f"{e(r['description'])}")
            lines.append(f"      {e(r['reason'])}")
    lines.append("killed:")
    for r in d["results"]:
        if r["killed"]:
            verdict = e(f" [{r['verdict']}]") if r["verdict"] else ""
            after = (f"after {r.get('classes', 0)} class(es)" if d.get("kill") == "verify"
                     else f"after {r['examples']} example(s)")
            lines.append(f"  {e(r['mutant'])}: {e(r['signature'] or '')}{verdict} {after}")
    return lines


def cmd_mutate(args: argparse.Namespace) -> int:
    from twin.search.explore import check_budget
    from twin.search.mutate import run_mutation

    check_budget(args.budget)
    if args.equivalence < 0:
        raise BadInput(f"--equivalence: must be >= 0, got {args.equivalence}")
    kill = args.kill or ("search" if args.confirm else "verify")
    if kill == "verify" and args.confirm:
        raise BadInput("--confirm: only with --kill search (verify's kills are predictions over a space)")
    if args.max_world is not None and not 1 <= args.max_world <= MAX_WORLD:
        raise BadInput(f"--max-world: must be a number of ranks from 1 to {MAX_WORLD}, got {args.max_world}")
    with MessageProgress() as progress:
        rep = run_mutation(budget=args.budget, confirm=args.confirm, seed=args.seed,
                           only=args.mutant, equivalence_examples=args.equivalence,
                           progress=progress, timeout_s=getattr(args, "timeout", 60.0),
                           kill=kill, space=args.space, max_world=args.max_world, jobs=args.jobs,
                           runner=args.runner, pool=not args.no_pool)
    d = rep.to_dict()
    if args.json:
        sys.stdout.write(json.dumps(d, indent=2) + "\n")
    else:
        _print_lines(mutate_report(d))
    return 0
