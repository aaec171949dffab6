"""Flag types shared by the sub-commands, validated while parsing (before any
scenario is loaded, any rank started or torch imported), and `BadInput`, the
error a sub-command raises for bad input (cli.py reports it as one line, exit 2).

Bounds (README, "Budgets and bounds"):
- `--timeout S` (real ranks): 1 s to 1 day. Below a second a rank cannot even
  join the process group; infinite or absurd values would overflow the
  collective timeouts handed to torch.distributed.
- `--sim-timeout S` (wall-clock budget of one simulated runner program): 0.1 s to 1 h.
- `--max-ops N` (ops per rank in one layer, simulator and real ranks): 1 to 1,000,000
  (about 1 KB of simulator state per op).
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable

from scenarios.contain import DEFAULT_MAX_OPS, DEFAULT_SIM_TIMEOUT_S, Limits

TIMEOUT_RANGE_S = (1.0, 86_400.0)
SIM_TIMEOUT_RANGE_S = (0.1, 3_600.0)
MAX_OPS_RANGE = (1, 1_000_000)


class BadInput(Exception):
    """Bad input from the user: reported as one line, exit code 2. Defined here,
    below cli.py, so sub-command modules raise it without importing cli.py."""


def seconds(lo: float, hi: float) -> Callable[[str], float]:
    """An argparse type: a finite number of seconds in [lo, hi]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
        if not math.isfinite(value) or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo:g} and {hi:g} seconds, got {text}")
        return value

    return parse


def count(lo: int, hi: int) -> Callable[[str], int]:
    """An argparse type: an integer in [lo, hi]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"must be between {lo:,} and {hi:,}, got {text}")
        return value

    return parse


def add_timeout(sp: argparse.ArgumentParser, default: float, what: str = "a real rank counts as hung") -> None:
    lo, hi = TIMEOUT_RANGE_S
    sp.add_argument("--timeout", type=seconds(lo, hi), default=default,
                    help=f"seconds before {what} (default {default:g}; {lo:g} to {hi:g})")


def add_budgets(sp: argparse.ArgumentParser) -> None:
    """--max-ops and --sim-timeout: the budgets of runner programs."""
    lo, hi = MAX_OPS_RANGE
    sp.add_argument("--max-ops", type=count(lo, hi), default=DEFAULT_MAX_OPS, metavar="N",
                    help=f"ops a runner may issue per rank in one layer (default {DEFAULT_MAX_OPS:,}); "
                         "beyond: RUNNER_ERROR")
    lo_s, hi_s = SIM_TIMEOUT_RANGE_S
    sp.add_argument("--sim-timeout", type=seconds(lo_s, hi_s), default=DEFAULT_SIM_TIMEOUT_S, metavar="S",
                    help=f"wall-clock seconds a runner program may run in the simulator "
                         f"(default {DEFAULT_SIM_TIMEOUT_S:g}); beyond: RUNNER_ERROR")


def limits_of(args: argparse.Namespace) -> Limits:
    return Limits(max_ops=getattr(args, "max_ops", DEFAULT_MAX_OPS),
                  sim_timeout_s=getattr(args, "sim_timeout", DEFAULT_SIM_TIMEOUT_S))


__all__ = ["MAX_OPS_RANGE", "BadInput", "SIM_TIMEOUT_RANGE_S", "TIMEOUT_RANGE_S", "add_budgets", "add_timeout", "count",
           "limits_of", "seconds"]
