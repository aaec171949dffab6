"""Micro-benchmark: the Triton kernel under the CPU interpreter vs the torch kernel.

Measures what the notes warn about (interpreter cost) on one small MoE so the
twin can decide where the Triton path is affordable. Returns figures only; the
CLI prints them.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

from kernels import get_kernel

__all__ = ["BENCH_SHAPE", "bench_kernels"]

# tokens, hidden, intermediate, experts, top-k
BENCH_SHAPE: dict[str, int] = {
    "tokens": 64,
    "hidden": 128,
    "intermediate": 256,
    "experts": 8,
    "top_k": 2,
}


def _times_ms(fn: Callable[[], torch.Tensor], repeats: int, min_time_s: float) -> tuple[float, float]:
    """(10th percentile of this thread's CPU time, median wall time) in ms of
    at least `repeats` calls and at least `min_time_s` of calls. On a shared
    machine the wall time also counts the time other processes held the core
    (the median moved by 50% between two runs a minute apart here); the CPU
    time of the calls least disturbed (cache, SMT sibling) is what the kernel
    costs, and agreed within 10%."""
    fn()  # warm-up: first interpreter call pays one-off setup
    cpu, wall = [], []
    end = time.perf_counter() + min_time_s
    while len(wall) < repeats or time.perf_counter() < end:
        c0, w0 = time.thread_time(), time.perf_counter()
        fn()
        wall.append((time.perf_counter() - w0) * 1e3)
        cpu.append((time.thread_time() - c0) * 1e3)
    cpu.sort()
    return cpu[int(0.1 * (len(cpu) - 1))], statistics.median(wall)


def bench_kernels(repeats: int = 5, min_time_s: float = 1.0) -> dict[str, float]:
    """Time (ms) of the torch and Triton-interpreter kernels on CPU, on one
    intra-op thread (as each rank runs), over at least `repeats` calls and at
    least `min_time_s` of calls per kernel.

    Keys: kernel_torch_ms, kernel_triton_interp_ms (10th percentile of the
    calling thread's CPU time: the kernel's cost, not the machine's load),
    kernel_triton_over_torch,
    kernel_triton_max_abs_diff (sanity: both computed the same thing),
    kernel_torch_median_ms, kernel_triton_interp_median_ms (median wall
    times: these include the machine's load).
    Raises KernelUnavailable if triton is not running under its interpreter
    (i.e. the process saw a CUDA device when kernels.triton_moe was imported).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    s = BENCH_SHAPE
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(s["tokens"], s["hidden"], generator=gen)
    w13 = torch.randn(s["experts"], 2 * s["intermediate"], s["hidden"], generator=gen)
    w13 /= s["hidden"] ** 0.5
    w2 = torch.randn(s["experts"], s["hidden"], s["intermediate"], generator=gen)
    w2 /= s["intermediate"] ** 0.5
    logits = torch.randn(s["tokens"], s["experts"], generator=gen)
    topk_weights, topk_ids = torch.topk(torch.softmax(logits, dim=-1), s["top_k"], dim=-1)
    args = (x, topk_ids, topk_weights, w13, w2)

    torch_fn = get_kernel("torch")
    triton_fn = get_kernel("triton")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch_ms, torch_median = _times_ms(lambda: torch_fn(*args), repeats, min_time_s)
        triton_ms, triton_median = _times_ms(lambda: triton_fn(*args), repeats, min_time_s)
        diff = (torch_fn(*args) - triton_fn(*args)).abs().max().item()
    finally:
        torch.set_num_threads(threads)
    return {
        "kernel_torch_ms": torch_ms,
        "kernel_triton_interp_ms": triton_ms,
        "kernel_triton_over_torch": triton_ms / torch_ms,
        "kernel_triton_max_abs_diff": diff,
        "kernel_torch_median_ms": torch_median,
        "kernel_triton_interp_median_ms": triton_median,
    }
