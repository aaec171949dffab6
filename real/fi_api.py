"""The FlashInfer entry points the NVLink all-to-all adapter calls, pinned.

This project pins flashinfer-python to PINNED_FLASHINFER, the version the
pinned engine (vLLM) installs, and the adapter calls what that version
provides on the path the engine itself takes:

- one-sided (`flashinfer_nvlink_one_sided`): the engine's
  FlashInferNVLinkOneSidedManager sizes the workspace with
  `trtllm_moe_alltoall.moe_a2a_get_workspace_size_per_rank(...)`, builds
  `trtllm_moe_alltoall.MoeAlltoAll(mapping=, max_num_tokens=, top_k=,
  num_experts=, workspace_size_per_rank=, mnnvl_config=)`, and its
  prepare/finalize call `MoeAlltoAll.dispatch(token_selected_experts=,
  input_payloads=, runtime_max_tokens_per_rank=, invalid_token_expert_id=,
  expert_id_payload_index=)` and `MoeAlltoAll.combine(payload=,
  runtime_max_tokens_per_rank=)`;
- two-sided (`flashinfer_nvlink_two_sided`): FlashInferNVLinkTwoSidedManager
  gets `trtllm_alltoall.MnnvlMoe.get_moe_workspaces` /
  `get_moe_prepare_workspace`, and prepare/finalize call
  `MnnvlMoe.mnnvl_moe_alltoallv_prepare_without_allgather`,
  `MnnvlMoe.mnnvl_moe_alltoallv` and `MnnvlMoe.mnnvl_moe_alltoallv_combine`.

In the pinned version MoeAlltoAll and MnnvlMoe are deprecated in favour of
flashinfer.moe_ep.NVLinkOneSidedAlltoAll / NVLinkTwoSidedAlltoAll, which wrap
exactly these calls; later versions drop the trtllm_* modules (0.7.4 has
neither). Every call is built by a *_call function below and run with
`invoke`; `library_calls` builds the same calls with placeholders so
`api_problems` can bind them against the installed signatures on CPU.
`drift_report` says whether the installed version is the pinned one and
which entry points it lacks: on the pinned version an absent entry point is
a defect, on any other version it is drift from the pin.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from moe_twin_kernels import set_triton_mode

set_triton_mode()  # resolve() imports flashinfer, which imports triton: pick its mode first

PINNED_FLASHINFER = "0.7.2.post1"  # = vLLM's pin; pyproject.toml pins the same (tested)

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

# The deprecated classes the engine calls -> what the pinned version names as their successor.
SUCCESSORS: dict[str, str] = {
    f"{_ONE}:MoeAlltoAll": "flashinfer.moe_ep:NVLinkOneSidedAlltoAll",
    f"{_TWO}:MnnvlMoe": "flashinfer.moe_ep:NVLinkTwoSidedAlltoAll",
}


class A2AUnavailable(Exception):
    """The FlashInfer all-to-all cannot run here; the caller should fall back."""

    def __init__(self, backend: str, reason: str, fallback: str = FALLBACK) -> None:
        self.backend = backend
        self.reason = reason
        self.fallback = fallback
        super().__init__(f"{backend}: FlashInfer all-to-all unavailable ({reason}); use {fallback}")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown FlashInfer all-to-all backend {backend!r}; expected one of {BACKENDS}")


def flashinfer_version() -> str | None:
    """The installed flashinfer-python version, without importing it (None if absent)."""
    try:
        return importlib.metadata.version("flashinfer-python")
    except importlib.metadata.PackageNotFoundError:
        return None


def is_pinned_version() -> bool:
    """Whether the installed flashinfer-python is the version this project pins."""
    return flashinfer_version() == PINNED_FLASHINFER


# ---- the library calls, as data ---------------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One library call: target is "module:attr[.attr]"; a method's instance is args[0]."""

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
def quiet_deprecation() -> Iterator[None]:
    # The engine's classes are deprecated in the pinned version but still what
    # it (and moe_ep's own backends) call; their warning is not ours to show.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"(MnnvlMoe|MoeAlltoAll) is deprecated", DeprecationWarning)
        yield


