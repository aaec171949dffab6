"""moe-twin command line: parses, calls, renders. No logic of its own.

Exit codes: 0 when the command itself worked (whatever it found); 1 with
--fail-on-hazard when a hazard was predicted (or, with real runs, confirmed);
2 for bad input (one line naming the cause); 3 for an internal error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from rich.console import Console

EXIT_OK, EXIT_HAZARD, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3


class BadInput(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: scripts parse stderr.
        raise BadInput(f"{self.prog}: {message}")


def _console() -> Console:
    return Console(highlight=False, soft_wrap=False)


def _emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def _load_scenario(ref: str):  # noqa: ANN202
    from scenarios.loader import load

    return load(ref)


def _timeline(trace: Any, width: int | None, compact: bool = True, **kw: Any) -> Any:
    try:
        from twin.timeline import render_timeline, terminal_width
    except ImportError:  # renderer not installed in this build
        return None
    return render_timeline(trace, width=width or terminal_width(), compact=compact, **kw)


# ---- commands ----


def cmd_scenarios(args: argparse.Namespace) -> int:
    from scenarios.loader import catalog

    entries = catalog()
    if args.json:
        _emit_json({"scenarios": [{"name": e.name, "file": str(e.file), "summary": e.summary} for e in entries]})
        return EXIT_OK
    from rich.table import Table

    t = Table(title="scenario catalog", title_justify="left")
    t.add_column("name", style="bold")
    t.add_column("summary")
    for e in entries:
        t.add_row(e.name, e.summary)
    _console().print(t)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    s = _load_scenario(args.scenario)
    if args.json:
        _emit_json({"scenario": s.to_dict(), "derived": s.derived()})
        return EXIT_OK
    from twin.report import show_scenario

    _console().print(show_scenario(s))
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from sim import simulate

    s = _load_scenario(args.scenario)
    trace = simulate(s, args.runner, profile=args.profile)
    if args.json:
        _emit_json({"scenario": s.name, "summary": s.summary_line(), "derived": s.derived(),
                    **trace.to_dict(with_steps=True)})
    else:
        from twin.report import simulate_report

        _console().print(simulate_report(s, trace, _timeline(trace, args.width)))
    return EXIT_HAZARD if (args.fail_on_hazard and trace.hazards) else EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from twin.report import replay_table

    console = _console()
    if args.real:
        from twin.crosscheck import replay_real

        with console.status("replaying on real ranks...") as status:
            results = replay_real(progress=lambda msg: status.update(f"real: {msg}"), timeout_s=args.timeout)
    else:
        from twin.replay import replay_sim

        results = replay_sim()
    if args.json:
        _emit_json({"cases": [r.to_dict() for r in results]})
    else:
        console.print(replay_table(results, real=args.real))
        for r in results:
            console.print(f"[bold]{r.case.regression} {r.case.runner}[/bold]: {r.case.what}")
            from twin.report import hazard_lines

            for line in hazard_lines(r.before.hazards):
                console.print("   ", line)
            if args.real:
                for line in r.real_lines():
                    console.print("   ", line)
    failed = any(not r.caught for r in results) or (args.real and any(not r.real_ok for r in results))
    return EXIT_HAZARD if (args.fail_on_hazard and failed) else EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    from real.calibrate import calibrate

    from sim.cost import save_cpu_profile

    console = _console()
    with console.status("calibrating the cpu profile (GEMMs, elementwise ops, gloo collectives)..."):
        profile, figures = calibrate(world_size=args.world)
    path = save_cpu_profile(profile)
    if args.json:
        _emit_json({"profile": path.as_posix(), **figures})
    else:
        console.print(f"cpu profile saved to {path}")
        for k, v in figures.items():
            console.print(f"  {k:32s} {v}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "sim":
        from twin.bench import bench_sim

        figures = bench_sim(repeats=args.repeats)
    else:
        from real.bench import bench_real

        figures = bench_real(repeats=args.repeats)
    if args.json:
        _emit_json(figures)
    else:
        console = _console()
        console.print(f"[bold]moe-twin bench {args.what}[/bold] (medians of {args.repeats} repeats)")
        for k, v in figures.items():
            console.print(f"  {k:44s} {v}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moe-twin", description="A simulation-backed digital twin of MoE layer execution.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser, scenario: bool = True, runner: bool = True) -> None:
        if scenario:
            sp.add_argument("scenario", help="catalog name or path to a scenario .toml")
        if runner:
            sp.add_argument("--runner", help="runner preset or module:Class (default: the scenario's)")
        sp.add_argument("--json", action="store_true", help="machine-readable output")

    sp = sub.add_parser("scenarios", help="list the scenario catalog")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_scenarios)

    sp = sub.add_parser("show", help="print a resolved scenario with its derived quantities")
    common(sp, runner=False)
    sp.set_defaults(func=cmd_show)

    sp = sub.add_parser("simulate", help="predict hazards and the timeline of a runner on a scenario")
    common(sp)
    sp.add_argument("--profile", help="cost profile: h100, h200, b200, cpu (default: by platform)")
    sp.add_argument("--width", type=int, help="timeline width in columns (default: terminal width)")
    sp.add_argument("--fail-on-hazard", action="store_true", help="exit 1 when a hazard is predicted")
    sp.set_defaults(func=cmd_simulate)

    sp = sub.add_parser("replay", help="the five historical regressions, before vs fixed")
    sp.add_argument("--real", action="store_true", help="also run every case on real ranks and give verdicts")
    sp.add_argument("--timeout", type=float, default=120.0, help="seconds before a real rank counts as hung")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--fail-on-hazard", action="store_true",
                    help="exit 1 when a regression is not caught (or not confirmed with --real)")
    sp.set_defaults(func=cmd_replay)

    sp = sub.add_parser("calibrate", help="fit the cpu cost profile on this machine")
    sp.add_argument("--world", type=int, default=2, help="ranks used to time gloo collectives")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_calibrate)

    sp = sub.add_parser("bench", help="benchmarks (medians and ratios)")
    sp.add_argument("what", choices=["sim", "real"], help="which side to benchmark")
    sp.add_argument("--repeats", type=int, default=5, help="repeats per figure (median reported)")
    sp.add_argument("--json", action="store_true", help="a flat object of named figures")
    sp.set_defaults(func=cmd_bench)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from scenarios.runners import RunnerLoadError
    from scenarios.spec import ScenarioError

    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args))
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    except (BadInput, ScenarioError, RunnerLoadError) as exc:
        print(f"moe-twin: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except ValueError as exc:  # unknown profile, group, ... from the library
        print(f"moe-twin: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("moe-twin: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("MOE_TWIN_DEBUG"):
            raise
        print(f"moe-twin: internal error: {type(exc).__name__}: {exc} (MOE_TWIN_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
