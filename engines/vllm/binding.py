"""Binding the installed vLLM to a CPU-only process (runs inside the engine venv).

What is bound, once per process (docs: engine_frontend.md):
- inert stubs for optional modules the import chain touches but the MoE
  layer never uses, only where the real module is absent;
- a proxy over vLLM's CpuPlatform that answers as the scenario's platform
  (cuda / rocm / cpu) and reports a large device count;
- the library-backed prepare/finalize classes, imported with their libraries
  stubbed and bound where all2all_utils looks them up.

And per scenario, by `Recorders`: collectives, streams/events, the routed
expert GEMMs and the all-to-all buffers replaced by objects that record what
the engine's code asked for (an `events` list of plain dicts). These are
stand-ins for GPU pieces, named as such; the decisions around them are the
engine's own code. The event list is the seed of a full Ops trace.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import types
from typing import Any

# Optional modules: stubbed only when absent (never shadowing a real install).
OPTIONAL_MODULES = ("openai_harmony", "uvloop", "xgrammar", "llguidance", "partial_json_parser",
                    "deep_ep", "mori", "nixl_ep", "moonep")
# Library-backed prepare/finalize modules and the names all2all_utils uses.
PF_MODULES = {
    "deepep_ht": ("DeepEPHTPrepareAndFinalize",),
    "deepep_ll": ("DeepEPLLPrepareAndFinalize", "DEEPEP_QUANT_BLOCK_SHAPE"),
    "deepep_v2": ("DeepEPV2PrepareAndFinalize",),
    "mori": ("MoriPrepareAndFinalize",),
    "nixl_ep": ("NixlEPPrepareAndFinalize", "NIXL_EP_QUANT_BLOCK_SHAPE"),
    "moonep": ("MoonEPPrepareAndFinalize", "MOONEP_DEFAULT_NUM_PREFETCH_SLOTS",
               "MOONEP_DEFAULT_NUM_SMS", "MOONEP_DEFAULT_TOKEN_PADDING"),
}
STUBBED: list[str] = []


class Inert:
    """Answers attribute access, calls, subscripting, iteration and `|` (type
    annotations such as `X | None` are evaluated at import)."""

    def __init__(self, name: str = "stub") -> None:
        self._name = name

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        if name == "topk_idx_t":  # NIXL's module reads its index dtype from the library
            import torch

            return torch.int64
        return Inert(f"{self._name}.{name}")

    def __call__(self, *a: Any, **k: Any) -> Inert:
        return Inert(f"{self._name}()")

    def __getitem__(self, k: Any) -> Inert:
        return self

    def __or__(self, other: Any) -> Any:
        return self

    __ror__ = __or__

    def __iter__(self) -> Any:
        return iter(())

    def __mro_entries__(self, bases: tuple[Any, ...]) -> tuple[type, ...]:
        return (object,)  # `class X(stub.Base)` builds

    def __get_pydantic_core_schema__(self, source: Any, handler: Any) -> Any:
        from pydantic_core import core_schema  # a field typed by a stub accepts anything

        return core_schema.any_schema()


class _StubModule(types.ModuleType):
    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)
        return getattr(Inert(self.__name__), name)


def stub_absent_modules() -> None:
    for name in OPTIONAL_MODULES:
        if name in sys.modules or importlib.util.find_spec(name) is not None:
            continue
        mod = _StubModule(name)
        mod.__path__ = []  # a package: `import x.y` resolves to more stubs
        mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        sys.modules[name] = mod
        STUBBED.append(name)
    sys.meta_path.insert(0, _StubSubmodules())


class _StubSubmodules:
    """Submodules of a stubbed package (e.g. `deep_ep.utils`) are stubs too."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        root = fullname.split(".")[0]
        if root in STUBBED and fullname != root:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: Any) -> Any:
        mod = _StubModule(spec.name)
        mod.__path__ = []
        return mod

    def exec_module(self, module: Any) -> None:
        return None


class PlatformProxy:
    """vLLM's CpuPlatform answering as the scenario's modeled platform."""

    def __init__(self, real: Any) -> None:
        object.__setattr__(self, "_real", real)
        object.__setattr__(self, "modeled", "cpu")

    def is_cuda(self) -> bool:
        return self.modeled == "cuda"

    def is_rocm(self) -> bool:
        return self.modeled == "rocm"

    def is_cuda_alike(self) -> bool:
        return self.modeled in ("cuda", "rocm")

    def is_cpu(self) -> bool:
        return self.modeled == "cpu"

    def device_count(self) -> int:
        return 1024

    def check_and_update_config(self, vllm_config: Any) -> None:
        """Not run: CpuPlatform's version rewrites the process environment
        (VLLM_DISABLE_SHARED_EXPERTS_STREAM=1 among others), which would turn
        off the shared-experts stream for every later scenario."""
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


