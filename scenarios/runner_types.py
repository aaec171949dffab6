"""What a runner is built with apart from its program (scenarios/runner_base.py):
where the shared experts run (`Order`), the errors of loading a runner, the
modular-kernel stand-in and the engine's own start-up refusals.

The order function and its rules stay in runner_base.py: the mutation
operators (twin/search/mutate_gen.py) mutate that module's functions.
"""

from __future__ import annotations

from enum import StrEnum

from scenarios.backends import backend_info
from scenarios.spec import Scenario


class Order(StrEnum):
    """Where the shared experts run relative to the routed experts."""

    NO_OVERLAP = "NO_OVERLAP"
    MK_INTERNAL_OVERLAPPED = "MK_INTERNAL_OVERLAPPED"
    MULTI_STREAM_OVERLAPPED = "MULTI_STREAM_OVERLAPPED"
    # before-38990: shared MLP on the main stream before the routed op.
    EXTERNAL = "EXTERNAL"


OVERLAPPED = (Order.MK_INTERNAL_OVERLAPPED, Order.MULTI_STREAM_OVERLAPPED)


class RunnerLoadError(ValueError):
    """An unknown runner name, or something that is not a runner."""


class RunnerUnsupported(RunnerLoadError):
    """The runner does not model this scenario (its `unsupported()` says why)."""


class ModularKernel:
    """The prepare/finalize + experts object a runner builds lazily.

    `declared_reduced` is what the runner's backend class *declares*; whether
    the combine really reduces is the backend's own behaviour (scenarios/backends.py).
    """

    def __init__(self, backend: str, declared_reduced: bool) -> None:
        self.backend = backend
        self.declared_reduced = declared_reduced

    def output_is_reduced(self) -> bool:
        return self.declared_reduced

    def supports_async_shared_overlap(self) -> bool:
        return backend_info(self.backend).async_shared_overlap

def engine_refusal(s: Scenario) -> str | None:
    """Why the engine's own configuration validation refuses the scenario, or
    None (checked against the engine's code by `conform`). The twin still
    simulates such a scenario: these are the engine's limits, not the runner's
    decisions."""
    p = s.parallel
    if p.eplb and s.runtime.platform == "cpu":
        return "EPLB runs on CUDA and ROCm only (the engine refuses it on the CPU platform)"
    if p.eplb and p.backend == "moonep":
        return "MoonEP does not support EPLB"
    if s.use_all2all_kernels and p.backend.startswith("mori") and s.runtime.platform != "rocm":
        return "MORI all-to-all needs ROCm with AITER's fused MoE"
    return None
