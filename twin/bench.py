"""`moe-twin bench sim`: simulator throughput and replay time, as medians.

Figures are medians over repeats; they are printed, never asserted (the
machine is shared and noisy).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

from scenarios.loader import load
from scenarios.spec import Scenario
from sim import simulate


def _median_rate(fn: Callable[[], None], n: int, repeats: int) -> float:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _tp_scenario(world: int, dp: int = 1) -> Scenario:
    tp = world // dp
    return Scenario(name=f"bench-tp{tp}-dp{dp}").with_(**{
        "model.hidden": 2048, "model.moe_intermediate": 64 * world, "model.num_experts": 64,
        "model.top_k": 6, "model.num_shared_experts": 1, "model.shared_intermediate": 64 * world,
        "parallel.tp": tp, "parallel.dp": dp, "runtime.platform": "cuda",
        "runtime.aux_stream": True, "workload.tokens": 16,
    })


def bench_sim(repeats: int = 5, n: int = 200) -> dict[str, float]:
    figures: dict[str, float] = {}
    for world in (2, 8, 64):
        s = _tp_scenario(world)
        count = max(10, n // max(1, world // 8))
        figures[f"sim_scenarios_per_s_tp{world}"] = round(
            _median_rate(lambda s=s: simulate(s, "fixed"), count, repeats), 1)
    s = _tp_scenario(8, dp=4)
    figures["sim_scenarios_per_s_tp2_dp4"] = round(_median_rate(lambda: simulate(s, "fixed"), n, repeats), 1)
    ep = _tp_scenario(8, dp=4).with_(**{"parallel.ep": True, "parallel.backend": "deepep_low_latency"})
    figures["sim_scenarios_per_s_tp2_dp4_ep_deepep"] = round(
        _median_rate(lambda: simulate(ep, "fixed"), n, repeats), 1)
    figures["sim_cost_ratio_8_over_2_ranks"] = round(
        figures["sim_scenarios_per_s_tp2"] / figures["sim_scenarios_per_s_tp8"], 2)
    figures["sim_cost_ratio_64_over_8_ranks"] = round(
        figures["sim_scenarios_per_s_tp8"] / figures["sim_scenarios_per_s_tp64"], 2)

    from twin.replay import replay_sim

    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        replay_sim()
        times.append(time.perf_counter() - t0)
    figures["replay_sim_s"] = round(statistics.median(times), 4)

    glm = load("glm5-tp8-decode")
    before = simulate(glm, "before-38990", profile="h100").latency_us
    fixed = simulate(glm, "fixed", profile="h100").latency_us
    figures["r3_glm5_tp8_h100_before_us"] = round(before, 2)
    figures["r3_glm5_tp8_h100_fixed_us"] = round(fixed, 2)
    figures["r3_glm5_layer_gap_pct"] = round(100.0 * (before - fixed) / fixed, 2)
    return figures
