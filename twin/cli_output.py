"""Output helpers of the command line, shared by cli.py and the sub-command
modules: exit codes, the report console (--width), the stderr spinner, JSON
on stdout, the embedded timeline.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from rich.console import Console

EXIT_OK, EXIT_HAZARD, EXIT_BAD_INPUT, EXIT_INTERNAL = 0, 1, 2, 3

_width: int | None = None  # --width of the running command


def set_width(width: int | None) -> None:
    """--width of this command (None: the terminal's)."""
    global _width
    _width = width


def add_common(sp: argparse.ArgumentParser, scenario: bool = True, runner: bool = True) -> None:
    """The scenario argument, --runner and --json of the commands on one scenario."""
    if scenario:
        sp.add_argument("scenario", help="catalog name or path to a scenario .toml")
    if runner:
        sp.add_argument("--runner", help="runner preset or module:Class (default: the scenario's)")
    sp.add_argument("--json", action="store_true", help="machine-readable output")


def console() -> Console:
    # --width applies to the whole report, not just the timeline. No markup:
    # reports carry scenario and runner text (twin/textsafe.py).
    return Console(highlight=False, soft_wrap=False, width=_width, markup=False)


def print_report(renderable: Any) -> None:
    from twin.textsafe import Sanitized

    console().print(Sanitized(renderable))


def spinner(message: str) -> Any:
    """A spinner on stderr, so stdout stays clean for --json and pipes. The
    message carries scenario and runner text: shown as text, never markup."""
    return Spinner(Console(stderr=True).status(plain_text(message)))


def plain_text(message: str) -> Any:
    from rich.text import Text

    from twin.textsafe import printable

    return Text(printable(message, one_line=True))


class Spinner:
    """rich's status, with `update(message)` taking plain text."""

    def __init__(self, status: Any) -> None:
        self.status = status

    def __enter__(self) -> Spinner:
        self.status.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.status.__exit__(*exc)

    def update(self, message: str) -> None:
        self.status.update(plain_text(message))


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def load_scenario(ref: str):  # noqa: ANN202
    from scenarios.loader import load

    return load(ref)


def timeline(trace: Any, width: int | None, compact: bool = True, **kw: Any) -> Any:
    try:
        from twin.view.timeline import render_timeline, terminal_width
    except ImportError:  # renderer not installed in this build
        return None
    return render_timeline(trace, width=width or terminal_width(), compact=compact, **kw)


def engine_layout(s: Any, runner: Any) -> dict[str, Any] | None:
    """The dispatch layout of `runner` (a preset, module:Class or class) on
    scenario `s` where its rules are not vLLM's (the `engine_layout` JSON key
    beside `derived`), else None: vLLM runners' output stays as it was."""
    from scenarios.dispatch_layout import VLLM_LAYOUT, keeps_vllm_rules
    from scenarios.runners import load_runner

    dl = getattr(load_runner(runner), "engine_rules", VLLM_LAYOUT)
    return None if keeps_vllm_rules(dl) else dl.summary(s)