def torch_dist_backend_call(group: Any) -> Call:
    return Call("flashinfer.comm.comm_backend:TorchDistBackend", (), {"group": group})


def mapping_call(rank: int, world: int) -> Call:
    # Pure EP: tp_size == moe_ep_size == world (MnnvlMoe sizes by tp_size,
    # set_comm_from_config orders ranks by tp_rank), as the engine maps it.
    return Call(
        "flashinfer.comm.mapping:Mapping",
        (),
        {"world_size": world, "rank": rank, "gpus_per_node": world, "tp_size": world, "moe_ep_size": world},
    )


def mnnvl_config_call(comm: Any) -> Call:
    return Call(f"{_MNNVL}:MnnvlConfig", (), {"comm_backend": comm})


def mnnvl_initialize_call() -> Call:
    return Call(f"{_MNNVL}:MnnvlMemory.initialize")


def one_sided_workspace_size_call(world: Any, max_tokens: Any, dispatch_bytes: Any, combine_bytes: Any) -> Call:
    return Call(f"{_ONE}:moe_a2a_get_workspace_size_per_rank", (), {
        "ep_size": world, "max_num_tokens": max_tokens,
        "total_dispatch_payload_size_per_token": dispatch_bytes,
        "combine_payload_size_per_token": combine_bytes,
    })


def one_sided_alltoall_call(mapping: Any, max_tokens: Any, top_k: Any, num_experts: Any,
                            workspace_bytes: Any, config: Any) -> Call:
    # Collective: allocates (or reuses) the MNNVL workspace, initialises it and barriers.
    return Call(f"{_ONE}:MoeAlltoAll", (), {
        "mapping": mapping, "max_num_tokens": max_tokens, "top_k": top_k,
        "num_experts": num_experts, "workspace_size_per_rank": workspace_bytes,
        "mnnvl_config": config,
    })


def one_sided_dispatch_call(a2a: Any, ids32: Any, payloads: Any, max_tokens: Any, invalid_id: Any) -> Call:
    # payloads[0] holds the ids, which the library sanitises to invalid_id.
    return Call(f"{_ONE}:MoeAlltoAll.dispatch", (a2a,), {
        "token_selected_experts": ids32, "input_payloads": payloads,
        "runtime_max_tokens_per_rank": max_tokens,
        "invalid_token_expert_id": invalid_id, "expert_id_payload_index": 0,
    })


def one_sided_combine_call(a2a: Any, payload: Any, max_tokens: Any) -> Call:
    return Call(f"{_ONE}:MoeAlltoAll.combine", (a2a,), {
        "payload": payload, "runtime_max_tokens_per_rank": max_tokens,
    })


def two_sided_workspace_call(mapping: Any, config: Any) -> Call:
    return Call(f"{_TWO}:MnnvlMoe.get_moe_workspaces", (mapping, config))


def two_sided_prepare_workspace_call(mapping: Any, config: Any) -> Call:
    return Call(f"{_TWO}:MnnvlMoe.get_moe_prepare_workspace", (mapping, config))


def two_sided_prepare_call(
    ids32: Any, w32: Any, prepare_workspace: Any, max_tokens: Any,
    rank: Any, world: Any, num_experts: Any, top_k: Any,
) -> Call:
    # slot_count == num_experts: no redundant expert slots (EPLB off), as the engine passes.
    return Call(
        f"{_TWO}:MnnvlMoe.mnnvl_moe_alltoallv_prepare_without_allgather",
        (ids32, w32, None, prepare_workspace, max_tokens, rank, world, num_experts, num_experts, top_k),
    )


def two_sided_alltoallv_call(x: Any, info: Any, workspace: Any, rank: Any, world: Any) -> Call:
    return Call(f"{_TWO}:MnnvlMoe.mnnvl_moe_alltoallv", (x, info, workspace, rank, world))


