"""`moe-twin bench real`: pool vs fresh processes, Triton-interpreter vs torch
kernel, and sim vs real timelines on this CPU. Medians and ratios, printed by
the CLI; never asserted (the machine is shared and noisy)."""

from __future__ import annotations

import statistics
import time

from scenarios.loader import load
from scenarios.spec import Scenario


def _small_world4() -> Scenario:
    return Scenario(name="bench-world4").with_(**{
        "model.hidden": 64, "model.moe_intermediate": 32, "model.num_experts": 8, "model.top_k": 2,
        "model.num_shared_experts": 1, "parallel.tp": 2, "parallel.dp": 2, "parallel.ep": True,
        "workload.tokens": 8, "kernel": "torch",
    })


def bench_pool(repeats: int = 5, n: int = 10) -> dict[str, float]:
    from real.pool import RankPool, fresh_run
    from real.worker import execute_rank
    from sim import simulate

    s = _small_world4()
    payload = {"scenario": s, "runner": "fixed", "kernel": "torch"}
    pred = simulate(s, "fixed")
    payload["predicted"] = pred.values
    with RankPool(4) as pool:
        pool.run(execute_rank, payload)  # warm: groups, imports
        rates = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(n):
                pool.run(execute_rank, payload)
            rates.append(n / (time.perf_counter() - t0))
    fresh = []
    for _ in range(max(2, repeats // 2)):
        t0 = time.perf_counter()
        fresh_run(4, execute_rank, payload, timeout_s=120.0)
        fresh.append(1.0 / (time.perf_counter() - t0))
    pool_rate, fresh_rate = statistics.median(rates), statistics.median(fresh)
    return {
        "pool_scenarios_per_s_world4": round(pool_rate, 2),
        "fresh_scenarios_per_s_world4": round(fresh_rate, 3),
        "pool_over_fresh": round(pool_rate / fresh_rate, 1),
    }


def bench_timeline(repeats: int = 5) -> dict[str, float]:
    """Sim (cpu profile) vs real step durations and layer latency."""
    from real.runner import run_real
    from sim import simulate
    from sim.cost import load_profile

    prof = load_profile("cpu")
    ratios: list[float] = []
    errors: list[float] = []
    per_scenario: dict[str, float] = {}
    # r3-tp-decode is not a calibration scenario: it checks the fit out of sample.
    for name in ("r4-gpt-oss-padded", "r1-stale-cache", "r2-fi-two-sided", "r3-tp-decode"):
        s = load(name).with_(**{"runtime.platform": "cpu", "runtime.aux_stream": False})
        pred = simulate(s, "fixed", profile=prof)
        lat = []
        per_step: dict[tuple[int, int], list[float]] = {}
        run_real(s, "fixed", prediction=pred)  # warm-up, as calibrate does
        for _ in range(repeats):
            real = run_real(s, "fixed", prediction=pred).trace
            lat.append(real.latency_us)
            for r, steps in real.steps.items():
                for st in steps:
                    if st.duration > 0:
                        per_step.setdefault((r, st.index), []).append(st.duration)
        for (r, i), durs in per_step.items():
            sim_d = pred.steps[r][i].duration
            if sim_d > 0:
                ratios.append(sim_d / statistics.median(durs))
        errors.append(abs(pred.latency_us - statistics.median(lat)) / statistics.median(lat))
        per_scenario[f"layer_latency_us_{name}_sim"] = round(pred.latency_us, 1)
        per_scenario[f"layer_latency_us_{name}_real_median"] = round(statistics.median(lat), 1)
    ratios.sort()
    return {
        "cpu_profile_calibrated": float(prof.calibrated),
        "step_duration_ratio_sim_over_real_median": round(statistics.median(ratios), 3),
        "step_duration_ratio_sim_over_real_p90": round(ratios[int(0.9 * (len(ratios) - 1))], 3),
        "layer_latency_rel_error_median": round(statistics.median(errors), 3),
        **per_scenario,
    }


def bench_real(repeats: int = 5) -> dict[str, float]:
    from kernels.bench import bench_kernels

    figures: dict[str, float] = {}
    figures.update(bench_pool(repeats))
    figures.update(bench_kernels(repeats))
    figures.update(bench_timeline(repeats))
    return figures
