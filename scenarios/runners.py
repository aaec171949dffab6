"""Runner programs: the control logic under test, written once against `Ops`.

`FixedRunner` follows docs/runner_semantics.md step by step (its decisions are
the methods of `MoERunner`, scenarios/runner_base.py). Each historical
regression (docs/regressions.md) is a subclass overriding one decision point.
`sglang` is SGLang's MoE block (scenarios/sglang.py), `trtllm` TensorRT-LLM's
(scenarios/trtllm.py). `vllm` / `vllm@<version>` is the installed vLLM's own
forward (engines/vllm/runner.py, imported by name only when asked for: the
engine extra sits above this layer). A user's own runner is
any `MoERunner` subclass, loaded as `module:Class`.
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from scenarios import contain
from scenarios.backends import backend_info
from scenarios.ops import Ops
from scenarios.runner_base import (
    OVERLAPPED,
    ModularKernel,
    MoERunner,
    Order,
    RunnerLoadError,
    RunnerUnsupported,
    multi_stream_platform,
    overlap_disabled,
    overlap_order,
    reference_order,
)
from scenarios.sglang import SGLangRunner
from scenarios.spec import Scenario
from scenarios.trtllm import TRTLLMRunner

__all__ = [
    "BEFORE_RUNNERS", "OVERLAPPED", "RUNNERS", "ModularKernel", "MoERunner", "Order", "RunnerLoadError",
    "RunnerUnsupported", "SGLangRunner", "TRTLLMRunner", "load_runner", "multi_stream_platform", "overlap_disabled",
    "overlap_order", "prepare_runner", "reference_order", "run_program", "runner_label", "unsupported_reason",
]


class FixedRunner(MoERunner):
    name = "fixed"


class Before40673(MoERunner):
    """R1: the early shared reduction lacks the sequence-parallel guard."""

    name = "before-40673"
    description = "R1: shared output reduced under SP (no `not is_sequence_parallel` guard)"

    def maybe_reduce_shared(self, ops: Ops, shared: Any, routed_reduced: bool) -> Any:
        if shared is not None and routed_reduced:
            return ops.all_reduce(shared, "tp", name="shared_all_reduce")
        return shared


class StaleCache40673(MoERunner):
    """R1 review finding: `output is reduced` cached at construction, before the
    lazily built kernel exists, so it is always False."""

    name = "stale-cache-40673"
    description = "R1: fused_output_is_reduced cached in the constructor (always False)"

    def __init__(self, scenario: Scenario) -> None:
        super().__init__(scenario)
        self._reduced_cached = self.kernel is not None and self.kernel.output_is_reduced()

    def fused_output_is_reduced(self) -> bool:
        return self._reduced_cached


class Before41382(MoERunner):
    """R2: FlashInfer NVLink backends declare that their combine does not reduce."""

    name = "before-41382"
    description = "R2: FlashInfer NVLink one/two-sided declare output_is_reduced = False"

    def backend_output_is_reduced(self, backend: str) -> bool:
        if backend.startswith("flashinfer_nvlink"):
            return False
        return super().backend_output_is_reduced(backend)


class Before38990(MoERunner):
    """R3: 'external shared experts' checked before multi-stream overlap."""

    name = "before-38990"
    description = "R3: external-shared-experts order checked first; multi-stream never chosen"

    def shared_experts_order(self, num_tokens: int) -> Order:
        s = self.scenario
        if overlap_disabled(s):
            return Order.NO_OVERLAP
        if s.use_all2all_kernels and backend_info(s.effective_backend).async_shared_overlap:
            return Order.MK_INTERNAL_OVERLAPPED
        if not s.use_all2all_kernels:  # "use external shared experts": true whenever allowed
            return Order.EXTERNAL
        return super().shared_experts_order(num_tokens)


class Before40865(MoERunner):
    """R4: the routed output is trimmed early whenever the hidden dim was padded."""

    name = "before-40865"
    description = "R4: unconditional early trim of the padded routed output"

    def pre_trim_width(self) -> int | None:
        m = self.scenario.model
        return m.routed_width if self.scenario.padded else None


class NoEarlyTrim40865(MoERunner):
    """R4, the earlier state: no early trim at all (crashes with shared experts)."""

    name = "no-early-trim-40865"
    description = "R4 (earlier state): never trims before the shared add"

    def pre_trim_width(self) -> int | None:
        return None


class FirstFix40865(MoERunner):
    """R4, the first fix: checked only for shared experts (crashes for latent MoE)."""

    name = "first-fix-40865"
    description = "R4 (first fix): early trim only when shared experts exist"

    def pre_trim_width(self) -> int | None:
        m = self.scenario.model
        return m.routed_width if (self.scenario.padded and m.has_shared) else None


class Before39222(MoERunner):
    """R5: the rule that disables overlap (EPLB, FlashInfer two-sided) is missing."""

    name = "before-39222"
    description = "R5: overlap not disabled under EPLB with unsafe backends / FI two-sided"

    def shared_experts_order(self, num_tokens: int) -> Order:
        return overlap_order(self.scenario, num_tokens)  # rule 1 (disable) is gone


RUNNERS: dict[str, type[MoERunner]] = {
    cls.name: cls
    for cls in (
        FixedRunner,
        Before40673,
        StaleCache40673,
        Before41382,
        Before38990,
        Before40865,
        Before39222,
        NoEarlyTrim40865,
        FirstFix40865,
        SGLangRunner,
        TRTLLMRunner,
    )
}

# The presets that reproduce the historical regressions (the rest are variants).
BEFORE_RUNNERS = (
    "before-40673",
    "stale-cache-40673",
    "before-41382",
    "before-38990",
    "before-40865",
    "before-39222",
)


def engine_reference(cls: type[MoERunner]) -> str:
    """The preset name of the correct runner of `cls`'s engine (by its
    dispatch rules): `sglang`, `trtllm`, else vLLM's `fixed`. Each engine
    overlaps its own way, so a lost overlap is measured against its own."""
    name = getattr(getattr(cls, "engine_rules", None), "name", "")
    return name if name in ("sglang", "trtllm") else "fixed"


def load_runner(spec: str | type[MoERunner]) -> type[MoERunner]:
    """A preset by name, or a user's runner as `module:Class` (also `path/file.py:Class`)."""
    if isinstance(spec, type):
        if issubclass(spec, MoERunner):
            return spec
        raise RunnerLoadError(f"{spec.__name__} is not a runner (it does not subclass MoERunner)")
    if spec in RUNNERS:
        return RUNNERS[spec]
    if spec == ENGINE_RUNNER or spec.startswith(ENGINE_RUNNER + "@"):
        return _engine_runner(spec)
    if ":" not in spec:
        raise RunnerLoadError(
            f"unknown runner {spec!r} (presets: {', '.join(RUNNERS)}, {ENGINE_RUNNER}[@version]; or module:Class)"
        )
    module_name, _, attr = spec.rpartition(":")
    try:
        # Importing executes the user's module: contained like runner code
        # (wall-clock budget, stdout to stderr, no exiting the tool).
        with contain.RunnerGuard(_import_user_module.__code__, contain.limits().sim_timeout_s,
                                 what=f"importing runner {spec!r}"):
            module = _import_user_module(spec, module_name)
    except RunnerLoadError:
        raise
    except contain.BudgetExceeded as exc:
        raise RunnerLoadError(f"runner {spec!r}: importing {module_name} took too long ({exc})") from None
    except Exception as exc:  # a user's module failing to import is their error, named
        raise RunnerLoadError(f"runner {spec!r}: cannot import {module_name}: {exc}") from exc
    except BaseException as exc:  # sys.exit, KeyboardInterrupt, GeneratorExit, ...: runner code's, not the tool's end
        if isinstance(exc, KeyboardInterrupt) and contain.user_interrupted():
            raise
        raise RunnerLoadError(f"runner {spec!r}: importing {module_name}: {contain.runner_exit(exc)}") from None
    cls = getattr(module, attr, None)
    if cls is None:
        raise RunnerLoadError(f"runner {spec!r}: {module_name} has no attribute {attr!r}")
    if not (isinstance(cls, type) and issubclass(cls, MoERunner)):
        raise RunnerLoadError(
            f"runner {spec!r} is not a runner: {attr} must be a class subclassing "
            "scenarios.runners.MoERunner"
        )
    return cls


