"""Sim vs real vs the exact reference: a verdict for every predicted hazard.

The rules (what CONFIRMED, REFUTED, INCONCLUSIVE and UNPREDICTED mean) live
in twin/verdicts.py; races in twin/races.py. This module runs the legs:
simulate, run on real ranks (each rank's output judged against the exact
reference, real/reference.py), then judge each predicted hazard and list
what reality showed that the simulator did not predict. The first divergent
step is where op, shape, error or fitted coefficients first disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scenarios.spec import Scenario
from scenarios.trace import Hazard, HazardKind, Trace
from sim import simulate
from twin.check.races import judge_race
from twin.check.verdicts import (
    REDUCTIONS,
    RESIDUAL_OK,
    VerdictItem,
    coeffs_match,
    judge_characterised,
    judge_failure,
    judge_lost_overlap,
    judge_missing_stream,
    judge_reduction,
    judge_redundant_collective,
    lost_overlap_on_wrong_output,
    predicted_coeffs,
    unpredicted,
    wrong_ranks,
)


@dataclass
class CheckResult:
    scenario: Scenario
    sim: Trace
    real: Trace
    verdicts: list[VerdictItem] = field(default_factory=list)
    divergence: tuple[int, int, str] | None = None  # rank, step, what
    fixed_real: Trace | None = None
    # The simulated timeline on the cpu profile, comparable with the real one
    # (predictions use the scenario's profile, e.g. h100).
    timeline_sim: Trace | None = None
    fixed_overlap_us: dict[int, float] | None = None  # best measured overlap of the fixed runner
    race_runs: dict[str, Any] = field(default_factory=dict)  # perturbed runs shared by race verdicts
    whatif_runs: dict[Any, Trace] = field(default_factory=dict)  # real runs with one collective removed

    @property
    def real_clean(self) -> bool:
        """No real failure and every rank's output equals the reference."""
        return not self.real.hazards and not wrong_ranks(self.real)

    @property
    def agree(self) -> bool:
        """Sim and real agree, and reality is right: no divergent step, no
        REFUTED or UNPREDICTED verdict, every rank's output equals the
        reference. Never true while any rank's output is wrong."""
        return self._verdicts_hold and not wrong_ranks(self.real)

    @property
    def confirmed_as_predicted(self) -> bool:
        """Some output is wrong, and every wrong output is one the simulator
        predicted and the real run confirmed (no divergence, nothing refuted
        or unpredicted)."""
        bad = wrong_ranks(self.real)
        confirmed = {v.rank for v in self.verdicts if v.verdict.value == "CONFIRMED"}
        return bool(bad) and self._verdicts_hold and set(bad) <= confirmed

    @property
    def _verdicts_hold(self) -> bool:
        return self.divergence is None and not any(
            v.verdict.value in ("UNPREDICTED", "REFUTED") for v in self.verdicts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name,
            "runner": self.sim.runner,
            "predicted": [h.to_dict() for h in self.sim.hazards],
            "observed": [h.to_dict() for h in self.real.hazards],
            "verdicts": [v.to_dict() for v in self.verdicts],
            "real_output": self.real.real_output(),
            "agree": self.agree,
            "confirmed_as_predicted": self.confirmed_as_predicted,
            "first_divergence": (
                {"rank": self.divergence[0], "step": self.divergence[1], "what": self.divergence[2]}
                if self.divergence else None
            ),
            "sim": self.sim.to_dict(with_steps=True),
            "real": self.real.to_dict(with_steps=True),
        }


OPAQUE_FROM = (HazardKind.WRONG_INPUT, HazardKind.UNSAFE_OVERLAP)


def first_divergence(sim: Trace, real: Trace, routed_scale: float = 1.0) -> tuple[int, int, str] | None:
    best: tuple[int, int, str] | None = None
    for r, ssteps in sim.steps.items():
        found = _rank_divergence(sim, real, r, ssteps, routed_scale)
        if found is not None and (best is None or found[1] < best[1]):
            best = found
    return best


