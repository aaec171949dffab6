"""The one-sided and two-sided FlashInfer NVLink engines (CUDA only; never run here).

Each engine runs the library's dispatch/combine on the path the engine (vLLM)
takes with the pinned flashinfer-python (real.fi_api) and hands back the
library's padded receive layout (`_Padded`); real.flashinfer_a2a turns that
into the stand-in's contract. Written from the pinned version's Python
source and the CUDA sources it ships in flashinfer/data/csrc; this project
has no GPU, so only the Python side is exercised here.

One-sided, trtllm_moe_alltoall.MoeAlltoAll
------------------------------------------
The workspace is sized by moe_a2a_get_workspace_size_per_rank from the
per-token dispatch bytes (ids int32 + weights fp32 + x) and combine bytes
(x); MoeAlltoAll allocates MNNVL memory of that size per rank (cached
process-wide by geometry), initialises it and barriers, so no peer publishes
into a workspace still being zeroed. Payloads are [ids int32 [T,k], weights
fp32 [T,k], x [T,H]]: 4-byte payloads first keeps every payload aligned to
its element size, which the op checks. dispatch returns workspace views
[ep_size, max_tokens_per_rank, *]: row (s, j) is the j-th token source s
sent here; with invalid_token_expert_id and expert_id_payload_index=0 the
library rewrites every id of the stale rows j >= count(s) to the invalid id
(moeAlltoAllSanitize.cu; the rows that carry a token keep their full global
top-k, although MoeAlltoAll's docstring speaks of non-local ids). combine stages the payload [ep_size, max_tokens_per_rank,
H] into the workspace, then sums in fp32 one row per distinct target rank of
each token and writes the payload dtype. runtime_max_tokens_per_rank places
rows in the receiver's buffer, so every rank must pass the same value: we
always pass max_tokens_per_rank. Limits (csrc/trtllm_moe_alltoall.cu,
moeAlltoAllKernels.{h,cu}): ep_size <= 64, num_experts >= ep_size
(non-divisible splits are ceil/floor, which our owner rule does not match,
so we require divisibility), top_k in {1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 22}.

Two-sided, trtllm_alltoall.MnnvlMoe
-----------------------------------
The workspaces are MNNVL FIFOs cached process-wide by MnnvlMoe (one mapping
per process; sized by mapping.tp_size, so the mapping is pure EP with
tp_size = moe_ep_size = world). Received rows are packed: the first
recv_rank_count_cumsum[-1] rows, grouped by source rank; ids owned by other
ranks and all ids of the padding rows are set to slot_count (we pass
num_experts) and we rewrite them to `invalid_expert_id`; padding rows of x
and weights are uninitialised. Combine scatters one row per (token,
contributing rank) into a zeroed [T*k, H] buffer in x's dtype and
torch.sum()s over k (CUDA sums bf16/fp16 in fp32, rounding once). Limits
(csrc/trtllm_alltoall*.cu): num_experts % 4 == 0 (and slot_count),
1 <= top_k <= 32, hidden * itemsize % 16 == 0, ids int32, scales fp32.

Shared set-up: torch.distributed initialised and the current CUDA device set
by the caller; TorchDistBackend(group) exchanges the MNNVL handles
(MnnvlConfig(comm_backend=...)); Mapping(world_size=world, rank=rank,
gpus_per_node=world, tp_size=world, moe_ep_size=world). Kernels are JIT-built
by FlashInfer on first use (or taken from its cache). Construction is
collective: every rank of the group must construct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from real.fi_api import (
    ONE_SIDED,
    TWO_SIDED,
    invoke,
    mapping_call,
    mnnvl_config_call,
    mnnvl_initialize_call,
    one_sided_alltoall_call,
    one_sided_bytes_per_token,
    one_sided_combine_call,
    one_sided_dispatch_call,
    one_sided_workspace_size_call,
    quiet_deprecation,
    torch_dist_backend_call,
    two_sided_alltoallv_call,
    two_sided_combine_call,
    two_sided_prepare_call,
    two_sided_prepare_workspace_call,
    two_sided_workspace_call,
)


@dataclass
class Padded:
    """An engine's dispatch result in the library's padded layout."""

    x: torch.Tensor  # [padded_rows, H]
    ids: torch.Tensor  # [padded_rows, k] int32, invalid_id where no token / not usable here
    weights: torch.Tensor  # [padded_rows, k] fp32
    recv_counts: torch.Tensor  # [world]
    handle: Any


class Engine(Protocol):
    padded_rows: int
    device: torch.device

    def dispatch(self, x: torch.Tensor, ids32: torch.Tensor, w32: torch.Tensor) -> Padded: ...

    def combine(self, y_pad: torch.Tensor, handle: Any, local_tokens: int) -> torch.Tensor: ...


def remap_ids(ids: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Replace a library sentinel id by ours (in place when they differ)."""
    if old != new:
        ids.masked_fill_(ids == old, new)
    return ids


