"""All-to-all (prepare/finalize) backends: the *true* contract of each library.

This table is what the backend really does (runner_semantics.md). What a runner
*declares* about a backend is the runner's own business (runners may be wrong,
e.g. R2); the simulator models data movement from this table and the real
runner's stand-ins implement it.
"""

from __future__ import annotations

from dataclasses import dataclass


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
    BackendInfo("mori", True, False, False, False, True, True, True, "MORI"),
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


# EPLB-overlap safe only from the newest version on (runner_semantics.md table).
_EPLB_SAFE_NEWEST_ONLY = frozenset({"flashinfer_nvlink_one_sided"})


def eplb_overlap_safe(name: str, version: str = "newest") -> bool:
    info = backend_info(name)
    if version != "newest" and name in _EPLB_SAFE_NEWEST_ONLY:
        return False
    return info.eplb_overlap_safe


def sp_backends(version: str = "newest") -> frozenset[str]:
    if version == "newest":
        return frozenset(b.name for b in _TABLE if b.sp_newest)
    return frozenset(b.name for b in _TABLE if b.sp_previous)
