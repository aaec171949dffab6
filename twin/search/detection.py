"""How often a plain `@given(moe_scenarios())` test catches a runner's bug.

`detects` runs what a user's test file runs (Hypothesis' default settings:
100 examples) under one seed, without shrinking (the question is whether a
failing example is met at all, not how small it gets), and says whether the
simulator predicted a hazard on one of the examples. `detection_rate` runs it
over seeds 0..n-1.
"""

from __future__ import annotations

from typing import Any

from scenarios.runners import MoERunner


class _Found(Exception):
    """Raised in the test body at the first hazard."""


def detects(runner: str | type[MoERunner], seed: int, strategy: Any = None, max_examples: int = 100) -> bool:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed

    from scenarios.strategies import moe_scenarios
    from sim import simulate

    strategy = moe_scenarios() if strategy is None else strategy

    @hseed(seed)
    @settings(settings.get_profile("default"), max_examples=max_examples, database=None, deadline=None,
              phases=(Phase.generate,), suppress_health_check=list(HealthCheck), report_multiple_bugs=False)
    @given(strategy)
    def body(s: Any) -> None:
        if simulate(s, runner).hazards:
            raise _Found

    try:
        body()
    except _Found:
        return True
    return False


def detection_rate(runner: str | type[MoERunner], seeds: int = 100, strategy: Any = None) -> float:
    return sum(detects(runner, seed, strategy) for seed in range(seeds)) / seeds


__all__ = ["detection_rate", "detects"]
