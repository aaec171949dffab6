"""moe-twin command line: parses, calls, renders. No logic of its own.

Exit codes: 0 when the command itself worked (whatever it found); 1 with
--fail-on-hazard when a hazard was predicted (or, with real runs, confirmed);
2 for bad input, including a runner that misuses Ops (one line naming the
cause); 3 for an internal or infrastructure error (e.g. rank processes that
cannot start: one line).
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
STARTUP_TIMEOUT_S = 120.0  # real.pool.DEFAULT_STARTUP_TIMEOUT_S (not imported: torch is slow to load)
FOLD_WORLD = 32  # simulate --json folds equivalent ranks beyond this many ranks


class BadInput(Exception):
    """Bad input from the user: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: scripts parse stderr.
        raise BadInput(f"{self.prog}: {message}")


_WIDTH: int | None = None


def _console() -> Console:
    # --width applies to the whole report, not just the timeline. No markup:
    # reports carry scenario and runner text (twin/textsafe.py).
    return Console(highlight=False, soft_wrap=False, width=_WIDTH, markup=False)


def _print(renderable: Any) -> None:
    from twin.textsafe import Sanitized

    _console().print(Sanitized(renderable))


def _progress(message: str) -> Any:
    """A spinner on stderr, so stdout stays clean for --json and pipes. The
    message carries scenario and runner text: shown as text, never markup."""
    return _Spinner(Console(stderr=True).status(_plain(message)))


def _plain(message: str) -> Any:
    from rich.text import Text

    from twin.textsafe import printable

    return Text(printable(message, one_line=True))


class _Spinner:
    """rich's status, with `update(message)` taking plain text."""

    def __init__(self, status: Any) -> None:
        self.status = status

    def __enter__(self) -> _Spinner:
        self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.__exit__(*exc)

    def update(self, message: str) -> None:
        self.status.update(_plain(message))


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
    from rich.text import Text

    from twin.textsafe import printable

    t = Table(title="scenario catalog", title_justify="left")
    t.add_column("name", style="bold")
    t.add_column("summary")
    for e in entries:
        t.add_row(Text(printable(e.name)), Text(printable(e.summary)))
    _print(t)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    s = _load_scenario(args.scenario)
    if args.json:
        _emit_json({"scenario": s.to_dict(), "derived": s.derived()})
        return EXIT_OK
    from twin.report import show_scenario

    _print(show_scenario(s))
    return EXIT_OK


def cmd_simulate(args: argparse.Namespace) -> int:
    from sim import simulate

    s = _load_scenario(args.scenario)
    trace = simulate(s, args.runner, profile=args.profile)
    if args.json:
        # Wide worlds list each class of equivalent ranks once (--all-ranks: every rank).
        fold = s.world > FOLD_WORLD and not args.all_ranks
        _emit_json({"scenario": s.name, "summary": s.summary_line(), "derived": s.derived(),
                    **(trace.to_folded_dict() if fold else trace.to_dict(with_steps=True))})
    else:
        from twin.report import simulate_report

        _print(simulate_report(s, trace, _timeline(trace, args.width)))
    return EXIT_HAZARD if (args.fail_on_hazard and trace.hazards) else EXIT_OK


def cmd_replay(args: argparse.Namespace) -> int:
    from twin.report import replay_table

    console = _console()
    if args.real:
        from twin.replay_real import replay_real

        _startup_timeout(args)
        _autocalibrate(args)
        with _progress("replaying on real ranks...") as status:
            results = replay_real(progress=lambda msg: status.update(f"real: {msg}"), timeout_s=args.timeout)
    else:
        from twin.replay import replay_sim

        results = replay_sim()
    if args.json:
        _emit_json({"cases": [r.to_dict() for r in results]})
    else:
        from twin.report import replay_details

        _print(replay_table(results, real=args.real))
        _print(replay_details(results, real=args.real, width=console.width))
    failed = any(not r.caught for r in results) or (args.real and any(not r.real_ok for r in results))
    return EXIT_HAZARD if (args.fail_on_hazard and failed) else EXIT_OK


