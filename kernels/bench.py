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


def _median_ms(fn: Callable[[], torch.Tensor], repeats: int) -> float:
    fn()  # warm-up: first interpreter call pays one-off setup
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def bench_kernels(repeats: int = 5) -> dict[str, float]:
    """Median wall time (ms) of the torch and Triton-interpreter kernels on CPU.

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
    torch_ms = _median_ms(lambda: torch_fn(*args), repeats)
    triton_ms = _median_ms(lambda: triton_fn(*args), repeats)
    diff = (torch_fn(*args) - triton_fn(*args)).abs().max().item()
    return {
        "kernel_torch_ms": torch_ms,
        "kernel_triton_interp_ms": triton_ms,
        "kernel_triton_over_torch": triton_ms / torch_ms,
        "kernel_triton_max_abs_diff": diff,
    }
