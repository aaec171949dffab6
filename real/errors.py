"""Errors of real runs, classified by type (never by message words).

A rank's failure is one of four kinds, decided by the exception's class:

- "shape":      `scenarios.ops.OpsShapeError`, raised by the real Ops exactly
                where the simulator raises its own (a SHAPE_MISMATCH finding);
- "usage":      `scenarios.ops.OpsUsageError`, the runner called an Ops method
                wrongly (a mistake in the runner's code, not a finding: the run
                stops with `RunnerUsageError`);
- "collective": `CollectiveFailure`, a torch.distributed call failed (a peer
                closed the connection, the collective was aborted or timed out);
- "internal":   a Python programming error (IndexError, KeyError, ...) raised
                inside an op's own function, which runs the twin's code and
                torch only, never runner code: a bug of the real interpreter,
                which the command reports as such (exit 3), not as a finding;
- "runner":     anything else the runner program raised (a RUNNER_ERROR).

An op whose input came from a failed step (on another stream) raises
`UpstreamFailure`; the failure is the upstream step's, not the consumer's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from scenarios.ops import OpsShapeError, OpsUsageError
from scenarios.trace import Hazard, HazardKind

SHAPE, USAGE, COLLECTIVE, RUNNER, INTERNAL = "shape", "usage", "collective", "runner", "internal"
# What a bug in the twin's own code raises (torch's errors are RuntimeError or ValueError).
PROGRAMMING_ERRORS = (IndexError, KeyError, AttributeError, NameError, ZeroDivisionError, AssertionError, TypeError)
# Set on an exception raised inside an op's function (real/ops.py), where no runner code runs.
IN_OP = "_moe_twin_in_op"


class TwinInternalError(RuntimeError):
    """The real interpreter itself failed on a rank (its bug, not the runner's)."""


class CollectiveFailure(RuntimeError):
    """A torch.distributed call failed (peer gone, collective aborted or timed out)."""


class UpstreamFailure(RuntimeError):
    """An op's input was produced by a step that failed: carries that step and its error."""

    def __init__(self, step: int, cause: BaseException) -> None:
        self.step = step
        self.cause = cause
        super().__init__(f"input from step {step} failed: {type(cause).__name__}: {cause}")

    def __reduce__(self) -> tuple:
        return (UpstreamFailure, (self.step, self.cause))


class RunnerUsageError(OpsUsageError):
    """A real run stopped because the runner misused Ops (rank and step named)."""


def root_cause(exc: BaseException) -> tuple[BaseException, int | None]:
    """The exception that really failed and its step, if `exc` only relays it."""
    step = None
    while isinstance(exc, UpstreamFailure):
        step, exc = exc.step, exc.cause
    return exc, step


def error_kind(exc: BaseException) -> str:
    """One of SHAPE, USAGE, COLLECTIVE, RUNNER (see the module docstring)."""
    exc, _ = root_cause(exc)
    if isinstance(exc, OpsShapeError):
        return SHAPE
    if isinstance(exc, OpsUsageError):
        return USAGE
    if isinstance(exc, CollectiveFailure):
        return COLLECTIVE
    if isinstance(exc, PROGRAMMING_ERRORS) and getattr(exc, IN_OP, False):
        return INTERNAL
    return RUNNER


# ---- failures of a run, across ranks ----
#
# Root-cause rule. A rank's failure is *primary* when the rank raised a
# non-communication error (shape or runner kind), its process died (or the
# pool could not get its result at all), or it was stopped in runner code
# between ops (its note ends in RETURNED). It is a *consequence* when the rank
# failed only through communication: a collective failure (a peer closed the
# connection, a collective aborted), or the pool stopped it still running after
# a peer had failed (blocked in a collective the failed peer never reached).
# Every consequence is attributed to the primary failure noticed first (by
# wall-clock time: the rank's own time of the error, or when the parent noticed
# the death), `Hazard.caused_by = <that rank>`, and says so in its detail. With
# no primary failure nothing is attributed: a rank that times out on its own
# is a HANG, a collective failure alone is a RUNNER_ERROR.


@dataclass
class RankFailureInfo:
    """What one failed rank did, as far as the parent can tell."""

    rank: int
    primary: bool
    kind: HazardKind
    step: int
    step_name: str
    detail: str
    at: float  # wall-clock seconds; inf when unknown
    cause: str  # how a consequence names this rank's failure ("rank 1 dying at step 7 x")


# The tail of a rank's progress note once an op has returned to runner code.
RETURNED = " (returned)"
DRAINING_NOTE = "draining its streams"  # after the program: the rank waits for its stream threads


def _note_step(text: str) -> tuple[int, str]:
    """(index, name) from a progress note "step 12 final_all_reduce"."""
    parts = text.removesuffix(RETURNED).split(" ", 2)
    if len(parts) >= 3 and parts[0] == "step" and parts[1].isdigit():
        return int(parts[1]), parts[2]
    return 0, text or "?"


def _from_result(rank: int, res: dict[str, Any]) -> RankFailureInfo:
    steps = res["steps"]
    idx = res["error_step"] or 0
    name = steps[idx].name if idx < len(steps) else "?"
    msg = res["error"].splitlines()[0]
    kind = res.get("error_kind") or RUNNER
    where = "after" if res.get("error_outside_step") else "at"
    at = res.get("error_at") or math.inf
    if kind == COLLECTIVE:
        return RankFailureInfo(rank, False, HazardKind.RUNNER_ERROR, idx, name, f"collective failed: {msg}", at,
                               f"rank {rank} losing a collective at step {idx} {name}")
    hz = HazardKind.SHAPE_MISMATCH if kind == SHAPE else HazardKind.RUNNER_ERROR
    return RankFailureInfo(rank, True, hz, idx, name, f"raised {msg}", at,
                           f"rank {rank} raising {res.get('error_class') or msg.split(':')[0]} {where} step {idx} {name}")


def _from_pool(rank: int, why: str, note: str, at: float | None) -> RankFailureInfo:
    idx, name = _note_step(note)
    shown = f"runner code after {note.removesuffix(RETURNED)}" if note.endswith(RETURNED) else note
    detail = f"rank {why}" + (f" (last at {shown})" if note else "")
    where = f" at step {idx} {name}" if note else ""
    first = why.partition("\n")[0]
    if why.startswith("timed out"):
        if note.endswith(RETURNED) and "after rank" not in first:
            # Stopped in runner code between ops (a loop, a sleep): its own
            # hang, and the cause of its peers' waiting in a collective.
            return RankFailureInfo(rank, True, HazardKind.HANG, idx, name, detail, at or math.inf,
                                   f"rank {rank} hanging in runner code after step {idx} {name}")
        # Stopped still running: blocked (usually in a collective), or a
        # peer's failure cut the run short ("... after rank N failed").
        return RankFailureInfo(rank, False, HazardKind.HANG, idx, name, detail, at or math.inf,
                               f"rank {rank} hanging{where}")
    verb = "dying" if first.startswith("died") else f"failing ({first})"
    return RankFailureInfo(rank, True, HazardKind.RUNNER_ERROR, idx, name, detail, at or math.inf,
                           f"rank {rank} {verb}{where}")


def rank_failures(world: int, results: dict[int, dict[str, Any]], failures: dict[int, str],
                  notes: dict[int, str], times: dict[int, float]) -> list[RankFailureInfo]:
    """Every rank that failed, from its result (an error it caught) or from
    the pool (it died, raised outside the program, or was stopped)."""
    out = []
    for r in range(world):
        res = results.get(r)
        if res is None:
            out.append(_from_pool(r, failures.get(r, "no result"), notes.get(r, ""), times.get(r)))
        elif res.get("error"):
            out.append(_from_result(r, res))
    return out


def root_of(infos: list[RankFailureInfo]) -> RankFailureInfo | None:
    """The primary failure noticed first (ties: the lower rank), if any."""
    primaries = [i for i in infos if i.primary]
    return min(primaries, key=lambda i: (i.at, i.rank)) if primaries else None


def failure_hazards(infos: list[RankFailureInfo]) -> list[Hazard]:
    """One hazard per failed rank; consequences carry `caused_by` (the rule above)."""
    root = root_of(infos)
    out = []
    for i in sorted(infos, key=lambda i: (not i.primary, i.rank)):  # causes before consequences
        if i.primary or root is None:
            out.append(Hazard(i.kind, i.step, i.step_name, i.rank, i.detail))
        else:
            out.append(Hazard(i.kind, i.step, i.step_name, i.rank,
                              f"consequence of {root.cause}: {i.detail}", caused_by=root.rank))
    return out


def _first_of_kind(results: dict[int, dict[str, Any]], kind: str) -> tuple[str, str] | None:
    """("rank R at step I NAME", the error's first line) of the lowest rank
    whose failure is of `kind` ("after step" when raised between steps)."""
    for r in sorted(results):
        res = results[r]
        if res.get("error") and res.get("error_kind") == kind:
            steps = res["steps"]
            idx = res["error_step"] or 0
            name = steps[idx].name if idx < len(steps) else "?"
            where = "after" if res.get("error_outside_step") else "at"
            return f"rank {r} {where} step {idx} {name}", res["error"].splitlines()[0]
    return None


def internal_error(results: dict[int, dict[str, Any]]) -> TwinInternalError | None:
    """The real interpreter's own failure on the lowest rank that hit one."""
    found = _first_of_kind(results, INTERNAL)
    if found is None:
        return None
    return TwinInternalError(f"the real interpreter failed on {found[0]} (a bug of moe-twin, not of the runner): "
                             f"{found[1]}")


def usage_error(results: dict[int, dict[str, Any]]) -> RunnerUsageError | None:
    """The runner's misuse of Ops on the lowest rank that hit one, as one line."""
    found = _first_of_kind(results, USAGE)
    return None if found is None else RunnerUsageError(f"runner misuses Ops on {found[0]}: {found[1]}")
