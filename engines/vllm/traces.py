"""Rank traces of vLLM's own MoE forward for the `vllm` runner: asked of the
engine probe (one long-lived probe process per engine release per twin
process) and cached on disk, so rank processes of a real run (the plain
venv, which cannot import vLLM) read what the launching process traced.

Assumption, one trace per distinct rank program: the engine's runner code
depends on the rank only through the tokens its DP rank holds (the SP slice
is computed from them); it never branches on the TP rank. So ranks whose DP
ranks hold the same number of tokens share one trace, taken as TP rank 0 of
the first such DP rank. (vLLM 0.33's expert substitution adds a constant on
TP rank 0 only; the unquantized probe layer does not build it.)

Cache key: the engine release, its interpreter, a fingerprint of the engine's
source (path, size and mtime of every .py file of the vllm package, so a
patched editable checkout named by $MOE_TWIN_VLLM_PYTHON is traced again), a
hash of this binding's own code, the engine configuration and the rank.
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

from engines.vllm import ENV_PYTHON, ROOT, engine_python
from engines.vllm.client import ProbeClient
from engines.vllm.config_map import engine_config
from scenarios.spec import Scenario

CACHE_ENV = "MOE_TWIN_CACHE_DIR"
_CLIENTS: dict[str, ProbeClient] = {}
_MEMO: dict[str, dict[str, Any]] = {}
# The same answers by what the caller holds (release, $MOE_TWIN_VLLM_PYTHON,
# scenario, traced DP rank, backend names): a runner asks several times per
# rank per simulation, and the full key costs the interpreter lookup and a hash.
_ASKED: dict[tuple[Any, ...], dict[str, Any]] = {}
_FINGERPRINTS: dict[str, str] = {}
STATS = {"probe_starts": 0, "probe_calls": 0, "disk_hits": 0, "memo_hits": 0}


def cache_dir() -> Path:
    """$MOE_TWIN_CACHE_DIR, else $XDG_CACHE_HOME/moe-twin/vllm-traces (~/.cache)."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "moe-twin" / "vllm-traces"


def client(version: str) -> ProbeClient:
    """The process's probe for `version` (started once, closed at exit)."""
    c = _CLIENTS.get(version)
    if c is None or c.proc.poll() is not None:
        c = ProbeClient(version=version)
        STATS["probe_starts"] += 1
        _CLIENTS[version] = c
    return c


@atexit.register
def close_clients() -> None:
    for c in _CLIENTS.values():
        c.close()
    _CLIENTS.clear()


def trace_rank(s: Scenario, d: int) -> tuple[int, int]:
    """(tp rank, dp rank) whose trace serves DP rank `d` (module doc)."""
    tokens = s.dp_tokens(d)
    first = next(e for e in range(s.parallel.dp) if s.dp_tokens(e) == tokens)
    return 0, first


def rank_answer(version: str, s: Scenario, d: int, renamed_backends: bool = True) -> dict[str, Any]:
    """The probe's trace answer for DP rank `d` of `s` (memoized, then on disk)."""
    t, first = trace_rank(s, d)
    asked = (version, os.environ.get(ENV_PYTHON), s, first, renamed_backends)
    if asked in _ASKED:
        STATS["memo_hits"] += 1
        return _ASKED[asked]
    cfg = engine_config(s, renamed_backends)
    cfg["trace"] = {"tp_rank": t, "dp_rank": first}
    python = engine_python(version)
    key = _key(version, python, cfg)
    if key in _MEMO:
        STATS["memo_hits"] += 1
        _ASKED[asked] = _MEMO[key]
        return _MEMO[key]
    path = cache_dir() / f"{key}.json"
    ans = _read(path)
    if ans is not None:
        STATS["disk_hits"] += 1
    else:
        STATS["probe_calls"] += 1
        ans = client(version).ask(cfg)
        if "error" not in ans:  # a probe defect is not kept
            _write(path, ans)
    _MEMO[key] = _ASKED[asked] = ans
    return ans


def _key(version: str, python: str, cfg: dict[str, Any]) -> str:
    blob = json.dumps({"version": version, "python": python, "engine": engine_fingerprint(python),
                       "binding": binding_fingerprint(), "cfg": cfg}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write(path: Path, ans: dict[str, Any]) -> None:
    """Atomically (rank processes may read while another run writes)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(ans))
        os.replace(tmp, path)
    except OSError:
        pass  # an unwritable cache only costs a probe call next time


def engine_fingerprint(python: str) -> str:
    """Path, size and mtime of every .py file of the vllm package `python` imports."""
    if python in _FINGERPRINTS:
        return _FINGERPRINTS[python]
    pkg = _vllm_dir(python)
    h = hashlib.sha256(pkg.encode())
    for dirpath, dirnames, files in os.walk(pkg):
        dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
        for f in sorted(files):
            if f.endswith(".py"):
                st = os.stat(os.path.join(dirpath, f))
                h.update(f"{dirpath}/{f}:{st.st_size}:{st.st_mtime_ns}".encode())
    _FINGERPRINTS[python] = h.hexdigest()
    return _FINGERPRINTS[python]


def _vllm_dir(python: str) -> str:
    """Where `python` finds the vllm package: a venv under .engines/ is read
    directly; another interpreter is asked (without importing vllm)."""
    venv = Path(python).parent.parent
    found = sorted(venv.glob("lib/python*/site-packages/vllm/__init__.py"))
    if venv.parent == ROOT / ".engines" and found:
        return str(found[0].parent)
    code = "import importlib.util as u; print(list(u.find_spec('vllm').submodule_search_locations)[0])"
    out = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return out.stdout.strip()


@functools.lru_cache(maxsize=1)
def binding_fingerprint() -> str:
    """This binding's own code (what the probe answers depends on it)."""
    h = hashlib.sha256()
    for p in sorted((ROOT / "engines" / "vllm").glob("*.py")):
        h.update(p.read_bytes())
    return h.hexdigest()
