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

from scenarios.backends import BACKENDS, backend_info, exists_in
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
    eplb = ep and draw(st.booleans()) and world > 1  # EPLB needs more than one rank
    version = draw(st.sampled_from(["newest", "previous"]))
    if not exists_in(backend, version):
        version = "newest"

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
        # The previous version reduces only after a non-linear transform (wrong
        # by design, runner_semantics.md step 6): generated scenarios stay
        # where the fixed runner is right.
        transform_nonlinear=bool(latent) and draw(st.booleans()) and version == "newest",
        routed_scaling_factor=draw(st.sampled_from([1.0, 2.5])),
    )
    platform = draw(st.sampled_from(list(platforms)))
    runtime = Runtime(
        platform=platform,
        aux_stream=platform in ("cuda", "rocm") and draw(st.booleans()),
        token_threshold=draw(st.sampled_from([256, 4])),
    )
    workload = Workload(
        tokens=draw(_token_counts(dp_, max_tokens, uneven)),
        seed=draw(st.integers(0, 3)),
        skew=draw(st.sampled_from([0.0, 0.5])),
    )
    parallel = ParallelConfig(tp=tp_, dp=dp_, ep=ep, eplb=eplb, backend=backend, version=version)
    s = Scenario(name="generated", model=model, parallel=parallel, runtime=runtime,
                 workload=workload, runner=runner)
    # Drawn last, applied only where it means something (a padded routed kernel).
    if draw(st.booleans()) and s.padded:
        s = s.with_(kernel_writes_unpadded=True)
    return s


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


@st.composite
def hybrid_scenarios(
    draw: Any, max_world: int = 8, runner: str = "fixed", max_tokens: int = 16, dp: list[int] | None = None
) -> Scenario:
    """Valid scenarios whose experts are sharded on both axes (moe_ep > 1 and
    moe_tp > 1, parallel.ep_size set): a moe_scenarios draw on a world of at
    least 4 ranks, re-laid out. Token-routing backends need ep_size = world,
    so the backend is the naive gather (the only one that allows a hybrid)."""
    worlds = [(t, d) for t in (1, 2, 4, 8) for d in (dp or [1, 2, 4]) if 4 <= t * d <= max_world]
    tp_, dp_ = draw(st.sampled_from(worlds))
    base = draw(moe_scenarios(max_world=max_world, tp=[tp_], dp=[dp_], runner=runner, max_tokens=max_tokens))
    world = base.world
    ep_size = draw(st.sampled_from([e for e in range(2, world) if world % e == 0]))
    experts = ep_size * draw(st.integers(1, 4))
    return base.with_(**{
        "parallel.ep": True, "parallel.ep_size": ep_size, "parallel.backend": "allgather_reducescatter",
        "parallel.eplb": draw(st.booleans()), "model.num_experts": experts,
        "model.top_k": min(base.model.top_k, experts),
    })
