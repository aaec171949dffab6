"""The shared vocabulary of both interpreters: Step, Trace, Hazard, Verdict.

One Step per op call per rank. Steps carry the same fields whether the
simulator or the real runner produced them, so the cross-check aligns them by
(rank, index) by construction.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import Any


class HazardKind(StrEnum):
    DOUBLE_REDUCTION = "DOUBLE_REDUCTION"
    MISSING_REDUCTION = "MISSING_REDUCTION"
    SHAPE_MISMATCH = "SHAPE_MISMATCH"
    LOST_OVERLAP = "LOST_OVERLAP"
    UNSAFE_OVERLAP = "UNSAFE_OVERLAP"
    # Beyond the five: a rank that never reaches a collective, and a runner
    # program that raised something other than a modeled shape error.
    HANG = "HANG"
    RUNNER_ERROR = "RUNNER_ERROR"


class Verdict(StrEnum):
    CONFIRMED = "CONFIRMED"
    REFUTED = "REFUTED"
    INCONCLUSIVE = "INCONCLUSIVE"
    UNPREDICTED = "UNPREDICTED"


# Step categories, used for colouring timelines and for cost lookup.
COMPUTE = "compute"
COLLECTIVE = "collective"
PADDING = "padding"
WAIT = "wait"
EVENT = "event"
LIFECYCLE = "lifecycle"
DECISION = "decision"


@dataclass(slots=True)
class Step:
    rank: int
    index: int
    op: str  # the Ops method, e.g. "all_reduce"
    name: str  # the runner's name for it, e.g. "final_all_reduce"
    stream: str = "main"
    category: str = COMPUTE
    component: str | None = None  # "routed" / "shared" for overlap accounting
    group: tuple[int, ...] | None = None  # collective members
    in_shapes: list[tuple[int, ...]] = field(default_factory=list)
    out_shape: tuple[int, ...] | None = None
    start: float = 0.0  # microseconds from the layer's start
    end: float = 0.0
    waits: list[int] = field(default_factory=list)  # event ids waited on
    records: int | None = None  # event id recorded
    value: dict[str, float] | None = None  # predicted or fitted coefficients
    residual: float | None = None  # real side: least-squares residual of the fit
    detail: str = ""  # decision value, value summary, ...
    error: str | None = None

    @property
    def duration(self) -> float:
        return self.end - self.start

    def label(self) -> str:
        return self.name if self.name == self.op else f"{self.name}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["in_shapes"] = [list(s) for s in self.in_shapes]
        d["out_shape"] = list(self.out_shape) if self.out_shape is not None else None
        d["group"] = list(self.group) if self.group is not None else None
        return d


@dataclass
class Hazard:
    kind: HazardKind
    step: int
    step_name: str
    rank: int
    detail: str
    cost_us: float | None = None  # LOST_OVERLAP: predicted latency cost

    def __str__(self) -> str:
        text = f"{self.kind.value} at step {self.step} {self.step_name} (rank {self.rank}): {self.detail}"
        if self.cost_us is not None:
            text += f" [+{self.cost_us:.1f} us]"
        return text

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "kind": self.kind.value,
            "step": self.step,
            "step_name": self.step_name,
            "rank": self.rank,
            "detail": self.detail,
        }
        if self.cost_us is not None:
            d["cost_us"] = round(self.cost_us, 3)
        return d

    @property
    def signature(self) -> str:
        """Stable identity of a finding: kind + where it arose."""
        return f"{self.kind.value}@{self.step_name}"


@dataclass
class Trace:
    """Everything one interpreter observed for one scenario and runner."""

    source: str  # "sim" or "real"
    scenario: str
    runner: str
    world: int
    steps: dict[int, list[Step]] = field(default_factory=dict)  # rank -> steps
    hazards: list[Hazard] = field(default_factory=list)
    outputs: dict[int, dict[str, float]] = field(default_factory=dict)  # rank -> coefficients
    latency_us: float = 0.0
    overlap_us: dict[int, float] = field(default_factory=dict)  # shared/routed overlap per rank
    decisions: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # stand-ins used, collapses, ...
    # Simulator only, not serialised: abstract value per rank and step index
    # (what the real runner fits its tensors against).
    values: dict[int, dict[int, Any]] = field(default_factory=dict, repr=False)

    def rank_steps(self, rank: int) -> list[Step]:
        return self.steps.get(rank, [])

    def streams(self, rank: int) -> list[str]:
        seen: list[str] = []
        for st in self.rank_steps(rank):
            if st.stream not in seen:
                seen.append(st.stream)
        return seen

    def hazard_kinds(self) -> set[str]:
        return {h.kind.value for h in self.hazards}

    def to_dict(self, with_steps: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "source": self.source,
            "scenario": self.scenario,
            "runner": self.runner,
            "world": self.world,
            "latency_us": round(self.latency_us, 3),
            "overlap_us": {str(r): round(v, 3) for r, v in self.overlap_us.items()},
            "decisions": dict(self.decisions),
            "hazards": [h.to_dict() for h in self.hazards],
            "outputs": {str(r): c for r, c in self.outputs.items()},
            "notes": list(self.notes),
        }
        if with_steps:
            d["steps"] = {
                str(r): [s.to_dict() for s in steps] for r, steps in self.steps.items()
            }
        return d
