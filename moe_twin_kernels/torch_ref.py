"""Plain-torch fused-MoE expert computation: the reference every kernel is checked against.

Layout conventions (shared by all kernels in this package):
  x            [T, H]           activations
  topk_ids     [T, k]           GLOBAL expert ids chosen by the router
  topk_weights [T, k]           routing weights (applied inside the kernel)
  w13          [E_local, 2I, H] packed [gate; up]: rows 0:I gate, rows I:2I up
  w2           [E_local, H, I]  down projection

This rank holds global experts expert_offset .. expert_offset + E_local - 1.
Routes to other experts contribute zero; nothing is reduced across ranks, so
expert-parallel (EP) and tensor-parallel (TP) partial outputs must be summed by
the caller (or by the all-to-all combine).

Tensor parallelism splits each expert's intermediate dim. The caller passes
already-sliced weights; gate and up must be sliced with the SAME intermediate
indices (see shard_w13_w2): a naive contiguous slice of the packed w13 rows
would pair gate rows with other gate rows instead of their up rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["fused_moe_reference_f64", "fused_moe_torch", "shard_w13_w2"]


def _check_shapes(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
) -> tuple[int, int]:
    """Validate the common layout; return (E_local, I)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H], got shape {tuple(x.shape)}")
    t, h = x.shape
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != t:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T={t}, k]"
        )
    if w13.dim() != 3 or w13.shape[2] != h or w13.shape[1] % 2 != 0:
        raise ValueError(f"w13 must be [E_local, 2*I, H={h}], got {tuple(w13.shape)}")
    e_local, two_i, _ = w13.shape
    i = two_i // 2
    if tuple(w2.shape) != (e_local, h, i):
        raise ValueError(f"w2 must be [E_local={e_local}, H={h}, I={i}], got {tuple(w2.shape)}")
    return e_local, i


def _moe_loop(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_offset: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Loop over local experts in `dtype`; returns [T, H] in `dtype`."""
    e_local, i = _check_shapes(x, topk_ids, topk_weights, w13, w2)
    xc = x.to(dtype)
    out = torch.zeros(x.shape, dtype=dtype, device=x.device)
    local_ids = topk_ids.long() - int(expert_offset)
    for e in range(e_local):
        # One (token, slot) pair per route: a token that picks the same expert
        # twice gets both weights, matching kernels that treat pairs independently.
        tok, slot = (local_ids == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        h = xc[tok] @ w13[e].to(dtype).t()
        act = F.silu(h[:, :i]) * h[:, i:]
        y = act @ w2[e].to(dtype).t()
        y = y * topk_weights[tok, slot].to(dtype).unsqueeze(1)
        out.index_add_(0, tok, y)
    return out


def fused_moe_torch(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_offset: int = 0,
) -> torch.Tensor:
    """MoE experts of this rank, computed in fp32 and returned in x.dtype.

    out[t] = sum over slots j with topk_ids[t, j] local of
             topk_weights[t, j] * w2_e @ (silu(gate_e @ x[t]) * (up_e @ x[t])).
    """
    return _moe_loop(x, topk_ids, topk_weights, w13, w2, expert_offset, torch.float32).to(x.dtype)


def fused_moe_reference_f64(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_offset: int = 0,
) -> torch.Tensor:
    """Same as fused_moe_torch but computed and returned in float64 (ground truth)."""
    return _moe_loop(x, topk_ids, topk_weights, w13, w2, expert_offset, torch.float64)


def shard_w13_w2(
    w13: torch.Tensor, w2: torch.Tensor, tp_rank: int, tp_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tensor-parallel shard `tp_rank` of `tp_size` along the intermediate dim.

    Returns (w13_shard [E, 2*I/tp, H] packed [gate_shard; up_shard],
    w2_shard [E, H, I/tp]). Gate and up are sliced with the same indices so the
    shard's silu(gate) * up stays elementwise-correct; summing the kernel
    outputs over all shards gives the unsharded output. I must divide evenly.
    """
    if tp_size < 1 or not 0 <= tp_rank < tp_size:
        raise ValueError(f"need 0 <= tp_rank < tp_size, got tp_rank={tp_rank}, tp_size={tp_size}")
    i = w13.shape[1] // 2
    if i % tp_size != 0:
        raise ValueError(f"intermediate size {i} is not divisible by tp_size={tp_size}")
    s = i // tp_size
    lo, hi = tp_rank * s, (tp_rank + 1) * s
    w13_shard = torch.cat([w13[:, lo:hi], w13[:, i + lo : i + hi]], dim=1).contiguous()
    w2_shard = w2[:, :, lo:hi].contiguous()
    return w13_shard, w2_shard
