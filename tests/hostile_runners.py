"""Runners that misbehave on purpose: the containment tests load them as
`tests/hostile_runners.py:Class` (user code the tool must survive)."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from scenarios.ops import Ops
from scenarios.runners import MoERunner


class LoopForever(MoERunner):
    """Spins in pure Python, never issuing an op."""

    def forward(self, ops: Ops, x: Any) -> Any:
        n = 0
        while True:
            n += 1


class AnnouncedLoop(MoERunner):
    """LoopForever that first creates the file named by $MOE_TWIN_TEST_IN_LOOP,
    so a test acts once runner code is running (not after a guessed delay)."""

    def forward(self, ops: Ops, x: Any) -> Any:
        with open(os.environ["MOE_TWIN_TEST_IN_LOOP"], "w"):
            pass
        n = 0
        while True:
            n += 1


class Sleeper(MoERunner):
    """Sleeps far longer than any budget."""

    def forward(self, ops: Ops, x: Any) -> Any:
        time.sleep(3600)
        return x


class OpsForever(MoERunner):
    """Issues ops in a loop (each op is recorded: memory grows per op)."""

    def forward(self, ops: Ops, x: Any) -> Any:
        while True:
            x = ops.clone(x)


class RaisesItsBudget(MoERunner):
    """Lifts the op budget from inside its own program, then loops on ops."""

    def forward(self, ops: Ops, x: Any) -> Any:
        from scenarios import contain

        contain.set_limits(contain.Limits(max_ops=10**9, sim_timeout_s=10**6))
        while True:
            x = ops.clone(x)


class GatherForever(MoERunner):
    """Each all-gather doubles the rows of its value: values grow geometrically."""

    def forward(self, ops: Ops, x: Any) -> Any:
        while True:
            x = ops.all_gather(x, "tp")


class Exit0(MoERunner):
    def forward(self, ops: Ops, x: Any) -> Any:
        sys.exit(0)


class Exit5(MoERunner):
    def forward(self, ops: Ops, x: Any) -> Any:
        sys.exit(5)


class Interrupt(MoERunner):
    def forward(self, ops: Ops, x: Any) -> Any:
        raise KeyboardInterrupt


class RaisesGeneratorExit(MoERunner):
    def forward(self, ops: Ops, x: Any) -> Any:
        raise GeneratorExit


class HomeMadeBase(BaseException):
    """Not an Exception: no `except Exception` catches it."""


class RaisesOwnBase(MoERunner):
    def forward(self, ops: Ops, x: Any) -> Any:
        raise HomeMadeBase("not an error class")


class RaisesGreenletExit(MoERunner):
    def forward(self, ops: Ops, x: Any) -> Any:
        import greenlet

        raise greenlet.GreenletExit


class Printer(MoERunner):
    """Prints from runner code (Python-level and straight to file descriptor 1)."""

    def forward(self, ops: Ops, x: Any) -> Any:
        print("runner says hello [bold]not json[/bold]")
        os.write(1, b"raw fd-1 write from the runner\n")
        return super().forward(ops, x)


class Swallower(MoERunner):
    """Catches every stop and keeps spinning: only a process-level stop ends it."""

    def forward(self, ops: Ops, x: Any) -> Any:
        while True:
            try:
                while True:
                    pass
            except BaseException:  # noqa: BLE001 - hostile on purpose
                continue


class EvilNames(MoERunner):
    """Step names, decision values and an exception message full of markup and escapes."""

    def forward(self, ops: Ops, x: Any) -> Any:
        x = ops.clone(x, name="[/bold][link=http://evil.example]click[/link]\x1b[2J\x1b]8;;http://x\x07")
        ops.decide("evil\x1b[31m", "[bold]v[/]\x1b[0m")
        raise RuntimeError("boom [/bold] \x1b[31mred\x1b[0m\nsecond line")


def _on_real_ranks(ops: Ops) -> bool:
    return type(ops).__module__.startswith("real.")


class LoopOnRealRanks(MoERunner):
    """Well-behaved in the simulator, spins forever on real ranks."""

    def forward(self, ops: Ops, x: Any) -> Any:
        x = ops.clone(x, name="before_the_loop")
        while _on_real_ranks(ops):
            pass
        return super().forward(ops, x)


class OpsForeverOnRealRanks(MoERunner):
    """Well-behaved in the simulator, issues ops forever on real ranks."""

    def forward(self, ops: Ops, x: Any) -> Any:
        while _on_real_ranks(ops):
            x = ops.clone(x)
        return super().forward(ops, x)


class RaisesItsBudgetOnRealRanks(MoERunner):
    """Well-behaved in the simulator; on real ranks lifts its op budget, then loops on ops."""

    def forward(self, ops: Ops, x: Any) -> Any:
        if _on_real_ranks(ops):
            from scenarios import contain

            contain.set_limits(contain.Limits(max_ops=10**9))
            while True:
                x = ops.clone(x)
        return super().forward(ops, x)


class ExitOnRealRanks(MoERunner):
    def forward(self, ops: Ops, x: Any) -> Any:
        if _on_real_ranks(ops):
            sys.exit(3)
        return super().forward(ops, x)


class AllReduceForever(MoERunner):
    """Every rank all-reduces in a loop: the ranks advance in lock-step, so all
    of them reach the op budget (the most steps a budget lets through)."""

    def forward(self, ops: Ops, x: Any) -> Any:
        while True:
            x = ops.all_reduce(x, "world")


class ThreadLeaker(MoERunner):
    """Starts a thread that never ends (a non-daemon thread keeps a process alive)."""

    def forward(self, ops: Ops, x: Any) -> Any:
        import threading

        threading.Thread(target=time.sleep, args=(3600,), name="runner-leak").start()
        return super().forward(ops, x)


class ChattyThread(MoERunner):
    """Leaves a daemon thread printing (to sys.stdout and descriptor 1) while
    the tool writes its output."""

    def forward(self, ops: Ops, x: Any) -> Any:
        import threading

        def chatter() -> None:
            while True:
                print("thread chatter")
                os.write(1, b"thread fd-1 chatter\n")
                sys.stdout.writelines(["thread writelines\n"])
                sys.stdout.buffer.write(b"thread buffer write\n")
                os.write(sys.stdout.fileno(), b"thread fileno write\n")
                time.sleep(0.001)

        if ops.rank == 0:
            threading.Thread(target=chatter, daemon=True).start()
            time.sleep(0.05)  # already chattering when the tool takes over again
        return super().forward(ops, x)


class PrintsAtExit(MoERunner):
    """Leaves exit handlers and a finaliser that print after the tool's output."""

    def forward(self, ops: Ops, x: Any) -> Any:
        import atexit

        atexit.register(print, "atexit print")
        atexit.register(os.write, 1, b"atexit fd-1 write\n")
        atexit.register(lambda: sys.stdout.buffer.write(b"atexit buffer write\n"))
        _KEPT.append(_WritesOnDel())
        return super().forward(ops, x)