def _parse_ranks(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BadInput(f"--ranks: expected a comma-separated list of rank numbers, got {text!r}") from None


def _real_scenario(args: argparse.Namespace, real: bool = True):  # noqa: ANN202
    """The scenario of a command that may run real ranks, validated without
    importing torch (a one-line error must not cost seconds)."""
    s = _load_scenario(args.scenario)
    if getattr(args, "kernel", None):
        from kernels import KERNELS

        if args.kernel not in KERNELS:
            raise BadInput(f"--kernel: unknown kernel {args.kernel!r} (known: {', '.join(KERNELS)})")
        s = s.with_(kernel=args.kernel)
    if real:
        from real.sizes import check_fits, check_kernel_device

        check_fits(s)
        check_kernel_device(s.kernel)
        _startup_timeout(args, apply=args.command != "timeline" or args.real)
    return s


def _autocalibrate(args: argparse.Namespace) -> None:
    """The first real use on this machine calibrates the cpu profile the
    simulated CPU timeline is drawn with (real/autocal.py): said on stderr,
    with progress; a failure is one line and the command goes on."""
    from real import autocal

    why = autocal.reason_to_calibrate()
    if why is None:
        return
    print(f"moe-twin: {why}: calibrating the cpu profile now, once (~15-30 s; "
          f"{autocal.OPT_OUT}=1 skips it)", file=sys.stderr)
    with _progress("calibrating the cpu profile...") as status:
        note = autocal.calibrate_now(progress=lambda m: status.update(f"calibrating the cpu profile: {m}"),
                                     timeout_s=getattr(args, "timeout", None) or 120.0)
    print(f"moe-twin: {note}", file=sys.stderr)


def _startup_timeout(args: argparse.Namespace, apply: bool = True) -> None:
    """--startup-timeout bounds rank start-up (spawn, rendezvous, groups) on
    its own, so --timeout bounds only the run (validated while parsing)."""
    if apply:
        from real.pool import set_default_startup_timeout

        set_default_startup_timeout(args.startup_timeout)


def _budget_stop(trace: Any) -> str | None:
    from scenarios.contain import budget_stop

    return budget_stop(trace.notes)


def _skipped_real(s: Any, sim: Any, reason: str) -> Any:
    """The real trace of a run not made: the simulated runner exceeded a budget."""
    from scenarios.trace import Trace

    return Trace(source="real", scenario=s.name, runner=sim.runner, world=s.world,
                 notes=[f"real run skipped: the runner was stopped by a budget in the simulator ({reason})"])


def cmd_run(args: argparse.Namespace) -> int:
    from sim import simulate

    s = _real_scenario(args)
    _autocalibrate(args)
    with _progress(f"running {s.name} on {s.world} real rank(s)..."):
        prediction = simulate(s, args.runner)  # shapes of async ops and the values to fit
        stop = _budget_stop(prediction)
        if stop is None:
            from real.runner import run_real

            res = run_real(s, args.runner, prediction=prediction, timeout_s=args.timeout)
            trace, errors, failures = res.trace, res.errors, res.failures
        else:  # the runner would loop on the ranks too: report the simulator's stop
            trace, errors, failures = _skipped_real(s, prediction, stop), {}, {}
            trace.hazards = list(prediction.hazards)
    if args.json:
        _emit_json({"scenario": s.name, **trace.to_dict(with_steps=True),
                    "errors": {str(r): {"step": st, "error": e} for r, (st, e) in errors.items()},
                    "failures": {str(r): f for r, f in failures.items()}})
    else:
        from twin.report import real_report

        _print(real_report(s, trace, _timeline(trace, args.width)))
    return EXIT_HAZARD if (args.fail_on_hazard and trace.hazards) else EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from sim import simulate
    from twin.crosscheck import CheckResult, VerdictItem, check
    from twin.report import check_report

    s = _real_scenario(args)
    _autocalibrate(args)
    with _progress(f"checking {s.name}: simulate, then run on {s.world} real rank(s)...") as status:
        sim = simulate(s, args.runner)
        stop = _budget_stop(sim)
        if stop is None:
            result = check(s, args.runner, timeout_s=args.timeout, progress=lambda m: status.update(m))
        else:  # the runner would loop on the ranks too: no real run, say why
            from scenarios.trace import Verdict

            result = CheckResult(s, sim, _skipped_real(s, sim, stop))
            result.verdicts = [VerdictItem(h.kind.value, Verdict.INCONCLUSIVE,
                                           f"not run on real ranks: stopped by a budget in the simulator ({stop})",
                                           h.step, h.rank) for h in sim.hazards]
    if args.json:
        _emit_json(result.to_dict())
    else:
        div = result.divergence[:2] if result.divergence else None
        compare = result.real if result.real.steps else None
        tl = _timeline(result.timeline_sim or result.sim, args.width, compare=compare, first_divergence=div)
        _print(check_report(result, tl))
    # Predicted (whatever the verdict) or found by the real run alone.
    found = bool(result.sim.hazards) or any(v.verdict.value == "UNPREDICTED" for v in result.verdicts)
    return EXIT_HAZARD if (args.fail_on_hazard and found) else EXIT_OK


def cmd_timeline(args: argparse.Namespace) -> int:
    from sim import simulate

    s = _real_scenario(args, real=args.real)
    ranks = _parse_ranks(args.ranks)
    if ranks is not None:
        bad = [r for r in ranks if not 0 <= r < s.world]
        if bad:
            raise BadInput(f"--ranks: {bad} not in this scenario's ranks 0..{s.world - 1}")
    if args.real:
        _autocalibrate(args)  # before simulating: a cpu scenario's timeline is the cpu profile's
    sim_trace = simulate(s, args.runner)
    real_trace = None
    div = None
    stop = _budget_stop(sim_trace) if args.real else None
    if stop is not None:
        print(f"moe-twin: real run skipped: the runner was stopped by a budget in the simulator ({stop})",
              file=sys.stderr)
    elif args.real:
        from real.runner import run_real
        from twin.crosscheck import first_divergence

        with _progress(f"running {s.name} on {s.world} real rank(s)..."):
            real_trace = run_real(s, args.runner, prediction=sim_trace, timeout_s=args.timeout).trace
        d = first_divergence(sim_trace, real_trace, s.model.routed_scaling_factor)
        div = d[:2] if d else None
        from twin.crosscheck import cpu_timeline

        sim_trace = cpu_timeline(s, args.runner, sim_trace)  # comparable with the CPU run
    if args.export:
        from twin.export import write_chrome_trace

        try:
            path = write_chrome_trace([sim_trace] + ([real_trace] if real_trace else []), args.export)
        except OSError as exc:
            raise BadInput(f"--export: cannot write {args.export}: {exc.strerror or exc}") from None
        from twin.textsafe import printable

        print(f"wrote {printable(path, one_line=True)}", file=sys.stderr)
    from twin.timeline import render_text, terminal_width

    width = args.width or terminal_width()
    view = _timeline(sim_trace, width, compact=False, ranks=ranks, compare=real_trace, first_divergence=div)
    sys.stdout.write(render_text(view, width=width, color=sys.stdout.isatty()) + "\n")
    return EXIT_OK


def cmd_calibrate(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise BadInput(f"--repeats: at least 1, got {args.repeats}")
    if args.world < 2:
        raise BadInput(f"--world: collectives need at least 2 ranks, got {args.world}")
    _startup_timeout(args)
    from real.calibrate import calibrate
    from sim.cost import save_cpu_profile

    console = _console()
    with _progress("calibrating the cpu profile (microbenchmarks, then real runs of calibration scenarios)...") as status:
        profile, figures = calibrate(world_size=args.world, repeats=args.repeats,
                                     progress=lambda m: status.update(f"calibrating the cpu profile: {m}"))
    path = save_cpu_profile(profile)
    if args.json:
        _emit_json({"profile": path.as_posix(), **figures})
    else:
        from twin.textsafe import printable

        console.print(f"cpu profile saved to {printable(path)}")
        for k, v in figures.items():
            console.print(f"  {k:32s} {v}")
    return EXIT_OK


def cmd_bench(args: argparse.Namespace) -> int:
    if args.repeats < 1:
        raise BadInput(f"--repeats: at least 1, got {args.repeats}")
    if args.what == "sim":
        from twin.bench import bench_sim

        figures = bench_sim(repeats=args.repeats)
    else:
        from real.bench import bench_real

        _autocalibrate(args)
        figures = bench_real(repeats=args.repeats)
    if args.json:
        _emit_json(figures)
    else:
        from rich.text import Text

        console = _console()
        console.print(Text(f"moe-twin bench {args.what}", style="bold"),
                      f"(medians of {args.repeats} repeats)")
        for k, v in figures.items():
            console.print(f"  {k:44s} {v}")
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    from twin.cli_flags import add_budgets, add_timeout, seconds

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
    add_budgets(sp)
    sp.add_argument("--profile", help="cost profile: h100, h200, b200, mi300x, mi355x, cpu (default: by platform)")
    sp.add_argument("--width", type=int, help="timeline width in columns (default: terminal width)")
    sp.add_argument("--fail-on-hazard", action="store_true", help="exit 1 when a hazard is predicted")
    sp.add_argument("--all-ranks", action="store_true",
                    help=f"with --json beyond {FOLD_WORLD} ranks: every rank's steps and outputs, "
                         "not each class of equivalent ranks once")
    sp.set_defaults(func=cmd_simulate)

    def startup_flag(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--startup-timeout", type=seconds(1e-3, 86_400.0), default=STARTUP_TIMEOUT_S, metavar="S",
                        help=f"seconds the rank processes may take to start (spawn, rendezvous, process groups), "
                             f"apart from --timeout; failing to start exits 3 (default {STARTUP_TIMEOUT_S:g})")

    sp = sub.add_parser("replay", help="the five historical regressions, before vs fixed")
    sp.add_argument("--real", action="store_true", help="also run every case on real ranks and give verdicts")
    add_timeout(sp, 120.0, "a real run (after start-up) counts as hung")
    startup_flag(sp)
    add_budgets(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.add_argument("--fail-on-hazard", action="store_true",
                    help="exit 1 when a regression is not caught (or not confirmed with --real)")
    sp.set_defaults(func=cmd_replay)

    def real_flags(sp: argparse.ArgumentParser) -> None:
        add_timeout(sp, 60.0, "a real run (after start-up) counts as hung")
        startup_flag(sp)
        sp.add_argument("--kernel", help="routed kernel for the real run: torch, triton, flashinfer")
        add_budgets(sp)  # every command with a real run simulates the runner first

    sp = sub.add_parser("run", help="run a scenario on real ranks (no simulation verdicts)")
    common(sp)
    real_flags(sp)
    sp.add_argument("--width", type=int, help="timeline width in columns (default: terminal width)")
    sp.add_argument("--fail-on-hazard", action="store_true", help="exit 1 when the real run shows a problem")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("check", help="simulate and run for real; a verdict per predicted hazard")
    common(sp)
    real_flags(sp)
    sp.add_argument("--width", type=int, help="timeline width in columns (default: terminal width)")
    sp.add_argument("--fail-on-hazard", action="store_true",
                    help="exit 1 when a hazard is predicted or the real run shows an unpredicted one")
    sp.set_defaults(func=cmd_check)

    sp = sub.add_parser("timeline", help="Gantt view per rank and stream; --real draws sim and real together")
    sp.add_argument("scenario", help="catalog name or path to a scenario .toml")
    sp.add_argument("--runner", help="runner preset or module:Class (default: the scenario's)")
    sp.add_argument("--real", action="store_true", help="also run for real and draw both on one scale")
    sp.add_argument("--ranks", help="comma-separated ranks to draw, e.g. 0,1")
    sp.add_argument("--width", type=int, help="columns (default: terminal width)")
    sp.add_argument("--export", metavar="FILE.json", help="also write a Chrome/Perfetto trace")
    real_flags(sp)
    sp.set_defaults(func=cmd_timeline)

    sp = sub.add_parser("calibrate", help="fit the cpu cost profile on this machine")
    sp.add_argument("--world", type=int, default=2, help="ranks used to time gloo collectives")
    sp.add_argument("--repeats", type=int, default=5, help="real runs per calibration scenario")
    startup_flag(sp)
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_calibrate)

    from twin.explore_cli import add_parsers as add_explore_parsers

    add_explore_parsers(sub)  # explore, mutate
    from twin.verify_cli import add_parser as add_verify_parser

    add_verify_parser(sub)
    from twin.conform_cli import add_parser as add_conform_parser

    add_conform_parser(sub)

    sp = sub.add_parser("bench", help="benchmarks (medians and ratios)")
    sp.add_argument("what", choices=["sim", "real"], help="which side to benchmark")
    sp.add_argument("--repeats", type=int, default=5, help="repeats per figure (median reported)")
    sp.add_argument("--json", action="store_true", help="a flat object of named figures")
    sp.set_defaults(func=cmd_bench)
    return p


def _pool_error() -> tuple[type[Exception], ...]:
    # Only if the real side was used: importing it (torch) for an error check
    # would cost seconds on every one-line error.
    pool = sys.modules.get("real.pool")
    return (pool.PoolError,) if pool is not None else ()


def _error(message: str) -> None:
    from twin.textsafe import printable

    print(f"moe-twin: {printable(message, one_line=True)}", file=sys.stderr)


def _startup_error() -> tuple[type[Exception], ...]:
    # As _pool_error: only if the real side was loaded at all.
    pool = sys.modules.get("real.pool")
    return (pool.PoolStartupError,) if pool is not None else ()


def main(argv: Sequence[str] | None = None) -> int:
    code = _main(argv)
    if argv is None:  # this process's own command line: nothing may keep it alive
        _end_if_threads_left(code)
    return code


def _main(argv: Sequence[str] | None) -> int:
    from scenarios import contain
    from scenarios.ops import OpsUsageError
    from scenarios.runners import RunnerLoadError
    from scenarios.spec import ScenarioError

    try:
        args = build_parser().parse_args(argv)
        global _WIDTH
        _WIDTH = getattr(args, "width", None)
        if _WIDTH is not None and _WIDTH < 40:
            raise BadInput(f"--width: at least 40 columns, got {_WIDTH}")
        from twin.cli_flags import limits_of

        contain.set_limits(limits_of(args))
        return int(args.func(args))
    except SystemExit as exc:  # --help (runner code's exits are contained where it runs)
        return EXIT_OK if exc.code in (0, None) else EXIT_INTERNAL
    except _startup_error() as exc:  # infrastructure, not the runner's fault
        _error(f"infrastructure error: {str(exc).splitlines()[0]}")
        return EXIT_INTERNAL
    except OpsUsageError as exc:  # the runner misuses Ops: its author's bug, named by step
        _error(f"error: {str(exc).splitlines()[0]}")
        return EXIT_BAD_INPUT
    except (BadInput, ScenarioError, RunnerLoadError, *_pool_error()) as exc:
        _error(f"error: {exc}")
        return EXIT_BAD_INPUT
    except ValueError as exc:  # unknown profile, group, ... from the library
        _error(f"error: {exc}")
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except Exception as exc:
        if os.environ.get("MOE_TWIN_DEBUG"):
            raise
        _error(f"internal error: {type(exc).__name__}: {exc} (MOE_TWIN_DEBUG=1 for a traceback)")
        return EXIT_INTERNAL
    finally:
        contain.set_limits(contain.Limits())  # in-process callers (tests) start from the defaults


def _end_if_threads_left(code: int) -> None:
    """Runner code may leave a non-daemon thread running, which would keep the
    process from ever exiting: end it once the command is done."""
    import threading

    left = [t for t in threading.enumerate()
            if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if not left:
        return
    _error(f"ending the process: runner code left {len(left)} thread(s) running "
           f"({', '.join(t.name for t in left[:3])})")
    if "real.runner" in sys.modules:
        sys.modules["real.runner"].close_pools()  # what atexit would have done
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
