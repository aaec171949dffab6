"""All-to-all (prepare/finalize) backends: the *true* contract of each library.

This table is what the backend really does (runner_semantics.md). What a runner
*declares* about a backend is the runner's own business (runners may be wrong,
e.g. R2); the simulator models data movement from this table and the real
runner's stand-ins implement it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache


@dataclass(frozen=True)
class BackendInfo:
    name: str
    output_is_reduced: bool  # combine already sums over experts and ranks
    batched: bool  # batched activation layout (low-latency kernels)
    async_shared_overlap: bool  # can run shared experts inside, between dispatch and combine
    eplb_overlap_safe: bool
    token_routing: bool  # dispatch sends each token only to its experts' owners
    sp_newest: bool  # in the SP list of the newest engine version
    sp_previous: bool  # in the SP list of the previous version
    gpu_library: str | None  # the GPU-only library this backend calls


_TABLE = (
    BackendInfo("none", False, False, False, True, False, False, False, None),
    BackendInfo("allgather_reducescatter", False, False, False, True, False, True, True, None),
    BackendInfo("deepep_high_throughput", True, False, True, False, True, True, True, "DeepEP"),
    BackendInfo("deepep_low_latency", True, True, True, False, True, True, True, "DeepEP"),
    BackendInfo("deepep_v2", True, False, True, True, True, True, False, "DeepEP"),
    # "mori" is the older name of mori_high_throughput (kept so scenarios load).
    BackendInfo("mori", True, False, False, False, True, True, True, "MORI"),
    BackendInfo("mori_high_throughput", True, False, False, False, True, True, True, "MORI"),
    BackendInfo("mori_low_latency", True, True, False, False, True, True, True, "MORI"),
    # MoonEP: token routing, reduces in its combine, never sequence parallel.
    BackendInfo("moonep", True, False, False, False, True, False, False, "MoonEP"),
    BackendInfo("nixl_ep", True, True, True, False, True, True, True, "NIXL"),
    BackendInfo(
        "flashinfer_nvlink_one_sided", True, False, False, True, True, True, False, "FlashInfer"
    ),
    BackendInfo(
        "flashinfer_nvlink_two_sided", True, False, False, False, True, False, False, "FlashInfer"
    ),
)

_BY_NAME = {b.name: b for b in _TABLE}

# Backends a scenario may name ("none" is what is in effect without all-to-all kernels).
BACKENDS: tuple[str, ...] = tuple(b.name for b in _TABLE if b.name != "none")


def backend_info(name: str) -> BackendInfo:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r} (known: {', '.join(BACKENDS)})"
        ) from None


# Backends only the newest engine version has.
_NEWEST_ONLY = frozenset({"deepep_v2"})


def exists_in(name: str, version: str) -> bool:
    """Whether the engine version has this backend at all."""
    return version == "newest" or name not in _NEWEST_ONLY


# Activation bytes per element the backends' rounding is computed for (bf16).
ACT_BYTES = 2
# Row sizes the low-latency kernels are compiled for (sorted).
LL_HIDDEN_SIZES = (2048, 2560, 3072, 4096, 5120, 6144, 7168, 8192)
_ROUND_BYTES_512 = frozenset({"deepep_high_throughput", "deepep_v2"})
_ROUND_TO_LIST = frozenset({"deepep_low_latency", "nixl_ep"})


def rounded_hidden(name: str, hidden: int, act_bytes: int = ACT_BYTES) -> int | None:
    """The row width a backend's own kernels need for a layer of width `hidden`
    (the engine rounds the layer's hidden size up for them), or None when the
    backend takes any width. DeepEP high-throughput and v2: row bytes up to a
    multiple of 512. DeepEP low-latency and NIXL: the smallest compiled size
    >= hidden; above the largest the engine refuses the layer (ValueError),
    see `too_wide_for`."""
    if name in _ROUND_BYTES_512:
        row = hidden * act_bytes
        return -(-row // 512) * 512 // act_bytes
    if name in _ROUND_TO_LIST:
        return next((h for h in LL_HIDDEN_SIZES if h >= hidden), None)
    return None


def too_wide_for(name: str, hidden: int) -> bool:
    """A list-rounding backend has no compiled size for this width."""
    return name in _ROUND_TO_LIST and hidden > LL_HIDDEN_SIZES[-1]


# EPLB-overlap safe only from the newest version on (runner_semantics.md table).
_EPLB_SAFE_NEWEST_ONLY = frozenset({"flashinfer_nvlink_one_sided"})


def eplb_overlap_safe(name: str, version: str = "newest") -> bool:
    info = backend_info(name)
    if version != "newest" and name in _EPLB_SAFE_NEWEST_ONLY:
        return False
    return info.eplb_overlap_safe


@lru_cache(maxsize=8)  # Scenario.sp asks on every op that reads the layout
def sp_backends(version: str = "newest") -> frozenset[str]:
    if version == "newest":
        return frozenset(b.name for b in _TABLE if b.sp_newest)
    return frozenset(b.name for b in _TABLE if b.sp_previous)
