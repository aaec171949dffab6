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


def _median_ms(fn: Callable[[], torch.Tensor], repeats: int, min_time_s: float) -> float:
    """Median of at least `repeats` calls and at least `min_time_s` of calls:
    a fast kernel gets hundreds of samples, so two runs agree."""
    fn()  # warm-up: first interpreter call pays one-off setup
    times = []
    end = time.perf_counter() + min_time_s
    while len(times) < repeats or time.perf_counter() < end:
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_kernels(repeats: int = 5, min_time_s: float = 1.0) -> dict[str, float]:
    """Median wall time (ms) of the torch and Triton-interpreter kernels on CPU,
    on one intra-op thread (as each rank runs), over at least `repeats` calls
    and at least `min_time_s` of calls per kernel.

    Keys: kernel_torch_ms, kernel_triton_interp_ms, kernel_triton_over_torch,
    kernel_triton_max_abs_diff (sanity: both computed the same thing).
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
        torch_ms = _median_ms(lambda: torch_fn(*args), repeats, min_time_s)
        triton_ms = _median_ms(lambda: triton_fn(*args), repeats, min_time_s)
        diff = (torch_fn(*args) - triton_fn(*args)).abs().max().item()
    finally:
        torch.set_num_threads(threads)
    return {
        "kernel_torch_ms": torch_ms,
        "kernel_triton_interp_ms": triton_ms,
        "kernel_triton_over_torch": triton_ms / torch_ms,
        "kernel_triton_max_abs_diff": diff,
    }
