"""An original Triton fused-MoE kernel (grouped GEMM over expert-sorted routes).

Algorithm:
  1. (torch) Flatten the T*k (token, slot) routes ("pairs"), bucket them by
     local expert, pad each bucket to a multiple of BLOCK_M with a sentinel
     pair id (= T*k) and record one expert id per BLOCK_M block. Routes to
     experts not on this rank go to a trailing bucket whose blocks carry
     expert id -1: those programs do nothing, so their rows stay zero.
  2. (Triton) GEMM1 over gathered rows x[pair // k] against the expert's gate
     and up halves, fused activation silu(gate) * up -> intermediate [P, I].
  3. (Triton) GEMM2 against the expert's w2 with the routing weight multiplied
     in, scattered back to row `pair` of a [T*k, H] buffer.
  4. (torch) Sum the k rows of each token.
Accumulation is fp32 throughout; the result is returned in x.dtype.

CPU: Triton has no CPU driver, so without TRITON_INTERPRET=1 a launch fails
with "0 active drivers". Triton consults the variable when a kernel is
decorated with @triton.jit (3.9: interpreter vs compiler is fixed then) and
documents it as something to set before import, so the default is set here,
before `import triton`, and only when torch sees no CUDA device (on a GPU
machine the compiled path must stay the default). setdefault leaves an
explicit TRITON_INTERPRET=0 alone. Side effect: the variable stays set for the
rest of the process, so triton kernels imported later are interpreted too. Under the interpreter the cost is
dominated by the number of program instances, so CPU uses large tiles, and
tiles are upcast to fp32 before tl.dot because bf16 dot is wrong there.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from moe_twin_kernels import set_triton_mode

set_triton_mode()

import triton  # noqa: E402  (must follow the TRITON_INTERPRET default above)
import triton.language as tl  # noqa: E402

from moe_twin_kernels.errors import KernelUnavailable  # noqa: E402
from moe_twin_kernels.torch_ref import _check_shapes  # noqa: E402

__all__ = ["TileConfig", "align_routes", "fused_moe_triton", "pick_tiles"]

# Fixed when the kernels below are decorated: that is when triton decides
# between the interpreter and the compiler.
_INTERPRETED: bool = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _gemm1_act_kernel(
    x_ptr,
    w13_ptr,
    inter_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_pairs,
    hidden,
    inter,
    top_k,
    stride_xt,
    stride_xh,
    stride_we,
    stride_wn,
    stride_wk,
    stride_im,
    stride_in,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of act = silu(x_g @ gate^T) * (x_g @ up^T)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        # The sorted array is padded to whole blocks, so this load needs no mask.
        pairs = tl.load(sorted_pairs_ptr + offs_m)
        row_ok = pairs < num_pairs  # sentinel rows compute zeros
        tokens = pairs // top_k
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < inter
        w_base = w13_ptr + expert.to(tl.int64) * stride_we
        acc_gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, hidden, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < hidden
            a = tl.load(
                x_ptr + tokens[:, None] * stride_xt + offs_k[None, :] * stride_xh,
                mask=row_ok[:, None] & k_ok[None, :],
                other=0.0,
            )
            w_mask = k_ok[:, None] & n_ok[None, :]
            # [BLOCK_K, BLOCK_N] views of the gate rows and the matching up rows (+ I rows).
            wg = tl.load(
                w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=w_mask,
                other=0.0,
            )
            wu = tl.load(
                w_base + (offs_n[None, :] + inter) * stride_wn + offs_k[:, None] * stride_wk,
                mask=w_mask,
                other=0.0,
            )
            if UPCAST:
                # "ieee": compiled fp32 must not silently drop to tf32.
                a = a.to(tl.float32)
                acc_gate = tl.dot(a, wg.to(tl.float32), acc_gate, input_precision="ieee")
                acc_up = tl.dot(a, wu.to(tl.float32), acc_up, input_precision="ieee")
            else:
                a = a.to(wg.dtype)
                acc_gate = tl.dot(a, wg, acc_gate)
                acc_up = tl.dot(a, wu, acc_up)
        act = acc_gate * tl.sigmoid(acc_gate) * acc_up
        tl.store(
            inter_ptr + offs_m[:, None] * stride_im + offs_n[None, :] * stride_in,
            act,
            mask=n_ok[None, :],
        )


@triton.jit
def _gemm2_weighted_kernel(
    inter_ptr,
    w2_ptr,
    out_ptr,
    topk_w_ptr,
    sorted_pairs_ptr,
    block_expert_ptr,
    num_pairs,
    hidden,
    inter,
    stride_im,
    stride_in,
    stride_we,
    stride_wn,
    stride_wk,
    stride_om,
    stride_on,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N tile of out[pair] = weight[pair] * act @ w2_e^T."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert >= 0:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        pairs = tl.load(sorted_pairs_ptr + offs_m)
        row_ok = pairs < num_pairs
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hidden
        w_base = w2_ptr + expert.to(tl.int64) * stride_we
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, inter, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_ok = offs_k < inter
            a = tl.load(
                inter_ptr + offs_m[:, None] * stride_im + offs_k[None, :] * stride_in,
                mask=k_ok[None, :],
                other=0.0,
            )
            w = tl.load(
                w_base + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk,
                mask=k_ok[:, None] & n_ok[None, :],
                other=0.0,
            )
            if UPCAST:
                acc = tl.dot(a, w.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(a.to(w.dtype), w, acc)
        # Weight applied in fp32 before the (single) rounding of the output.
        weight = tl.load(topk_w_ptr + pairs, mask=row_ok, other=0.0).to(tl.float32)
        acc = acc * weight[:, None]
        tl.store(
            out_ptr + pairs[:, None] * stride_om + offs_n[None, :] * stride_on,
            acc,
            mask=row_ok[:, None] & n_ok[None, :],
        )


@dataclass(frozen=True)
class TileConfig:
    """Tile sizes and launch options for one device kind."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4


