"""Sim vs real, step by step: a verdict for every predicted hazard.

- DOUBLE/MISSING_REDUCTION: the real tensor at the hazard's step is fitted
  against float64 source partials; CONFIRMED when the fitted coefficients
  equal the predicted ones (1e-3), REFUTED when they are the correct ones.
- SHAPE_MISMATCH / RUNNER_ERROR: the same exception at the same step.
- HANG: the real rank timed out at the same step.
- LOST_OVERLAP: the measured shared/routed overlap is 0 while the fixed
  runner's measured overlap on the same scenario is > 0.
- UNSAFE_OVERLAP: rerun with one stream delayed; CONFIRMED when the output
  changes, else INCONCLUSIVE with the reason.
UNPREDICTED: a real failure or a wrong measured output the simulator did not
predict. The first divergent step is where shapes, errors or fitted
coefficients first disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scenarios.backends import backend_info
from scenarios.loader import load
from scenarios.spec import Scenario
from scenarios.trace import Hazard, HazardKind, Step, Trace, Verdict
from sim import simulate
from twin.replay import CaseResult

TOL = 1e-3
RESIDUAL_OK = 1e-4


@dataclass
class VerdictItem:
    kind: str
    verdict: Verdict
    reason: str
    step: int | None = None
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "verdict": self.verdict.value, "reason": self.reason,
                "step": self.step, "rank": self.rank}


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

    @property
    def real_clean(self) -> bool:
        return not self.real.hazards

    def to_dict(self) -> dict[str, Any]:
        return {
            "scenario": self.scenario.name,
            "runner": self.sim.runner,
            "predicted": [h.to_dict() for h in self.sim.hazards],
            "observed": [h.to_dict() for h in self.real.hazards],
            "verdicts": [v.to_dict() for v in self.verdicts],
            "first_divergence": (
                {"rank": self.divergence[0], "step": self.divergence[1], "what": self.divergence[2]}
                if self.divergence else None
            ),
            "sim": self.sim.to_dict(with_steps=True),
            "real": self.real.to_dict(with_steps=True),
        }


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(b))


def _coeffs_match(pred: dict[str, float], fit: dict[str, float]) -> bool:
    """Every fitted coefficient equals the predicted one (unobservable sources,
    absent from the fit, are not held against the prediction)."""
    return all(_close(c, pred.get(label, 0.0)) for label, c in fit.items())


def first_divergence(sim: Trace, real: Trace, routed_scale: float = 1.0) -> tuple[int, int, str] | None:
    best: tuple[int, int, str] | None = None
    for r, ssteps in sim.steps.items():
        rsteps = real.steps.get(r, [])
        if not rsteps and ssteps:
            # The rank never reported (hung or died): its steps are lost with it.
            lost = next((h for h in real.hazards if h.rank == r), None)
            where = lost.step if lost else 0
            what = f"real rank {r} returned no steps ({lost.detail if lost else 'no result'})"
            if best is None or where < best[1]:
                best = (r, where, what)
            continue
        for i, st in enumerate(ssteps):
            what = None
            if i >= len(rsteps):
                if rsteps and not any(x.error for x in rsteps):
                    what = f"real rank stopped before step {i} {st.name}"
                break
            rt = rsteps[i]
            if (rt.op, rt.name) != (st.op, st.name):
                what = f"sim {st.op}/{st.name} vs real {rt.op}/{rt.name}"
            elif bool(st.error) != bool(rt.error):
                what = f"error: sim {st.error or 'none'} vs real {rt.error or 'none'}"
            elif st.out_shape is not None and rt.out_shape is not None and tuple(st.out_shape) != tuple(rt.out_shape) and not st.error:
                what = f"shape: sim {list(st.out_shape)} vs real {list(rt.out_shape)}"
            elif rt.value is not None:
                pred = _predicted_coeffs(sim, r, i, routed_scale)
                if pred is not None and not _coeffs_match(pred, rt.value):
                    what = f"coefficients: sim {pred} vs real {rt.value}"
                elif rt.residual is not None and rt.residual > RESIDUAL_OK:
                    what = f"real tensor not explained by the predicted sources (residual {rt.residual:.2g})"
            if what is not None:
                if best is None or i < best[1]:
                    best = (r, i, what)
                break
    return best


def _predicted_coeffs(sim: Trace, rank: int, step: int, routed_scale: float) -> dict[str, float] | None:
    """Predicted coefficients in the unit the real fit measures (partials
    include the intended routed scaling factor)."""
    from sim import algebra

    value = sim.values.get(rank, {}).get(step)
    if value is None:
        return None
    return algebra.coefficients(value, {"routed": routed_scale, "shared": 1.0})


def _real_step(real: Trace, rank: int, step: int) -> Step | None:
    steps = real.steps.get(rank, [])
    return steps[step] if step < len(steps) else None


def _verdict_reduction(sim: Trace, real: Trace, h: Hazard, routed_scale: float) -> VerdictItem:
    # Judge at the hazard's step and, for missing reductions, at the output.
    rt = _real_step(real, h.rank, h.step)
    if rt is None:
        return VerdictItem(h.kind.value, Verdict.INCONCLUSIVE, "the real rank never reached this step", h.step, h.rank)
    if rt.value is None:
        why = rt.error or "no fit at this step (rows differ from the prediction or a non-linear transform)"
        return VerdictItem(h.kind.value, Verdict.INCONCLUSIVE, why, h.step, h.rank)
    pred = _predicted_coeffs(sim, h.rank, h.step, routed_scale) or {}
    fit = rt.value
    shown = ", ".join(f"{k}={v:g}" for k, v in sorted(fit.items()))
    if _coeffs_match(pred, fit) and (rt.residual or 0.0) <= RESIDUAL_OK:
        return VerdictItem(h.kind.value, Verdict.CONFIRMED, f"measured {shown} (residual {rt.residual:.1e})", h.step, h.rank)
    if all(_close(v, 1.0) for v in fit.values()):
        return VerdictItem(h.kind.value, Verdict.REFUTED, f"measured {shown}: reduced exactly once", h.step, h.rank)
    return VerdictItem(h.kind.value, Verdict.REFUTED, f"measured {shown}, predicted {pred}", h.step, h.rank)


def _verdict_error(real: Trace, h: Hazard, kinds: tuple[HazardKind, ...]) -> VerdictItem:
    obs = [o for o in real.hazards if o.rank == h.rank and o.kind in kinds]
    same = [o for o in obs if o.step == h.step]
    if same:
        return VerdictItem(h.kind.value, Verdict.CONFIRMED, f"real {same[0].detail} at step {h.step} {same[0].step_name}", h.step, h.rank)
    if obs:
        o = obs[0]
        return VerdictItem(h.kind.value, Verdict.REFUTED, f"real failed at step {o.step} {o.step_name} instead: {o.detail}", h.step, h.rank)
    return VerdictItem(h.kind.value, Verdict.REFUTED, "the real run did not fail here", h.step, h.rank)


def _outputs_differ(a: dict[int, Any], b: dict[int, Any]) -> float:
    worst = 0.0
    for r, ta in a.items():
        tb = b.get(r)
        if tb is None or tuple(ta.shape) != tuple(tb.shape):
            return float("inf")
        worst = max(worst, float((ta - tb).abs().max()))
    return worst


def check(
    scenario: Scenario,
    runner: str | None = None,
    timeout_s: float = 60.0,
    progress: Callable[[str], None] | None = None,
    fixed_real: Trace | None = None,
) -> CheckResult:
    from real.runner import run_real

    say = progress or (lambda _m: None)
    sim = simulate(scenario, runner)
    scale = scenario.model.routed_scaling_factor
    say(f"{scenario.name}: real run of {sim.runner}")
    base = run_real(scenario, runner, prediction=sim, timeout_s=timeout_s)
    real = base.trace
    result = CheckResult(scenario, sim, real, fixed_real=fixed_real)
    result.timeline_sim = cpu_timeline(scenario, runner, sim)
    for h in _dedupe(sim.hazards):
        if h.kind in (HazardKind.DOUBLE_REDUCTION, HazardKind.MISSING_REDUCTION):
            result.verdicts.append(_verdict_reduction(sim, real, h, scale))
        elif h.kind == HazardKind.SHAPE_MISMATCH:
            result.verdicts.append(_verdict_error(real, h, (HazardKind.SHAPE_MISMATCH, HazardKind.RUNNER_ERROR, HazardKind.HANG)))
        elif h.kind == HazardKind.RUNNER_ERROR:
            result.verdicts.append(_verdict_error(real, h, (HazardKind.RUNNER_ERROR, HazardKind.SHAPE_MISMATCH)))
        elif h.kind == HazardKind.HANG:
            result.verdicts.append(_verdict_error(real, h, (HazardKind.HANG,)))
        elif h.kind == HazardKind.LOST_OVERLAP:
            if result.fixed_overlap_us is None:
                result.fixed_overlap_us = _fixed_overlap(scenario, result, timeout_s, say)
            mine = real.overlap_us.get(h.rank, 0.0)
            ref = result.fixed_overlap_us.get(h.rank, 0.0)
            assert result.fixed_real is not None
            detail = (f"measured overlap {mine:.0f} us (fixed: {ref:.0f} us, best of up to {OVERLAP_TRIES} runs); "
                      f"layer {real.latency_us:.0f} us vs fixed {result.fixed_real.latency_us:.0f} us")
            if mine == 0.0 and ref > 0.0:
                result.verdicts.append(VerdictItem(h.kind.value, Verdict.CONFIRMED, detail, h.step, h.rank))
            elif mine > 0.0:
                result.verdicts.append(VerdictItem(h.kind.value, Verdict.REFUTED, detail, h.step, h.rank))
            else:
                result.verdicts.append(VerdictItem(h.kind.value, Verdict.INCONCLUSIVE,
                                                   detail + ": the fixed runner did not overlap here either", h.step, h.rank))
        elif h.kind == HazardKind.UNSAFE_OVERLAP:
            result.verdicts.append(_verdict_race(scenario, runner, sim, base, h, timeout_s, say))
    _unpredicted(result)
    result.divergence = first_divergence(sim, real, scale)
    return result


OVERLAP_TRIES = 3


def _fixed_overlap(scenario: Scenario, result: CheckResult, timeout_s: float, say: Callable[[str], None]) -> dict[int, float]:
    """Per rank, the best shared/routed overlap the fixed runner achieves on
    real ranks. Whether two CPU threads overlap is at the mercy of the OS
    scheduler on an oversubscribed machine, so a run without overlap is
    retried (up to OVERLAP_TRIES runs); the claim checked is that the
    overlapped order is realisable here."""
    from real.runner import run_real

    best: dict[int, float] = {}
    fixed_pred = simulate(scenario, "fixed")
    for attempt in range(OVERLAP_TRIES):
        if result.fixed_real is None or attempt > 0:
            say(f"{scenario.name}: real run of fixed (overlap reference {attempt + 1})")
            result.fixed_real = run_real(scenario, "fixed", prediction=fixed_pred, timeout_s=timeout_s).trace
        for r, v in result.fixed_real.overlap_us.items():
            best[r] = max(best.get(r, 0.0), v)
        if best and all(v > 0.0 for v in best.values()):
            break
    return best


def cpu_timeline(scenario: Scenario, runner: str | None, sim: Trace) -> Trace:
    """The simulated trace to draw beside a real CPU run: the same prediction
    re-timed with the (calibrated) cpu profile when it used another one."""
    if scenario.cost_profile == "cpu":
        return sim
    trace = simulate(scenario, runner, profile="cpu", what_if=False)
    trace.notes.append(f"timeline re-timed with the cpu profile (predictions used {scenario.cost_profile})")
    return trace


def _verdict_race(scenario: Scenario, runner: str | None, sim: Trace, base: Any, h: Hazard, timeout_s: float, say: Callable[[str], None]) -> VerdictItem:
    from real.runner import run_real

    streams = sorted({st.stream for st in sim.steps.get(h.rank, [])})
    changed = []
    for stream in streams:
        say(f"{scenario.name}: rerun with stream '{stream}' delayed")
        pert = run_real(scenario, runner, prediction=sim, timeout_s=timeout_s, delay={stream: 0.05})
        diff = _outputs_differ(base.outputs, pert.outputs)
        if diff > 1e-5:
            changed.append(f"delaying '{stream}' changed the output (max |diff| {diff:.3g})")
    if changed:
        return VerdictItem(h.kind.value, Verdict.CONFIRMED, "; ".join(changed), h.step, h.rank)
    info = backend_info(scenario.effective_backend)
    if info.gpu_library and "overlap" in h.detail and "buffer" not in h.detail:
        reason = (f"needs real {info.gpu_library}: the CPU stand-in of {scenario.effective_backend} cannot race "
                  f"(output unchanged with each of {', '.join(streams)} delayed)")
    else:
        reason = f"output unchanged with each of {', '.join(streams)} delayed: the race was not provoked"
    return VerdictItem(h.kind.value, Verdict.INCONCLUSIVE, reason, h.step, h.rank)


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


def _unpredicted(result: CheckResult) -> None:
    predicted = {(h.kind, h.rank) for h in result.sim.hazards}
    for o in result.real.hazards:
        if (o.kind, o.rank) in predicted or o.caused_by is not None:  # a consequence is reported with its cause
            continue
        # A measured double/missing reduction is covered by any predicted reduction hazard on that rank.
        if o.kind in (HazardKind.DOUBLE_REDUCTION, HazardKind.MISSING_REDUCTION) and any(
            k in (HazardKind.DOUBLE_REDUCTION, HazardKind.MISSING_REDUCTION) and r == o.rank for k, r in predicted
        ):
            continue
        result.verdicts.append(VerdictItem(o.kind.value, Verdict.UNPREDICTED, o.detail, o.step, o.rank))


# ---- replay --real ----


@dataclass
class RealCaseResult(CaseResult):
    check_before: CheckResult | None = None
    check_fixed: CheckResult | None = None

    @property
    def fixed_real_ok(self) -> bool:
        return not self.check_fixed.real.hazards and not any(
            v.verdict == Verdict.UNPREDICTED for v in self.check_fixed.verdicts)

    @property
    def expected_verdict(self) -> Verdict | None:
        vs = [v.verdict for v in self.check_before.verdicts if v.kind == self.case.expected]
        if not vs:
            return None
        for want in (Verdict.CONFIRMED, Verdict.INCONCLUSIVE, Verdict.REFUTED):
            if want in vs:
                return want
        return vs[0]

    @property
    def real_ok(self) -> bool:
        # R5 may honestly be INCONCLUSIVE on CPU stand-ins; anything REFUTED is not ok.
        v = self.expected_verdict
        return self.fixed_real_ok and v in (Verdict.CONFIRMED, Verdict.INCONCLUSIVE)

    def real_cells(self) -> list[Any]:
        from rich.text import Text

        v = self.expected_verdict
        style = {Verdict.CONFIRMED: "bold green", Verdict.INCONCLUSIVE: "yellow"}.get(v, "bold red")
        before = Text(v.value if v else "no verdict", style=style)
        fixed = Text("ok", style="green") if self.fixed_real_ok else Text("NOT CLEAN", style="bold red")
        return [before, fixed]

    def real_lines(self) -> list[str]:
        lines = []
        seen = set()
        for v in self.check_before.verdicts:
            key = (v.kind, v.verdict, v.reason)
            if key in seen:
                continue
            seen.add(key)
            ranks = sorted({x.rank for x in self.check_before.verdicts if (x.kind, x.verdict, x.reason) == key})
            lines.append(f"real: {v.kind} {v.verdict.value} (ranks {','.join(map(str, ranks))}): {v.reason}")
        if self.check_before.divergence:
            r, i, what = self.check_before.divergence
            lines.append(f"first divergence: rank {r} step {i}: {what}")
        fo = self.check_fixed.real
        ov = ", ".join(f"r{r} {v:.0f} us" for r, v in sorted(fo.overlap_us.items()) if v > 0)
        lines.append(f"real fixed: {'clean' if self.fixed_real_ok else 'NOT CLEAN'}"
                     + (f"; measured shared/routed overlap {ov}" if ov else "")
                     + (f"; output {next(iter(fo.outputs.values()), {})}" if fo.outputs else ""))
        return lines

    def to_dict(self) -> dict[str, Any]:
        return {
            **super().to_dict(),
            "verdicts": [{"kind": v.kind, "verdict": v.verdict.value, "reason": v.reason, "rank": v.rank,
                          "step": v.step} for v in self.check_before.verdicts],
            "fixed_real_ok": self.fixed_real_ok,
            "fixed_verdicts": [v.to_dict() for v in self.check_fixed.verdicts],
            "measured": {
                "before_outputs": {str(r): c for r, c in self.check_before.real.outputs.items()},
                "fixed_outputs": {str(r): c for r, c in self.check_fixed.real.outputs.items()},
                "before_overlap_us": {str(r): round(v, 1) for r, v in self.check_before.real.overlap_us.items()},
                "fixed_overlap_us": {str(r): round(v, 1) for r, v in self.check_fixed.real.overlap_us.items()},
            },
            "first_divergence": self.check_before.to_dict()["first_divergence"],
            "stand_ins": [n for n in self.check_before.real.notes if n.startswith("stand-in")],
        }


def replay_real(progress: Callable[[str], None] | None = None, timeout_s: float = 120.0) -> list[RealCaseResult]:
    from twin.replay import CASES

    out = []
    for case in CASES:
        s = load(case.scenario)
        if progress:
            progress(f"{case.regression} {case.runner} on {case.scenario}")
        fixed_check = check(s, "fixed", timeout_s=timeout_s, progress=progress)
        before_check = check(s, case.runner, timeout_s=timeout_s, progress=progress, fixed_real=fixed_check.real)
        out.append(RealCaseResult(case, before_check.sim, fixed_check.sim, before_check, fixed_check))
    return out


__all__ = ["check", "replay_real", "CheckResult"]
