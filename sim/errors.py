"""Exceptions of the simulator."""

from __future__ import annotations

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
