"""moe-twin command line: parses, calls, renders. No logic of its own.

Exit codes: 0 when the command itself worked (whatever it found); 1 with
--fail-on-hazard when a hazard was predicted (or, with real runs, confirmed);
2 for bad input, including a runner that misuses Ops (one line naming the
cause); 3 for an internal or infrastructure error (e.g. rank processes that
cannot start: one line).

Adding a sub-command defined in its own module is one line: append the
module's dotted name to SUBCOMMANDS. The module defines
`add_parsers(sub) -> None`, which adds its parser(s) to `sub` (argparse's
sub-parsers object) with `set_defaults(func=cmd)`, where
`cmd(args) -> int` returns the exit code. It raises
`twin.cli_flags.BadInput` for bad input and never imports this file (the
dependencies point down: cli.py -> twin/ -> sim/, real/ -> scenarios/).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

from twin.cli_flags import BadInput
from twin.cli_output import (
    EXIT_BAD_INPUT,
    EXIT_HAZARD,
    EXIT_INTERNAL,
    EXIT_OK,
    add_common,
    emit_json,
    engine_layout,
    load_scenario,
    print_report,
    set_width,
)

# Sub-commands defined in their own modules (see the module docstring): one line each.
SUBCOMMANDS = (
    "twin.check.check_cli",  # simulate, replay, run, check, timeline
    "twin.bench_cli",  # calibrate, bench
    "twin.search.explore_cli",  # explore, mutate
    "twin.search.verify_cli",  # verify
    "twin.check.conform_cli",  # conform
)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, no usage dump: scripts parse stderr.
        raise BadInput(f"{self.prog}: {message}")


# ---- commands ----


def cmd_scenarios(args: argparse.Namespace) -> int:
    from scenarios.loader import catalog

    entries = catalog()
    if args.json:
        emit_json({"scenarios": [{"name": e.name, "file": str(e.file), "summary": e.summary} for e in entries]})
        return EXIT_OK
    from rich.table import Table
    from rich.text import Text

    from twin.textsafe import printable

    t = Table(title="scenario catalog", title_justify="left")
    t.add_column("name", style="bold")
    t.add_column("summary")
    for e in entries:
        t.add_row(Text(printable(e.name)), Text(printable(e.summary)))
    print_report(t)
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    s = load_scenario(args.scenario)
    engine = engine_layout(s, args.runner) if args.runner else None
    if args.json:
        doc = {"scenario": s.to_dict(), "derived": s.derived()}
        if engine is not None:
            doc["engine_layout"] = engine  # the runner's dispatch layout where it is not vLLM's
        emit_json(doc)
        return EXIT_OK
    from twin.check.report import show_scenario

    print_report(show_scenario(s, engine))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moe-twin", description="A simulation-backed digital twin of MoE layer execution.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sp = sub.add_parser("scenarios", help="list the scenario catalog")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=cmd_scenarios)

    sp = sub.add_parser("show", help="print a resolved scenario with its derived quantities")
    add_common(sp, runner=False)
    sp.add_argument("--runner", help="runner preset or module:Class whose engine layout the derived values follow "
                                     "(default: vLLM's)")
    sp.set_defaults(func=cmd_show)

    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parsers(sub)

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


def _analysis_error() -> tuple[type[Exception], ...]:
    # As _pool_error: only if the real side was loaded at all.
    errors = sys.modules.get("real.pool_errors")
    return (errors.AnalysisOverBudget,) if errors is not None else ()


MAX_WIDTH = 1000  # columns of a timeline: wider is a slow, huge print, never a view


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None:  # this process's own command line: its stdout is the tool's alone
        from twin import tool_stdout

        guard = tool_stdout.protect()
        try:
            code = _main(argv)
        except BrokenPipeError:  # the reader of stdout stopped reading (`| head -1`): its choice
            tool_stdout.reader_gone(guard)
            code = EXIT_OK
        finally:
            tool_stdout.finish(guard)
        _end_forked_processes()
        _end_if_threads_left(code)  # nothing may keep it alive
        return code
    return _main(argv)


def _end_forked_processes() -> None:
    """A process runner code forked and left running would outlive the
    command and hold its stderr open (scenarios/contain_forks.py)."""
    from scenarios.contain_forks import end_forked

    ended = end_forked()
    if ended:
        _error(f"ended {len(ended)} process{'es' if len(ended) > 1 else ''} runner code forked and left running "
               f"(pid {', '.join(map(str, ended))})")


def _main(argv: Sequence[str] | None) -> int:
    from scenarios import contain
    from scenarios.ops import OpsUsageError
    from scenarios.runners import RunnerLoadError
    from scenarios.spec import ScenarioError

    try:
        args = build_parser().parse_args(argv)
        width = getattr(args, "width", None)
        if width is not None and not 40 <= width <= MAX_WIDTH:
            raise BadInput(f"--width: from 40 to {MAX_WIDTH} columns, got {width}")
        set_width(width)
        from twin.cli_flags import limits_of

        contain.set_limits(limits_of(args))
        return int(args.func(args))
    except SystemExit as exc:  # --help (runner code's exits are contained where it runs)
        return EXIT_OK if exc.code in (0, None) else EXIT_INTERNAL
    except _startup_error() as exc:  # infrastructure, not the runner's fault
        _error(f"infrastructure error: {str(exc).splitlines()[0]}")
        return EXIT_INTERNAL
    except _analysis_error() as exc:  # the twin's own post-run work was too slow: its limit, not a hang
        _error(f"twin limit: {str(exc).splitlines()[0]}")
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
    except BrokenPipeError:
        raise  # main's: the reader of stdout went away, not an internal error
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


__all__ = ["EXIT_BAD_INPUT", "EXIT_HAZARD", "EXIT_INTERNAL", "EXIT_OK", "SUBCOMMANDS", "BadInput", "build_parser",
           "main"]

if __name__ == "__main__":
    sys.exit(main())
