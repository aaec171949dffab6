"""Exceptions of the simulator."""

from __future__ import annotations

import os
from pathlib import Path

from scenarios.ops import OpsShapeError, OpsUsageError


class SimShapeError(OpsShapeError):
    """Raised inside a runner program where the real op would raise."""


class CollectiveFailed(RuntimeError):
    """Members of a collective disagreed (op or shape): real gloo/NCCL would fail."""


class RunnerUsageError(OpsUsageError):
    """A runner called an Ops method wrongly (unknown group, a non-tensor
    argument, waiting on something that is not an event). Raised by
    `sim.simulate` instead of a finding: the runner's code is wrong whatever
    the configuration, so there is nothing to predict. One line: the step
    (the runner's name for the call), the rank and the misuse."""

    def __init__(self, step: str, rank: int, misuse: str, runner: str = "") -> None:
        who = f"runner {runner} " if runner else "runner "
        super().__init__(f"{who}misuses Ops at step {step} (rank {rank}): {misuse}")
        self.step = step
        self.rank = rank
        self.misuse = misuse


_SIM_DIR = str(Path(__file__).resolve().parent) + os.sep


def raised_inside_simulator(exc: BaseException) -> str:
    """" (raised inside the simulator at sim/x.py:12: ...)" when the innermost
    frame of exc is the simulator's own code, else "": a runner's exception
    that the simulator raised may be the simulator's bug, and says so."""
    tb = exc.__traceback__
    last = None
    while tb is not None:
        last, tb = tb, tb.tb_next
    if last is None or not last.tb_frame.f_code.co_filename.startswith(_SIM_DIR):
        return ""
    where = f"sim/{Path(last.tb_frame.f_code.co_filename).name}:{last.tb_lineno}"
    return f" (raised inside the simulator at {where}: the runner's misuse or the simulator's own bug)"
