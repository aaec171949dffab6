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

Everything here was written against flashinfer-python 0.7.2.post1 (read from
its Python source and the CUDA sources it ships in flashinfer/data/csrc). This
project has no GPU, so only the Python side (signatures, packing, error paths,
the checker's logic over gloo) is exercised here; `contract_check` is how a
GPU machine verifies the rest and must be re-run on every library upgrade.

One-sided (`flashinfer_nvlink_one_sided`), module flashinfer.comm.trtllm_moe_alltoall
-------------------------------------------------------------------------------------
    moe_a2a_get_workspace_size_per_rank(ep_size, max_num_tokens,
        total_dispatch_payload_size_per_token, combine_payload_size_per_token,
        eplb_stats_num_experts=0, *, backend='trtllm') -> int (bytes)
    moe_a2a_initialize(workspace, ep_rank, ep_size, max_num_tokens,
        eplb_stats_num_experts=0, *, backend='trtllm') -> metainfo (CPU int64)
    moe_a2a_dispatch(token_selected_experts, input_payloads, workspace, metainfo,
        runtime_max_tokens_per_rank, ep_rank, ep_size, top_k, num_experts,
        enable_pdl=None, eplb_local_stats=None, enable_rank_mask=False,
        active_rank_mask=None, *, backend='trtllm', recv_view_cache=None)
        -> (recv_payloads, combine_payload_offset, eplb_gathered_stats)
    moe_a2a_sanitize_expert_ids(expert_ids, workspace, metainfo, ep_rank,
        invalid_expert_id, enable_pdl=None, *, backend='trtllm')  (in place)
    moe_a2a_combine(payload, local_num_tokens, workspace, metainfo,
        runtime_max_tokens_per_rank, ep_rank, ep_size, top_k,
        combine_payload_offset, payload_in_workspace=False, output_dtype=None,
        output_scales=None, output_scalar_scale=1.0, sf_layout=layout_linear,
        output=None, *, use_low_precision=False, enable_pdl=None,
        enable_rank_mask=False, active_rank_mask=None, backend='trtllm') -> [T, H]

  We call them positionally with the leading arguments only (defaults: trtllm
  kernels, PDL auto, no EPLB, no rank mask, no FP8 combine). Payloads are
  [ids int32 [T,k], weights fp32 [T,k], x [T,H]]: 4-byte payloads first keeps
  every payload aligned to its element size, which the op checks. Each recv
  payload is a workspace view [ep_size, max_tokens_per_rank, *]: row (s, j) is
  the j-th token source s sent here; rows j >= count(s) are stale, and the
  sanitize call sets their ids to the invalid id. Received ids are the full
  global top-k. Combine stages the payload [ep_size, max_tokens_per_rank, H]
  into the workspace, then sums in fp32 one row per distinct target rank of
  each token and writes the payload dtype (bf16, fp16, fp32 or fp8).
  Limits (csrc/trtllm_moe_alltoall.cu, moeAlltoAllKernels.{h,cu}): ep_size <= 64,
  num_experts >= ep_size (non-divisible splits are ceil/floor, which our owner
  rule does not match, so we require divisibility), top_k in
  {1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 22} (others fail "Unsupported top_k").
  Initialisation: a Mapping, MNNVL memory of the size above per rank
  (MnnvlMemory(mapping, size).as_torch_strided_tensor(torch.uint8) ->
  [ep_size, size] uint8), moe_a2a_initialize on it, then a barrier so no peer
  publishes into a workspace still being zeroed (what MoeAlltoAll does).
  runtime_max_tokens_per_rank places rows in the receiver's buffer, so every
  rank must pass the same value: we always pass max_tokens_per_rank.

Two-sided (`flashinfer_nvlink_two_sided`), flashinfer.comm.trtllm_alltoall.MnnvlMoe
-------------------------------------------------------------------------------
    MnnvlMoe.get_moe_workspaces(mapping, config=None) -> uint64 [ep, *]
    MnnvlMoe.get_moe_prepare_workspace(mapping, config=None) -> uint64 [ep, *]
    MnnvlMoe.mnnvl_moe_alltoallv_prepare_without_allgather(expert_ids, scales,
        expert_statics, workspace, max_token_count_per_rank, ep_rank, ep_size,
        expert_count, slot_count, top_k)
        -> (MoEAlltoallInfo, recv_ids [ep*T, k] int32, recv_scales [ep*T, k] fp32, stats)
    MnnvlMoe.mnnvl_moe_alltoallv(x, alltoall_info, workspace, ep_rank, ep_size)
        -> [ep*T, H]
    MnnvlMoe.mnnvl_moe_alltoallv_combine(x, alltoall_info, workspace, ep_rank,
        ep_size, top_k, token_count) -> [token_count, H]

  The workspaces are MNNVL FIFOs cached process-wide by MnnvlMoe (one mapping
  per process; sized by mapping.tp_size, so the mapping is pure EP with
  tp_size = moe_ep_size = world). Received rows are packed: the first
  recv_rank_count_cumsum[-1] rows, grouped by source rank; ids owned by
  other ranks and all ids of the padding rows are set to slot_count (we pass
  num_experts) and we rewrite them to `invalid_expert_id`; padding rows of x
  and weights are uninitialised. Combine scatters one row per (token,
  contributing rank) into a zeroed [T*k, H] buffer in x's dtype and
  torch.sum()s over k (CUDA sums bf16/fp16 in fp32, rounding once).
  Limits (csrc/trtllm_alltoall*.cu): num_experts % 4 == 0 (and slot_count),
  1 <= top_k <= 32, hidden * itemsize % 16 == 0, ids int32, scales fp32.

Shared initialisation: torch.distributed initialised and the current CUDA
device set by the caller; TorchDistBackend(group) exchanges the MNNVL handles
(MnnvlConfig(comm_backend=...)); MnnvlMemory.initialize() then
MnnvlMemory.set_comm_from_config(mapping, config); Mapping(world_size=world,
rank=rank, gpus_per_node=world, tp_size=world, moe_ep_size=world). The
kernels are JIT-built by FlashInfer on first use (or taken from its cache).
Construction is collective: every rank of the group must construct.

In 0.7.2.post1 `MoeAlltoAll` and `MnnvlMoe` are deprecated in favour of
flashinfer.moe_ep.NVLinkOneSidedAlltoAll / NVLinkTwoSidedAlltoAll, which wrap
exactly the calls above; the functional moe_a2a_* API is not deprecated. The
MnnvlMoe deprecation warning is silenced around our calls, as moe_ep does.

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

import importlib
import importlib.metadata
import inspect
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist

from kernels import set_triton_mode

__all__ = [
    "BACKENDS",
    "FALLBACK",
    "MAX_EP_RANKS",
    "MIN_CAPABILITY",
    "ONE_SIDED",
    "ONE_SIDED_TOP_K",
    "TWO_SIDED",
    "A2AState",
    "A2AUnavailable",
    "Call",
    "FlashInferA2A",
    "StandInA2A",
    "StandInState",
    "api_problems",
    "available",
    "compact_rows",
    "config_problems",
    "contract_check",
    "expand_rows",
    "expected_combine",
    "flashinfer_version",
    "join_routing",
    "library_calls",
    "reference_experts",
    "remap_ids",
    "resolve",
    "split_routing",
    "to_library_routing",
    "valid_rows",
]

set_triton_mode()  # flashinfer imports triton: pick its mode first

ONE_SIDED = "flashinfer_nvlink_one_sided"
TWO_SIDED = "flashinfer_nvlink_two_sided"
BACKENDS: tuple[str, ...] = (ONE_SIDED, TWO_SIDED)
FALLBACK = "the torch.distributed all_to_all stand-in"

MIN_CAPABILITY = (9, 0)
MAX_EP_RANKS = 64  # kMaxRanks of the one-sided kernels (one uint64 rank mask)
# The one-sided kernels are instantiated for these top-k only (SWITCH_TOP_K).
ONE_SIDED_TOP_K = frozenset({1, 2, 4, 6, 8, 10, 12, 14, 16, 18, 22})
TWO_SIDED_MAX_TOP_K = 32
SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

_ONE = "flashinfer.comm.trtllm_moe_alltoall"
_TWO = "flashinfer.comm.trtllm_alltoall"
_MNNVL = "flashinfer.comm.mnnvl"

# Per-dtype (atol, rtol) for comparing combined outputs. Partials are rounded
# to the payload dtype before the fp32 sum; the sum is rounded once more.
_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


class A2AUnavailable(Exception):
    """The FlashInfer all-to-all cannot run here; the caller should fall back."""

    def __init__(self, backend: str, reason: str, fallback: str = FALLBACK) -> None:
        self.backend = backend
        self.reason = reason
        self.fallback = fallback
        super().__init__(f"{backend}: FlashInfer all-to-all unavailable ({reason}); use {fallback}")


def _check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown FlashInfer all-to-all backend {backend!r}; expected one of {BACKENDS}")


def flashinfer_version() -> str | None:
    """The installed flashinfer-python version, without importing it (None if absent)."""
    try:
        return importlib.metadata.version("flashinfer-python")
    except importlib.metadata.PackageNotFoundError:
        return None


# ---- the library calls, as data ---------------------------------------------------------
#
# Every FlashInfer call the engines make is built by one of the *_call
# functions below and run with `invoke`. `library_calls` builds the same calls
# with placeholders so `api_problems` (and the tests) can bind them against the
# installed signatures: an upgrade that renames or drops an argument shows up
# as "API not found" instead of a failure on a GPU machine.


@dataclass(frozen=True)
class Call:
    """One library call: target is "module:attr[.attr]"."""

    target: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)


