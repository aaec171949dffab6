"""`moe-twin bench sim`: simulator throughput and replay time, as medians.

Figures are medians over repeats; they are printed, never asserted (the
machine is shared and noisy). The wide-EP figures are medians over at least
one second of samples each.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable

from scenarios.loader import load
from scenarios.spec import ModelTraits, ParallelConfig, Scenario, Workload
from scenarios.trace import Trace
from scenarios.workload import routing_arrays
from sim import simulate

MIN_SAMPLE_S = 1.0  # each wide-EP figure: samples until this much time has passed (at least 3)
EP_WORLDS = (8, 64, 256, 1024)
ROUTING_TOKENS = 65536


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


def _samples_s(fn: Callable[[], object], min_total_s: float = MIN_SAMPLE_S, min_samples: int = 3) -> list[float]:
    """Seconds of fn() per sample, taken until min_total_s has passed."""
    times: list[float] = []
    t_end = time.perf_counter() + min_total_s
    while len(times) < min_samples or time.perf_counter() < t_end:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _median_s(fn: Callable[[], object], min_total_s: float = MIN_SAMPLE_S, min_samples: int = 3) -> float:
    """Median seconds of fn() over samples taken until min_total_s has passed."""
    return statistics.median(_samples_s(fn, min_total_s, min_samples))


def ep_scenario(world: int) -> Scenario:
    """The wide expert-parallel layout: tp=2, dp=world/2, DeepEP low-latency,
    16 tokens per DP rank, 1024 experts (top-8), one shared expert."""
    return Scenario(
        name=f"bench-ep{world}",
        model=ModelTraits(hidden=2048, moe_intermediate=128, num_experts=1024, top_k=8,
                          num_shared_experts=1),
        parallel=ParallelConfig(tp=2, dp=world // 2, ep=True, backend="deepep_low_latency"),
        workload=Workload(tokens=16),
    )


def timeline_replays(trace: Trace) -> int:
    """How many rank timelines the timing phase replayed (its symmetry
    classes; every rank when it declined, e.g. a different load per rank)."""
    for note in trace.notes:
        if note.startswith("timing: ") and note.endswith(" simulated once"):
            return 1
        if note.startswith("timing: ") and " simulated as " in note:
            return int(note.rsplit(" simulated as ", 1)[1].split()[0])
    return trace.world


def bench_wide(min_total_s: float = MIN_SAMPLE_S) -> dict[str, float]:
    """Wide EP: simulate time per world size and its growth exponent, the
    routing generation time, and the size of `simulate --json` at 1024 ranks.
    `sim_ep_timelines_N_ranks` says how many rank timelines were replayed
    (N: none shared, as when token routing loads every rank differently).
    `sim_ep_mean_s_N_ranks` is the mean of the same samples: a median can
    leave out the collector's occasional passes over earlier runs' records."""
    figures: dict[str, float] = {}
    for world in EP_WORLDS:
        s = ep_scenario(world)
        # warm: routing and loads are cached per scenario, as in a session
        figures[f"sim_ep_timelines_{world}_ranks"] = timeline_replays(simulate(s, "fixed"))
        times = _samples_s(lambda s=s: simulate(s, "fixed"), min_total_s)
        figures[f"sim_ep_s_{world}_ranks"] = round(statistics.median(times), 4)
        figures[f"sim_ep_mean_s_{world}_ranks"] = round(statistics.fmean(times), 4)
    lo, hi = EP_WORLDS[0], EP_WORLDS[-1]
    figures[f"sim_ep_growth_exponent_{lo}_to_{hi}"] = round(
        math.log(figures[f"sim_ep_s_{hi}_ranks"] / figures[f"sim_ep_s_{lo}_ranks"]) / math.log(hi / lo), 2)
    figures["sim_ep_growth_exponent_256_to_1024"] = round(
        math.log(figures["sim_ep_s_1024_ranks"] / figures["sim_ep_s_256_ranks"]) / math.log(4), 2)

    def gen(skew: float) -> None:
        routing_arrays.cache_clear()
        routing_arrays(0, skew, 256, 8, ROUTING_TOKENS, 1)  # DeepSeek-V3's 256 experts, top-8

    figures[f"routing_ms_{ROUTING_TOKENS}_tokens"] = round(1000 * _median_s(lambda: gen(0.0), min_total_s), 2)
    # Skewed routing redraws the rows that hit an expert they hold: slower.
    figures[f"routing_ms_{ROUTING_TOKENS}_tokens_skew_0.9"] = round(
        1000 * _median_s(lambda: gen(0.9), min_total_s), 2)

    s = ep_scenario(1024)
    trace = simulate(s, "fixed")
    doc = {"scenario": s.name, "summary": s.summary_line(), "derived": s.derived(), **trace.to_folded_dict()}
    figures["json_bytes_1024_ranks"] = len(json.dumps(doc, indent=2)) + 1  # as `simulate --json` prints it
    return figures


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
    times = _samples_s(lambda: simulate(ep, "fixed"))
    figures["sim_scenarios_per_s_tp2_dp4_ep_deepep"] = round(1.0 / statistics.median(times), 1)
    figures["sim_scenarios_per_s_tp2_dp4_ep_deepep_mean"] = round(1.0 / statistics.fmean(times), 1)
    figures.update(bench_wide())
    figures["sim_cost_ratio_8_over_2_ranks"] = round(
        figures["sim_scenarios_per_s_tp2"] / figures["sim_scenarios_per_s_tp8"], 2)
    figures["sim_cost_ratio_64_over_8_ranks"] = round(
        figures["sim_scenarios_per_s_tp8"] / figures["sim_scenarios_per_s_tp64"], 2)

    from twin.check.replay import replay_sim

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