@dataclass
class Mnnvl:
    mapping: Any
    config: Any
    comm: Any


def mnnvl_setup(rank: int, world: int, group: Any) -> Mnnvl:
    comm = invoke(torch_dist_backend_call(group))
    if (comm.Get_rank(), comm.Get_size()) != (rank, world):
        raise ValueError(f"rank/world {rank}/{world} do not match the process group's "
                         f"{comm.Get_rank()}/{comm.Get_size()}")
    mapping = invoke(mapping_call(rank, world))
    config = invoke(mnnvl_config_call(comm))
    invoke(mnnvl_initialize_call())
    return Mnnvl(mapping, config, comm)


class OneSidedEngine:
    """MoeAlltoAll over its MNNVL workspace, as the engine drives it (CUDA only)."""

    def __init__(self, rank: int, world: int, num_experts: int, top_k: int, hidden: int,
                 max_tokens: int, dtype: torch.dtype, invalid_id: int, group: Any) -> None:
        self.rank, self.world, self.num_experts, self.top_k = rank, world, num_experts, top_k
        self.max_tokens, self.invalid_id = max_tokens, invalid_id
        self.padded_rows = world * max_tokens
        self.device = torch.device("cuda", torch.cuda.current_device())
        m = mnnvl_setup(rank, world, group)
        dispatch_bytes, combine_bytes = one_sided_bytes_per_token(top_k, hidden, dtype)
        size = invoke(one_sided_workspace_size_call(world, max_tokens, dispatch_bytes, combine_bytes))
        with quiet_deprecation():
            self.a2a = invoke(one_sided_alltoall_call(m.mapping, max_tokens, top_k, num_experts, size,
                                                      m.config))

    def dispatch(self, x: torch.Tensor, ids32: torch.Tensor, w32: torch.Tensor) -> Padded:
        ids_r, w_r, x_r = invoke(one_sided_dispatch_call(
            self.a2a, ids32, [ids32, w32, x], self.max_tokens, self.invalid_id))
        # Each [world, max_tokens, *], workspace-backed; stale rows carry only invalid ids.
        counts = (ids_r != self.invalid_id).any(dim=2).sum(dim=1)
        return Padded(x_r.flatten(0, 1), ids_r.flatten(0, 1), w_r.flatten(0, 1), counts, None)

    def combine(self, y_pad: torch.Tensor, handle: Any, local_tokens: int) -> torch.Tensor:
        # MoeAlltoAll keeps the dispatch's token count and combine offset itself.
        payload = y_pad.view(self.world, self.max_tokens, -1)
        return invoke(one_sided_combine_call(self.a2a, payload, self.max_tokens))


class TwoSidedEngine:
    """MnnvlMoe all-to-all-v over its cached FIFO workspaces, as the engine drives it (CUDA only)."""

    def __init__(self, rank: int, world: int, num_experts: int, top_k: int, hidden: int,
                 max_tokens: int, dtype: torch.dtype, invalid_id: int, group: Any) -> None:
        self.rank, self.world, self.num_experts, self.top_k = rank, world, num_experts, top_k
        self.max_tokens, self.invalid_id = max_tokens, invalid_id
        self.padded_rows = world * max_tokens
        self.device = torch.device("cuda", torch.cuda.current_device())
        m = mnnvl_setup(rank, world, group)
        with quiet_deprecation():
            self.workspace = invoke(two_sided_workspace_call(m.mapping, m.config))
            self.prepare_workspace = invoke(two_sided_prepare_workspace_call(m.mapping, m.config))

    def dispatch(self, x: torch.Tensor, ids32: torch.Tensor, w32: torch.Tensor) -> Padded:
        info, ids_r, w_r, _stats = invoke(two_sided_prepare_call(
            ids32, w32, self.prepare_workspace, self.max_tokens, self.rank, self.world,
            self.num_experts, self.top_k))
        x_r = invoke(two_sided_alltoallv_call(x, info, self.workspace, self.rank, self.world))
        # The prepare kernel marks padding and other ranks' picks with slot_count.
        remap_ids(ids_r, self.num_experts, self.invalid_id)
        cumsum = info.recv_rank_count_cumsum.to(torch.int64)
        counts = torch.diff(cumsum, prepend=cumsum.new_zeros(1))
        return Padded(x_r, ids_r, w_r, counts, info)

    def combine(self, y_pad: torch.Tensor, handle: Any, local_tokens: int) -> torch.Tensor:
        return invoke(two_sided_combine_call(
            y_pad, handle, self.workspace, self.rank, self.world, self.top_k, local_tokens))


ENGINES: dict[str, Callable[..., Engine]] = {ONE_SIDED: OneSidedEngine, TWO_SIDED: TwoSidedEngine}