class _Placeholder:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"<{self.name}>"


def resolve(target: str) -> Any:
    """Import "module:attr.attr" and return the object (ImportError/AttributeError if absent)."""
    module_name, _, qualname = target.partition(":")
    obj: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def invoke(call: Call) -> Any:
    return resolve(call.target)(*call.args, **call.kwargs)


@contextmanager
def _quiet_deprecation() -> Iterator[None]:
    # MnnvlMoe is deprecated but still what moe_ep's two-sided backend wraps.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "MnnvlMoe is deprecated", DeprecationWarning)
        yield


def torch_dist_backend_call(group: Any) -> Call:
    return Call("flashinfer.comm.comm_backend:TorchDistBackend", (), {"group": group})


def mapping_call(rank: int, world: int) -> Call:
    # Pure EP: tp_size == moe_ep_size == world (MnnvlMoe sizes by tp_size,
    # set_comm_from_config orders ranks by tp_rank).
    return Call(
        "flashinfer.comm.mapping:Mapping",
        (),
        {"world_size": world, "rank": rank, "gpus_per_node": world, "tp_size": world, "moe_ep_size": world},
    )


def mnnvl_config_call(comm: Any) -> Call:
    return Call(f"{_MNNVL}:MnnvlConfig", (), {"comm_backend": comm})


