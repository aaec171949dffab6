"""Run a scenario on real rank processes and assemble the measured Trace."""

from __future__ import annotations

import atexit
from dataclasses import dataclass, field
from typing import Any

from real.model import check_fits
from scenarios import contain
from scenarios.runners import MoERunner, load_runner, runner_label
from scenarios.spec import Scenario
from scenarios.trace import Hazard, HazardKind, Step, Trace
from sim.hazards import overlap_us

_POOLS: dict[int, Any] = {}

SHAPE_WORDS = ("size", "shape", "must match", "cannot be multiplied", "declared", "expects", "width")


def resolve_kernel(scenario: Scenario, kernel: str | None) -> str:
    """The routed kernel a real run uses: explicit, the scenario's, or the
    device default for "auto" (torch on CPU, triton on CUDA)."""
    import torch

    from kernels import KERNELS, default_kernel

    name = kernel or scenario.kernel
    cuda = torch.cuda.is_available()
    if name == "auto":
        name = default_kernel("cuda" if cuda else "cpu")
    if name not in KERNELS:
        raise ValueError(f"kernel: unknown kernel {name!r} (known: {', '.join(KERNELS)})")
    if name == "flashinfer" and not cuda:
        raise ValueError("kernel flashinfer: FlashInfer's cutlass MoE needs a CUDA device (SM89+); "
                         "use kernel torch or triton on CPU")
    return name


def get_pool(world: int, timeout_s: float = 60.0) -> Any:
    """A pool per world size, kept alive across scenarios (start-up paid once)."""
    from real.pool import RankPool

    pool = _POOLS.get(world)
    if pool is None:
        pool = _POOLS[world] = RankPool(world, timeout_s=timeout_s)
    return pool


def close_pools() -> None:
    for pool in _POOLS.values():
        pool.close()
    _POOLS.clear()


atexit.register(close_pools)


@dataclass
class RealResult:
    trace: Trace
    outputs: dict[int, Any] = field(default_factory=dict)  # rank -> final output tensor
    failures: dict[int, str] = field(default_factory=dict)  # rank -> how it failed (pool level)
    errors: dict[int, tuple[int, str]] = field(default_factory=dict)  # rank -> (step, message)


def run_real(
    scenario: Scenario,
    runner: str | type[MoERunner] | None = None,
    prediction: Trace | None = None,
    kernel: str | None = None,
    timeout_s: float = 60.0,
    delay: dict[str, float] | None = None,
    pool: Any = None,
) -> RealResult:
    """Execute the runner program on `scenario.world` real ranks.

    `prediction` (a simulator Trace with values) gives the shapes of ops
    issued on auxiliary streams and the values to fit at every step."""
    from real.pool import RankFailure

    check_fits(scenario)
    if not timeout_s > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout_s}")
    kernel = resolve_kernel(scenario, kernel)
    ref = runner if runner is not None else scenario.runner
    cls = load_runner(ref)
    # Rank processes load the runner again: keep the user's spec (a file path
    # stays a file path); a class object must be importable by its name.
    spec = ref if isinstance(ref, str) else runner_label(cls)
    payload: dict[str, Any] = {"scenario": scenario, "runner": spec, "kernel": kernel, "delay": delay or {},
                               "limits": contain.limits()}  # the op budget applies on the ranks too
    if prediction is not None:
        payload["predicted"] = prediction.values
        payload["shapes"] = {
            r: {st.index: st.out_shape for st in steps if st.out_shape is not None}
            for r, steps in prediction.steps.items()
        }
    from real.worker import execute_rank

    pool = pool or get_pool(scenario.world, timeout_s)
    results: dict[int, dict[str, Any]] = {}
    failures: dict[int, str] = {}
    notes_at_failure: dict[int, str] = {}
    try:
        for r, res in enumerate(pool.run(execute_rank, payload, timeout_s=timeout_s)):
            results[r] = res
    except RankFailure as exc:
        results.update(exc.partial)
        failures.update(exc.failures)
        notes_at_failure.update(exc.notes)
    return _assemble(scenario, runner_label(cls), results, failures, notes_at_failure)


def _assemble(s: Scenario, label: str, results: dict[int, dict[str, Any]], failures: dict[int, str], notes: dict[int, str]) -> RealResult:
    trace = Trace(source="real", scenario=s.name, runner=label, world=s.world)
    out = RealResult(trace, failures=failures)
    stand_ins: set[str] = set()
    for r in range(s.world):
        res = results.get(r)
        if res is None:
            why = failures.get(r, "no result")
            where = notes.get(r, "")
            step = _step_from_note(where)
            hz = HazardKind.HANG if "timed out" in why else HazardKind.RUNNER_ERROR
            trace.hazards.append(Hazard(hz, step, where.split(" ", 2)[-1] if where else "?", r,
                                        f"rank {why}" + (f" (last at {where})" if where else "")))
            trace.steps[r] = []
            continue
        steps: list[Step] = res["steps"]
        trace.steps[r] = steps
        stand_ins.update(res["stand_ins"])
        if res["output"] is not None:
            out.outputs[r] = res["output"]
        if res["output_fit"] is not None:
            trace.outputs[r] = res["output_fit"]
        elif res["output"] is not None:
            why = ("non-linear routed-output transform" if s.model.transform_nonlinear
                   else "no prediction to fit against")
            trace.notes.append(f"rank {r}: output produced but not fitted ({why})")
        for obs in res["observations"]:
            trace.hazards.append(Hazard(HazardKind.UNSAFE_OVERLAP, steps[-1].index if steps else 0, "race", r, obs))
        if res["error"]:
            idx = res["error_step"] or 0
            name = steps[idx].name if idx < len(steps) else "?"
            out.errors[r] = (idx, res["error"])
            msg = res["error"].splitlines()[0]
            kind = HazardKind.SHAPE_MISMATCH if any(w in msg for w in SHAPE_WORDS) else HazardKind.RUNNER_ERROR
            trace.hazards.append(Hazard(kind, idx, name, r, f"raised {msg}"))
        trace.notes.append(f"rank {r}: kernel {res['kernel']}")
    for coeffs_rank, coeffs in trace.outputs.items():
        for label_, c in coeffs.items():
            if abs(c - 1.0) > 1e-3:
                kind = HazardKind.DOUBLE_REDUCTION if (c > 1.0 or "[tokens" in label_) else HazardKind.MISSING_REDUCTION
                steps = trace.steps[coeffs_rank]
                idx = next((st.index for st in steps if st.op == "layer_output"), len(steps) - 1)
                trace.hazards.append(Hazard(kind, idx, "layer_output", coeffs_rank,
                                            f"measured {label_} coefficient {c:.4f}, expected 1"))
    for r, steps in trace.steps.items():
        trace.overlap_us[r] = overlap_us(steps)
        if steps:
            trace.latency_us = max(trace.latency_us, max(st.end for st in steps))
    trace.notes.extend(f"stand-in: {x}" for x in sorted(stand_ins))
    # Mirror the simulator's decision record.
    for st in trace.steps.get(0, []):
        if st.op == "decide":
            trace.decisions[st.name] = st.detail
    return out


def _step_from_note(text: str) -> int:
    parts = text.split()
    if len(parts) >= 2 and parts[0] == "step" and parts[1].isdigit():
        return int(parts[1])
    return 0
