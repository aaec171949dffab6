"""`moe-twin calibrate`: fit the simulator's `cpu` profile on this machine.

Measures, with one intra-op thread (as each rank runs): GEMM throughput,
memory bandwidth, the fixed cost of a small op, and gloo all-reduce / all-to-all
latency and bus bandwidth across real rank processes (alpha-beta fit over two
message sizes, NCCL bus-bandwidth convention).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import torch

from sim.cost import Profile


def _median_s(fn: Callable[[], Any], repeats: int = 15) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _compute_figures() -> dict[str, float]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        a, b = torch.randn(256, 1024), torch.randn(1024, 1024)
        gemm = _median_s(lambda: a @ b)
        big = torch.randn(8 * 2**20)  # 32 MiB
        copy = _median_s(lambda: big.clone(), repeats=7)
        small_a, small_b = torch.randn(8, 128), torch.randn(8, 128)
        small = _median_s(lambda: small_a + small_b, repeats=200)
        x, w = torch.randn(4, 128), torch.randn(128, 128)
        tiny_gemm = _median_s(lambda: x @ w, repeats=200)
    finally:
        torch.set_num_threads(threads)
    return {
        "flops": 2 * 256 * 1024 * 1024 / gemm,
        "mem_bw": 2 * big.numel() * 4 / copy,
        "elementwise_us": small * 1e6,
        "kernel_us": tiny_gemm * 1e6,
    }


def _bus_rank(rank: int, world: int, n: int, iters: int) -> float:
    """Amortised time of one large all-reduce (bandwidth term)."""
    import torch.distributed as dist

    t = torch.randn(n)
    dist.all_reduce(t)
    dist.barrier()
    t0 = time.perf_counter()
    for _ in range(iters):
        dist.all_reduce(t)
    return (time.perf_counter() - t0) / iters


# Scenarios the real runner executes to fit the fixed costs: TP-only, naive DP
# gather, token-routing all-to-all, shared experts; CPU platform, small dims.
CALIBRATION_SCENARIOS = ("r4-gpt-oss-padded", "r1-stale-cache", "r2-fi-two-sided", "r4-nemotron-padded")


def _features(scenario: Any, base: Profile) -> list[list[tuple[float, float, float, float, float]]]:
    """Per rank and step: (variable us, kernels, elementwise units, collective
    alphas, all-to-all alphas), by finite differences of the cost model."""
    from dataclasses import replace

    from scenarios.runners import load_runner
    from sim.engine import Simulation

    zero = replace(base, kernel_us=0.0, elementwise_us=0.0, coll_alpha_us=0.0, a2a_alpha_us=0.0)
    probes = [zero, replace(zero, kernel_us=1.0), replace(zero, elementwise_us=1.0),
              replace(zero, coll_alpha_us=1.0), replace(zero, a2a_alpha_us=1.0)]
    durs = []
    for prof in probes:
        sim = Simulation(scenario, load_runner("fixed"), prof, "fixed")
        sim.run()
        durs.append([[pl.dur for pl in ops.plans] for ops in sim.rank_ops])
    out = []
    for r in range(len(durs[0])):
        rows = []
        for i in range(len(durs[0][r])):
            var = durs[0][r][i]
            rows.append((var, *(durs[k][r][i] - var for k in range(1, 5))))
        out.append(rows)
    return out


def _fit_fixed_costs(base: Profile, repeats: int, timeout_s: float) -> dict[str, float]:
    from real.runner import run_real
    from scenarios.loader import load
    from sim import simulate

    samples: dict[int, list[float]] = {1: [], 2: [], 3: [], 4: []}
    gaps: list[float] = []
    for name in CALIBRATION_SCENARIOS:
        s = load(name).with_(**{"runtime.platform": "cpu", "runtime.aux_stream": False})
        feats = _features(s, base)
        pred = simulate(s, "fixed", profile=base)
        per_step: dict[tuple[int, int], list[float]] = {}
        run_real(s, "fixed", prediction=pred, timeout_s=timeout_s)  # warm-up: threads, lazy imports
        for _ in range(repeats):
            real = run_real(s, "fixed", prediction=pred, timeout_s=timeout_s).trace
            for r, steps in real.steps.items():
                for st in steps:
                    per_step.setdefault((r, st.index), []).append(st.duration)
            for steps in real.steps.values():
                main = [st for st in steps if st.stream == "main" and st.end > 0]
                for prev, st in zip(main, main[1:]):
                    if not st.waits and st.category != "collective":
                        gaps.append(max(0.0, st.start - prev.end))
        n_steps = len(feats[0])
        for i in range(n_steps):
            # A collective's last arriver does not wait: take the fastest rank.
            real_d = min(statistics.median(per_step.get((r, i), [float("inf")])) for r in range(len(feats)))
            f = feats[0][i]
            classes = [k for k in range(1, 5) if f[k] > 1e-12]
            if len(classes) == 1 and real_d != float("inf"):
                k = classes[0]
                samples[k].append(max(0.0, (real_d - f[0]) / f[k]))
    names = {1: "kernel_us", 2: "elementwise_us", 3: "coll_alpha_us", 4: "a2a_alpha_us"}
    fitted = {names[k]: statistics.median(v) for k, v in samples.items() if v}
    if gaps:
        fitted["host_gap_us"] = statistics.median(gaps)
    return fitted


def calibrate(world_size: int = 2, repeats: int = 5, timeout_s: float = 120.0) -> tuple[Profile, dict[str, float]]:
    """Microbenchmarks give the compute and memory rates and the collective bus
    bandwidth; real runs of calibration scenarios give the fixed per-step costs
    (kernel launch and Python overhead, collective latency) by matching each
    measured step against the cost model's terms for it."""
    from real.pool import fresh_run

    comp = _compute_figures()
    n_elems = 4 * 1024 * 1024
    per = fresh_run(world_size, _bus_rank, n_elems, 10, timeout_s=timeout_s)
    n = world_size
    bus_bw = 2 * (n - 1) / n * n_elems * 4 / max(per)
    base = Profile(
        name="cpu", flops=comp["flops"], mem_bw=comp["mem_bw"], kernel_us=comp["kernel_us"],
        coll_alpha_us=100.0, bus_bw=bus_bw, a2a_alpha_us=100.0, bytes_per_elem=4,
        elementwise_us=comp["elementwise_us"], calibrated=False, source="microbenchmarks",
    )
    fixed = _fit_fixed_costs(base, repeats, timeout_s)
    from dataclasses import replace

    profile = replace(
        base, calibrated=True,
        source=f"calibrated on this machine ({date.today().isoformat()}: microbenchmarks + "
               f"{len(CALIBRATION_SCENARIOS)} real scenarios)",
        **fixed,
    )
    figures = {
        "gemm_gflops": round(comp["flops"] / 1e9, 2),
        "mem_bw_gbs": round(comp["mem_bw"] / 1e9, 2),
        "gloo_allreduce_busbw_gbs": round(bus_bw / 1e9, 3),
        "fitted_kernel_us": round(profile.kernel_us, 1),
        "fitted_elementwise_us": round(profile.elementwise_us, 1),
        "fitted_collective_alpha_us": round(profile.coll_alpha_us, 1),
        "fitted_all_to_all_alpha_us": round(profile.a2a_alpha_us, 1),
        "fitted_host_gap_us": round(profile.host_gap_us, 1),
    }
    return profile, figures
