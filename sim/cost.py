"""Cost model: step durations from hardware profiles.

GEMM-like ops use a roofline (max of compute and memory time) plus a fixed
per-kernel cost; collectives use alpha-beta with NCCL's bus-bandwidth
convention (all-reduce moves 2(n-1)/n of the bytes, all-gather,
reduce-scatter and all-to-all (n-1)/n).

GPU profiles are from published figures (dense bf16 peak, HBM bandwidth,
achieved NVLink bus bandwidth); the `cpu` profile is fitted on the current
machine by `moe-twin calibrate` and read from the profile file.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path


@dataclass(frozen=True)
class Profile:
    name: str
    flops: float  # achieved dense FLOP/s for MoE-sized GEMMs
    mem_bw: float  # achieved memory bandwidth, B/s
    kernel_us: float  # fixed cost per kernel (launch + tail) in us
    coll_alpha_us: float  # collective latency term
    bus_bw: float  # achieved collective bus bandwidth, B/s
    a2a_alpha_us: float  # token-routing all-to-all latency term
    bytes_per_elem: int  # activation and weight element size
    elementwise_us: float  # fixed cost of small elementwise/layout ops
    calibrated: bool = False
    source: str = ""
    # Host time between consecutive ops of one stream (Python dispatch on CPU;
    # hidden by asynchronous launches on GPUs, where it is 0).
    host_gap_us: float = 0.0


# Published figures. H100 SXM: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink4
# ~370 GB/s achieved NCCL bus bandwidth, small all-reduce ~10-25 us. H200: same
# compute and NVLink, 4.8 TB/s HBM3e. B200: ~2.25 PFLOP/s dense bf16, 8 TB/s,
# NVLink5 (2x NVLink4). Achieved fractions (70% compute, 85% memory) are the
# usual ones for decode-sized grouped GEMMs.
GPU_PROFILES: dict[str, Profile] = {
    "h100": Profile("h100", 0.70 * 989e12, 0.85 * 3.35e12, 3.0, 12.0, 370e9, 15.0, 2, 2.0,
                    False, "published H100 SXM figures"),
    "h200": Profile("h200", 0.70 * 989e12, 0.85 * 4.8e12, 3.0, 12.0, 370e9, 15.0, 2, 2.0,
                    False, "published H200 figures"),
    "b200": Profile("b200", 0.70 * 2250e12, 0.85 * 8.0e12, 2.5, 10.0, 740e9, 12.0, 2, 1.8,
                    False, "published B200 figures"),
}

# Used until `moe-twin calibrate` has measured this machine: order-of-magnitude
# figures for one CPU core running torch eager ops and gloo over loopback.
DEFAULT_CPU = Profile("cpu", 20e9, 10e9, 15.0, 150.0, 1.0e9, 300.0, 4, 8.0, False,
                      "uncalibrated defaults (run `moe-twin calibrate`)")


def profile_path() -> Path:
    """Where `moe-twin calibrate` saves the cpu profile (MOE_TWIN_HOME overrides)."""
    home = os.environ.get("MOE_TWIN_HOME")
    base = Path(home) if home else Path.home() / ".cache" / "moe-twin"
    return base / "cpu_profile.json"


_cpu_cache: dict[str, Profile] = {}


def load_profile(name: str) -> Profile:
    if name in GPU_PROFILES:
        return GPU_PROFILES[name]
    if name != "cpu":
        known = ", ".join([*GPU_PROFILES, "cpu"])
        raise ValueError(f"unknown profile {name!r} (known: {known})")
    path = profile_path()
    key = str(path)
    if key in _cpu_cache:
        return _cpu_cache[key]
    prof = DEFAULT_CPU
    if path.is_file():
        try:
            data = json.loads(path.read_text())
            allowed = {f.name for f in fields(Profile)}
            prof = Profile(**{k: v for k, v in data.items() if k in allowed})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"profile file {path} is unreadable ({exc}); rerun `moe-twin calibrate`") from exc
    _cpu_cache[key] = prof
    return prof


def save_cpu_profile(profile: Profile) -> Path:
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(profile), indent=2) + "\n")
    _cpu_cache.pop(str(path), None)
    return path


def gemm_us(p: Profile, flops: float, bytes_moved: float, kernels: int) -> float:
    return kernels * p.kernel_us + max(flops / p.flops, bytes_moved / p.mem_bw) * 1e6


def elementwise_us(p: Profile, bytes_moved: float) -> float:
    return p.elementwise_us + bytes_moved / p.mem_bw * 1e6


def collective_us(p: Profile, kind: str, n: int, nbytes: float) -> float:
    """nbytes: the per-rank buffer (all-reduce input, all-gather output,
    reduce-scatter input, all-to-all send)."""
    if n <= 1:
        return 0.0  # engines skip collectives over a group of one
    if kind == "all_reduce":
        factor = 2.0 * (n - 1) / n
        alpha = p.coll_alpha_us
    elif kind in ("all_gather", "reduce_scatter"):
        factor = (n - 1) / n
        alpha = p.coll_alpha_us
    else:  # token-routing all-to-all dispatch / combine
        factor = (n - 1) / n
        alpha = p.a2a_alpha_us
    return alpha + factor * nbytes / p.bus_bw * 1e6
