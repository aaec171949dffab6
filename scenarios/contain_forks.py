"""Processes runner code forks in the tool's own process end with the command.

A child forked by runner code ends where it hands back to the tool (the
guard's exit, the next op), but one that never comes back (it sleeps, it
loops) would outlive the command and hold its stderr open: a reader waiting
for the end of it (`2>&1 | ...`, a CI log) would wait for the child. The
children are told apart from the tool's own (rank processes, an engine probe)
by when they were made: a fork while runner code runs under a guard. Linux
lists a process's children in /proc; elsewhere nothing is recorded. Not
covered: a process runner code starts with subprocess (no fork hooks run), a
grandchild (it is not ours), a fork from a thread runner code left running
after its guard.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

# Children forked while runner code ran, in this process, with a pidfd each
# (None where the kernel has none): killing and reaping through it can never
# reach another process that reuses the pid after runner code reaped its own.
_forked: dict[int, int | None] = {}
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
        for pid in _children() - _before:
            _forked[pid] = _pidfd(pid)
        _before = None


def _pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


def watch(runner_code_running: Callable[[], bool]) -> None:
    """Record the children forked while `runner_code_running()` (once per process)."""
    global _runner_code_running
    _runner_code_running = runner_code_running


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent)


def end_forked() -> list[int]:
    """Kill the processes runner code forked here that still run (reaping
    them); the pids ended. Children that exited already are only reaped."""
    ended = []
    for pid, fd in sorted(_forked.items()):
        try:
            if _end(pid, fd):
                ended.append(pid)
        except (ChildProcessError, ProcessLookupError, OSError):  # reaped by someone else already
            pass
        finally:
            if fd is not None:
                os.close(fd)
    _forked.clear()
    return ended


def _end(pid: int, fd: int | None) -> bool:
    """Whether the child was still running (then killed); reaped either way."""
    if fd is not None and hasattr(os, "P_PIDFD"):
        if os.waitid(os.P_PIDFD, fd, os.WEXITED | os.WNOHANG) is not None:
            return False
        signal.pidfd_send_signal(fd, signal.SIGKILL)
        os.waitid(os.P_PIDFD, fd, os.WEXITED)
        return True
    done, _ = os.waitpid(pid, os.WNOHANG)
    if done != 0:
        return False
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return True


__all__ = ["end_forked", "watch"]
