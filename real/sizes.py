"""Can this machine run a scenario for real? Checks that need no torch, so a
refusal is a one-line error in a fraction of a second (before torch loads)."""

from __future__ import annotations

import glob

from scenarios.spec import Scenario

MAX_REAL_BYTES = 3 * 2**30  # per rank; larger scenarios are refused with a clear error


class ScenarioTooLarge(ValueError):
    pass


def real_bytes_estimate(s: Scenario) -> int:
    """Weights a rank holds (fp32) plus the reference copies the fit needs."""
    m = s.model
    kw = m.kernel_width
    routed = s.local_experts * 3 * kw * (m.moe_intermediate // s.moe_tp)
    shared = 3 * m.hidden * m.shared_inter if m.has_shared else 0
    return 4 * (routed + shared + m.num_experts * m.hidden) * 2


def check_fits(s: Scenario) -> None:
    need = real_bytes_estimate(s)
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


__all__ = ["MAX_REAL_BYTES", "ScenarioTooLarge", "check_fits", "check_kernel_device", "real_bytes_estimate"]
