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
    # A rank hands back rows that are not its own tokens in order (padding
    # rows, another rank's tokens, the right tokens in the wrong order).
    WRONG_TOKENS = "WRONG_TOKENS"
    # A consumer op is fed something other than what it must consume (the
    # latent-projected tensor, dispatched tokens, a buffer clobbered in place).
    WRONG_INPUT = "WRONG_INPUT"
    # Real only: a rank's output differs from the exact reference and no known
    # cause explains it (the verdicts treat it as uncharacterised).
    WRONG_OUTPUT = "WRONG_OUTPUT"
    # Performance: a collective whose removal (its output replaced by its
    # input on every member) leaves every rank's layer output unchanged and
    # correct; the cost is the latency it adds (a what-if simulation).
    REDUNDANT_COLLECTIVE = "REDUNDANT_COLLECTIVE"
    # An order the platform cannot execute: work issued on a stream the
    # modelled platform does not have (the aux stream on `cpu`, or with no
    # aux stream configured). The engine crashes there (the rules of the
    # runner's engine name how: EngineRules.missing_stream_consequence).
    MISSING_STREAM = "MISSING_STREAM"


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
        if self.value is not None:
            d["value"] = _finite_map(self.value)
        return d


@dataclass
class Hazard:
    kind: HazardKind
    step: int
    step_name: str
    rank: int
    detail: str
    cost_us: float | None = None  # LOST_OVERLAP, REDUNDANT_COLLECTIVE: predicted latency cost
    # Real only: this failure is a consequence of another rank's (e.g. a peer's
    # "connection closed" after rank `caused_by` died), not a finding of its own.
    caused_by: int | None = None
    # Simulator only: the first step of this rank whose value the hazard makes
    # something other than a combination of sources: a race's earlier access
    # (values depend on the schedule), the non-linear consumer of an over- or
    # under-counted input. Real runs are compared by op and shape only from there.
    opaque_from: int | None = None
    # Simulator only: the ops that took the wrong value as their input (None:
    # not recorded, e.g. a wrong layer output), filled in as they take it.
    consumers: list[str] | None = None

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
        if self.caused_by is not None:
            d["caused_by"] = self.caused_by
        return d

    @property
    def signature(self) -> str:
        """Stable identity of a finding: kind + where it arose."""
        return f"{self.kind.value}@{self.step_name}"


# The real judge's cause for rows whose routed experts ran under other
# tokens' routing (real/judge.py); a verdict matches it to the simulator's
# routing hazard only (twin/check/verdicts.py).
ROUTED_AS_OTHER = "the routed experts ran under other tokens' routing"


@dataclass
class OutputCheck:
    """One rank's real output judged against the exact reference (the ground
    truth: real/reference.py). `correct` is the only claim about reality a
    verdict may rest on; `cause` characterises a wrong output in words."""

    rank: int
    correct: bool
    max_abs_err: float | None = None  # None when nothing comparable was returned
    max_rel_err: float | None = None
    wrong_rows: int = 0
    rows: int = 0  # rows the rank must return
    wrong_tokens: list[str] = field(default_factory=list)  # token ids of wrong rows, e.g. "d0t3"
    cause: str = ""  # "" when correct
    kind: str | None = None  # the HazardKind the characterisation points to, when wrong
    shape: tuple[int, ...] | None = None  # what the rank returned
    # Tokens whose rows are all zero (of the wrong ones): a padding row, or a
    # row every source is missing from; the two are the same numbers.
    zero_tokens: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "correct": self.correct,
            "max_abs_err": _finite(self.max_abs_err),
            "max_rel_err": _finite(self.max_rel_err),
            "wrong_rows": self.wrong_rows,
            "rows": self.rows,
            "wrong_tokens": list(self.wrong_tokens),
            "cause": self.cause,
            "kind": self.kind,
            "shape": list(self.shape) if self.shape is not None else None,
            "zero_tokens": list(self.zero_tokens),
        }


def _step_key(st: Step, events: dict[int, int], shapes_of: dict[int, tuple]) -> tuple:
    """A step without its rank, times and shapes; its group as offsets from
    the first member; event ids (numbered over all ranks) in the order the
    rank first uses them (`events` carries that numbering over its steps)."""
    waits = tuple(events.setdefault(e, len(events)) for e in st.waits)
    records = events.setdefault(st.records, len(events)) if st.records is not None else None
    group = st.group
    if group:
        hit = shapes_of.get(id(group))
        if hit is None or hit[0] is not group:
            hit = shapes_of[id(group)] = (group, tuple(g - group[0] for g in group))
        group = hit[1]
    value = tuple(sorted((k, repr(v)) for k, v in st.value.items())) if st.value is not None else None
    return (st.index, st.op, st.name, st.stream, st.category, st.component, group,
            len(st.in_shapes), st.out_shape is None, waits, records, value, st.residual,
            st.detail, st.error)


