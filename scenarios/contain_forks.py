"""Processes runner code forks in the tool's own process end with the command.

A child forked by runner code ends where it hands back to the tool (the
guard's exit, the next op), but one that never comes back (it sleeps, it
loops) would outlive the command and hold its stderr open: a reader waiting
for the end of it (`2>&1 | ...`, a CI log) would wait for the child. The
children are told apart from the tool's own (rank processes, an engine probe)
by when they were made: a fork while runner code runs under a guard. Linux
lists a process's children in /proc; elsewhere nothing is recorded.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

_forked: set[int] = set()  # children forked while runner code ran, in this process
_before: set[int] | None = None  # this process's children just before a fork of runner code
_runner_code_running: Callable[[], bool] = lambda: False  # noqa: E731 - set by scenarios/contain.py


def _children() -> set[int]:
    pids: set[int] = set()
    me = os.getpid()
    try:
        for tid in os.listdir(f"/proc/{me}/task"):
            with open(f"/proc/{me}/task/{tid}/children") as f:
                pids.update(int(p) for p in f.read().split())
    except (OSError, ValueError):  # no /proc (or no children file): nothing known
        pass
    return pids


def _before_fork() -> None:
    global _before
    _before = _children() if _runner_code_running() else None


def _after_fork_in_parent() -> None:
    global _before
    if _before is not None:
        _forked.update(_children() - _before)
        _before = None


def watch(runner_code_running: Callable[[], bool]) -> None:
    """Record the children forked while `runner_code_running()` (once per process)."""
    global _runner_code_running
    _runner_code_running = runner_code_running


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)


def end_forked() -> list[int]:
    """Kill the processes runner code forked here that still run (reaping
    them); the pids ended. Children that exited already are only reaped."""
    ended = []
    for pid in sorted(_forked):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                ended.append(pid)
        except (ChildProcessError, ProcessLookupError):  # reaped by someone else already
            pass
    _forked.clear()
    return ended


__all__ = ["end_forked", "watch"]
