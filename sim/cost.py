"""Cost model: step durations from hardware profiles.

GEMM-like ops use a roofline (max of compute and memory time) plus a fixed
per-kernel cost; collectives use alpha-beta with NCCL's bus-bandwidth
convention (all-reduce moves 2(n-1)/n of the bytes, all-gather,
reduce-scatter and all-to-all (n-1)/n).

GPU profiles are from published figures (dense bf16 peak, HBM bandwidth,
achieved NVLink bus bandwidth); the `cpu` profile is fitted on the current
machine by `moe-twin calibrate` (or automatically on the first real run) and
stored per machine: a profile is used only on the machine it was fitted on
(`machine_key`: host, CPU model, core count, torch version).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
from dataclasses import asdict, dataclass, fields
from functools import lru_cache
from importlib import metadata
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
    # The CPU routed kernel (moe_twin_kernels/torch_ref.py) loops over the local
    # experts: a dozen small ops per expert with tokens, two per idle one. GPU
    # kernels are one fused launch: 0.
    expert_active_us: float = 0.0
    expert_idle_us: float = 0.0
    # gloo over loopback exchanges with one peer after another, each exchange
    # waiting for that peer process to be scheduled: the latency term is per
    # peer (n-1 of them). NCCL's small-message latency barely grows: False.
    alpha_per_peer: bool = False
    # Cores the ranks share (0: a device per rank). When a scenario has more
    # ranks than cores, long computations (the expert loop, the GEMMs'
    # roofline) are time-shared; ops shorter than a scheduler slice are not
    # (measured: a router or shared-MLP step takes as long with 4 ranks on 2
    # cores as with 2, the expert loop ~2x as long).
    cores: int = 0
    machine: str = ""  # the machine key a calibrated profile was fitted on
    # 1-minute load average when it was fitted: on a shared machine the fixed
    # costs follow the other processes' load.
    calibration_load: float = 0.0


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

# AMD Instinct (ROCm). Same achieved fractions as above; each figure's source
# is next to it. The latency terms have no published figure: they are
# assumptions, named as such.
GPU_PROFILES["mi300x"] = Profile(
    "mi300x",
    # 1307.4 TFLOP/s dense BF16 (AMD MI300X spec, quoted in
    # github.com/alpharomercoma/MI300X-vs-H200 REPORT.md).
    0.70 * 1307.4e12,
    # 5.3 TB/s HBM3 (AMD spec; aiwiki.ai/wiki/amd_instinct_mi300x).
    0.85 * 5.3e12,
    4.0,  # assumption: HIP launch + tail a little above CUDA's
    18.0,  # assumption: RCCL small all-reduce ~1.5x NCCL's on H100
    # xGMI: 7 Infinity Fabric links, 128 GB/s bidirectional each, 896 GB/s
    # aggregate (gpu.blog/gpus/instinct-mi300x-mi300x), i.e. 448 GB/s one way;
    # assumption: collectives achieve 75% of it over the fully connected mesh.
    0.75 * 448e9,
    20.0,  # assumption: all-to-all latency scaled like the collective one
    2, 2.5, False, "published MI300X figures (latency terms assumed)")
GPU_PROFILES["mi355x"] = Profile(
    "mi355x",
    # ~2.5 PFLOP/s dense BF16: half the ~5 PFLOP/s FP8 reported at ISSCC 2026
    # (world-today-news.com/?p=7253162); "a dead heat" with B200 at BF16
    # (theregister.com/2025/06/12/amd_mi355x).
    0.70 * 2500e12,
    # 8 TB/s HBM3E (theregister.com/2025/06/12/amd_mi355x).
    0.85 * 8.0e12,
    3.5,  # assumption: as MI300X, less for the higher clock
    15.0,  # assumption: between MI300X and H100
    # xGMI: ~153.6 GB/s bidirectional per link (humeconsulting.co, "AMD
    # MI355X: strong node-level inference"), 7 links: 537.6 GB/s one way;
    # the same 75% achieved as MI300X.
    0.75 * 537.6e9,
    18.0,  # assumption
    2, 2.2, False, "published MI355X figures (latency terms assumed)")

# Used until this machine is calibrated: order-of-magnitude figures for one
# CPU core running torch eager ops and gloo over loopback.
DEFAULT_CPU = Profile("cpu", 20e9, 10e9, 15.0, 150.0, 1.0e9, 300.0, 4, 8.0, False,
                      "uncalibrated defaults (run `moe-twin calibrate`)",
                      expert_active_us=120.0, expert_idle_us=15.0, alpha_per_peer=True)


def home_dir() -> Path:
    """Where calibrated profiles live (MOE_TWIN_HOME overrides)."""
    home = os.environ.get("MOE_TWIN_HOME")
    return Path(home) if home else Path.home() / ".cache" / "moe-twin"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def _torch_version() -> str:
    try:  # without importing torch: the simulator is torch-free
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


def usable_cores() -> int:
    """Cores this process (and the ranks it starts) may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not on Linux
        return os.cpu_count() or 1


@lru_cache(maxsize=1)
def machine_key() -> dict[str, str]:
    """What a cpu profile is valid for: the host, its CPU, how many cores the
    ranks share, and the torch build whose eager ops were timed."""
    return {"host": socket.gethostname(), "cpu": _cpu_model(), "cores": str(usable_cores()),
            "torch": _torch_version()}


def machine_label(key: dict[str, str]) -> str:
    return f"{key.get('host', '?')} ({key.get('cpu', '?')}, {key.get('cores', '?')} cores, torch {key.get('torch', '?')})"