def two_sided_combine_call(
    y: Any, info: Any, workspace: Any, rank: Any, world: Any, top_k: Any, local_tokens: Any
) -> Call:
    return Call(f"{_TWO}:MnnvlMoe.mnnvl_moe_alltoallv_combine", (y, info, workspace), {
        "ep_rank": rank, "ep_size": world, "top_k": top_k, "token_count": local_tokens,
    })


def library_calls(backend: str) -> list[Call]:
    """Every call the backend's engine makes, with placeholder arguments."""
    check_backend(backend)
    p = _Placeholder
    shared = [
        torch_dist_backend_call(p("group")),
        mapping_call(0, 2),
        mnnvl_config_call(p("comm")),
        mnnvl_initialize_call(),
    ]
    if backend == ONE_SIDED:
        return shared + [
            one_sided_workspace_size_call(2, 8, 64, 32),
            one_sided_alltoall_call(p("mapping"), 8, 2, 8, 1024, p("config")),
            one_sided_dispatch_call(p("a2a"), p("ids32"), [p("ids32"), p("w32"), p("x")], 8, -1),
            one_sided_combine_call(p("a2a"), p("payload"), 8),
        ]
    return shared + [
        two_sided_workspace_call(p("mapping"), p("config")),
        two_sided_prepare_workspace_call(p("mapping"), p("config")),
        two_sided_prepare_call(p("ids32"), p("w32"), p("prepare_workspace"), 8, 0, 2, 8, 2),
        two_sided_alltoallv_call(p("x"), p("info"), p("workspace"), 0, 2),
        two_sided_combine_call(p("y"), p("info"), p("workspace"), 0, 2, 2, 4),
    ]


def call_signature(fn: Any) -> tuple[inspect.Signature, tuple[Any, ...]]:
    """The signature to bind a call against, and the leading arguments binding adds.
    A class binds against __init__ (deprecation wrappers hide the class's own
    signature behind *args, **kwargs), with a placeholder for self."""
    if isinstance(fn, type):
        return inspect.signature(fn.__init__), (_Placeholder("self"),)
    return inspect.signature(fn), ()


def binding_problem(call: Call) -> str | None:
    """Why the installed library cannot take this call (None: it can, or cannot be checked)."""
    try:
        fn = resolve(call.target)
    except Exception as exc:  # ImportError, AttributeError, or a broken import
        return f"{call.target} not found ({type(exc).__name__}: {exc})"
    try:
        sig, lead = call_signature(fn)
    except (TypeError, ValueError):
        return None  # builtins without a signature cannot be checked
    try:
        sig.bind(*lead, *call.args, **call.kwargs)
    except TypeError as exc:
        return f"{call.target}{sig} rejects our arguments ({exc})"
    return None


def api_problems(backend: str | None = None) -> list[str]:
    """Entry points that are missing or no longer accept our arguments (empty: all fine)."""
    problems = [binding_problem(c) for b in (BACKENDS if backend is None else (backend,))
                for c in library_calls(b)]
    return sorted({p for p in problems if p})


def drift_report(backend: str | None = None) -> dict[str, Any]:
    """The installed version against the pin, and the entry points it lacks.
    `defect` is true when the pinned version itself lacks one (a bug here);
    on another version the problems are drift from the pin."""
    installed = flashinfer_version()
    problems = api_problems(backend)
    pinned = installed == PINNED_FLASHINFER
    return {"installed": installed, "pinned": PINNED_FLASHINFER, "is_pinned": pinned,
            "problems": problems, "defect": bool(pinned and problems)}


# ---- availability and configuration -----------------------------------------------------


def available(backend: str | None = None) -> tuple[bool, str]:
    """Whether the FlashInfer all-to-all can run here, and if not why. Never raises
    (except ValueError for an unknown backend name)."""
    if backend is not None:
        check_backend(backend)
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
        pin = "" if version == PINNED_FLASHINFER else f" (this project pins {PINNED_FLASHINFER})"
        return False, f"API not found in flashinfer {version}{pin}: " + "; ".join(problems)
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
    check_backend(backend)
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