PROXY: PlatformProxy | None = None


def bind_engine() -> dict[str, Any]:
    """Import the engine's MoE chain once, with the proxy in place. Returns the
    modules the probe uses by short name."""
    global PROXY
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("VLLM_CONFIGURE_LOGGING", "0")
    logging.disable(logging.WARNING)
    stub_absent_modules()
    import vllm
    import vllm.platforms as platforms
    from vllm.platforms.cpu import CpuPlatform

    PROXY = PlatformProxy(CpuPlatform())
    platforms._current_platform = PROXY
    # Imported while the proxy answers "cpu": on "cuda" this chain loads CUDA
    # attention extensions.
    importlib.import_module("vllm.model_executor.models.utils")
    _import_rocm_platform_module()
    mods = {"vllm": vllm}
    for short, name in (
        ("layer", "vllm.model_executor.layers.fused_moe.layer"),
        ("runner", "vllm.model_executor.layers.fused_moe.runner.moe_runner"),
        ("shared", "vllm.model_executor.layers.fused_moe.runner.shared_experts"),
        ("a2a", "vllm.model_executor.layers.fused_moe.all2all_utils"),
        ("mk", "vllm.model_executor.layers.fused_moe.modular_kernel"),
        ("fmconfig", "vllm.model_executor.layers.fused_moe.config"),
        ("config", "vllm.config"),
        ("fctx", "vllm.forward_context"),
    ):
        mods[short] = importlib.import_module(name)
    pf = "vllm.model_executor.layers.fused_moe.prepare_finalize."
    for module, names in PF_MODULES.items():
        if importlib.util.find_spec(pf + module) is None:
            continue  # a backend this release does not have (e.g. deepep_v2 before 0.33)
        m = importlib.import_module(pf + module)
        for n in names:
            if hasattr(m, n):
                setattr(mods["a2a"], n, getattr(m, n))
    _bind_experts_fallback()
    mods["version"] = getattr(vllm, "__version__", "unknown")
    return mods


# The GPU architecture the ROCm platform module reads at import (MI300X, the
# twin's default ROCm profile): a stand-in, there is no GPU to ask here.
ROCM_ARCH_STANDIN = "gfx942"


def _import_rocm_platform_module() -> None:
    """vllm.platforms.rocm asks the GPU for its architecture when imported
    (amdsmi, then torch.cuda); the expert-class checks import it on "rocm"."""
    import torch

    real = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda *a, **k: types.SimpleNamespace(gcnArchName=ROCM_ARCH_STANDIN)
    try:
        importlib.import_module("vllm.platforms.rocm")
        STANDINS.add(f"ROCm GPU architecture {ROCM_ARCH_STANDIN} (read by vllm.platforms.rocm at import)")
    finally:
        torch.cuda.get_device_properties = real


def _bind_experts_fallback() -> None:
    """The expert-kernel choice probes GPU hardware this machine does not have
    (a CPU stand-in): where the engine's own selection finds no kernel here,
    the Triton experts class stands in (its GEMMs never run: they are
    recorders). The choice of GEMM kernel is not a decision `conform` compares."""
    import vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method as um
    from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

    real = um.select_unquantized_moe_backend

    def select(moe_config: Any) -> Any:
        try:
            return real(moe_config=moe_config)
        except (NotImplementedError, ValueError) as exc:
            if isinstance(exc, ValueError) and "current device" not in str(exc):
                raise
            try:
                from vllm.model_executor.layers.fused_moe.experts.triton_moe import TritonExperts
            except ModuleNotFoundError:  # 0.20.0 keeps the class in fused_moe.py
                from vllm.model_executor.layers.fused_moe.fused_moe import TritonExperts

            STANDINS.add("Triton experts class where no GEMM kernel is selectable on this CPU machine")
            return UnquantizedMoeBackend.TRITON, TritonExperts

    um.select_unquantized_moe_backend = select


STANDINS: set[str] = set()


def set_platform(name: str) -> None:
    assert PROXY is not None
    object.__setattr__(PROXY, "modeled", name)