def mnnvl_initialize_call() -> Call:
    return Call(f"{_MNNVL}:MnnvlMemory.initialize")


def set_comm_call(mapping: Any, config: Any) -> Call:
    return Call(f"{_MNNVL}:MnnvlMemory.set_comm_from_config", (mapping, config))


def mnnvl_memory_call(mapping: Any, size: Any) -> Call:
    return Call(f"{_MNNVL}:MnnvlMemory", (mapping, size))


def mnnvl_as_tensor_call(mem: Any) -> Call:
    return Call(f"{_MNNVL}:MnnvlMemory.as_torch_strided_tensor", (mem, torch.uint8))


def one_sided_workspace_size_call(world: Any, max_tokens: Any, dispatch_bytes: Any, combine_bytes: Any) -> Call:
    return Call(f"{_ONE}:moe_a2a_get_workspace_size_per_rank", (world, max_tokens, dispatch_bytes, combine_bytes))


def one_sided_initialize_call(workspace: Any, rank: Any, world: Any, max_tokens: Any) -> Call:
    return Call(f"{_ONE}:moe_a2a_initialize", (workspace, rank, world, max_tokens))


def one_sided_dispatch_call(
    ids32: Any, payloads: Any, workspace: Any, metainfo: Any, max_tokens: Any,
    rank: Any, world: Any, top_k: Any, num_experts: Any,
) -> Call:
    return Call(
        f"{_ONE}:moe_a2a_dispatch",
        (ids32, payloads, workspace, metainfo, max_tokens, rank, world, top_k, num_experts),
    )


def one_sided_sanitize_call(ids_recv: Any, workspace: Any, metainfo: Any, rank: Any, invalid_id: Any) -> Call:
    return Call(f"{_ONE}:moe_a2a_sanitize_expert_ids", (ids_recv, workspace, metainfo, rank, invalid_id))


def one_sided_combine_call(
    payload: Any, local_tokens: Any, workspace: Any, metainfo: Any, max_tokens: Any,
    rank: Any, world: Any, top_k: Any, combine_offset: Any,
) -> Call:
    return Call(
        f"{_ONE}:moe_a2a_combine",
        (payload, local_tokens, workspace, metainfo, max_tokens, rank, world, top_k, combine_offset),
    )


def two_sided_workspace_call(mapping: Any, config: Any) -> Call:
    return Call(f"{_TWO}:MnnvlMoe.get_moe_workspaces", (mapping, config))


def two_sided_prepare_workspace_call(mapping: Any, config: Any) -> Call:
    return Call(f"{_TWO}:MnnvlMoe.get_moe_prepare_workspace", (mapping, config))


def two_sided_prepare_call(
    ids32: Any, w32: Any, prepare_workspace: Any, max_tokens: Any,
    rank: Any, world: Any, num_experts: Any, top_k: Any,
) -> Call:
    # slot_count == num_experts: no redundant expert slots (EPLB off).
    return Call(
        f"{_TWO}:MnnvlMoe.mnnvl_moe_alltoallv_prepare_without_allgather",
        (ids32, w32, None, prepare_workspace, max_tokens, rank, world, num_experts, num_experts, top_k),
    )


