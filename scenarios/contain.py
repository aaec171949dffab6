"""Containment of runner code: the runner under test is user code.

Both interpreters and runner loading execute it; none of it may hang, exhaust
or end the tool. This module holds what they share (torch-free, bottom layer):

- `Limits`: the op budget per rank (`--max-ops`) and the wall-clock budget per
  simulated program (`--sim-timeout`), plus fixed caps on a value's size.
  `check_op` enforces them where an interpreter records a step, so a runner
  that issues ops in a loop stops at a step boundary.
- `RunnerGuard`: a context manager around code that runs runner code. It arms
  a SIGALRM timer that stops runner code that never issues an op (a pure
  Python loop, a sleep) by raising `BudgetExceeded` in it; points stdout (the
  Python object and file descriptor 1) at stderr, so nothing the runner prints
  reaches a `--json` document; tells the user's Ctrl-C apart from a
  `KeyboardInterrupt` the runner raises itself; and, as a last resort, ends the
  process if runner code cannot be stopped at all (stuck in one long C call,
  or catching every stop in a loop).

The alarm raises only when the interrupted frame is runner code (the chain of
frames reaches the guard's boundary function before any frame of the tool),
never inside the simulator's own bookkeeping; otherwise it retries a few
milliseconds later. It is disarmed before the guard restores anything, and a
handler that runs after disarming does nothing.
"""

from __future__ import annotations

import _signal  # getsignal without the enum conversion (~4 us per call in signal.getsignal)
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import CodeType, FrameType, TracebackType
from typing import Any

from scenarios import contain_forks
from scenarios.contain_watchdog import (  # noqa: F401  (part of this module's interface)
    HARD_EXIT_CODE,
    HARD_GRACE_CPU_S,
    HARD_GRACE_S,
    HARD_GRACE_WALL_MAX_S,
    _Watchdog,
)

DEFAULT_MAX_OPS = 10_000
DEFAULT_SIM_TIMEOUT_S = 10.0
# A value may hold at most this many row blocks (legitimate programs hold at
# most one block per rank; an all-gather in a loop doubles them every step).
VALUE_BLOCKS_BASE, VALUE_BLOCKS_PER_RANK = 64, 4
# Elements per simulated tensor (2^40: far past any machine, well before a
# float cost model overflows).
MAX_ELEMENTS = 1 << 40
# Alarm retry intervals: while tool code runs, and after a stop was swallowed.
_DEFER_S, _REPEAT_S = 0.005, 0.05

BUDGET_NOTE = "runner stopped by a budget: "  # prefix of the Trace note a budget stop leaves
WALL_CLOCK_BUDGET = "wall-clock budget"  # the name a --sim-timeout stop starts with

_TOOL_DIRS = tuple(
    str(Path(__file__).resolve().parent.parent / d) + os.sep for d in ("sim", "real", "twin", "moe_twin_kernels")
)
_TOOL_FILES = frozenset(str(Path(__file__).resolve().parent / f) for f in ("contain.py", "ops.py"))


@dataclass(frozen=True)
class Limits:
    """Budgets for runner programs (see the README's "Budgets" section)."""

    max_ops: int = DEFAULT_MAX_OPS
    sim_timeout_s: float = DEFAULT_SIM_TIMEOUT_S


