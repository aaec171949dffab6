"""Assert helpers for users' own test files (README, "Testing your own runner").

    from hypothesis import given
    from scenarios.strategies import moe_scenarios
    from twin.search.asserts import assert_no_hazard, assert_verified

    @given(moe_scenarios())
    def test_my_runner(s):
        assert_no_hazard(MyRunner, s)

    def test_my_runner_over_every_decision_class():
        assert_verified(MyRunner, space="default")

They run the simulator, so they live above it, with the search code.
`from scenarios.strategies import assert_no_hazard` and
`from twin.verify import assert_verified`, the names older test files use,
still work (scenarios/strategies.py, twin/__init__.py).
"""

from __future__ import annotations

from typing import Any

from scenarios.runners import MoERunner
from scenarios.spec import Scenario


def assert_no_hazard(runner: type[MoERunner] | str, scenario: Scenario, profile: str | None = None) -> None:
    """Fail (AssertionError listing the hazards) if the simulator predicts any."""
    from sim import simulate

    trace = simulate(scenario, runner, profile=profile)
    if trace.hazards:
        lines = "\n".join(f"  {h}" for h in trace.hazards)
        raise AssertionError(
            f"{trace.runner} on {scenario.summary_line()}:\n{lines}"
        )


def assert_verified(runner: str | type[MoERunner], space: Any = "default", max_world: int | None = None,
                    jobs: int = 1) -> Any:
    """Fail (AssertionError listing every finding with its scenario) unless
    `verify` proves the runner clean over the space; returns the VerifyResult."""
    from twin.search.verify import assert_verified as verified

    return verified(runner, space=space, max_world=max_world, jobs=jobs)


__all__ = ["assert_no_hazard", "assert_verified"]
