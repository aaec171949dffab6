"""What the commands that run real ranks share: the start-up and real-run
flags, the scenario checked before torch is imported, the first-use
calibration of the cpu profile, and the real run skipped when the simulated
runner was stopped by a budget.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from twin.cli_flags import BadInput, add_budgets, add_timeout, seconds
from twin.cli_output import load_scenario, spinner

STARTUP_TIMEOUT_S = 120.0  # real.startup.DEFAULT_STARTUP_TIMEOUT_S


def add_startup_flag(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--startup-timeout", type=seconds(1e-3, 86_400.0), default=STARTUP_TIMEOUT_S, metavar="S",
                    help=f"seconds the rank processes may take to start (spawn, rendezvous, process groups), "
                         f"apart from --timeout; failing to start exits 3 (default {STARTUP_TIMEOUT_S:g})")


def add_real_flags(sp: argparse.ArgumentParser) -> None:
    add_timeout(sp, 60.0, "a real run (after start-up) counts as hung")
    add_startup_flag(sp)
    sp.add_argument("--kernel", help="routed kernel for the real run: torch, triton, flashinfer")
    add_budgets(sp)  # every command with a real run simulates the runner first


def real_scenario(args: argparse.Namespace, real: bool = True):  # noqa: ANN202
    """The scenario of a command that may run real ranks, validated without
    importing torch (a one-line error must not cost seconds)."""
    s = load_scenario(args.scenario)
    if getattr(args, "kernel", None):
        from moe_twin_kernels import KERNELS

        if args.kernel not in KERNELS:
            raise BadInput(f"--kernel: unknown kernel {args.kernel!r} (known: {', '.join(KERNELS)})")
        s = s.with_(kernel=args.kernel)
    if real:
        from real.sizes import check_fits, check_kernel_device

        check_fits(s)
        check_kernel_device(s.kernel)
        resolve_runner(args, s)
        startup_timeout(args, apply=args.command != "timeline" or args.real)
    return s


def resolve_runner(args: argparse.Namespace, s: Any) -> None:
    """An unknown runner, or a user's runner that cannot be loaded, is bad
    input refused before torch is imported or the cpu profile calibrated (the
    simulator would refuse it too, after seconds of both)."""
    from scenarios.runners import load_runner

    load_runner(getattr(args, "runner", None) or s.runner)


def autocalibrate(args: argparse.Namespace) -> bool:
    """The first real use on this machine calibrates the cpu profile the
    simulated CPU timeline is drawn with (real/autocal.py): said on stderr,
    with progress; a failure is one line and the command goes on. True when
    it ran (a cpu-profile simulation made before it is stale)."""
    from real import autocal

    why = autocal.reason_to_calibrate()
    if why is None:
        return False
    print(f"moe-twin: {why}: calibrating the cpu profile now, once (~15-30 s; "
          f"{autocal.OPT_OUT}=1 skips it)", file=sys.stderr)
    with spinner("calibrating the cpu profile...") as status:
        note = autocal.calibrate_now(progress=lambda m: status.update(f"calibrating the cpu profile: {m}"),
                                     timeout_s=getattr(args, "timeout", None) or 120.0)
    print(f"moe-twin: {note}", file=sys.stderr)
    return True


def startup_timeout(args: argparse.Namespace, apply: bool = True) -> None:
    """--startup-timeout bounds rank start-up (spawn, rendezvous, groups) on
    its own, so --timeout bounds only the run (validated while parsing)."""
    if apply:
        from real.startup import set_default_startup_timeout

        set_default_startup_timeout(args.startup_timeout)


def budget_stop(trace: Any) -> str | None:
    from scenarios import contain

    return contain.budget_stop(trace.notes)


def skipped_real(s: Any, sim: Any, reason: str) -> Any:
    """The real trace of a run not made: the simulated runner exceeded a budget."""
    from scenarios.trace import Trace

    return Trace(source="real", scenario=s.name, runner=sim.runner, world=s.world,
                 notes=[f"real run skipped: the runner was stopped by a budget in the simulator ({reason})"])
