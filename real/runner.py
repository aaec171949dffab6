"""Run a scenario on real rank processes and assemble the measured Trace."""

from __future__ import annotations

import atexit
from dataclasses import dataclass, field
from typing import Any

from real.errors import (
    RunnerUsageError,
    failure_hazards,
    internal_error,
    rank_failures,
    usage_error,
)
from real.model import check_fits
from scenarios import contain
from scenarios.dispatch_layout import VLLM_LAYOUT, engine_scenario
from scenarios.runners import MoERunner, load_runner, prepare_runner, runner_label
from scenarios.spec import Scenario
from scenarios.trace import Hazard, HazardKind, Step, Trace
from scenarios.whatif import Removed
from sim.hazards import overlap_us

_POOLS: dict[int, Any] = {}
# Pool generations already prepared for a scenario shape: (pool, start, tp, dp, moe_ep, kernel).
_PREPARED: set[tuple[int, int, int, int, int, str]] = set()

__all__ = ["RealResult", "RunnerUsageError", "close_pools", "get_pool", "resolve_kernel", "run_real"]


def resolve_kernel(scenario: Scenario, kernel: str | None) -> str:
    """The routed kernel a real run uses: explicit, the scenario's, or the
    device default for "auto" (torch on CPU, triton on CUDA)."""
    import torch

    from moe_twin_kernels import KERNELS, default_kernel

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


def start_ranks(pool: Any, s: Scenario, kernel: str) -> None:
    """Start-up under its own timeout (the pool's `startup_timeout_s`), apart
    from the run's: spawn, rendezvous, group init, then this scenario shape's
    process groups and kernel import. Raises `PoolStartupError` (infrastructure)."""
    from real.pool import PoolStartupError, RankFailure, startup_cause
    from real.worker import prepare_rank

    pool.start()
    key = (id(pool), pool.starts, s.parallel.tp, s.parallel.dp, s.moe_ep, kernel)
    if key in _PREPARED:
        return
    limit = pool.startup_timeout_s
    try:
        pool.run(prepare_rank, s, kernel, timeout_s=limit)
    except RankFailure as exc:
        cause = "preparing process groups and the kernel: " + startup_cause(exc.failures, exc.notes)
        raise PoolStartupError(pool.world_size, limit, cause, exc.failures, exc.notes) from exc
    _PREPARED.add(key)


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
    without: Removed | None = None,
) -> RealResult:
    """Execute the runner program on `scenario.world` real ranks.

    `prediction` (a simulator Trace with values) gives the shapes of ops
    issued on auxiliary streams and the values to fit at every step.
    `timeout_s` bounds the run itself; rank start-up has its own timeout (the
    pool's) and fails with `real.pool.PoolStartupError`. A runner that misuses
    Ops raises `RunnerUsageError` (rank and step named), not a finding.
    `without` removes one collective from the program on every rank (a what-if
    run; `prediction` should then be the what-if's simulation)."""
    from real.pool import RankFailure

    if not timeout_s > 0:
        raise ValueError(f"timeout must be > 0 seconds, got {timeout_s}")
    ref = runner if runner is not None else scenario.runner
    cls = load_runner(ref)
    # The ranks, the weights and the exact reference all see the engine's
    # layout (the routed rows' width); vLLM's rules leave `scenario` as is.
    scenario = engine_scenario(scenario, getattr(cls, "engine_rules", VLLM_LAYOUT))
    check_fits(scenario)
    kernel = resolve_kernel(scenario, kernel)
    # Rank processes load the runner again: keep the user's spec (a file path
    # stays a file path); a class object must be importable by its name.
    spec = ref if isinstance(ref, str) else runner_label(cls)
    payload: dict[str, Any] = {"scenario": scenario, "runner": spec, "kernel": kernel, "delay": delay or {},
                               "limits": contain.limits(),  # the op budget applies on the ranks too
                               "without": without}
    if prediction is not None:
        payload["predicted"] = prediction.values
        payload["shapes"] = {
            r: {st.index: st.out_shape for st in steps if st.out_shape is not None}
            for r, steps in prediction.steps.items()
        }
    from real.worker import execute_rank

    failed = prepare_runner(cls, scenario)  # before any rank starts (e.g. the engine traces they read)
    if failed is not None:
        return _not_started(scenario, runner_label(cls), failed)
    pool = pool or get_pool(scenario.world, timeout_s)
    start_ranks(pool, scenario, kernel)
    results: dict[int, dict[str, Any]] = {}
    failures: dict[int, str] = {}
    notes_at_failure: dict[int, str] = {}
    times: dict[int, float] = {}
    try:
        for r, res in enumerate(pool.run(execute_rank, payload, timeout_s=timeout_s, failed=_reports_error)):
            results[r] = res
    except RankFailure as exc:
        results.update(exc.partial)  # the ranks that finished keep their results
        failures.update(exc.failures)
        notes_at_failure.update(exc.notes)
        times.update(exc.times)
    misuse = usage_error(results)
    if misuse is not None:
        raise misuse
    broken = internal_error(results)  # the interpreter's own bug: no finding about the runner
    if broken is not None:
        raise broken
    result = _assemble(scenario, runner_label(cls), results, failures, notes_at_failure, times)
    if without is not None:
        result.trace.notes.append(f"what-if run: {without.op} {without} removed on every rank")
    _judge_outputs(scenario, result)
    return result