def _finite(x: float | None) -> float | str | None:
    """JSON has no NaN/inf: say them as strings."""
    if x is None:
        return None
    if x != x:
        return "nan"
    if x in (float("inf"), float("-inf")):
        return "inf" if x > 0 else "-inf"
    return float(x)


def _finite_map(coeffs: dict[str, float]) -> dict[str, float | str | None]:
    """Coefficients for JSON: a non-finite one (a runner scaled by NaN) as a string."""
    return {k: _finite(v) for k, v in coeffs.items()}


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
    # Real only: each rank's output judged against the exact reference.
    output_checks: dict[int, OutputCheck] = field(default_factory=dict)
    # Simulator only, not serialised: abstract value per rank and step index
    # (what the real runner fits its tensors against).
    values: dict[int, dict[int, Any]] = field(default_factory=dict, repr=False)

    def real_output(self) -> list[dict[str, Any]]:
        """Each rank's output check, in rank order (the `"real_output"` JSON)."""
        return [self.output_checks[r].to_dict() for r in sorted(self.output_checks)]

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

    def to_dict(self, with_steps: bool = True, with_outputs: bool = True) -> dict[str, Any]:
        d: dict[str, Any] = {
            "source": self.source,
            "scenario": self.scenario,
            "runner": self.runner,
            "world": self.world,
            "latency_us": round(self.latency_us, 3),
            "overlap_us": {str(r): round(v, 3) for r, v in self.overlap_us.items()},
            "decisions": dict(self.decisions),
            "hazards": [h.to_dict() for h in self.hazards],
            "outputs": {str(r): _finite_map(c) for r, c in self.outputs.items()} if with_outputs else {},
            "notes": list(self.notes),
        }
        if self.source == "real":
            d["real_output"] = self.real_output()
        if with_steps:
            d["steps"] = {
                str(r): [s.to_dict() for s in steps] for r, steps in self.steps.items()
            }
        return d

    def to_folded_dict(self) -> dict[str, Any]:
        """to_dict() with every class of equivalent ranks listed once, for wide
        worlds (`"folded": true`). Ranks are equivalent when their outputs
        agree and their steps are the same ops with the same streams, values
        and details, each collective's group the same shape (offsets from its
        first member). `rank_classes` lists each class's members and its
        representative; `steps` and `outputs` hold the representatives only.
        A member's steps are the representative's with its own rank, its own
        group of that shape, its own times (`step_times`: rank -> [start, end]
        per step) and its own shapes where they differ (`step_shapes`: rank ->
        step index -> in_shapes and out_shape; routing makes a dispatch's rows
        differ per rank)."""
        d = self.to_dict(with_steps=False, with_outputs=False)
        classes: dict[tuple, list[int]] = {}
        shapes_of: dict[int, tuple] = {}  # id(group) -> offsets (groups are shared tuples)
        for r in sorted(set(self.steps) | set(self.outputs)):
            classes.setdefault(self._class_key(r, shapes_of), []).append(r)
        reps = [members[0] for members in classes.values()]
        d["folded"] = True
        d["rank_classes"] = [{"representative": m[0], "ranks": m} for m in classes.values()]
        d["outputs"] = {str(r): _finite_map(self.outputs[r]) for r in reps if r in self.outputs}
        d["steps"] = {str(r): [st.to_dict() for st in self.steps.get(r, [])] for r in reps}
        times: dict[str, list[list[float]]] = {}
        shapes: dict[str, dict[str, Any]] = {}
        for members in classes.values():
            rep = self.steps.get(members[0], [])
            for r in members[1:]:
                mine = self.steps.get(r, [])
                times[str(r)] = [[st.start, st.end] for st in mine]
                differ = {
                    str(st.index): {"in_shapes": [list(x) for x in st.in_shapes],
                                    "out_shape": list(st.out_shape) if st.out_shape is not None else None}
                    for st, st0 in zip(mine, rep, strict=True)
                    if st.out_shape != st0.out_shape or st.in_shapes != st0.in_shapes
                }
                if differ:
                    shapes[str(r)] = differ
        d["step_times"] = times
        d["step_shapes"] = shapes
        return d

    def _class_key(self, rank: int, shapes_of: dict[int, tuple]) -> tuple:
        out = self.outputs.get(rank)
        events: dict[int, int] = {}
        return (
            tuple(out.items()) if out is not None else None,
            tuple(_step_key(st, events, shapes_of) for st in self.steps.get(rank, [])),
        )
