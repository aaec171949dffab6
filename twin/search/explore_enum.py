"""explore's first phase: `verify`'s enumeration of a decision space.

The enumeration simulates one small scenario per decision class (pruning
classes proved equivalent), so it meets every class of the space whatever
the luck of a random draw; the Hypothesis phase after it covers what the
space leaves out (sizes, token counts, the continuous knobs). Its findings
go into explore's store like any other: same signatures, written to disk as
they are found, known ones not new on a resumed run, confirmed on real ranks
with `--confirm`.

It runs in this process (one core: the stop request and the containment
budgets apply as in the search) and is bounded by time: past `time_s` it
stops before the next class and says how much of the space it covered.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from twin.search.explore_store import FindingStore

DEFAULT_SPACE = "default"
# The default space takes ~25 s of one core for the presets (README, verify):
# room for a loaded machine, and a bound for runners that spin until a budget.
DEFAULT_ENUMERATE_S = 120.0
# A runner that spins until the wall-clock budget on this many classes in a
# row ends the phase: each further class would cost a whole --sim-timeout, and
# the search after it still tries generated scenarios, each under its budget.
WALL_STOPS_TO_GIVE_UP = 3
INTERRUPTED = "interrupted"
REPORT_EVERY_S = 0.2  # progress updates at most this often (there is one tick per assignment)


@dataclass
class EnumerationSummary:
    """What the enumeration phase covered and found (JSON "enumeration")."""

    space: str
    max_world: int
    classes: int = 0  # decision classes covered: simulated + pruned
    simulated: int = 0
    pruned: int = 0
    invalid: int = 0
    assignments_done: int = 0
    assignments_total: int = 0
    complete: bool = False
    stopped: str | None = None  # why it ended before the last assignment
    signatures: list[str] = field(default_factory=list)  # every signature it showed
    new_findings: int = 0  # signatures the store did not hold before this phase
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "space": self.space,
            "max_world": self.max_world,
            "classes": self.classes,
            "simulated": self.simulated,
            "pruned": self.pruned,
            "invalid": self.invalid,
            "assignments_done": self.assignments_done,
            "assignments_total": self.assignments_total,
            "complete": self.complete,
            "stopped": self.stopped,
            "findings": list(self.signatures),
            "new_findings": self.new_findings,
            "elapsed_s": round(self.elapsed_s, 3),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EnumerationSummary:
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known, signatures=list(d.get("findings", [])))

    def line(self) -> str:
        """One line for the progress display and the text report."""
        share = f"{self.assignments_done}/{self.assignments_total} assignments"
        how = "complete" if self.complete else f"stopped ({self.stopped}) after {share}"
        return (f"enumeration of the {self.space} space: {self.classes} classes covered "
                f"({self.simulated} simulated, {self.pruned} pruned), {len(self.signatures)} finding(s), "
                f"{self.new_findings} new; {how}, {self.elapsed_s:.1f} s")


def enumerate_phase(spec: str, store: FindingStore, report: Callable[..., None],
                    space: Any = DEFAULT_SPACE, max_world: int | None = None,
                    time_s: float = DEFAULT_ENUMERATE_S) -> EnumerationSummary:
    """Enumerate `space` for the runner `spec` into `store`. `report(phase,
    message, done=, total=)` shows progress and raises KeyboardInterrupt on a
    stop request (explore's): the phase ends before the next class, with
    `stopped` INTERRUPTED."""
    from twin.search.verify import verify

    t0 = time.monotonic()
    before = set(store.findings)
    shown = set(before)
    why: list[str] = []
    last = [0.0]

    def polled(phase: str, message: str = "", **counts: int) -> None:
        try:
            report(phase, message, **counts)
        except KeyboardInterrupt:  # a stop request: the caller raises it again once the summary is kept
            if not why:
                why.append(INTERRUPTED)

    def should_stop() -> bool:
        polled("")
        if not why and time.monotonic() - t0 >= time_s:
            why.append(f"time bound of {time_s:g} s")
        return bool(why)

    def progress(done: int, total: int, findings: int) -> None:
        now = time.monotonic()
        fresh = [sig for sig in store.findings if sig not in shown]
        shown.update(fresh)
        for sig in fresh:
            polled("enumerate", f"new finding {sig}", done=done, total=total)
        if now - last[0] >= REPORT_EVERY_S or done == total:
            last[0] = now
            polled("enumerate", done=done, total=total)

    res = verify(spec, space=space, max_world=max_world, jobs=1, store=store, should_stop=should_stop,
                 progress=progress, keep_outcomes=True, name_prefix="explore",
                 max_wall_stops=WALL_STOPS_TO_GIVE_UP)
    if res.gave_up and not why:
        why.append(res.gave_up)
    seen = set().union(*res.outcomes.values()) if res.outcomes else set()
    return EnumerationSummary(
        space=res.space, max_world=res.max_world, classes=res.classes, simulated=res.simulated,
        pruned=res.pruned, invalid=res.invalid, assignments_done=res.assignments_done,
        assignments_total=res.assignments_total, complete=res.complete, stopped=why[0] if why else None,
        signatures=sorted(seen), new_findings=len(seen - before), elapsed_s=time.monotonic() - t0)


__all__ = ["DEFAULT_ENUMERATE_S", "DEFAULT_SPACE", "INTERRUPTED", "EnumerationSummary", "enumerate_phase"]
