"""Can this machine run a scenario for real? Checks that need no torch, so a
refusal is a one-line error in a fraction of a second (before torch loads)."""

from __future__ import annotations

import glob
import os

from scenarios.spec import Scenario

MAX_REAL_BYTES = 3 * 2**30  # per rank; larger scenarios are refused with a clear error
# Every real rank is a process with torch loaded (~0.4 GiB resident before any
# weight); past 8 CPU ranks per core start-up and collectives crawl. The pool's
# own rule (real/ranks.py MAX_RANKS_PER_CPU, which needs torch to import),
# applied here before anything is simulated: 16 ranks on a 2-core machine.
RANKS_PER_CPU = 8
RANK_OVERHEAD_BYTES = 400 * 2**20
MAX_REAL_TOTAL_BYTES = 20 * 2**30  # all ranks together


class ScenarioTooLarge(ValueError):
    pass


def real_bytes_estimate(s: Scenario) -> int:
    """Weights a rank holds (fp32) plus the reference copies the fit needs."""
    m = s.model
    kw = s.kernel_width
    routed = s.local_experts * 3 * kw * (m.moe_intermediate // s.moe_tp)
    shared = 3 * m.hidden * m.shared_inter if m.has_shared else 0
    return 4 * (routed + shared + m.num_experts * m.hidden) * 2


def _usable_cpus() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def max_real_ranks() -> int | None:
    """Most CPU rank processes this machine holds; None with NVIDIA devices
    (one rank per GPU, which only torch can count: the pool checks it)."""
    if glob.glob("/dev/nvidia[0-9]*"):
        return None
    return RANKS_PER_CPU * _usable_cpus()


def check_fits(s: Scenario) -> None:
    """Refuses (ScenarioTooLarge, one line) a scenario this machine cannot run
    for real: too many rank processes, or too much memory per rank or in all."""
    limit = max_real_ranks()
    if limit is not None and s.world > limit:
        raise ScenarioTooLarge(
            f"world size {s.world} is larger than this machine can hold: limit is {limit} real ranks "
            f"({RANKS_PER_CPU} per usable CPU core x {_usable_cpus()} cores); `simulate` has no such limit"
        )
    need = real_bytes_estimate(s)
    total = s.world * (need + RANK_OVERHEAD_BYTES)
    if need <= MAX_REAL_BYTES and total > MAX_REAL_TOTAL_BYTES:
        raise ScenarioTooLarge(
            f"scenario {s.name!r} needs ~{total / 2**30:.1f} GiB over its {s.world} ranks for a real run "
            f"(limit {MAX_REAL_TOTAL_BYTES / 2**30:.0f} GiB): use a scaled-down scenario"
        )
    if need > MAX_REAL_BYTES:
        raise ScenarioTooLarge(
            f"scenario {s.name!r} needs ~{need / 2**30:.1f} GiB per rank for a real run on CPU "
            f"(limit {MAX_REAL_BYTES / 2**30:.0f} GiB): use a scaled-down scenario (the r1..r5 ones are)"
        )


def check_kernel_device(kernel: str) -> None:
    """FlashInfer's kernel needs a CUDA device: refused at once on a machine
    with no NVIDIA device node (torch could not see a GPU there either)."""
    if kernel == "flashinfer" and not glob.glob("/dev/nvidia[0-9]*"):
        raise ValueError("kernel flashinfer: FlashInfer's cutlass MoE needs a CUDA device (SM89+); "
                         "use kernel torch or triton on CPU")


__all__ = ["MAX_REAL_BYTES", "MAX_REAL_TOTAL_BYTES", "RANKS_PER_CPU", "max_real_ranks", "ScenarioTooLarge", "check_fits", "check_kernel_device", "real_bytes_estimate"]