def pick_tiles(device_type: str) -> TileConfig:
    """Large tiles under the CPU interpreter, GPU-sized tiles when compiled.

    Interpreter cost ~ number of program instances (numpy does big tiles
    cheaply). On the bench MoE (64 tok, H 128, I 256, 8 experts, top-2):
    16/32/32 -> ~1.6 s, 64/128/128 -> ~130 ms, 64/256/256 -> ~110 ms per call.
    """
    if device_type == "cpu":
        return TileConfig(block_m=64, block_n=256, block_k=256)
    return TileConfig(block_m=64, block_n=64, block_k=32, num_warps=4)


def align_routes(
    topk_ids: torch.Tensor, expert_offset: int, num_local_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort routes by local expert and pad each expert's run to whole blocks.

    Returns (sorted_pairs [num_blocks * block_m] int32, pair ids with sentinel
    T*k in the padding; block_expert [num_blocks] int32, the local expert of each
    block, -1 for the trailing blocks of routes to experts not on this rank).
    """
    flat = topk_ids.reshape(-1).long() - int(expert_offset)
    num_pairs = flat.numel()
    is_local = (flat >= 0) & (flat < num_local_experts)
    # Non-local routes share one extra bucket, placed last.
    bucket = torch.where(is_local, flat, torch.full_like(flat, num_local_experts))
    counts = torch.bincount(bucket, minlength=num_local_experts + 1)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded
    count_start = torch.cumsum(counts, 0) - counts
    order = torch.argsort(bucket, stable=True)
    sorted_bucket = bucket[order]
    rank_in_bucket = torch.arange(num_pairs, device=flat.device) - count_start[sorted_bucket]
    dest = padded_start[sorted_bucket] + rank_in_bucket
    total = int(padded.sum().item())  # host sync: the grid size depends on routing
    sorted_pairs = torch.full((total,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs[dest] = order.to(torch.int32)
    expert_of_bucket = torch.arange(num_local_experts + 1, dtype=torch.int32, device=flat.device)
    expert_of_bucket[-1] = -1
    block_expert = torch.repeat_interleave(expert_of_bucket, padded // block_m)
    return sorted_pairs, block_expert


def fused_moe_triton(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_offset: int = 0,
    tiles: TileConfig | None = None,
) -> torch.Tensor:
    """Triton fused MoE with the common kernel signature (see moe_twin_kernels.torch_ref).

    `tiles` overrides the device default (pick_tiles); used by tests/benchmarks.
    """
    e_local, inter = _check_shapes(x, topk_ids, topk_weights, w13, w2)
    if x.device.type == "cpu" and not _INTERPRETED:
        raise KernelUnavailable(
            "Triton kernel on CPU tensors needs the interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported (or use the 'torch' kernel)"
        )
    t, h = x.shape
    top_k = topk_ids.shape[1]
    num_pairs = t * top_k
    if num_pairs == 0 or e_local == 0:
        return torch.zeros_like(x)
    cfg = tiles if tiles is not None else pick_tiles(x.device.type)
    sorted_pairs, block_expert = align_routes(topk_ids, expert_offset, e_local, cfg.block_m)
    num_blocks = block_expert.numel()
    # Upcast under the interpreter (its bf16 dot multiplies raw bit patterns)
    # and whenever an operand is fp32 (full-precision fp32 dot; the cross-check
    # tolerance is 1e-4 relative). Compiled fp16/bf16 keep native tensor-core dots.
    upcast = _INTERPRETED or torch.float32 in (x.dtype, w13.dtype, w2.dtype)

    inter_buf = torch.empty((num_blocks * cfg.block_m, inter), dtype=torch.float32, device=x.device)
    grid1 = (num_blocks, triton.cdiv(inter, cfg.block_n))
    _gemm1_act_kernel[grid1](
        x,
        w13,
        inter_buf,
        sorted_pairs,
        block_expert,
        num_pairs,
        h,
        inter,
        top_k,
        x.stride(0),
        x.stride(1),
        w13.stride(0),
        w13.stride(1),
        w13.stride(2),
        inter_buf.stride(0),
        inter_buf.stride(1),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        UPCAST=upcast,
        num_warps=cfg.num_warps,
    )

    # Zero-filled: rows of non-local routes are never written.
    pair_out = torch.zeros((num_pairs, h), dtype=torch.float32, device=x.device)
    weights = topk_weights.reshape(-1).contiguous()
    grid2 = (num_blocks, triton.cdiv(h, cfg.block_n))
    _gemm2_weighted_kernel[grid2](
        inter_buf,
        w2,
        pair_out,
        weights,
        sorted_pairs,
        block_expert,
        num_pairs,
        h,
        inter,
        inter_buf.stride(0),
        inter_buf.stride(1),
        w2.stride(0),
        w2.stride(1),
        w2.stride(2),
        pair_out.stride(0),
        pair_out.stride(1),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        UPCAST=upcast,
        num_warps=cfg.num_warps,
    )
    return pair_out.view(t, top_k, h).sum(dim=1).to(x.dtype)