# The installed engine's own runner: `vllm` (pinned release) or `vllm@<version>`.
ENGINE_RUNNER = "vllm"
ENGINE_RUNNER_MODULE = "engines.vllm.runner"


def _engine_runner(spec: str) -> type[MoERunner]:
    """The engine's runner class for `spec`; a missing engine is one line
    saying how to install it."""
    version = spec.partition("@")[2]
    try:
        module = importlib.import_module(ENGINE_RUNNER_MODULE)
        from_version = module.runner_class
        return from_version(version) if version else from_version()
    except RuntimeError as exc:  # engines.vllm.EngineMissing
        raise RunnerLoadError(f"runner {spec!r}: {exc}") from None


# Runner files executed by this process, by (path, mtime, size): an edited file is loaded again.
_FILE_MODULES: dict[tuple[str, int, int], Any] = {}


def _import_user_module(spec: str, module_name: str) -> Any:
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise RunnerLoadError(f"runner {spec!r}: {_not_a_file(path)}")
        st = path.stat()
        key = (str(path.resolve()), st.st_mtime_ns, st.st_size)
        if key in _FILE_MODULES:  # loaded once per command (validated early, then simulated)
            return _FILE_MODULES[key]
        spec_obj = importlib.util.spec_from_file_location(path.stem, path)
        assert spec_obj is not None and spec_obj.loader is not None
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules.setdefault(path.stem, module)
        spec_obj.loader.exec_module(module)
        _FILE_MODULES[key] = module
        return module
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")  # let users name modules in the current directory
    return importlib.import_module(module_name)