def _rank_divergence(sim: Trace, real: Trace, r: int, ssteps: list, routed_scale: float) -> tuple[int, int, str] | None:
    rsteps = real.steps.get(r, [])
    if not rsteps and ssteps:
        # The rank never reported (hung or died): its steps are lost with it.
        lost = next((h for h in real.hazards if h.rank == r), None)
        if lost is not None and _predicted_failure(sim, lost):
            return None  # the failure's own verdict judges it; there are no steps to compare
        where = lost.step if lost else 0
        return (r, where, f"real rank {r} returned no steps ({lost.detail if lost else 'no result'})")
    # From a predicted wrong input or race on, the sim's values name the usual
    # sources for what is not a combination of them (or depends on the
    # schedule): compare ops, shapes and errors only.
    opaque = min((o for h in sim.hazards if h.rank == r and (o := _opaque_from(h)) is not None), default=None)
    for i, st in enumerate(ssteps):
        if i >= len(rsteps):
            if rsteps and not any(x.error for x in rsteps):
                return (r, i, f"real rank stopped before step {i} {st.name}")
            return None
        fits = opaque is None or i < opaque
        what = _step_divergence(sim, r, i, st, rsteps[i], routed_scale if fits else None)
        if what is not None:
            return (r, i, what)
    return None


def _opaque_from(h: Hazard) -> int | None:
    """The first step whose value a predicted hazard makes opaque, or None:
    its own (a wrong input, a race), a race's earlier access (a reader early
    in program order may run after the writer), an over-counted input's
    non-linear consumer."""
    own = h.step if h.kind in OPAQUE_FROM else None
    return min((s for s in (own, h.opaque_from) if s is not None), default=None)


def _predicted_failure(sim: Trace, lost: Hazard) -> bool:
    """The simulator predicted this rank's failure, of this kind, at this step
    (e.g. a HANG in a collective a peer never reaches)."""
    return any(h.kind == lost.kind and h.rank == lost.rank and h.step == lost.step for h in sim.hazards)


def _step_divergence(sim: Trace, r: int, i: int, st: Any, rt: Any, routed_scale: float | None) -> str | None:
    """What differs at one step; coefficients only when `routed_scale` is given."""
    if (rt.op, rt.name) != (st.op, st.name):
        return f"sim {st.op}/{st.name} vs real {rt.op}/{rt.name}"
    if bool(st.error) != bool(rt.error):
        return f"error: sim {st.error or 'none'} vs real {rt.error or 'none'}"
    if st.out_shape is not None and rt.out_shape is not None and tuple(st.out_shape) != tuple(rt.out_shape) and not st.error:
        return f"shape: sim {list(st.out_shape)} vs real {list(rt.out_shape)}"
    if rt.value is not None and routed_scale is not None:
        pred = predicted_coeffs(sim, r, i, routed_scale)
        if pred is not None and not coeffs_match(pred, rt.value):
            return f"coefficients: sim {pred} vs real {rt.value}"
        if rt.residual is not None and rt.residual > RESIDUAL_OK:
            return f"real tensor not explained by the predicted sources (residual {rt.residual:.2g})"
    return None


def check(
    scenario: Scenario,
    runner: str | None = None,
    timeout_s: float = 60.0,
    progress: Callable[[str], None] | None = None,
    fixed_real: Trace | None = None,
    prediction: Trace | None = None,
) -> CheckResult:
    """Simulate (or take `prediction`, the caller's `simulate(scenario, runner)`
    made with the same cost profile), run on real ranks, judge each hazard."""
    from real.runner import run_real

    say = progress or (lambda _m: None)
    sim = prediction if prediction is not None else simulate(scenario, runner)
    scale = scenario.model.routed_scaling_factor
    say(f"{scenario.name}: real run of {sim.runner}")
    base = run_real(scenario, runner, prediction=sim, timeout_s=timeout_s)
    real = base.trace
    result = CheckResult(scenario, sim, real, fixed_real=fixed_real)
    result.timeline_sim = cpu_timeline(scenario, runner, sim)
    for h in _dedupe(sim.hazards):
        result.verdicts.append(_judge(result, runner, base, h, scale, timeout_s, say))
    result.verdicts.extend(unpredicted(sim, real))
    result.divergence = first_divergence(sim, real, scale)
    return result


def _judge(result: CheckResult, runner: str | None, base: Any, h: Hazard, scale: float,
           timeout_s: float, say: Callable[[str], None]) -> VerdictItem:
    sim, real, scenario = result.sim, result.real, result.scenario
    if h.kind in REDUCTIONS:
        return judge_reduction(sim, real, h, scale, scenario)
    if h.kind in (HazardKind.WRONG_TOKENS, HazardKind.WRONG_INPUT):
        return judge_characterised(real, h)
    if h.kind == HazardKind.LOST_OVERLAP:
        on_wrong = lost_overlap_on_wrong_output(real, h)
        if on_wrong is not None:
            return on_wrong  # before the reference runner's real runs: they would decide nothing
        reference = overlap_reference(scenario, runner)
        if result.fixed_overlap_us is None:
            result.fixed_overlap_us = _fixed_overlap(scenario, result, reference, timeout_s, say)
        assert result.fixed_real is not None
        return judge_lost_overlap(real, h, result.fixed_overlap_us, result.fixed_real.latency_us, OVERLAP_TRIES,
                                  reference)
    if h.kind == HazardKind.UNSAFE_OVERLAP:
        return judge_race(scenario, runner, sim, base, h, timeout_s, say, result.race_runs)
    if h.kind == HazardKind.REDUNDANT_COLLECTIVE:
        return judge_redundant_collective(real, h, _without_run(result, runner, h, timeout_s, say))
    if h.kind == HazardKind.MISSING_STREAM:
        return judge_missing_stream(sim, real, h)
    return judge_failure(sim, real, h)


