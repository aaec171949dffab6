"""`moe-twin bench real`: pool vs fresh processes, Triton-interpreter vs torch
kernel, and sim vs real timelines on this CPU. Medians and ratios, printed by
the CLI; never asserted (the machine is shared and noisy)."""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

from scenarios.spec import Scenario
from scenarios.trace import COLLECTIVE


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


# Catalog scenarios small enough for CPU ranks (the historical regressions),
# run with the fixed runner on the CPU platform.
TIMELINE_SCENARIOS = ("r1-sp-deepep", "r1-stale-cache", "r2-fi-one-sided-previous", "r2-fi-two-sided",
                      "r3-tp-decode", "r4-gpt-oss-padded", "r4-latent-padded", "r4-nemotron-padded",
                      "r5-eplb-deepep-ll", "r5-fi-two-sided")


def _parts(steps: list[Any], samples: dict[tuple[int, int], list[float]], latency: float) -> tuple[float, float, float]:
    """(compute, collectives, the rest) of one rank's layer: step medians,
    collectives from their members' median issue; the rest is host time
    between ops and waiting for slower ranks."""
    comp = coll = 0.0
    for st in steps:
        got = samples.get((st.rank, st.index))
        if not got:
            continue
        if st.category == COLLECTIVE:
            coll += statistics.median(got)
        else:
            comp += statistics.median(got)
    return comp, coll, latency - comp - coll


def bench_timeline(repeats: int = 5) -> dict[str, float]:
    """The simulated CPU timeline (cpu profile) against real runs: the
    whole-layer latency error per scenario (sim vs the median of `repeats`
    real runs), in and out of the calibration set, and where the residual
    lies (compute steps, collectives, host time and waits)."""
    from real.calibrate import CALIBRATION_SCENARIOS, Runs, calibration_scenario, step_samples
    from real.runner import run_real
    from sim import simulate
    from sim.cost import load_profile

    prof = load_profile("cpu")
    load_before = os.getloadavg()[0]
    ratios: list[float] = []
    errors: dict[str, float] = {}
    spreads: list[float] = []
    resid = [0.0, 0.0, 0.0]
    per_scenario: dict[str, float] = {}
    for name in TIMELINE_SCENARIOS:
        s = calibration_scenario(name)
        pred = simulate(s, "fixed")  # the cpu profile, as the twin draws it beside a real CPU run
        run_real(s, "fixed", prediction=pred)  # warm-up, as calibrate does
        runs = Runs(s, [run_real(s, "fixed", prediction=pred).trace for _ in range(repeats)])
        lat = sorted(t.latency_us for t in runs.traces)
        real = statistics.median(lat)
        samples = {(r, i): v for (_n, r, i), v in step_samples({name: runs}, prof.host_gap_us, {name: pred}).items()}
        for (r, i), got in samples.items():
            sim_d = pred.steps[r][i].duration
            if sim_d > 0 and statistics.median(got) > 0:
                ratios.append(sim_d / statistics.median(got))
        sim_parts = _parts(pred.steps[0], {(0, st.index): [st.duration] for st in pred.steps[0]}, pred.latency_us)
        real_parts = _parts(pred.steps[0], samples, real)
        for k in range(3):
            resid[k] += abs(sim_parts[k] - real_parts[k])
        errors[name] = (pred.latency_us - real) / real
        if len(lat) >= 2:
            spreads.append((lat[-1] - lat[0]) / real)
        per_scenario[f"layer_latency_us_{name}_sim"] = round(pred.latency_us, 1)
        per_scenario[f"layer_latency_us_{name}_real_median"] = round(real, 1)
        per_scenario[f"layer_latency_error_{name}"] = round(errors[name], 3)
    ratios.sort()
    inside = [abs(e) for n, e in errors.items() if n in CALIBRATION_SCENARIOS]
    outside = [abs(e) for n, e in errors.items() if n not in CALIBRATION_SCENARIOS]
    total = sum(resid) or 1.0
    return {
        "cpu_profile_calibrated": float(prof.calibrated),
        "step_duration_ratio_sim_over_real_median": round(statistics.median(ratios), 3),
        "step_duration_ratio_sim_over_real_p90": round(ratios[int(0.9 * (len(ratios) - 1))], 3),
        "layer_latency_rel_error_median": round(statistics.median(abs(e) for e in errors.values()), 3),
        "layer_latency_rel_error_median_calibration_scenarios": round(statistics.median(inside), 3),
        "layer_latency_rel_error_median_other_scenarios": round(statistics.median(outside), 3),
        "layer_latency_rel_error_max": round(max(abs(e) for e in errors.values()), 3),
        # Run-to-run spread of the real latency ((max - min) / median): the noise floor.
        "layer_latency_real_spread_median": round(statistics.median(spreads), 3) if spreads else 0.0,
        "residual_share_compute": round(resid[0] / total, 3),
        "residual_share_collectives": round(resid[1] / total, 3),
        "residual_share_host_gaps_and_waits": round(resid[2] / total, 3),
        "cpu_profile_calibration_load_average": prof.calibration_load,
        "load_average_1min_before": round(load_before, 2),
        "load_average_1min_after": round(os.getloadavg()[0], 2),
        **per_scenario,
    }


def bench_real(repeats: int = 5) -> dict[str, float]:
    from moe_twin_kernels.bench import bench_kernels

    figures: dict[str, float] = {}
    figures.update(bench_pool(repeats))
    figures.update(bench_kernels(repeats))
    figures.update(bench_timeline(repeats))
    return figures
