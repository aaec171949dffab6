"""FlashInfer NVLink token-routing all-to-all behind the stand-in's contract.

`real/ops.py` runs the token-routing backends `flashinfer_nvlink_one_sided`
and `flashinfer_nvlink_two_sided` as a torch.distributed all_to_all stand-in.
`FlashInferA2A` calls the real FlashInfer kernels instead, with the same
contract:

    dispatch(x[T, H], topk_ids[T, k], topk_weights[T, k])
        -> x_recv[R, H], ids_recv[R, k] int64, weights_recv[R, k] fp32, state
    combine(y[R, H], state) -> out[T, H]

Each token arrives at most once on every rank that owns one of its experts
(owner = expert_id // (num_experts // world)); the expert computation applies
the routing weights and sums over this rank's experts, one row per received
row; combine adds, in fp32, one row per contributing rank and applies no
weights. The R received rows are grouped by source rank (rank 0's first);
within a source the order is the library's (set by atomics), not token order.

The library side is split: real.fi_api pins flashinfer-python to the version
the pinned engine installs, lists the entry points the engine calls and
reports drift from them; real.fi_engines drives the one-sided and two-sided
kernels and documents their layouts; real.fi_contract holds the stand-in
behind this interface and `contract_check`, which a GPU machine runs (on
every library upgrade) to verify what this CPU-only project cannot.

Platform: CUDA; MnnvlMemory.supports_mnnvl() (P2P-capable NVLinks, all up),
which is the only platform check FlashInfer's own NVLink EP backends make
(moe_ep nvlink_platform_supported); and compute capability >= MIN_CAPABILITY.
The sm_90 floor is our policy, not a documented limit of these kernels:
FlashInfer's other MNNVL module and its moe_ep NCCL/NIXL transports are
Hopper+ only, and we would rather refuse older GPUs than guess. Handles are
exchanged as FABRIC handles where supported, else POSIX fds (one node).
Everywhere else `available()` says why and construction raises
`A2AUnavailable` naming the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from real.fi_api import (
    BACKENDS,
    FALLBACK,
    MAX_EP_RANKS,
    MIN_CAPABILITY,
    ONE_SIDED,
    ONE_SIDED_TOP_K,
    PINNED_FLASHINFER,
    TWO_SIDED,
    A2AUnavailable,
    Call,
    api_problems,
    available,
    check_backend,
    config_problems,
    drift_report,
    flashinfer_version,
    is_pinned_version,
    library_calls,
    resolve,
)
from real.fi_engines import ENGINES, Engine, remap_ids

__all__ = [
    "BACKENDS",
    "FALLBACK",
    "MAX_EP_RANKS",
    "MIN_CAPABILITY",
    "ONE_SIDED",
    "ONE_SIDED_TOP_K",
    "PINNED_FLASHINFER",
    "TWO_SIDED",
    "A2AState",
    "A2AUnavailable",
    "Call",
    "FlashInferA2A",
    "api_problems",
    "available",
    "compact_rows",
    "config_problems",
    "drift_report",
    "expand_rows",
    "flashinfer_version",
    "is_pinned_version",
    "join_routing",
    "library_calls",
    "remap_ids",
    "resolve",
    "split_routing",
    "to_library_routing",
    "valid_rows",
]


# ---- packing helpers (pure, CPU-testable) ------------------------------------------------


def to_library_routing(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Our routing (any int/float ids, any float weights) -> contiguous int32 ids
    and fp32 weights, as both libraries require. Out-of-range ids are refused:
    the kernels would compute a target rank from them and write out of bounds."""
    if topk_ids.dim() != 2 or topk_ids.shape != topk_weights.shape:
        raise ValueError(f"topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T, k]")
    if topk_ids.is_floating_point():
        # ops.py carries ids as floats inside the routing tensor; they must be whole.
        if topk_ids.numel() and not bool((topk_ids == topk_ids.round()).all()):
            raise ValueError("topk_ids carries non-integer values")
    ids = topk_ids.to(torch.int32).contiguous()
    if ids.numel():
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids must lie in [0, {num_experts}), got [{lo}, {hi}]")
    return ids, topk_weights.to(torch.float32).contiguous()


