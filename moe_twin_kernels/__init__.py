"""Fused-MoE expert kernels behind one signature.

Every kernel is called as::

    kernel(x, topk_ids, topk_weights, w13, w2, expert_offset=0) -> Tensor[T, H]

with x [T, H], topk_ids [T, k] (global expert ids), topk_weights [T, k],
w13 [E_local, 2*I, H] packed [gate; up], w2 [E_local, H, I]. The output is the
routing-weighted sum over the token's experts held by this rank (global ids
expert_offset .. expert_offset + E_local - 1); nothing is reduced across ranks.

Importing this package is cheap: triton and flashinfer are imported only when
their kernel is requested, because importing them costs seconds (and triton's
interpreter switch must be set before triton is imported).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from moe_twin_kernels.errors import KernelUnavailable, UnknownKernel

KernelFn = Callable[..., Any]  # returns a torch.Tensor (torch is imported by the kernels)

KERNELS: tuple[str, ...] = ("torch", "triton", "flashinfer")

# name -> (module, function); resolved lazily by get_kernel.
_ENTRY_POINTS: dict[str, tuple[str, str]] = {
    "torch": ("moe_twin_kernels.torch_ref", "fused_moe_torch"),
    "triton": ("moe_twin_kernels.triton_moe", "fused_moe_triton"),
    "flashinfer": ("moe_twin_kernels.flashinfer_adapter", "fused_moe_flashinfer"),
}



def set_triton_mode() -> None:
    """Default TRITON_INTERPRET=1 where torch sees no CUDA device.

    Must run before the first `import triton` in the process, by anything:
    FlashInfer imports triton too, and triton's own @jit helpers created in
    compiled mode then fail inside interpreted kernels ("Cannot call @triton.jit'd
    outside of the scope of a kernel"). An explicit TRITON_INTERPRET is kept.
    """
    import os

    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


__all__ = [
    "set_triton_mode",
    "KERNELS",
    "KernelFn",
    "KernelUnavailable",
    "UnknownKernel",
    "default_kernel",
    "get_kernel",
]


def get_kernel(name: str) -> KernelFn:
    """Return the kernel called `name` (one of KERNELS), importing its module on demand.

    Raises UnknownKernel for names outside KERNELS and KernelUnavailable when the
    kernel's package cannot be imported. Device checks happen at call time.
    """
    if name not in _ENTRY_POINTS:
        raise UnknownKernel(f"unknown kernel {name!r}; valid names: {', '.join(KERNELS)}")
    module_name, fn_name = _ENTRY_POINTS[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KernelUnavailable(f"kernel {name!r} cannot be imported: {exc}") from exc
    return getattr(module, fn_name)


def default_kernel(device_type: str) -> str:
    """The kernel to use when none is named: "torch" on CPU, "triton" on CUDA.

    On CPU Triton only runs under its interpreter (tens of times slower than
    torch), and FlashInfer's cutlass MoE needs an SM89+ GPU; neither is a
    sensible default there.
    """
    if device_type == "cuda":
        return "triton"
    return "torch"