def two_sided_alltoallv_call(x: Any, info: Any, workspace: Any, rank: Any, world: Any) -> Call:
    return Call(f"{_TWO}:MnnvlMoe.mnnvl_moe_alltoallv", (x, info, workspace, rank, world))


def two_sided_combine_call(
    y: Any, info: Any, workspace: Any, rank: Any, world: Any, top_k: Any, local_tokens: Any
) -> Call:
    return Call(
        f"{_TWO}:MnnvlMoe.mnnvl_moe_alltoallv_combine",
        (y, info, workspace, rank, world, top_k, local_tokens),
    )


def library_calls(backend: str) -> list[Call]:
    """Every call the backend's engine makes, with placeholder arguments."""
    _check_backend(backend)
    p = _Placeholder
    shared = [
        torch_dist_backend_call(p("group")),
        mapping_call(0, 2),
        mnnvl_config_call(p("comm")),
        mnnvl_initialize_call(),
    ]
    if backend == ONE_SIDED:
        return shared + [
            set_comm_call(p("mapping"), p("config")),
            one_sided_workspace_size_call(2, 8, 64, 32),
            mnnvl_memory_call(p("mapping"), 1024),
            mnnvl_as_tensor_call(p("mem")),
            one_sided_initialize_call(p("workspace"), 0, 2, 8),
            one_sided_dispatch_call(p("ids32"), [p("ids32"), p("w32"), p("x")], p("workspace"),
                                    p("metainfo"), 8, 0, 2, 2, 8),
            one_sided_sanitize_call(p("ids_recv"), p("workspace"), p("metainfo"), 0, -1),
            one_sided_combine_call(p("payload"), 4, p("workspace"), p("metainfo"), 8, 0, 2, 2, 0),
        ]
    return shared + [
        two_sided_workspace_call(p("mapping"), p("config")),
        two_sided_prepare_workspace_call(p("mapping"), p("config")),
        two_sided_prepare_call(p("ids32"), p("w32"), p("prepare_workspace"), 8, 0, 2, 8, 2),
        two_sided_alltoallv_call(p("x"), p("info"), p("workspace"), 0, 2),
        two_sided_combine_call(p("y"), p("info"), p("workspace"), 0, 2, 2, 4),
    ]


def api_problems(backend: str | None = None) -> list[str]:
    """Entry points that are missing or no longer accept our arguments (empty: all fine)."""
    problems: list[str] = []
    for b in BACKENDS if backend is None else (backend,):
        for call in library_calls(b):
            try:
                fn = resolve(call.target)
            except Exception as exc:  # ImportError, AttributeError, or a broken import
                problems.append(f"{call.target} not found ({type(exc).__name__}: {exc})")
                continue
            try:
                sig = inspect.signature(fn)
            except (TypeError, ValueError):
                continue  # builtins without a signature cannot be checked
            try:
                sig.bind(*call.args, **call.kwargs)
            except TypeError as exc:
                problems.append(f"{call.target}{sig} rejects our arguments ({exc})")
    return sorted(set(problems))


# ---- availability and configuration -----------------------------------------------------


def available(backend: str | None = None) -> tuple[bool, str]:
    """Whether the FlashInfer all-to-all can run here, and if not why. Never raises
    (except ValueError for an unknown backend name)."""
    if backend is not None:
        _check_backend(backend)
    try:
        return _available(backend)
    except Exception as exc:  # a probe itself failing means "cannot run here"
        return False, f"availability probe failed ({type(exc).__name__}: {exc})"


def _available(backend: str | None) -> tuple[bool, str]:
    try:
        import flashinfer  # noqa: F401  (seconds to import; only here and in engines)
    except Exception as exc:
        return False, f"flashinfer not importable ({type(exc).__name__}: {exc})"
    version = flashinfer_version() or "?"
    problems = api_problems(backend)
    if problems:
        return False, f"API not found in flashinfer {version}: " + "; ".join(problems)
    if not torch.cuda.is_available():
        return False, (
            f"no CUDA device (torch {torch.__version__}, built for CUDA {torch.version.cuda}, "
            f"{torch.cuda.device_count()} device(s) visible)"
        )
    major, minor = torch.cuda.get_device_capability()
    if (major, minor) < MIN_CAPABILITY:
        need = f"sm_{MIN_CAPABILITY[0]}{MIN_CAPABILITY[1]}"
        return False, f"GPU arch sm_{major}{minor} not supported (needs {need}+)"
    from flashinfer.comm.mnnvl import MnnvlMemory

    try:
        mnnvl = bool(MnnvlMemory.supports_mnnvl())
    except Exception as exc:
        return False, f"MNNVL not supported: NVLink probe failed ({type(exc).__name__}: {exc})"
    if not mnnvl:
        return False, "MNNVL not supported: this GPU has no P2P-capable NVLink or not all links are up"
    return True, f"flashinfer {version} on sm_{major}{minor} with NVLink"


