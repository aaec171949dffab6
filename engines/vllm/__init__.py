"""The vLLM engine extra: locating the installed engine, mapping a scenario
to the engine's configuration, and the probe process that runs the engine's
own MoE layer code (engines/vllm/probe.py, inside the engine venv).

This package is imported by the twin process too: nothing at module level
imports torch or vLLM.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

PINNED_VERSION = "0.33.0"
# The twin's engine version whose rules each supported release follows. The
# older releases (0.20.0-0.22.0: the FusedMoE layer class builds the layer)
# are for the engine's own history (README: released versions and the seeds).
TWIN_VERSION = {"0.33.0": "newest", "0.22.0": "previous", "0.21.0": "previous", "0.20.0": "previous"}
# Releases whose layer has no reduce_results knob (the runner always reduces).
NO_REDUCE_RESULTS_KNOB = frozenset({"0.20.0", "0.21.0", "0.22.0"})
# Releases that still use the older backend names (MORI is `mori`).
OLD_BACKEND_NAMES = frozenset({"0.20.0", "0.21.0", "0.22.0"})
ROOT = Path(__file__).resolve().parents[2]
ENV_PYTHON = "MOE_TWIN_VLLM_PYTHON"


class EngineMissing(RuntimeError):
    """The engine extra is not installed (the message says how to install it)."""


def _engine_venv_python(version: str) -> Path | None:
    """The interpreter of `version`'s venv under .engines/, once its install
    finished: scripts/install-engine.sh creates the venv first and writes its
    stamp last, so a venv mid-install (or left by a failed one) has no stamp."""
    target = ROOT / ".engines" / f"vllm-{version}"
    if not (target / f".moe-twin-engine-vllm-{version}").is_file():
        return None
    return target / "bin" / "python"


def engine_python(version: str = PINNED_VERSION) -> str:
    """The interpreter that can import the pinned vLLM: $MOE_TWIN_VLLM_PYTHON,
    the per-version venv under .engines/, or this interpreter (install with
    --into-venv)."""
    venv = _engine_venv_python(version)
    if version != PINNED_VERSION and venv is not None:
        return str(venv)  # an older release's own venv wins over the pinned one's override
    explicit = os.environ.get(ENV_PYTHON)
    if explicit:
        return explicit
    if venv is not None:
        return str(venv)
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    raise EngineMissing(
        f"vllm {version} is not installed: run scripts/install-engine.sh vllm=={version} "
        f"(or point ${ENV_PYTHON} at an interpreter that has it)"
    )


def installed(version: str = PINNED_VERSION) -> bool:
    """Whether `version` has its own venv under .engines/ (or, for the pinned
    release, any interpreter engine_python finds)."""
    if version != PINNED_VERSION:
        return _engine_venv_python(version) is not None
    try:
        engine_python()
    except EngineMissing:
        return False
    return True
