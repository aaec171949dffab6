"""`replay --engine vllm`: the seed regressions on vLLM's own release history.

Each case runs the runner traced from a released vLLM's MoE forward
(`vllm@X.Y.Z`, resolved by scenarios.runners.load_runner) on a regression's
trigger scenario and states what that release must predict: the seed's hazard
for a release that shipped it, nothing for the release that fixed it. Only
the seeds that shipped in a release have cases (README: released vLLM versions
and the seed regressions). A release that is not installed under .engines/,
or a runner that does not load, skips its case: it is reported, never counted
as a miss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engines.vllm import installed
from scenarios.loader import load
from scenarios.runners import RunnerLoadError, load_runner
from scenarios.spec import Scenario
from scenarios.trace import Trace, Verdict
from sim import simulate
from twin.check.crosscheck import CheckResult, check
from twin.check.replay_real import RealCaseResult
from twin.check.verdicts import wrong_ranks

CLEAN = "clean"  # the expectation of a release that carries the fix
ENGINES = ("vllm",)


@dataclass(frozen=True)
class EngineCase:
    regression: str
    release: str
    scenario: str
    expected: str  # a hazard kind, or CLEAN
    twin_runner: str  # the twin's own runner for the same code (before-N or fixed)
    what: str
    # DOUBLE_REDUCTION: each routed coefficient is this many times the reference
    # ("tp": the scenario's TP size, the final all-reduce over an already summed output).
    routed_coefficient: str | None = None

    @property
    def runner(self) -> str:
        return f"vllm@{self.release}"


ENGINE_CASES: tuple[EngineCase, ...] = (
    EngineCase("R2", "0.20.0", "r2-fi-two-sided", "DOUBLE_REDUCTION", "before-41382",
               "the first release with the FlashInfer NVLink PF (output_is_reduced() = False)", "tp"),
    EngineCase("R2", "0.21.0", "r2-fi-two-sided", "DOUBLE_REDUCTION", "before-41382",
               "the last release with the FlashInfer NVLink PF declaring output_is_reduced() = False", "tp"),
    EngineCase("R2", "0.22.0", "r2-fi-two-sided", CLEAN, "fixed",
               "the first release with the fix: the combine's output counts as reduced"),
)


def install_hint(release: str) -> str:
    return f"not installed: run scripts/install-engine.sh vllm=={release}"


def skip_reason(case: EngineCase) -> str | None:
    """Why this case cannot run here, or None: the release is not installed,
    or its traced runner does not load."""
    if not installed(case.release):
        return install_hint(case.release)
    try:
        load_runner(case.runner)
    except RunnerLoadError as exc:
        return f"runner {case.runner} not available: {exc}"
    return None


def expected_coefficient(case: EngineCase, s: Scenario) -> float | None:
    if case.routed_coefficient == "tp":
        return float(s.parallel.tp)
    return 1.0 if case.expected == CLEAN else None


def routed_coefficients(trace: Trace) -> list[float]:
    """Every routed coefficient on every rank, sorted and deduplicated."""
    return sorted({v for outs in trace.outputs.values() for k, v in outs.items() if k.startswith("routed")})


@dataclass
class EngineCaseResult:
    case: EngineCase
    skipped: str | None = None
    before: Trace | None = None  # the release's traced runner
    fixed: Trace | None = None  # the twin's `fixed` runner (must stay clean)
    twin: Trace | None = None  # the twin's runner for the same code
    want_coefficient: float | None = None

    @property
    def hit(self) -> bool:
        """The release predicts what it must: the seed's hazard (and coefficient), or nothing."""
        if self.before is None:
            return False
        if self.case.expected == CLEAN:
            return not self.before.hazards and self.coefficient_ok
        return self.case.expected in self.before.hazard_kinds() and self.coefficient_ok

    @property
    def coefficient_ok(self) -> bool:
        if self.want_coefficient is None or self.before is None:
            return True
        return routed_coefficients(self.before) == [self.want_coefficient]

    @property
    def agrees_with_twin(self) -> bool:
        """The release's program and the twin's runner for the same code predict the same kinds."""
        return (self.before is not None and self.twin is not None
                and self.before.hazard_kinds() == self.twin.hazard_kinds())

    @property
    def caught(self) -> bool:
        if self.skipped:
            return True  # skipped is reported, never a miss
        return self.hit and self.fixed is not None and not self.fixed.hazards and self.agrees_with_twin

    def detail_lines(self) -> list[str]:
        if self.before is None:
            return []
        kinds = ", ".join(sorted(self.before.hazard_kinds())) or "clean"
        twin = ", ".join(sorted(self.twin.hazard_kinds())) or "clean" if self.twin else "-"
        coeffs = ", ".join(f"{v:g}" for v in routed_coefficients(self.before)) or "-"
        want = f" (expected {self.want_coefficient:g})" if self.want_coefficient is not None else ""
        return [f"{self.case.runner}: {kinds}; routed coefficients {coeffs}{want}",
                f"twin's {self.case.twin_runner}: {twin} "
                f"({'agrees' if self.agrees_with_twin else 'DISAGREES'} with the release)"]

    def to_dict(self) -> dict[str, Any]:
        c = self.case
        d: dict[str, Any] = {
            "regression": c.regression,
            "runner": c.runner,
            "scenario": c.scenario,
            "expected": c.expected,
            "engine": "vllm",
            "release": c.release,
            "twin_runner": c.twin_runner,
            "skipped": self.skipped,
        }
        if self.skipped or self.before is None or self.fixed is None:
            return {**d, "predicted": [], "fixed_predicted": [], "caught": None}
        return {
            **d,
            "predicted": [h.to_dict() for h in self.before.hazards],
            "fixed_predicted": [h.to_dict() for h in self.fixed.hazards],
            "twin_predicted": sorted(self.twin.hazard_kinds()) if self.twin else [],
            "agrees_with_twin": self.agrees_with_twin,
            "routed_coefficients": routed_coefficients(self.before),
            "expected_routed_coefficient": self.want_coefficient,
            "caught": self.caught,
            "latency_us": {"before": round(self.before.latency_us, 3), "fixed": round(self.fixed.latency_us, 3)},
        }


