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


def _collective_rank(rank: int, world: int, sizes: list[int], repeats: int) -> dict[str, float]:
    import torch.distributed as dist

    out: dict[str, float] = {}
    for n in sizes:
        t = torch.randn(n)
        dist.barrier()
        out[f"ar_{n}"] = _median_s(lambda t=t: dist.all_reduce(t), repeats)
        send = torch.randn(n)
        recv = torch.empty(n)
        dist.barrier()
        out[f"a2a_{n}"] = _median_s(lambda s=send, r=recv: dist.all_to_all_single(r, s), repeats)
    return out


def calibrate(world_size: int = 2, repeats: int = 15) -> tuple[Profile, dict[str, float]]:
    from real.pool import fresh_run

    comp = _compute_figures()
    small, large = 1024, 1024 * 1024  # elements (4 KiB, 4 MiB)
    res = fresh_run(world_size, _collective_rank, [small, large], repeats, timeout_s=120.0)
    coll = {k: max(r[k] for r in res) for k in res[0]}
    n = world_size
    factor_ar = 2 * (n - 1) / n
    factor_a2a = (n - 1) / n
    ar_alpha = coll[f"ar_{small}"] * 1e6
    ar_bw = factor_ar * (large - small) * 4 / max(coll[f"ar_{large}"] - coll[f"ar_{small}"], 1e-9)
    a2a_alpha = coll[f"a2a_{small}"] * 1e6
    profile = Profile(
        name="cpu",
        flops=comp["flops"],
        mem_bw=comp["mem_bw"],
        kernel_us=comp["kernel_us"],
        coll_alpha_us=ar_alpha,
        bus_bw=ar_bw,
        a2a_alpha_us=a2a_alpha,
        bytes_per_elem=4,
        elementwise_us=comp["elementwise_us"],
        calibrated=True,
        source=f"calibrated on this machine ({date.today().isoformat()}, gloo world {n})",
    )
    del factor_a2a
    figures = {
        "gemm_gflops": round(comp["flops"] / 1e9, 2),
        "mem_bw_gbs": round(comp["mem_bw"] / 1e9, 2),
        "small_op_us": round(comp["elementwise_us"], 2),
        "small_gemm_us": round(comp["kernel_us"], 2),
        "gloo_allreduce_alpha_us": round(ar_alpha, 1),
        "gloo_allreduce_busbw_gbs": round(ar_bw / 1e9, 3),
        "gloo_all_to_all_alpha_us": round(a2a_alpha, 1),
    }
    return profile, figures
