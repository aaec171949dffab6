"""What `verify` returns (twin/search/verify.py): one simulated class's
outcome, as a worker sends it back, and the result of a whole enumeration."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from scenarios.space import held_fixed
from twin.search.explore_store import Finding
from twin.search.verify_merge import found_together, sets_to_json, statement
from twin.search.verify_record import Reads


@dataclass
class Outcome:
    """What a worker sends back for one simulated class."""

    index: int
    reads: Reads
    findings: dict[str, tuple[str, str, int, int]]  # signature -> (kind, detail, step, rank)
    decisions: dict[str, str]
    budget_stop: str | None


@dataclass
class VerifyResult:
    runner: str
    space: str  # its name ("custom": a table given by the caller)
    max_world: int
    axes: dict[str, list[Any]]
    classes: int = 0
    pruned: int = 0
    invalid: int = 0
    opaque: int = 0
    # Valid assignments the runner refuses as out of its scope (its
    # `unsupported()`): not classes, nothing is proved about them.
    unsupported: int = 0
    findings: list[Finding] = field(default_factory=list)
    elapsed_s: float = 0.0
    shard: tuple[int, int] | None = None
    jobs: int = 1
    # assignment index -> signatures, for every valid class (kept on request)
    outcomes: dict[int, frozenset[str]] | None = None
    complete: bool = True  # False: stopped early (`should_stop`), the counts cover what was done
    assignments_done: int = 0  # of this shard's range, invalid and out-of-world ones included
    assignments_total: int = 0
    # Simulated classes in a row that ran into the wall-clock budget, and why
    # the walk gave up on them (see verify's `max_wall_stops`).
    wall_stops_in_a_row: int = 0
    gave_up: str | None = None
    interrupted: bool = False  # the user's Ctrl-C ended it (the counts cover what was done)
    # Per distinct set of signatures one class showed: how many classes showed
    # exactly that set. Few sets, any space size; which findings always come
    # with which others (one cause seen at several steps) follows from them.
    finding_sets: dict[frozenset[str], int] = field(default_factory=dict)

    def note_found(self, signatures: Any) -> None:
        """One more class (simulated, or pruned onto one that was) showing `signatures`."""
        if signatures:
            key = frozenset(signatures)
            self.finding_sets[key] = self.finding_sets.get(key, 0) + 1

    def absorb_found(self, other: dict[frozenset[str], int]) -> None:
        """Add the sets of a disjoint block (a worker's)."""
        for key, n in other.items():
            self.finding_sets[key] = self.finding_sets.get(key, 0) + n

    @property
    def simulated(self) -> int:
        return self.classes - self.pruned

    @property
    def proved_clean(self) -> bool:
        return not self.findings and self.complete  # an enumeration cut short proves nothing

    def statement(self) -> str:
        said = statement(self.classes, len(self.findings), self.axes, self.unsupported)
        if self.complete:
            return said
        why = "interrupted" if self.interrupted else f"stopped: {self.gave_up}"
        return (f"{said} [incomplete, {why}: {self.assignments_done} of {self.assignments_total} "
                "assignments enumerated; nothing is claimed about the rest]")

    def to_dict(self) -> dict[str, Any]:
        return {
            "runner": self.runner,
            "classes": self.classes,
            "pruned": self.pruned,
            "axes": self.axes,
            "findings": found_together([f.to_dict() for f in self.findings], self.finding_sets),
            "finding_sets": sets_to_json(self.finding_sets),
            "proved_clean": self.proved_clean,
            "simulated": self.simulated,
            "invalid": self.invalid,
            "opaque": self.opaque,
            "unsupported": self.unsupported,
            "space": self.space,
            "max_world": self.max_world,
            "shard": list(self.shard) if self.shard else None,
            "jobs": self.jobs,
            "elapsed_s": round(self.elapsed_s, 3),
            "statement": self.statement(),
            "held_fixed": held_fixed(self.axes),
            "complete": self.complete,
            "stopped": self.gave_up,  # why it ended early by itself (None: it did not)
            "interrupted": self.interrupted,
        }
