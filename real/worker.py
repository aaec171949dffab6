"""What each rank process runs for one scenario (called through the pool)."""

from __future__ import annotations

import os
import sys
import time
import traceback
from typing import Any

import torch.distributed as dist

from real.errors import error_kind, root_cause
from real.fit import fit_value
from real.model import Reference
from real.ops import RealOps
from real.reference import one_thread
from scenarios import contain
from scenarios.dispatch_layout import VLLM_LAYOUT
from scenarios.runners import load_runner, run_program
from scenarios.spec import Scenario
from scenarios.whatif import without_collective

# Process groups by member ranks, kept for the worker's life: every scenario's
# groups are created once, new ones only when a scenario needs them.
_GROUPS: dict[tuple[int, ...], Any] = {}


def _groups(s: Scenario) -> dict[tuple[int, ...], Any]:
    """Process groups for every TP, DP, MoE-EP and MoE-TP group (EP spans the
    world); every rank creates the missing ones in the same order
    (torch.distributed requires it: all ranks run the same scenarios)."""
    world = s.world
    members: list[tuple[int, ...]] = []
    for r in range(world):
        for kind in ("tp", "dp", "moe_ep", "moe_tp"):
            g = s.group(kind, r)
            if g not in members:
                members.append(g)
    full = tuple(range(world))
    if full not in members:
        members.append(full)
    for g in members:
        if g not in _GROUPS:
            _GROUPS[g] = dist.new_group(list(g)) if len(g) > 1 else None
    return _GROUPS


def _kernel(name: str):  # noqa: ANN202
    from moe_twin_kernels import get_kernel

    return get_kernel(name)


def prepare_rank(rank: int, world: int, s: Scenario, kernel_name: str) -> None:
    """Start-up work of a scenario's shape, done once per pool generation under
    the start-up timeout: process groups (a store rendezvous each) and the kernel."""
    _groups(s)
    _kernel(kernel_name)


def _stdout_to_stderr() -> None:
    """Runner code's prints must not reach the CLI's stdout (a --json document):
    a rank's file descriptor 1 is the CLI's, so point it (and sys.stdout) at stderr."""
    global _STDOUT_MOVED
    if _STDOUT_MOVED:
        return
    sys.stdout.flush()
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    _STDOUT_MOVED = True


_STDOUT_MOVED = False


def execute_rank(rank: int, world: int, payload: dict[str, Any]) -> dict[str, Any]:
    """Run the runner program on this rank; return steps, fits, output, notes."""
    s: Scenario = payload["scenario"]
    if world != s.world:
        raise RuntimeError(f"pool has {world} ranks but the scenario needs {s.world}")
    from real.errors import DRAINING_NOTE
    from real.pool import FINISHING_NOTE, note

    _stdout_to_stderr()
    contain.set_limits(payload.get("limits") or contain.Limits())  # --max-ops of this run

    groups = _groups(s)
    runner_cls = load_runner(payload["runner"])
    if payload.get("without") is not None:  # a what-if run: one collective removed
        runner_cls = without_collective(runner_cls, payload["without"])
    kernel_name = payload.get("kernel") or s.kernel_choice  # run_real resolves "auto" by device
    kernel = _kernel(kernel_name)
    delay = payload.get("delay") or {}
    predicted: dict[int, Any] = payload.get("predicted", {}).get(rank, {})
    shapes: dict[int, tuple[int, ...]] = payload.get("shapes", {}).get(rank, {})
    # Common time origin: every rank leaves the barrier at about the same moment.
    if world > 1:
        dist.barrier(group=groups[tuple(range(world))])
    t0 = time.perf_counter()
    ops = RealOps(s, rank, groups, kernel, t0, shapes, delay, note,
                  dispatch_layout=getattr(runner_cls, "engine_rules", VLLM_LAYOUT))
    raised: BaseException | None = None
    raised_at: float | None = None
    pid = os.getpid()
    try:
        run_program(runner_cls, s, ops)
    except BaseException as exc:  # SystemExit / KeyboardInterrupt too: SIGINT is ignored on ranks
        raised, raised_at = exc, time.time()
    if os.getpid() != pid:  # a process runner code forked, back in the rank's code: not a rank
        os._exit(0)
    note(DRAINING_NOTE)  # tool code from here: a hang now is not in runner code
    ops.close()  # drains the stream threads (a failure there is recorded in ops.failed)
    note(f"{FINISHING_NOTE}: fits and output")  # past every collective: no failure grace for us
    failure = _failure(ops, raised, raised_at, bool(payload.get("traceback")))
    with one_thread():  # small float64 products: a second intra-op thread only spins on a busy machine
        _fit_steps(s, ops, predicted)
    out = ops.output.data.cpu() if ops.output is not None and ops.output.data is not None else None
    output_fit = None
    if out is not None and ops.output is not None:
        output_fit = ops.steps[ops.output.step].value
    return {
        "rank": rank,
        "steps": ops.steps,
        **failure,
        "output": out,
        "output_fit": output_fit,
        "observations": ops.observations,
        "stand_ins": sorted(ops.stand_ins),
        "kernel": kernel_name,
    }


def _fit_steps(s: Scenario, ops: RealOps, predicted: dict[int, Any]) -> None:
    """Fit each step's real tensor against the simulator's predicted value
    (float64 partials, real/fit.py); the result goes on the step."""
    ref = Reference(s, ops.weights)  # the weights this rank already generated
    for idx, value in predicted.items():
        t = ops.tensors.get(idx)
        snap = t.extra.get("snapshot") if t is not None else None
        if t is None or snap is None or idx >= len(ops.steps):
            continue
        fitted = fit_value(ref, value, snap.cpu(), t.space)
        if fitted is not None:
            ops.steps[idx].value, ops.steps[idx].residual = fitted


def _failure(ops: RealOps, raised: BaseException | None, raised_at: float | None, with_traceback: bool) -> dict[str, Any]:
    """The rank's failure, if any: the earliest-issued failing step (the
    simulator raises at issue time, so a failure on an auxiliary stream comes
    before a later main-stream error it caused), else what the program raised
    outside any step (then it counts as after the last step).

    Keys: error ("Class: message"), error_step, error_class, error_kind (see
    real/errors.py), error_at (wall-clock seconds, to order the ranks'
    failures) and error_outside_step (raised by the program between steps)."""
    exc: BaseException | None = None
    step: int | None = None
    outside = False
    own = {i: e for i, e in ops.failed.items() if root_cause(e)[1] is None}
    if own:
        step = min(own)
        exc = own[step]
    elif raised is not None:
        exc, step = root_cause(raised)
        if step is None:
            outside = True
            step = ops.steps[-1].index if ops.steps else 0
    if exc is None:
        return {"error": None, "error_step": None, "error_class": None, "error_kind": None,
                "error_at": None, "error_outside_step": False}
    error = f"{type(exc).__name__}: {exc}"
    if step < len(ops.steps) and not ops.steps[step].error:
        ops.steps[step].error = error
    if with_traceback:
        error += "\n" + "".join(traceback.format_exception(exc))
    return {"error": error, "error_step": step, "error_class": type(exc).__name__,
            "error_kind": error_kind(exc), "error_at": raised_at or time.time(), "error_outside_step": outside}