def config_problems(
    backend: str,
    world: int,
    num_experts: int,
    top_k: int,
    hidden: int,
    dtype: torch.dtype,
    max_tokens_per_rank: int,
) -> list[str]:
    """Why the library kernels cannot run this layer configuration (empty: they can)."""
    _check_backend(backend)
    out: list[str] = []
    if world < 1 or num_experts < 1 or top_k < 1 or hidden < 1 or max_tokens_per_rank < 1:
        return [f"sizes must be positive (world={world}, num_experts={num_experts}, top_k={top_k}, "
                f"hidden={hidden}, max_tokens_per_rank={max_tokens_per_rank})"]
    if num_experts % world:
        out.append(f"num_experts={num_experts} not divisible by world={world} (the stand-in's "
                   "owner rule expert // local_experts needs an even split)")
    if top_k > num_experts:
        out.append(f"top_k={top_k} > num_experts={num_experts}")
    if dtype not in SUPPORTED_DTYPES:
        out.append(f"dtype {dtype} not supported (bf16, fp16, fp32)")
    if backend == ONE_SIDED:
        if world > MAX_EP_RANKS:
            out.append(f"world={world} > {MAX_EP_RANKS} ranks")
        if top_k not in ONE_SIDED_TOP_K:
            out.append(f"top_k={top_k} has no one-sided kernel (supported: {sorted(ONE_SIDED_TOP_K)})")
    else:
        if num_experts % 4:
            out.append(f"num_experts={num_experts} not divisible by 4 (two-sided prepare kernel)")
        if top_k > TWO_SIDED_MAX_TOP_K:
            out.append(f"top_k={top_k} > {TWO_SIDED_MAX_TOP_K} (two-sided prepare kernel)")
        if dtype in SUPPORTED_DTYPES and (hidden * dtype.itemsize) % 16:
            out.append(f"hidden={hidden} x {dtype.itemsize} bytes is not a multiple of 16 bytes "
                       "(two-sided moe_comm)")
    return out


def one_sided_bytes_per_token(top_k: int, hidden: int, dtype: torch.dtype) -> tuple[int, int]:
    """(dispatch, combine) payload bytes per token for the one-sided workspace."""
    return top_k * 4 + top_k * 4 + hidden * dtype.itemsize, hidden * dtype.itemsize


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