class _WritesOnDel:
    def __del__(self) -> None:
        os.write(1, b"finaliser fd-1 write\n")


_KEPT: list[Any] = []


class Forks(MoERunner):
    """Forks on rank 0: the child carries on through the tool's code."""

    def forward(self, ops: Ops, x: Any) -> Any:
        if ops.rank == 0:
            os.fork()
        return super().forward(ops, x)


class IgnoresInterrupts(MoERunner):
    def forward(self, ops: Ops, x: Any) -> Any:
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        return super().forward(ops, x)


class ForksOnRealRanks(MoERunner):
    """Forks on real rank 1; the child carries on through the rank's code."""

    def forward(self, ops: Ops, x: Any) -> Any:
        if _on_real_ranks(ops) and ops.rank == 1:
            os.fork()
        return super().forward(ops, x)


class Rank1SleepsOnRealRanks(MoERunner):
    """Real rank 1 sleeps in its own code; its peer waits in the next collective."""

    def forward(self, ops: Ops, x: Any) -> Any:
        x = ops.clone(x, name="before_the_sleep")
        if _on_real_ranks(ops) and ops.rank == 1:
            time.sleep(3600)
        return super().forward(ops, x)


class ForkedChildSleeps(MoERunner):
    """Rank 0 forks; the child sleeps (never back in the tool's code)."""

    def forward(self, ops: Ops, x: Any) -> Any:
        if ops.rank == 0 and os.fork() == 0:
            time.sleep(120)
            os._exit(0)
        return super().forward(ops, x)


class PrepareLoops(MoERunner):
    """prepare_program() (once per scenario, before the program) spins for ever."""

    @classmethod
    def prepare_program(cls, scenario: Any) -> None:
        while True:
            pass


class PrepareRaises(MoERunner):
    @classmethod
    def prepare_program(cls, scenario: Any) -> None:
        raise ValueError("prepare broke")


class PrepareExits(MoERunner):
    @classmethod
    def prepare_program(cls, scenario: Any) -> None:
        sys.exit(3)


class PreparePrints(MoERunner):
    @classmethod
    def prepare_program(cls, scenario: Any) -> None:
        print("prepare says hello")


PREPARED: list[Any] = []  # scenarios CountsPrepares was prepared for, in this process


class CountsPrepares(MoERunner):
    @classmethod
    def prepare_program(cls, scenario: Any) -> None:
        PREPARED.append(scenario)


class BreaksAHandle(MoERunner):
    """Overwrites what a tensor handle holds: the simulator's own code raises."""

    def forward(self, ops: Ops, x: Any) -> Any:
        x.value = None
        return ops.scale(x, 2.0)