def _digest(key: dict[str, str]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def profile_path() -> Path:
    """This machine's cpu profile file (one file per machine key)."""
    return home_dir() / f"cpu_profile.{_digest(machine_key())}.json"


_cpu_cache: dict[str, Profile] = {}


def load_profile(name: str) -> Profile:
    if name in GPU_PROFILES:
        return GPU_PROFILES[name]
    if name != "cpu":
        known = ", ".join([*GPU_PROFILES, "cpu"])
        raise ValueError(f"unknown profile {name!r} (known: {known})")
    path = profile_path()
    key = str(path)
    if key not in _cpu_cache:
        _cpu_cache[key] = _read_cpu_profile(path)
    return _cpu_cache[key]


def _read_cpu_profile(path: Path) -> Profile:
    """This machine's profile, or the defaults saying why (none yet, or only
    profiles fitted elsewhere: those are never used)."""
    if not path.is_file():
        others = _other_machines(path)
        if not others:
            return DEFAULT_CPU
        why = f"the stored cpu profile(s) are for another machine: {'; '.join(others)}"
        return _defaults_because(why)
    try:
        data = json.loads(path.read_text())
        machine = data["machine"]
        allowed = {f.name for f in fields(Profile)}
        prof = Profile(**{k: v for k, v in data["profile"].items() if k in allowed})
        if not isinstance(machine, dict):
            raise TypeError("no machine key")
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        # Recalibrated (and overwritten) on the next real use, like a missing one.
        return _defaults_because(f"{path} is unreadable: {type(exc).__name__}: {exc}")
    if machine != machine_key():  # a copied file, or a hash collision: never used silently
        return _defaults_because(f"{path} was calibrated on another machine: {machine_label(machine)}")
    return prof


def _defaults_because(why: str) -> Profile:
    from dataclasses import replace

    return replace(DEFAULT_CPU, source=f"uncalibrated defaults ({why}; run `moe-twin calibrate` here)")


def _other_machines(path: Path) -> list[str]:
    """Labels of the machines other stored profiles were fitted on."""
    out = []
    legacy = path.parent / "cpu_profile.json"  # before profiles had a machine key
    if legacy.is_file():
        out.append(f"{legacy} (machine unknown)")
    for other in sorted(path.parent.glob("cpu_profile.*.json")):
        try:
            out.append(machine_label(json.loads(other.read_text())["machine"]))
        except (OSError, ValueError, TypeError, KeyError):
            out.append(f"{other} (unreadable)")
    return out


def save_cpu_profile(profile: Profile) -> Path:
    """Store `profile` as this machine's (written whole, then renamed: a
    concurrent reader sees the old file or the new one)."""
    from dataclasses import replace

    key = machine_key()
    path = profile_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"machine": key, "profile": asdict(replace(profile, machine=machine_label(key)))}
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)
    _cpu_cache.pop(str(path), None)
    return path


def for_world(p: Profile, world: int) -> Profile:
    """`p` as seen by each of `world` ranks sharing `p.cores` cores."""
    if not p.cores or world <= p.cores:
        return p
    from dataclasses import replace

    f = world / p.cores
    return replace(p, flops=p.flops / f, mem_bw=p.mem_bw / f, expert_active_us=p.expert_active_us * f,
                   expert_idle_us=p.expert_idle_us * f)


def gemm_us(p: Profile, flops: float, bytes_moved: float, kernels: int) -> float:
    return kernels * p.kernel_us + max(flops / p.flops, bytes_moved / p.mem_bw) * 1e6


def experts_us(p: Profile, pairs: int, active: int, local_experts: int, width: int, inter: int) -> float:
    """The routed experts of one rank: `pairs` (token, expert) pairs over
    `active` of its `local_experts`, gated MLPs of `width` x `inter`. One fused
    kernel (4 launches) plus, on CPU, the per-expert loop of the torch kernel."""
    bpe = p.bytes_per_elem
    flops = 6.0 * pairs * width * inter
    bytes_moved = active * 3 * width * inter * bpe + 2 * pairs * width * bpe
    loop = active * p.expert_active_us + max(0, local_experts - active) * p.expert_idle_us
    return gemm_us(p, flops, bytes_moved, 4) + loop


def elementwise_us(p: Profile, bytes_moved: float) -> float:
    return p.elementwise_us + bytes_moved / p.mem_bw * 1e6


def collective_us(p: Profile, kind: str, n: int, nbytes: float) -> float:
    """nbytes: the per-rank buffer (all-reduce input, all-gather output,
    reduce-scatter input, all-to-all send); for all_gatherv the other members'
    rows received, for reduce_scatterv the other members' rows sent."""
    if n <= 1:
        return 0.0  # engines skip collectives over a group of one
    if kind == "all_reduce":
        factor = 2.0 * (n - 1) / n
        alpha = p.coll_alpha_us
    elif kind in ("all_gather", "reduce_scatter"):
        factor = (n - 1) / n
        alpha = p.coll_alpha_us
    elif kind in ("all_gatherv", "reduce_scatterv"):  # nbytes: what really moves in (out)
        factor = 1.0
        alpha = p.coll_alpha_us
    else:  # token-routing all-to-all dispatch / combine
        factor = (n - 1) / n
        alpha = p.a2a_alpha_us
    if p.alpha_per_peer:
        alpha *= n - 1
    return alpha + factor * nbytes / p.bus_bw * 1e6