def remap_ids(ids: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """Replace a library sentinel id by ours (in place when they differ)."""
    if old != new:
        ids.masked_fill_(ids == old, new)
    return ids


# ---- the adapter -------------------------------------------------------------------------


@dataclass(eq=False)  # holds tensors: compare states by identity
class A2AState:
    """What combine needs from a dispatch (FlashInferA2A)."""

    backend: str
    local_tokens: int
    padded_rows: int
    valid: torch.Tensor  # bool [padded_rows]: which library rows became x_recv rows
    recv_counts: list[int]  # rows received from each source rank
    handle: Any = field(repr=False, default=None)  # combine offset / MoEAlltoallInfo


@dataclass
class _Padded:
    """An engine's dispatch result in the library's padded layout."""

    x: torch.Tensor  # [padded_rows, H]
    ids: torch.Tensor  # [padded_rows, k] int32, invalid_id where no token / not usable here
    weights: torch.Tensor  # [padded_rows, k] fp32
    recv_counts: torch.Tensor  # [world]
    handle: Any


class _Engine(Protocol):
    padded_rows: int
    device: torch.device

    def dispatch(self, x: torch.Tensor, ids32: torch.Tensor, w32: torch.Tensor) -> _Padded: ...

    def combine(self, y_pad: torch.Tensor, handle: Any, local_tokens: int) -> torch.Tensor: ...


@dataclass
class _Mnnvl:
    mapping: Any
    config: Any
    comm: Any


def _mnnvl_setup(rank: int, world: int, group: Any) -> _Mnnvl:
    comm = invoke(torch_dist_backend_call(group))
    if (comm.Get_rank(), comm.Get_size()) != (rank, world):
        raise ValueError(f"rank/world {rank}/{world} do not match the process group's "
                         f"{comm.Get_rank()}/{comm.Get_size()}")
    mapping = invoke(mapping_call(rank, world))
    config = invoke(mnnvl_config_call(comm))
    invoke(mnnvl_initialize_call())
    return _Mnnvl(mapping, config, comm)


class _OneSidedEngine:
    """moe_a2a_* over an MNNVL workspace we own (CUDA only; not run in this project)."""

    def __init__(self, rank: int, world: int, num_experts: int, top_k: int, hidden: int,
                 max_tokens: int, dtype: torch.dtype, invalid_id: int, group: Any) -> None:
        self.rank, self.world, self.num_experts, self.top_k = rank, world, num_experts, top_k
        self.max_tokens, self.invalid_id = max_tokens, invalid_id
        self.padded_rows = world * max_tokens
        self.device = torch.device("cuda", torch.cuda.current_device())
        m = _mnnvl_setup(rank, world, group)
        # Without this, MnnvlMemory falls back to an MPI communicator.
        invoke(set_comm_call(m.mapping, m.config))
        dispatch_bytes, combine_bytes = one_sided_bytes_per_token(top_k, hidden, dtype)
        size = invoke(one_sided_workspace_size_call(world, max_tokens, dispatch_bytes, combine_bytes))
        self._mem = invoke(mnnvl_memory_call(m.mapping, size))  # keep alive: __del__ unmaps
        self.workspace = invoke(mnnvl_as_tensor_call(self._mem))
        self.metainfo = invoke(one_sided_initialize_call(self.workspace, rank, world, max_tokens))
        # No peer may publish into a workspace another rank is still zeroing.
        torch.cuda.synchronize()
        m.comm.barrier()

    def dispatch(self, x: torch.Tensor, ids32: torch.Tensor, w32: torch.Tensor) -> _Padded:
        recv, offset, _stats = invoke(one_sided_dispatch_call(
            ids32, [ids32, w32, x], self.workspace, self.metainfo, self.max_tokens,
            self.rank, self.world, self.top_k, self.num_experts))
        ids_r, w_r, x_r = recv  # each [world, max_tokens, *], workspace-backed
        invoke(one_sided_sanitize_call(ids_r, self.workspace, self.metainfo, self.rank, self.invalid_id))
        counts = (ids_r != self.invalid_id).any(dim=2).sum(dim=1)
        return _Padded(x_r.flatten(0, 1), ids_r.flatten(0, 1), w_r.flatten(0, 1), counts, offset)

    def combine(self, y_pad: torch.Tensor, handle: Any, local_tokens: int) -> torch.Tensor:
        payload = y_pad.view(self.world, self.max_tokens, -1)
        return invoke(one_sided_combine_call(
            payload, local_tokens, self.workspace, self.metainfo, self.max_tokens,
            self.rank, self.world, self.top_k, handle))


class _TwoSidedEngine:
    """MnnvlMoe all-to-all-v over its cached FIFO workspaces (CUDA only; not run here)."""

    def __init__(self, rank: int, world: int, num_experts: int, top_k: int, hidden: int,
                 max_tokens: int, dtype: torch.dtype, invalid_id: int, group: Any) -> None:
        self.rank, self.world, self.num_experts, self.top_k = rank, world, num_experts, top_k
        self.max_tokens, self.invalid_id = max_tokens, invalid_id
        self.padded_rows = world * max_tokens
        self.device = torch.device("cuda", torch.cuda.current_device())
        m = _mnnvl_setup(rank, world, group)
        with _quiet_deprecation():
            self.workspace = invoke(two_sided_workspace_call(m.mapping, m.config))
            self.prepare_workspace = invoke(two_sided_prepare_workspace_call(m.mapping, m.config))

    def dispatch(self, x: torch.Tensor, ids32: torch.Tensor, w32: torch.Tensor) -> _Padded:
        info, ids_r, w_r, _stats = invoke(two_sided_prepare_call(
            ids32, w32, self.prepare_workspace, self.max_tokens, self.rank, self.world,
            self.num_experts, self.top_k))
        x_r = invoke(two_sided_alltoallv_call(x, info, self.workspace, self.rank, self.world))
        # The prepare kernel marks padding and other ranks' picks with slot_count.
        remap_ids(ids_r, self.num_experts, self.invalid_id)
        cumsum = info.recv_rank_count_cumsum.to(torch.int64)
        counts = torch.diff(cumsum, prepend=cumsum.new_zeros(1))
        return _Padded(x_r, ids_r, w_r, counts, info)

    def combine(self, y_pad: torch.Tensor, handle: Any, local_tokens: int) -> torch.Tensor:
        return invoke(two_sided_combine_call(
            y_pad, handle, self.workspace, self.rank, self.world, self.top_k, local_tokens))


_ENGINES: dict[str, Callable[..., _Engine]] = {ONE_SIDED: _OneSidedEngine, TWO_SIDED: _TwoSidedEngine}


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
        _check_backend(backend)
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
        self._engine: _Engine = _ENGINES[backend](
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
    def _from_engine(cls, engine: _Engine, backend: str, rank: int, world: int, num_experts: int,
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


# ---- the stand-in semantics, same interface ---------------------------------------------


@dataclass(eq=False)
class StandInState:
    order: torch.Tensor  # local token index of every row sent, grouped by destination
    send: list[int]
    recv: list[int]
    rows: int

    @property
    def recv_counts(self) -> list[int]:
        return self.recv


class StandInA2A:
    """ops.py's stand-in semantics (torch.distributed all_to_all_single) behind
    FlashInferA2A's interface; runs on gloo (CPU) and NCCL (CUDA)."""

    def __init__(self, rank: int, world: int, num_experts: int, top_k: int, *, group: Any = None) -> None:
        if num_experts % world:
            raise ValueError(f"num_experts={num_experts} not divisible by world={world}")
        self.rank, self.world, self.num_experts, self.top_k = rank, world, num_experts, top_k
        self.local_experts = num_experts // world
        self.group = group

    def _a2a(self, t: torch.Tensor, out_rows: int, out_split: list[int], in_split: list[int]) -> torch.Tensor:
        out = t.new_empty((out_rows, *t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), out_split, in_split, group=self.group)
        return out

    def dispatch(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StandInState]:
        ids = topk_ids.to(torch.int64)
        owners = ids // self.local_experts
        per_dest = [torch.nonzero((owners == o).any(dim=1)).flatten() for o in range(self.world)]
        counts = torch.tensor([len(r) for r in per_dest], dtype=torch.int64, device=x.device)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        order = torch.cat(per_dest)
        send, recv = counts.tolist(), recv_counts.tolist()
        n = sum(recv)
        # Separate exchanges keep ids exact and x in its own dtype.
        x_recv = self._a2a(x[order], n, recv, send)
        ids_recv = self._a2a(ids[order], n, recv, send)
        w_recv = self._a2a(topk_weights.to(torch.float32)[order], n, recv, send)
        return x_recv, ids_recv, w_recv, StandInState(order, send, recv, x.shape[0])

    def combine(self, y: torch.Tensor, state: StandInState) -> torch.Tensor:
        back = self._a2a(y, sum(state.send), state.send, state.recv)
        out = torch.zeros((state.rows, y.shape[1]), dtype=torch.float32, device=y.device)
        out.index_add_(0, state.order, back.float())  # one row per contributing rank, fp32
        return out.to(y.dtype)


# ---- the contract check ------------------------------------------------------------------


def _expert_scale(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    # A distinct positive factor per expert: a misrouted or dropped row changes the sum.
    return 1.0 + (ids.clamp(min=0).to(torch.float32) + 1.0) / num_experts


def reference_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rank: int, local_experts: int, num_experts: int
) -> torch.Tensor:
    """A cheap deterministic "expert layer": expert e scales a row by 1 + (e+1)/E.
    Only this rank's experts count; weights are applied; output in x's dtype."""
    ids64 = ids.to(torch.int64)
    lo = rank * local_experts
    local = (ids64 >= lo) & (ids64 < lo + local_experts)
    coef = (weights.to(torch.float32) * _expert_scale(ids64, num_experts) * local).sum(dim=1)
    return (x.to(torch.float32) * coef[:, None]).to(x.dtype)


def expected_combine(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """What dispatch -> reference_experts -> combine must give, in fp32 (closed form)."""
    coef = (weights.to(torch.float32) * _expert_scale(ids.to(torch.int64), num_experts)).sum(dim=1)
    return x.to(torch.float32) * coef[:, None]


def _inputs(rank: int, tokens: int, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype,
            device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + rank)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    # Distinct experts per token, as a router's top-k gives.
    ids = torch.empty(tokens, top_k, dtype=torch.int64)
    for t in range(tokens):
        ids[t] = torch.randperm(num_experts, generator=g)[:top_k]
    w = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=1)
    return x.to(device), ids.to(device), w.to(device)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _diagnose(out: torch.Tensor, expected: torch.Tensor, contributors: torch.Tensor, atol: float,
              rtol: float) -> str:
    """Name what the library's combine did when it is not the sum."""
    o = out.float()
    if torch.allclose(o, expected, atol=atol, rtol=rtol):
        return "sum over contributing ranks (contract holds)"
    if bool((contributors > 1).any()) and torch.allclose(
            o * contributors[:, None].float(), expected, atol=atol, rtol=rtol):
        return "mean over contributing ranks, not the sum"
    if not bool(o.abs().gt(0).any()):
        return "all zeros: nothing came back"
    return f"unexplained: differs from the sum by up to {_diff(o, expected):.3g}"


def contract_check(
    backend: str,
    rank: int,
    world: int,
    num_experts: int,
    top_k: int,
    hidden: int,
    max_tokens_per_rank: int,
    dtype: torch.dtype,
    *,
    tokens: int | None = None,
    seed: int = 0,
    group: Any = None,
    device: str | torch.device | None = None,
    adapter_factory: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Run FlashInfer's dispatch/combine and the stand-in on the same inputs and
    compare (call on every rank of the group, on a GPU machine). Re-run after
    every flashinfer upgrade: whether combine reduces is a library behaviour.

    Returns {"ran": False, "reason": ...} where the library cannot run, else a
    report with "ok" (agreed over all ranks), the max differences against the
    stand-in and against the closed-form sum, per-source received row counts
    and a diagnosis of what combine did. `adapter_factory` replaces the
    library adapter (tests use it to check this checker on CPU over gloo).
    """
    _check_backend(backend)
    if adapter_factory is None:
        ok, reason = available(backend)
        if not ok:
            return {"ran": False, "backend": backend, "reason": reason}
        problems = config_problems(backend, world, num_experts, top_k, hidden, dtype, max_tokens_per_rank)
        if problems:
            return {"ran": False, "backend": backend, "reason": "unsupported configuration: " + "; ".join(problems)}

        def adapter_factory() -> Any:
            return FlashInferA2A(backend, rank, world, num_experts, top_k, hidden, max_tokens_per_rank,
                                 dtype, group=group)

        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not dist.is_initialized():
        return {"ran": False, "backend": backend, "reason": "torch.distributed is not initialised "
                "(call contract_check on every rank of the EP group)"}
    if (dist.get_rank(group), dist.get_world_size(group)) != (rank, world):
        raise ValueError(f"rank/world {rank}/{world} do not match the group's "
                         f"{dist.get_rank(group)}/{dist.get_world_size(group)}")
    if tokens is None:
        # Uneven token counts across ranks, as in real batches.
        tokens = max(1, max_tokens_per_rank - rank % 2)
    local_experts = num_experts // world
    x, ids, w = _inputs(rank, tokens, hidden, num_experts, top_k, dtype, dev, seed)

    lib = adapter_factory()
    xr, ir, wr, st = lib.dispatch(x, ids, w)
    out_lib = lib.combine(reference_experts(xr, ir, wr, rank, local_experts, num_experts), st)

    ref = StandInA2A(rank, world, num_experts, top_k, group=group)
    xs, is_, ws, sst = ref.dispatch(x, ids, w)
    out_ref = ref.combine(reference_experts(xs, is_, ws, rank, local_experts, num_experts), sst)

    expected = expected_combine(x, ids, w, num_experts)
    atol, rtol = _TOLERANCE.get(dtype, (1.6e-2, 1.6e-2))
    owners = torch.sort(ids.to(torch.int64) // local_experts, dim=1).values
    contributors = (owners.diff(dim=1) != 0).sum(dim=1) + 1
    shape_ok = tuple(out_lib.shape) == tuple(out_ref.shape) == (tokens, hidden)
    vs_ref = shape_ok and torch.allclose(out_lib.float(), out_ref.float(), atol=atol, rtol=rtol)
    reduces = shape_ok and torch.allclose(out_lib.float(), expected, atol=atol, rtol=rtol)
    counts_match = list(st.recv_counts) == list(sst.recv_counts)
    ok_here = bool(vs_ref and reduces and counts_match)

    flag = torch.tensor([1 if ok_here else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return {
        "ran": True,
        "ok": bool(flag.item()),
        "ok_this_rank": ok_here,
        "backend": backend,
        "flashinfer": flashinfer_version(),
        "rank": rank,
        "world": world,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "rows_received": int(xr.shape[0]),
        "recv_counts": list(st.recv_counts),
        "recv_counts_standin": list(sst.recv_counts),
        "recv_counts_match": counts_match,
        "shape": list(out_lib.shape),
        "max_abs_diff_vs_standin": _diff(out_lib, out_ref) if shape_ok else None,
        "max_abs_diff_vs_sum": _diff(out_lib, expected) if shape_ok else None,
        "atol": atol,
        "rtol": rtol,
        "combine_reduces": bool(reduces),
        "diagnosis": _diagnose(out_lib, expected, contributors, atol, rtol) if shape_ok
        else f"combine returned shape {list(out_lib.shape)}, expected {[tokens, hidden]}",
    }