OVERLAP_TRIES = 3


def _without_run(result: CheckResult, runner: str | None, h: Hazard, timeout_s: float,
                 say: Callable[[str], None]) -> Trace:
    """The real run of the runner with the hazard's collective removed on
    every rank (one per collective, shared by its ranks' verdicts)."""
    from real.runner import run_real
    from scenarios.runners import load_runner
    from scenarios.whatif import removed_at, without_collective

    scenario = result.scenario
    target = removed_at(result.sim.steps[h.rank], h.step)
    if target not in result.whatif_runs:
        cls = without_collective(load_runner(runner or scenario.runner), target)
        say(f"{scenario.name}: real run without {target}")
        pred = simulate(scenario, cls, what_if=False)
        result.whatif_runs[target] = run_real(scenario, runner, prediction=pred, timeout_s=timeout_s,
                                               without=target).trace
    return result.whatif_runs[target]


def _fixed_overlap(scenario: Scenario, result: CheckResult, reference: str, timeout_s: float,
                   say: Callable[[str], None]) -> dict[int, float]:
    """Per rank, the best shared/routed overlap the engine's correct runner
    (`reference`; a `fixed_real` handed to check() is a run of fixed) achieves on
    real ranks. Whether two CPU threads overlap is at the mercy of the OS
    scheduler on an oversubscribed machine, so a run without overlap is
    retried (up to OVERLAP_TRIES runs); the claim checked is that the
    overlapped order is realisable here."""
    from real.runner import run_real

    best: dict[int, float] = {}
    ref_pred = simulate(scenario, reference)
    for attempt in range(OVERLAP_TRIES):
        if result.fixed_real is None or attempt > 0 or reference != "fixed":
            say(f"{scenario.name}: real run of {reference} (overlap reference {attempt + 1})")
            result.fixed_real = run_real(scenario, reference, prediction=ref_pred, timeout_s=timeout_s).trace
        for r, v in result.fixed_real.overlap_us.items():
            best[r] = max(best.get(r, 0.0), v)
        if best and all(v > 0.0 for v in best.values()):
            break
    return best


def overlap_reference(scenario: Scenario, runner: str | None) -> str:
    """The correct runner of `runner`'s engine (its dispatch rules' name):
    the overlap a LOST_OVERLAP is measured against (SGLang's and TensorRT-LLM's
    overlap their own way; vLLM's is `fixed`)."""
    from scenarios.runners import engine_reference, load_runner

    try:
        return engine_reference(load_runner(runner or scenario.runner))
    except Exception:  # noqa: BLE001 - the check already ran this runner; a reload failing keeps the default
        return "fixed"


def cpu_timeline(scenario: Scenario, runner: str | None, sim: Trace) -> Trace:
    """The simulated trace to draw beside a real CPU run: the same prediction
    re-timed with the (calibrated) cpu profile when it used another one."""
    if scenario.cost_profile == "cpu":
        return sim
    trace = simulate(scenario, runner, profile="cpu", what_if=False)
    trace.notes.append(f"timeline re-timed with the cpu profile (predictions used {scenario.cost_profile})")
    return trace


def _dedupe(hazards: list[Hazard]) -> list[Hazard]:
    """One hazard per (kind, step, rank); several ranks are judged separately."""
    seen: set[tuple[str, int, int]] = set()
    out = []
    for h in hazards:
        key = (h.kind.value, h.step, h.rank)
        if key not in seen:
            seen.add(key)
            out.append(h)
    return out


def replay_real(progress: Callable[[str], None] | None = None, timeout_s: float = 120.0) -> list[Any]:
    """Kept here for existing imports; lives in twin/replay_real.py."""
    from twin.check.replay_real import replay_real as run

    return run(progress=progress, timeout_s=timeout_s)


__all__ = ["check", "replay_real", "CheckResult", "VerdictItem"]
