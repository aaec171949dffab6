"""Hypothesis strategies that generate only valid scenarios.

Everything is drawn so that validity holds by construction (sizes are
multiples of the parallel degrees that shard them), and every choice shrinks
toward the small end: few ranks, few experts, few tokens, no padding.

For users' own test files:

    from hypothesis import given
    from scenarios.strategies import moe_scenarios, assert_no_hazard

    @given(moe_scenarios())
    def test_my_runner(s):
        assert_no_hazard(MyRunner, s)
"""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

from scenarios.backends import BACKENDS, backend_info
from scenarios.runners import MoERunner
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, Workload


@st.composite
def moe_scenarios(
    draw: Any,
    max_world: int = 8,
    tp: list[int] | None = None,
    dp: list[int] | None = None,
    platforms: tuple[str, ...] = ("cpu", "cuda"),
    runner: str = "fixed",
    max_tokens: int = 32,
    uneven: bool = True,
) -> Scenario:
    tps = [t for t in (tp or [1, 2, 4, 8]) if t <= max_world]
    tp_ = draw(st.sampled_from(tps))
    dps = [d for d in (dp or [1, 2, 4]) if tp_ * d <= max_world]
    dp_ = draw(st.sampled_from(dps))
    world = tp_ * dp_
    ep = draw(st.booleans())
    backends = ["allgather_reducescatter"] + [b for b in BACKENDS if b != "allgather_reducescatter"]
    backend = draw(st.sampled_from(backends))
    if backend_info(backend).token_routing and not ep:
        backend = "allgather_reducescatter"
    eplb = ep and draw(st.booleans())
    version = draw(st.sampled_from(["newest", "previous"]))

    hidden = 8 * draw(st.integers(4, 16))
    latent = None
    if draw(st.booleans()) and draw(st.booleans()):
        latent = 8 * draw(st.integers(1, hidden // 8 - 1))
    routed_width = latent or hidden
    pad = 8 * draw(st.integers(0, 2))
    moe_hidden = routed_width + pad if pad else None
    experts = world * draw(st.integers(1, 4)) if ep else draw(st.integers(2, 8))
    experts = max(experts, 2)
    top_k = draw(st.integers(1, min(4, experts)))
    inter = 8 * world * draw(st.integers(1, 2))
    shared = draw(st.integers(0, 2))
    model = ModelTraits(
        hidden=hidden,
        moe_intermediate=inter,
        num_experts=experts,
        top_k=top_k,
        num_shared_experts=shared,
        moe_hidden=moe_hidden,
        latent_dim=latent,
        transform_nonlinear=bool(latent) and draw(st.booleans()),
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
    )
    platform = draw(st.sampled_from(list(platforms)))
    runtime = Runtime(
        platform=platform,
        aux_stream=platform == "cuda" and draw(st.booleans()),
        token_threshold=draw(st.sampled_from([256, 4])),
    )
    workload = Workload(
        tokens=draw(_token_counts(dp_, max_tokens, uneven)),
        seed=draw(st.integers(0, 3)),
        skew=draw(st.sampled_from([0.0, 0.5])),
    )
    parallel = ParallelConfig(tp=tp_, dp=dp_, ep=ep, eplb=eplb, backend=backend, version=version)
    return Scenario(name="generated", model=model, parallel=parallel, runtime=runtime,
                    workload=workload, runner=runner)


@st.composite
def _token_counts(draw: Any, dp: int, max_tokens: int, uneven: bool) -> int | tuple[int, ...]:
    """One count for every DP rank, or sometimes (dp > 1) one per DP rank,
    possibly 0 (an idle DP rank; not all of them); shrinks toward the single count."""
    if uneven and dp > 1 and draw(st.booleans()):
        counts = draw(st.lists(st.integers(0, max_tokens), min_size=dp, max_size=dp))
        return tuple(counts) if any(counts) else (1, *counts[1:])
    return draw(st.integers(1, max_tokens))


def assert_no_hazard(runner: type[MoERunner] | str, scenario: Scenario, profile: str | None = None) -> None:
    """Fail (AssertionError listing the hazards) if the simulator predicts any."""
    from sim import simulate

    trace = simulate(scenario, runner, profile=profile)
    if trace.hazards:
        lines = "\n".join(f"  {h}" for h in trace.hazards)
        raise AssertionError(
            f"{trace.runner} on {scenario.summary_line()}:\n{lines}"
        )
