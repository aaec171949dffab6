"""The last resort of runner containment (scenarios/contain.py): a watchdog
thread that ends the process when runner code cannot be stopped in-process
(one long C call, or code catching every stop in a loop)."""

from __future__ import annotations

import os
import threading
import time

# Runner code still running this long after its wall-clock budget cannot be
# stopped in-process: the watchdog ends the process with this exit code (the
# runner is the user's input).
HARD_GRACE_S = 5.0
HARD_EXIT_CODE = 2
# The grace is owed in CPU time, not only wall clock: a process starved by a
# busy machine would otherwise be ended while it is about to stop on its own.
# It must have run HARD_GRACE_CPU_S past the budget, or be this far past it
# in wall clock (a C call blocked without spending CPU).
HARD_GRACE_CPU_S = 2.5
HARD_GRACE_WALL_MAX_S = 60.0


class _Watchdog:
    """One daemon thread per process: ends the process when runner code
    outlives its budget by HARD_GRACE_S of wall clock while the process kept
    running (HARD_GRACE_CPU_S of CPU), or by HARD_GRACE_WALL_MAX_S whatever
    its CPU (nothing else can stop a long C call). Arming and disarming only
    set an attribute (no lock: guards are entered per simulated scenario);
    the thread looks every POLL_S."""

    POLL_S = 0.25

    def __init__(self) -> None:
        # (budget's monotonic end, message): one object, swapped whole, so the
        # thread never sees a deadline with another arming's message.
        self.armed: tuple[float, str] | None = None
        self.thread: threading.Thread | None = None

    def arm(self, deadline: float, message: str) -> None:
        self.armed = (deadline, message)
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="moe-twin-watchdog", daemon=True)
            self.thread.start()

    def disarm(self) -> None:
        self.armed = None

    def _loop(self) -> None:
        seen: tuple[float, str] | None = None  # the arming whose budget has passed
        cpu_at_deadline = 0.0
        while True:
            time.sleep(self.POLL_S)
            armed = self.armed
            if armed is None or time.monotonic() <= armed[0]:
                continue
            if armed is not seen:  # first look past this budget: CPU is counted from here
                seen, cpu_at_deadline = armed, time.process_time()
            if self.overdue(time.monotonic() - armed[0], time.process_time() - cpu_at_deadline):
                os.write(2, (armed[1] + "\n").encode("utf-8", "replace"))
                os._exit(HARD_EXIT_CODE)

    @staticmethod
    def overdue(wall_past_s: float, cpu_past_s: float) -> bool:
        """Past the budget long enough to end the process: the grace in wall
        clock with the CPU to show the process ran, or the long wall limit."""
        if wall_past_s > HARD_GRACE_WALL_MAX_S:
            return True
        return wall_past_s > HARD_GRACE_S and cpu_past_s >= HARD_GRACE_CPU_S
