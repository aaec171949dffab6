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