def replay_engine_sim(engine: str = "vllm", progress: Callable[[str], None] | None = None,
                      cases: tuple[EngineCase, ...] | None = None) -> list[EngineCaseResult]:
    if engine not in ENGINES:
        raise ValueError(f"replay --engine: unknown engine {engine!r} (known: {', '.join(ENGINES)})")
    out = []
    for case in ENGINE_CASES if cases is None else cases:
        reason = skip_reason(case)
        if reason:
            out.append(EngineCaseResult(case, skipped=reason))
            continue
        if progress:
            progress(f"{case.regression} {case.runner}")
        s = load(case.scenario)
        out.append(EngineCaseResult(case, before=simulate(s, case.runner), fixed=simulate(s, "fixed"),
                                    twin=simulate(s, case.twin_runner),
                                    want_coefficient=expected_coefficient(case, s)))
    return out


@dataclass
class EngineRealResult(EngineCaseResult):
    """A release's case also run on real ranks: the release's traced program and
    the twin's `fixed` runner, each checked against the exact reference."""

    real: RealCaseResult | None = None

    @property
    def release_real_clean(self) -> bool:
        return self.real is not None and real_clean(self.real.check_before)

    @property
    def real_ok(self) -> bool:
        if self.skipped:
            return True
        if self.real is None:
            return False
        if self.case.expected == CLEAN:
            return self.real.fixed_real_ok and self.release_real_clean
        return self.real.real_ok

    def real_cells(self) -> list[Any]:
        from rich.text import Text

        assert self.real is not None
        before, fixed = self.real.real_cells()
        if self.case.expected == CLEAN:
            before = Text("clean", style="green") if self.release_real_clean else Text("NOT CLEAN", style="bold red")
        return [before, fixed]

    def real_lines(self) -> list[str]:
        return self.real.real_lines() if self.real is not None else []

    def to_dict(self) -> dict[str, Any]:
        d = super().to_dict()
        if self.real is None:
            return d
        real = self.real.to_dict()
        keep = ("verdicts", "fixed_real_ok", "fixed_verdicts", "measured", "real_output", "fixed_real_output",
                "first_divergence", "stand_ins")
        return {**d, **{k: real[k] for k in keep}, "release_real_clean": self.release_real_clean,
                "real_ok": self.real_ok}


def real_clean(result: CheckResult) -> bool:
    """No hazard on real ranks, every output equal to the reference, nothing unpredicted."""
    return (not result.real.hazards and not wrong_ranks(result.real)
            and not any(v.verdict == Verdict.UNPREDICTED for v in result.verdicts))


def replay_engine_real(engine: str = "vllm", progress: Callable[[str], None] | None = None,
                       timeout_s: float = 120.0,
                       cases: tuple[EngineCase, ...] | None = None) -> list[EngineRealResult]:
    out: list[EngineRealResult] = []
    for sim in replay_engine_sim(engine, progress, cases):
        case = sim.case
        if sim.skipped:
            out.append(EngineRealResult(case, skipped=sim.skipped))
            continue
        s = load(case.scenario)
        if progress:
            progress(f"{case.regression} {case.runner} on {case.scenario}")
        # The table's simulations are check()'s predictions (same calls, same profile).
        fixed_check = check(s, "fixed", timeout_s=timeout_s, progress=progress, prediction=sim.fixed)
        before_check = check(s, case.runner, timeout_s=timeout_s, progress=progress, fixed_real=fixed_check.real,
                             prediction=sim.before)
        real = RealCaseResult(case, before_check.sim, fixed_check.sim, before_check, fixed_check)  # type: ignore[arg-type]
        out.append(EngineRealResult(case, before=sim.before, fixed=sim.fixed, twin=sim.twin,
                                    want_coefficient=sim.want_coefficient, real=real))
    return out


__all__ = ["EngineRealResult", "real_clean", "replay_engine_real", "CLEAN", "ENGINES", "ENGINE_CASES", "EngineCase", "EngineCaseResult", "install_hint",
           "replay_engine_sim", "routed_coefficients", "skip_reason"]