class BudgetExceeded(RuntimeError):
    """Runner code exceeded a budget; `budget` names it, `limit` its setting."""

    def __init__(self, budget: str, limit: str, detail: str = "") -> None:
        self.budget, self.limit, self.detail = budget, limit, detail
        super().__init__(f"{budget} exceeded ({limit})" + (f": {detail}" if detail else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (BudgetExceeded, (self.budget, self.limit, self.detail))


class RunnerExit(RuntimeError):
    """SystemExit / KeyboardInterrupt raised by runner code (not the user's Ctrl-C)."""


_limits = Limits()
_deadline: float | None = None  # monotonic end of the current wall-clock budget
# Ctrl-C bookkeeping (main thread only): presses seen by this module's
# handlers, the count when the innermost guard was entered, and a press that
# arrived while a guard was changing process state (raised once it is done).
_sigint_seen = 0
_seen_at_entry = 0
_critical = 0
_pending_interrupt = False
_guards = 0  # RunnerGuards entered and not left: runner code may be running


def limits() -> Limits:
    return _limits


def set_limits(new: Limits) -> None:
    """Set the budgets for this process (the CLI, from its flags; rank processes, per run)."""
    global _limits
    _limits = new


@dataclass(frozen=True)
class Budget:
    """The op budget and wall-clock deadline in force when a rank's program
    starts: an interpreter takes it once, under the guard that set the
    deadline, so runner code changing the limits later changes nothing."""

    max_ops: int
    deadline: float | None  # monotonic end of the wall-clock budget (None: none)


def current_budget() -> Budget:
    return Budget(_limits.max_ops, _deadline)


def value_block_cap(world: int) -> int:
    return VALUE_BLOCKS_BASE + VALUE_BLOCKS_PER_RANK * max(1, world)


def check_op(n_steps: int, ins: tuple[Any, ...] = (), out_shape: tuple[int, ...] | None = None,
             world: int = 1, budget: Budget | None = None) -> None:
    """Called by an interpreter before it records step number `n_steps` of a
    rank; `budget`: the one taken when the program started (default: now's)."""
    if budget is not None:
        max_ops, deadline = budget.max_ops, budget.deadline
    else:
        max_ops, deadline = _limits.max_ops, _deadline
    if n_steps >= max_ops:
        raise BudgetExceeded("op budget", f"--max-ops {max_ops}", f"{n_steps} ops on this rank")
    if deadline is not None and time.monotonic() > deadline:
        raise _timeout()
    if ins:
        cap = VALUE_BLOCKS_BASE + VALUE_BLOCKS_PER_RANK * (world if world > 1 else 1)
        for t in ins:
            try:  # the simulator's values count blocks without building them
                n = t.value.n_blocks
            except AttributeError:
                n = None
            if n is None:
                n = _block_count(t)
            if n is not None and n > cap:
                raise BudgetExceeded("value size cap", f"{cap} row blocks per value at {world} rank(s)",
                                     f"an input holds {n} row blocks")
    # The plain product bounds the clamped one from above unless a dimension
    # is negative: only a product over the cap needs the exact count.
    if not out_shape:
        return
    try:
        may_exceed = math.prod(out_shape) > MAX_ELEMENTS
    except TypeError:  # not numbers: the exact count below says what is wrong
        may_exceed = True
    if may_exceed:
        n = 1
        for d in out_shape:
            n *= max(0, int(d))
        if n > MAX_ELEMENTS:
            raise BudgetExceeded("value size cap", f"{MAX_ELEMENTS} elements per tensor",
                                 f"shape {list(out_shape)}")


def _block_count(t: Any) -> int | None:
    """The row blocks of an input without a simulated value's count (None: unknown)."""
    v = getattr(t, "value", None)
    n = getattr(v, "n_blocks", None)
    if n is None:
        blocks = getattr(v, "blocks", None)
        n = len(blocks) if blocks is not None else None
    return n


def _timeout() -> BudgetExceeded:
    return BudgetExceeded(WALL_CLOCK_BUDGET, f"--sim-timeout {_limits.sim_timeout_s:g} s")


def budget_stop(notes: list[str]) -> str | None:
    """The reason a simulation was stopped by a budget (from its Trace notes), if it was."""
    for n in notes:
        if n.startswith(BUDGET_NOTE):
            return n[len(BUDGET_NOTE):]
    return None


def user_interrupted() -> bool:
    """True when the KeyboardInterrupt being handled came from the user's Ctrl-C
    (pressed since the innermost guard was entered), not from runner code."""
    return _sigint_seen > _seen_at_entry


def _on_sigint(signum: int, frame: FrameType | None) -> None:
    global _sigint_seen, _pending_interrupt
    _sigint_seen += 1
    if _critical:  # a guard is changing process state: raise when it is done
        _pending_interrupt = True
        return
    raise KeyboardInterrupt


class GracefulInterrupts:
    """`with GracefulInterrupts() as stop:` for long searches: the first Ctrl-C
    is only recorded (`stop()` turns True; the caller stops at its next safe
    point), the second raises KeyboardInterrupt at once. Main thread only."""

    def __init__(self, notice: str = "") -> None:
        self.notice = notice
        self._start = 0
        self._saved: Any = None

    def __enter__(self) -> GracefulInterrupts:
        self._start = _sigint_seen
        if threading.current_thread() is threading.main_thread():
            self._saved = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._saved is not None:
            signal.signal(signal.SIGINT, self._saved)

    def __call__(self) -> bool:
        return _sigint_seen > self._start

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        global _sigint_seen
        if _sigint_seen == self._start:
            _sigint_seen += 1
            if self.notice:
                os.write(2, (self.notice + "\n").encode())
            return
        _on_sigint(signum, frame)


def runner_exit(exc: BaseException) -> RunnerExit:
    """A runner's SystemExit, KeyboardInterrupt or other BaseException (not an
    Exception: GeneratorExit, a class of its own) as an ordinary error."""
    if isinstance(exc, SystemExit):
        return RunnerExit(f"runner code called sys.exit({exc.code!r}); runner code may not end the tool")
    if isinstance(exc, KeyboardInterrupt):
        return RunnerExit(f"runner code raised {type(exc).__name__} itself (not a Ctrl-C)")
    return RunnerExit(f"runner code raised {type(exc).__name__}, a BaseException that is not an Exception"
                      + (f": {exc}" if str(exc) else ""))


def _is_tool(code: CodeType) -> bool:
    f = code.co_filename
    return f in _TOOL_FILES or f.startswith(_TOOL_DIRS)


def _in_runner(frame: FrameType | None, boundary: CodeType | None) -> bool:
    """Is `frame` runner code: do its callers reach `boundary` before any tool frame?"""
    if boundary is None:
        return False
    while frame is not None:
        if frame.f_code is boundary:
            return True
        if _is_tool(frame.f_code):
            return False
        frame = frame.f_back
    return False


# ---------------------------------------------------------------- the guard


_watchdog = _Watchdog()
contain_forks.watch(lambda: _guards > 0)  # a fork now is runner code's: ended with the command
_active: RunnerGuard | None = None  # the innermost guard with an armed alarm


def _alarm_handler(signum: int, frame: FrameType | None) -> None:
    guard = _active
    if guard is not None:  # else a stale alarm: nothing to stop
        guard._on_alarm(signum, frame)


_KEPT_SIGNALS = (signal.SIGINT, signal.SIGTERM)  # the user's Ctrl-C and kill reach the tool whatever runner code did


class RunnerGuard:
    """`with RunnerGuard(boundary=fn.__code__):` around code that runs runner code.

    `boundary` is the code object of the tool function that calls into runner
    code (frames below it, up to the first tool frame, are the runner's).
    `timeout_s` None: no wall-clock budget (the op budget still applies).
    Re-entrant: an inner guard inside an outer one only narrows the deadline.
    """

    def __init__(self, boundary: CodeType | None, timeout_s: float | None = None, what: str = "runner code") -> None:
        self.boundary = boundary
        self.timeout_s = timeout_s
        self.what = what
        self._saved: dict[str, Any] = {}
        self._armed = False

    # -- enter / exit --

    # Entering and leaving change process state (stdout, signal handlers, the
    # timer): a Ctrl-C meanwhile is held back (`_critical`) and raised once
    # the state is whole again, never half-way (stdout left on stderr).

    def __enter__(self) -> RunnerGuard:
        global _deadline, _critical, _seen_at_entry, _guards
        s = self._saved
        main = threading.current_thread() is threading.main_thread()
        _critical += 1
        try:
            if main and _signal.getsignal(signal.SIGINT) is signal.default_int_handler:
                # Stays installed (it raises KeyboardInterrupt like Python's own,
                # and counts): installing a handler costs ~20 us per guard.
                signal.signal(signal.SIGINT, _on_sigint)
        except BaseException:  # a Ctrl-C before the handler was ours: nothing changed yet
            _critical -= 1
            raise
        s["deadline"], s["seen"] = _deadline, _seen_at_entry
        s["pid"] = os.getpid()
        _guards += 1
        if main:  # runner code may change them; the tool's come back on exit
            s["signals"] = [(n, _signal.getsignal(n)) for n in _KEPT_SIGNALS]
        _seen_at_entry = _sigint_seen
        if self.timeout_s is not None:
            mine = time.monotonic() + self.timeout_s
            _deadline = mine if _deadline is None else min(_deadline, mine)
        self._redirect_stdout()
        if main:
            self._install_alarm()
        _critical -= 1
        if _pending_interrupt and not _critical:
            self.__exit__(None, None, None)  # restores everything, then raises the Ctrl-C
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        global _deadline, _critical, _seen_at_entry, _pending_interrupt, _active, _guards
        s = self._saved
        if os.getpid() != s["pid"]:  # a process runner code forked, back in tool code: not the tool
            os._exit(0)
        _guards -= 1
        _critical += 1
        self._armed = False  # first: an alarm handler that still runs now does nothing
        for n, handler in s.pop("signals", ()):
            if handler is not None and _signal.getsignal(n) is not handler:  # None: installed from C, not ours to set
                signal.signal(n, handler)
        if "entered" in s:  # the alarm was armed
            signal.setitimer(signal.ITIMER_REAL, 0)
            _watchdog.disarm()
            _active = s.pop("active")
            if "alarm" in s:  # someone else's SIGALRM handler: theirs again
                signal.signal(signal.SIGALRM, s.pop("alarm"))
            self._restore_outer_timer()
        if "fd1" in s or "stdout" in s:
            self._restore_stdout()
        _deadline = s["deadline"]
        _seen_at_entry = s["seen"]
        _critical -= 1
        if _pending_interrupt and not _critical:
            _pending_interrupt = False
            raise KeyboardInterrupt

    # -- stdout --

    def _redirect_stdout(self) -> None:
        s = self._saved
        try:
            sys.stdout.flush()
        except (OSError, ValueError, AttributeError):
            pass
        s["stdout"] = sys.stdout
        sys.stdout = sys.stderr
        try:
            s["fd1"] = os.dup(1)
            os.dup2(2, 1)
        except OSError:  # no fd 1 or 2 (daemonised): nothing to protect
            s.pop("fd1", None)

    def _restore_stdout(self) -> None:
        s = self._saved
        if "fd1" in s:
            try:
                sys.stderr.flush()
            except (OSError, ValueError, AttributeError):
                pass
            fd = s.pop("fd1")
            os.dup2(fd, 1)
            os.close(fd)
        sys.stdout = s.pop("stdout")

    # -- signals --

    def _install_alarm(self) -> None:
        global _active
        s = self._saved
        if _deadline is None:
            return
        left = _deadline - time.monotonic()
        s["outer_timer"] = signal.getitimer(signal.ITIMER_REAL)[0]
        s["entered"] = time.monotonic()
        if _signal.getsignal(signal.SIGALRM) is not _alarm_handler:
            previous = signal.signal(signal.SIGALRM, _alarm_handler)
            if previous not in (signal.SIG_DFL, signal.SIG_IGN, None):
                s["alarm"] = previous  # restored on exit; an unused SIGALRM keeps ours (cheaper)
        s["active"], _active = _active, self
        self._armed = True
        signal.setitimer(signal.ITIMER_REAL, max(left, 1e-4))
        _watchdog.arm(_deadline,
                      f"moe-twin: error: {self.what} could not be stopped {HARD_GRACE_S:g} s after its "
                      f"wall-clock budget (--sim-timeout {_limits.sim_timeout_s:g} s): it is stuck in one "
                      "long C call or catches every stop; aborting")

    def _restore_outer_timer(self) -> None:
        s = self._saved
        outer = s.get("outer_timer", 0.0)
        if outer > 0:  # someone else's timer was running: give it its remaining time
            signal.setitimer(signal.ITIMER_REAL, max(outer - (time.monotonic() - s["entered"]), 1e-4))

    def _on_alarm(self, signum: int, frame: FrameType | None) -> None:
        if not self._armed:
            return
        deadline = _deadline
        if deadline is not None and time.monotonic() < deadline:
            signal.setitimer(signal.ITIMER_REAL, max(deadline - time.monotonic(), 1e-4))
            return
        if not _in_runner(frame, self.boundary):
            # Tool code is running (the scheduler, the algebra): never raise
            # into it; runner code gets the stop at its next op or alarm.
            signal.setitimer(signal.ITIMER_REAL, _DEFER_S)
            return
        # Again and again until the guarded code ends (a runner may catch one).
        signal.setitimer(signal.ITIMER_REAL, _REPEAT_S)
        raise _timeout()


__all__ = [
    "BUDGET_NOTE",
    "BudgetExceeded",
    "GracefulInterrupts",
    "DEFAULT_MAX_OPS",
    "DEFAULT_SIM_TIMEOUT_S",
    "Limits",
    "MAX_ELEMENTS",
    "RunnerExit",
    "RunnerGuard",
    "WALL_CLOCK_BUDGET",
    "budget_stop",
    "check_op",
    "Budget",
    "current_budget",
    "limits",
    "runner_exit",
    "set_limits",
    "user_interrupted",
    "value_block_cap",
]