def _not_started(s: Scenario, label: str, why: str) -> RealResult:
    """No rank started: the runner's prepare_program() failed in this process."""
    trace = Trace(source="real", scenario=s.name, runner=label, world=s.world)
    trace.hazards.append(Hazard(HazardKind.RUNNER_ERROR, 0, "prepare_program", 0, why))
    trace.hazards.extend(Hazard(HazardKind.RUNNER_ERROR, 0, "prepare_program", r, "not started",
                                caused_by=0) for r in range(1, s.world))
    result = RealResult(trace)
    _judge_outputs(s, result)
    return result


def _reports_error(res: Any) -> bool:
    """A rank's result that carries an error it caught (its peers may be stuck)."""
    return isinstance(res, dict) and bool(res.get("error"))


def _assemble(s: Scenario, label: str, results: dict[int, dict[str, Any]], failures: dict[int, str],
              notes: dict[int, str], times: dict[int, float] | None = None) -> RealResult:
    trace = Trace(source="real", scenario=s.name, runner=label, world=s.world)
    out = RealResult(trace, failures=failures)
    stand_ins: set[str] = set()
    # Errors by type, consequences of another rank's failure tied to it (real/errors.py).
    trace.hazards.extend(failure_hazards(rank_failures(s.world, results, failures, notes, times or {})))
    for r in range(s.world):
        res = results.get(r)
        if res is None:
            trace.steps[r] = []
            continue
        steps: list[Step] = res["steps"]
        trace.steps[r] = steps
        stand_ins.update(res["stand_ins"])
        if res["output"] is not None:
            out.outputs[r] = res["output"]
        if res["output_fit"] is not None:
            trace.outputs[r] = res["output_fit"]
        for index, name, what in res["observations"]:  # at the reader, as the simulator reports a race
            trace.hazards.append(Hazard(HazardKind.UNSAFE_OVERLAP, index, name, r, what))
        if res["error"]:
            out.errors[r] = (res["error_step"] or 0, res["error"])
        trace.notes.append(f"rank {r}: kernel {res['kernel']}")
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


# ---- ground truth: every rank's output against the exact reference ----

FAILURE_KINDS = (HazardKind.HANG, HazardKind.RUNNER_ERROR, HazardKind.SHAPE_MISMATCH)


def _judge_outputs(s: Scenario, result: RealResult) -> None:
    """Fill `trace.output_checks` for every rank (real/judge.py) and add one
    real hazard per rank whose returned output is wrong, of the check's kind,
    at the layer_output step. A rank that returned nothing is judged wrong
    with its failure as the cause; its failure hazard already reports it."""
    from real.judge import judge_output, shared_group_of
    from real.reference import exact_reference, one_thread

    trace = result.trace
    ref = exact_reference(s)
    shared_group = shared_group_of(trace)
    with one_thread():
        for r in range(s.world):
            output = result.outputs.get(r)
            failure, kind = _failure_of(result, r)
            check = judge_output(s, r, output, ref, failure, kind, shared_group)
            trace.output_checks[r] = check
            if output is not None and not check.correct:
                idx, name = _output_step(trace.steps.get(r, []))
                trace.hazards.append(Hazard(HazardKind(check.kind or HazardKind.WRONG_INPUT), idx, name, r, check.cause))


def _failure_of(result: RealResult, rank: int) -> tuple[str | None, HazardKind | None]:
    """Why `rank` has no output: its failure hazard, else the pool's word."""
    for h in result.trace.hazards:
        if h.rank == rank and h.kind in FAILURE_KINDS:
            text = f"{h.detail} (step {h.step} {h.step_name})"
            if h.caused_by is not None:
                text += f", a consequence of rank {h.caused_by}'s failure"
            return text, h.kind
    if rank in result.errors:
        step, msg = result.errors[rank]
        return f"raised {msg.splitlines()[0]} (step {step})", HazardKind.RUNNER_ERROR
    if rank in result.failures:
        return f"rank {result.failures[rank]}", None
    return None, None


def _output_step(steps: list[Step]) -> tuple[int, str]:
    st = next((st for st in steps if st.op == "layer_output"), steps[-1] if steps else None)
    return (st.index, st.name) if st is not None else (0, "layer_output")