def split_routing(routing: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ops.py's routing tensor [T, 2, k] fp32 (ids as floats, weights) -> (ids int64, weights fp32)."""
    if routing.dim() != 3 or routing.shape[1] != 2:
        raise ValueError(f"routing must be [T, 2, k], got {tuple(routing.shape)}")
    return routing[:, 0, :].to(torch.int64), routing[:, 1, :].to(torch.float32).contiguous()


def join_routing(ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(ids, weights) [T, k] -> ops.py's routing tensor [T, 2, k] fp32 (ids exact below 2**24)."""
    if ids.shape != weights.shape or ids.dim() != 2:
        raise ValueError(f"ids {tuple(ids.shape)} and weights {tuple(weights.shape)} must both be [T, k]")
    return torch.stack([ids.to(torch.float32), weights.to(torch.float32)], dim=1)


def valid_rows(ids: torch.Tensor, invalid_id: int) -> torch.Tensor:
    """Rows of a padded receive buffer that carry a token: any id != invalid_id."""
    return (ids != invalid_id).any(dim=1)


def compact_rows(valid: torch.Tensor, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Keep the valid rows of each tensor (copies, so workspace views can be reused)."""
    return tuple(t[valid] for t in tensors)


def expand_rows(y: torch.Tensor, valid: torch.Tensor, rows: int) -> torch.Tensor:
    """Inverse of compact_rows: y's rows at the valid positions, zeros elsewhere."""
    n = int(valid.sum())
    if y.shape[0] != n:
        raise ValueError(f"y has {y.shape[0]} rows but dispatch delivered {n}")
    if valid.shape[0] != rows:
        raise ValueError(f"mask has {valid.shape[0]} rows, expected {rows}")
    out = y.new_zeros((rows, *y.shape[1:]))
    out[valid] = y
    return out


# ---- the adapter -------------------------------------------------------------------------


@dataclass(eq=False)  # holds tensors: compare states by identity
class A2AState:
    """What combine needs from a dispatch (FlashInferA2A)."""

    backend: str
    local_tokens: int
    padded_rows: int
    valid: torch.Tensor  # bool [padded_rows]: which library rows became x_recv rows
    recv_counts: list[int]  # rows received from each source rank
    handle: Any = field(repr=False, default=None)  # MoEAlltoallInfo (two-sided); None (one-sided)


class FlashInferA2A:
    """FlashInfer's NVLink dispatch/combine with the stand-in's contract (see module doc).

    Construction is collective over `group` (default: the default process
    group, whose size must be `world`). Raises A2AUnavailable where the
    library cannot run (the reason names the fallback).

    ids_recv are global expert ids as int64; ids of experts owned by other
    ranks may be `invalid_expert_id` instead (always so on two-sided), so the
    expert kernel must only evaluate ids in this rank's range. One dispatch
    may be outstanding at a time: combine it before the next dispatch.
    dispatch synchronises with the host (id range check, dropping the
    library's padding rows); a zero-copy padded mode would avoid that.
    """

    def __init__(
        self,
        backend: str,
        rank: int,
        world: int,
        num_experts: int,
        top_k: int,
        hidden: int,
        max_tokens_per_rank: int,
        dtype: torch.dtype,
        *,
        group: Any = None,
        invalid_expert_id: int = -1,
    ) -> None:
        check_backend(backend)
        ok, reason = available(backend)
        if not ok:
            raise A2AUnavailable(backend, reason)
        problems = config_problems(backend, world, num_experts, top_k, hidden, dtype, max_tokens_per_rank)
        if problems:
            raise A2AUnavailable(backend, "unsupported configuration: " + "; ".join(problems))
        if not dist.is_initialized():
            raise RuntimeError("FlashInferA2A needs torch.distributed initialised on every rank")
        self._setup(backend, rank, world, num_experts, top_k, hidden, max_tokens_per_rank, dtype,
                    invalid_expert_id)
        self._engine: Engine = ENGINES[backend](
            rank, world, num_experts, top_k, hidden, max_tokens_per_rank, dtype, invalid_expert_id, group)

    def _setup(self, backend: str, rank: int, world: int, num_experts: int, top_k: int, hidden: int,
               max_tokens_per_rank: int, dtype: torch.dtype, invalid_expert_id: int) -> None:
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        if 0 <= invalid_expert_id < num_experts:
            raise ValueError(f"invalid_expert_id={invalid_expert_id} is a real expert id")
        self.backend, self.rank, self.world = backend, rank, world
        self.num_experts, self.top_k, self.hidden = num_experts, top_k, hidden
        self.max_tokens_per_rank, self.dtype = max_tokens_per_rank, dtype
        self.invalid_expert_id = invalid_expert_id
        self._pending: A2AState | None = None

    @classmethod
    def _from_engine(cls, engine: Engine, backend: str, rank: int, world: int, num_experts: int,
                     top_k: int, hidden: int, max_tokens_per_rank: int, dtype: torch.dtype,
                     invalid_expert_id: int = -1) -> FlashInferA2A:
        # Tests drive the wrapper (checks, compaction, phases) with a fake engine on CPU.
        self = cls.__new__(cls)
        self._setup(backend, rank, world, num_experts, top_k, hidden, max_tokens_per_rank, dtype,
                    invalid_expert_id)
        self._engine = engine
        return self

    def dispatch(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, A2AState]:
        """Send each token to the ranks owning its experts (collective)."""
        if self._pending is not None:
            raise RuntimeError("dispatch called twice without combine (the library keeps one "
                               "dispatch's routing in its workspace)")
        if x.dim() != 2 or x.shape[1] != self.hidden:
            raise ValueError(f"x must be [T, {self.hidden}], got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            raise ValueError(f"x is {x.dtype}, the workspace was sized for {self.dtype}")
        if x.shape[0] > self.max_tokens_per_rank:
            raise ValueError(f"{x.shape[0]} tokens > max_tokens_per_rank={self.max_tokens_per_rank}")
        if topk_ids.shape != (x.shape[0], self.top_k):
            raise ValueError(f"topk_ids must be [{x.shape[0]}, {self.top_k}], got {tuple(topk_ids.shape)}")
        if x.device.type != self._engine.device.type:
            raise ValueError(f"x is on {x.device}, the all-to-all runs on {self._engine.device}")
        ids32, w32 = to_library_routing(topk_ids.to(x.device), topk_weights.to(x.device), self.num_experts)
        p = self._engine.dispatch(x.contiguous(), ids32, w32)
        valid = valid_rows(p.ids, self.invalid_expert_id)
        x_recv, ids_recv, w_recv = compact_rows(valid, p.x, p.ids, p.weights)
        state = A2AState(self.backend, x.shape[0], self._engine.padded_rows, valid,
                         [int(c) for c in p.recv_counts.tolist()], p.handle)
        if sum(state.recv_counts) != x_recv.shape[0]:
            raise RuntimeError(f"library reports {sum(state.recv_counts)} received rows, "
                               f"{x_recv.shape[0]} carry a token")
        self._pending = state
        return x_recv, ids_recv.to(torch.int64), w_recv.to(torch.float32), state

    def combine(self, y: torch.Tensor, state: A2AState) -> torch.Tensor:
        """Sum each token's per-rank expert outputs on its home rank (collective)."""
        if state is not self._pending:
            raise RuntimeError("combine needs the state of the outstanding dispatch")
        if y.dim() != 2 or y.shape[1] != self.hidden:
            raise ValueError(f"y must be [R, {self.hidden}], got {tuple(y.shape)}")
        if y.dtype != self.dtype:
            raise ValueError(f"y is {y.dtype}, the workspace was sized for {self.dtype}")
        y_pad = expand_rows(y.contiguous(), state.valid, state.padded_rows)
        out = self._engine.combine(y_pad, state.handle, state.local_tokens)
        self._pending = None
        return out