def _not_a_file(path: Path) -> str:
    """Why `path` cannot be a runner's source file, in words (a FIFO is never
    opened: reading it would wait for a writer)."""
    from scenarios.loader import file_kind

    try:
        what = file_kind(path.stat().st_mode)
    except OSError:
        return f"no such file {path}"
    return f"{path} is {what}, not a Python file"


def unsupported_reason(cls: type[MoERunner], scenario: Scenario) -> str | None:
    """Why the runner does not model `scenario` (its `unsupported()`), or None."""
    return cls(scenario).unsupported()


def runner_label(cls: type[MoERunner]) -> str:
    if RUNNERS.get(getattr(cls, "name", "")) is cls:
        return cls.name
    spec = getattr(cls, "load_spec", None)  # a runner load_runner knows by name (vllm@0.21.0)
    if isinstance(spec, str) and cls.__dict__.get("load_spec") == spec:
        return spec
    return f"{cls.__module__}:{cls.__qualname__}"


# Packages whose prepare_program() is the tool's own (an engine probe may take
# minutes): only an override from elsewhere is runner code, run under budget.
_OWN_PACKAGES = frozenset({"scenarios", "engines", "sim", "real", "twin"})
PREPARE_STOPPED = "the runner's prepare_program() was stopped: "  # a budget stopped it


_PREPARED: dict[tuple[type, Scenario], str | None] = {}  # the answers of a user's prepare_program, once each
_PREPARED_MAX = 256


def prepare_runner(runner_cls: type[MoERunner], scenario: Scenario) -> str | None:
    """Run the class's prepare_program(scenario) once, before the program.
    Returns None, or why runner code's own prepare_program() failed (it
    raised, exited or overran the wall-clock budget: a RUNNER_ERROR for the
    caller to report). A user's is run once per scenario in this process
    (verify asks before simulating; check before the real run too). The
    user's Ctrl-C still ends the command."""
    fn = getattr(runner_cls.prepare_program, "__func__", runner_cls.prepare_program)
    if getattr(fn, "__module__", "").partition(".")[0] in _OWN_PACKAGES:
        runner_cls.prepare_program(scenario)
        return None
    key = (runner_cls, scenario)
    if key not in _PREPARED:
        if len(_PREPARED) >= _PREPARED_MAX:
            _PREPARED.clear()
        _PREPARED[key] = _prepare_guarded(runner_cls, scenario)
    return _PREPARED[key]


def _prepare_guarded(runner_cls: type[MoERunner], scenario: Scenario) -> str | None:
    try:
        with contain.RunnerGuard(_prepare_guarded.__code__, contain.limits().sim_timeout_s,
                                 what="the runner's prepare_program()"):
            runner_cls.prepare_program(scenario)
    except contain.BudgetExceeded as exc:
        return f"{PREPARE_STOPPED}{exc}"
    except Exception as exc:
        return f"the runner's prepare_program() raised {type(exc).__name__}: {exc}"
    except BaseException as exc:  # sys.exit, KeyboardInterrupt, ...: runner code's, not the tool's end
        if isinstance(exc, KeyboardInterrupt) and contain.user_interrupted():
            raise
        return f"the runner's prepare_program(): {contain.runner_exit(exc)}"
    return None


def run_program(runner_cls: type[MoERunner], scenario: Scenario, ops: Ops) -> Any:
    """The lifecycle both interpreters drive: construct, lazy build, forward."""
    ops.lifecycle("construct")
    runner = runner_cls(scenario)
    reason = runner.unsupported()
    if reason:
        raise RunnerUnsupported(f"runner {runner_label(runner_cls)!r} does not model this scenario: {reason}")
    ops.lifecycle("build_kernel")
    runner.process_weights(ops)
    ops.lifecycle("forward")
    return runner.model_forward(ops)
