"""The engine probe's client (the twin side): the long-lived probe process
(engines/vllm/probe.py, in the engine venv), one request line in, one answer
line out. Used by `conform` and by the `vllm` runner (engines/vllm/traces.py).
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
from typing import Any

from engines.vllm import PINNED_VERSION, ROOT, EngineMissing, engine_python

READY_TIMEOUT_S = 180.0
REQUEST_TIMEOUT_S = 60.0


class ProbeError(RuntimeError):
    """The probe process failed (not an engine answer)."""


class ProbeClient:
    """The engine probe subprocess: one request line in, one answer line out."""

    def __init__(self, python: str | None = None, version: str = PINNED_VERSION) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), VLLM_TARGET_DEVICE="cpu")
        # The engine's own output (logging, warnings) is kept for the error line only.
        self.log = tempfile.TemporaryFile(mode="w+")
        exe = python or engine_python(version)
        try:
            self.proc = subprocess.Popen(
                [exe, "-m", "engines.vllm.probe"], cwd=str(ROOT), env=env,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
        except OSError as exc:
            self.log.close()
            raise EngineMissing(f"cannot start the engine interpreter {exe}: {exc.strerror or exc}") from None
        self.hello = self._read(READY_TIMEOUT_S)
        if not self.hello.get("ready"):
            raise ProbeError(f"engine probe did not start: {self.hello}")
        if self.hello.get("version") != version:
            # e.g. $MOE_TWIN_VLLM_PYTHON names another release's interpreter
            self.close()
            raise EngineMissing(f"{exe} runs vllm {self.hello.get('version')}, not the requested {version}")

    def _read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            self.close()
            raise ProbeError(f"engine probe gave no answer within {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait()
            raise ProbeError(f"engine probe exited (code {self.proc.returncode}): {self._last_log_line()}")
        return json.loads(line)

    def _last_log_line(self) -> str:
        self.log.seek(0)
        lines = [ln.strip() for ln in self.log.read().splitlines() if ln.strip()]
        return lines[-1] if lines else "no output"

    def ask(self, cfg: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cfg) + "\n")
        self.proc.stdin.flush()
        return self._read(REQUEST_TIMEOUT_S)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.log.close()

    def __enter__(self) -> ProbeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
