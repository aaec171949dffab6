"""The SimPy model of one MoE layer's execution across ranks (torch-free)."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

from scenarios import contain
from scenarios.runners import (
    PREPARE_STOPPED,
    MoERunner,
    engine_reference,
    load_runner,
    prepare_runner,
    runner_label,
)
from scenarios.spec import Scenario
from scenarios.trace import Hazard, HazardKind, Trace
from sim import hazards as hz
from sim.cost import Profile, for_world, load_profile
from sim.engine import Simulation
from sim.errors import RunnerUsageError
from sim.redundant import redundant_collectives

__all__ = ["simulate", "Simulation", "RunnerUsageError"]

@contextmanager
def _no_cyclic_gc() -> Iterator[None]:
    """A wide world builds ~world^2 small immutable records (row blocks) that
    live until the trace is made; the cyclic collector would walk all of them
    again and again (most of the time at 1024 ranks). They hold no cycles, so
    it is paused while one scenario is simulated, its what-ifs included (the
    op and value-size budgets bound what each simulation allocates), and
    resumed after every simulation was released (Simulation.release), with
    the trace handed to the oldest generation unwalked (_promote_survivors)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            _promote_survivors()
            gc.enable()


def _promote_survivors() -> None:
    """Move what the simulation left alive (its trace) into the collector's
    oldest generation without walking it: re-enabled, the collector would
    otherwise walk every one of those records at its next young collection
    (~10% of a 256-rank simulation, ~0.5 ms of a tp=2 x dp=4 one) and again
    when promoting them. freeze() then unfreeze() is that move (two list
    splices). What the caller allocated since the last collection moves too:
    a cycle among those is freed at the next full collection instead of a
    young one. Skipped when the process keeps frozen objects of its own:
    unfreeze would hand them back to the collector."""
    if gc.get_freeze_count() == 0:
        gc.freeze()
        gc.unfreeze()


# A crash ends the layer: no what-if is priced for it (MISSING_STREAM is the
# engine's crash at a launch on a stream the platform lacks).
FATAL = {HazardKind.SHAPE_MISMATCH, HazardKind.HANG, HazardKind.RUNNER_ERROR, HazardKind.MISSING_STREAM}


def _not_simulated(scenario: Scenario, label: str, why: str) -> Trace:
    """The trace of a program never started: the runner's prepare_program()
    failed. A budget's stop is noted as one (a real run of it is skipped,
    not made to wait out the budget again)."""
    trace = Trace(source="sim", scenario=scenario.name, runner=label, world=scenario.world)
    trace.hazards.append(Hazard(HazardKind.RUNNER_ERROR, 0, "prepare_program", 0, why))
    if why.startswith(PREPARE_STOPPED):  # the note names the budget first, as a program's stop does
        trace.notes.append(f"{contain.BUDGET_NOTE}{why.removeprefix(PREPARE_STOPPED)} (in the runner's prepare_program())")
    return trace


def _run(scenario: Scenario, cls: type[MoERunner], prof: Profile, label: str) -> tuple[Simulation, Trace]:
    sim = Simulation(scenario, cls, prof, label)
    trace = sim.run()
    trace.hazards.extend(hz.detect_races(sim))
    trace.hazards.extend(hz.detect_collective_order(sim))
    trace.hazards.extend(hz.detect_forbidden_overlap(sim))
    trace.hazards.extend(hz.detect_missing_stream(sim))
    for r, steps in trace.steps.items():
        trace.overlap_us[r] = hz.overlap_us(steps)
    return sim, trace


def _trace(scenario: Scenario, cls: type[MoERunner], prof: Profile, label: str) -> Trace:
    """A what-if's trace (its simulation released at once)."""
    sim, trace = _run(scenario, cls, prof, label)
    sim.release()
    return trace


def _what_ifs(sim: Simulation, trace: Trace, cls: type[MoERunner], prof: Profile, label: str) -> None:
    """LOST_OVERLAP and REDUNDANT_COLLECTIVE, each from simulations of variants."""
    scenario = sim.scenario
    order = hz.lost_overlap_candidate(sim)
    if order is not None:
        alt = _trace(scenario, hz.with_order(cls, order), prof, label)
        alt_name = f"order {order.value}"
        if alt.latency_us >= trace.latency_us - 1e-9 or alt.hazards:
            # Forcing the order did not help (the runner's own structure
            # serialises it): compare with its engine's correct program.
            ref = engine_reference(cls)
            alt = _trace(scenario, load_runner(ref), prof, ref)
            alt_name = f"the {ref} runner"
        if not alt.hazards:
            trace.hazards.extend(hz.lost_overlap_hazards(sim, trace.latency_us, alt.latency_us, order, alt_name))
    trace.hazards.extend(redundant_collectives(sim, cls, trace, lambda c: _trace(scenario, c, prof, label)))


def simulate(
    scenario: Scenario,
    runner: str | type[MoERunner] | None = None,
    profile: str | Profile | None = None,
    what_if: bool = True,
) -> Trace:
    """Predict hazards and the timeline of `runner` (default: the scenario's) on `scenario`.

    `what_if` runs the what-if simulations LOST_OVERLAP (the best safe order)
    and REDUNDANT_COLLECTIVE (each collective removed) need.
    Raises RunnerUsageError (an OpsUsageError, a ValueError) when the runner
    calls an Ops method wrongly: that is a mistake in its code, not a finding.
    """
    cls = load_runner(runner if runner is not None else scenario.runner)
    prof = profile if isinstance(profile, Profile) else load_profile(profile or scenario.cost_profile)
    prof = for_world(prof, scenario.world)  # ranks sharing CPU cores (a no-op for GPU profiles)
    label = runner_label(cls)
    failed = prepare_runner(cls, scenario)  # outside the program's budget (e.g. tracing an engine's forward)
    if failed is not None:
        return _not_simulated(scenario, label, failed)
    with _no_cyclic_gc():
        sim, trace = _run(scenario, cls, prof, label)
        try:
            if what_if and not any(h.kind in FATAL for h in trace.hazards):
                _what_ifs(sim, trace, cls, prof, label)
        finally:
            sim.release()
            del sim  # freed here, before the collector resumes
    trace.notes.append(f"profile {prof.name}: {prof.source}")
    return trace
