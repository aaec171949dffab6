"""Replay of the historical regressions: each `before` runner and the `fixed`
runner on the regression's trigger scenario."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from scenarios.loader import load
from scenarios.trace import Hazard, Trace
from sim import simulate


@dataclass(frozen=True)
class Case:
    regression: str
    runner: str
    scenario: str
    expected: str
    what: str


CASES: tuple[Case, ...] = (
    Case("R1", "before-40673", "r1-sp-deepep", "DOUBLE_REDUCTION",
         "shared output all-reduced under sequence parallelism"),
    Case("R1", "stale-cache-40673", "r1-stale-cache", "DOUBLE_REDUCTION",
         "'output is reduced' cached before the kernel exists"),
    Case("R2", "before-41382", "r2-fi-two-sided", "DOUBLE_REDUCTION",
         "FlashInfer combine reduces, runner reduces again"),
    Case("R3", "before-38990", "r3-tp-decode", "LOST_OVERLAP",
         "shared experts no longer overlap the routed experts"),
    Case("R4", "before-40865", "r4-gpt-oss-padded", "SHAPE_MISMATCH",
         "padded routed output trimmed too early"),
    Case("R5", "before-39222", "r5-eplb-deepep-ll", "UNSAFE_OVERLAP",
         "overlap enabled under EPLB with an unsafe backend"),
)


@dataclass
class CaseResult:
    case: Case
    before: Trace
    fixed: Trace

    @property
    def predicted(self) -> list[Hazard]:
        return self.before.hazards

    skipped = None  # every twin case runs (a release's case may be skipped: replay_engine.py)

    @property
    def hit(self) -> bool:
        return self.case.expected in self.before.hazard_kinds()

    @property
    def caught(self) -> bool:
        return self.hit and not self.fixed.hazards

    def detail_lines(self) -> list[str]:
        return []

    def to_dict(self) -> dict[str, Any]:
        c = self.case
        return {
            "regression": c.regression,
            "runner": c.runner,
            "scenario": c.scenario,
            "expected": c.expected,
            "predicted": [h.to_dict() for h in self.before.hazards],
            "fixed_predicted": [h.to_dict() for h in self.fixed.hazards],
            "caught": self.caught,
            "latency_us": {"before": round(self.before.latency_us, 3), "fixed": round(self.fixed.latency_us, 3)},
        }


def replay_sim(progress: Callable[[str], None] | None = None) -> list[CaseResult]:
    results = []
    for case in CASES:
        if progress:
            progress(f"{case.regression} {case.runner}")
        scenario = load(case.scenario)
        results.append(CaseResult(case, simulate(scenario, case.runner), simulate(scenario, "fixed")))
    return results
