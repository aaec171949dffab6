"""The tool's stdout, kept for the tool: in its own process, file descriptor 1
points at stderr and `sys.stdout` is a writer that reaches the real stdout
only from the tool's main thread, in its own process, until the command's
output is done.

Runner code is contained while it runs (scenarios/contain.py), but some of it
runs later: a thread it left running, an `atexit` handler, an object's
`__del__` at exit, a process it forked. Whatever they write (`print`,
`sys.stdout.write`/`writelines`/`.buffer`, `os.write(sys.stdout.fileno())`
or descriptor 1) goes to stderr; a forked child closes its copy of the real
stdout at once, so it never holds a reader's pipe open either.
"""

from __future__ import annotations

import os
import sys
import threading
from typing import Any


class ToolStdout:
    """`sys.stdout` of the tool's own process (see the module docstring)."""

    def __init__(self, out: Any) -> None:
        self._out = out
        self._pid = os.getpid()
        self._main = threading.main_thread()
        self.done = False  # the command's output is complete: everything else is not the tool's

    def _target(self) -> Any:
        if self.done or os.getpid() != self._pid or threading.current_thread() is not self._main:
            return sys.stderr
        return self._out

    def write(self, text: str) -> int:
        return self._target().write(text)

    def writelines(self, lines: Any) -> None:
        self._target().writelines(lines)

    def flush(self) -> None:
        self._target().flush()

    def fileno(self) -> int:
        return self._target().fileno()

    @property
    def buffer(self) -> Any:
        return self._target().buffer

    def isatty(self) -> bool:
        return self._out.isatty()  # what the output goes to (rich decides colours by it)

    def __getattr__(self, name: str) -> Any:  # encoding, errors, ...: the real stream's
        return getattr(self._out, name)


def protect() -> ToolStdout | None:
    """Point descriptor 1 at stderr and `sys.stdout` at a ToolStdout over the
    real stdout; None when stdout is not a file descriptor (nothing to do)."""
    try:
        sys.stdout.flush()
        fd = os.dup(sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        return None
    real = os.fdopen(fd, "w", buffering=1 if getattr(sys.stdout, "line_buffering", False) else -1,
                     encoding=getattr(sys.stdout, "encoding", None), errors=getattr(sys.stdout, "errors", None))
    _keep_terminal_width(fd)
    os.dup2(2, 1)  # only once the real stdout is kept: stray writes to descriptor 1 go to stderr
    guard = ToolStdout(real)
    os.register_at_fork(after_in_child=lambda: _drop_in_child(guard, fd))
    sys.stdout = guard  # type: ignore[assignment]
    return guard


def _keep_terminal_width(fd: int) -> None:
    """rich sizes a terminal by descriptors 0-2, and 1 is about to be stderr:
    a terminal on the real stdout keeps its width (COLUMNS, as rich reads it)."""
    if "COLUMNS" in os.environ or not os.isatty(fd):
        return
    try:
        os.environ["COLUMNS"] = str(os.get_terminal_size(fd).columns)
    except OSError:
        pass


def _drop_in_child(guard: ToolStdout, fd: int) -> None:
    """In a process forked from the tool's: no writer to the real stdout."""
    guard.done = True
    try:
        os.close(fd)
    except OSError:
        pass


def finish(guard: ToolStdout | None) -> None:
    """The command's output is complete: flush it and close the real stdout,
    so that anything written after it (exit handlers, finalisers) goes to
    stderr. A reader that stopped reading (`| head`) is not an error."""
    if guard is None:
        return
    guard.done = True
    try:
        guard._out.close()
    except (OSError, ValueError):  # BrokenPipeError among them
        pass


def reader_gone(guard: ToolStdout | None) -> None:
    """The reader of stdout went away mid-output: the rest goes nowhere."""
    if guard is not None:
        try:
            guard._out = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
        except OSError:
            pass


__all__ = ["ToolStdout", "finish", "protect", "reader_gone"]
