"""REDUNDANT_COLLECTIVE: a collective the layer does not need.

A what-if per collective of the program (scenarios/whatif.py): the same
runner with that call removed on every rank, its output replaced by its
input. The collective is redundant when that program runs without any
hazard and every rank's layer output keeps exactly the coefficients it had
(which, the run having no correctness hazard, are the correct ones); its cost
is the latency the removal saves. Looked for only on a run with no
correctness hazard (a performance hazard on a wrong output means nothing).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from scenarios.runners import MoERunner
from scenarios.trace import Hazard, HazardKind, Trace
from scenarios.whatif import REMOVABLE, Removed, without_collective

TOL = 1e-9
_REMOVABLE = frozenset(REMOVABLE)  # one hash lookup per step, not a comparison per removable op
# Performance hazards: they do not stop the search.
PERFORMANCE = (HazardKind.LOST_OVERLAP, HazardKind.REDUNDANT_COLLECTIVE)


def candidates(trace: Trace) -> dict[Removed, list[tuple[int, int]]]:
    """Every removable collective call, with the (rank, step) where it runs."""
    # Keyed by (op, name, occurrence) while collecting: one Removed per call
    # in the end, not one per rank (a frozen dataclass, hashed per lookup).
    # The occurrence counts every earlier step of that op and name, as
    # removed_at does, in one pass over the steps instead of a rescan each.
    found: dict[tuple[str, str, int], list[tuple[int, int]]] = {}
    for r, steps in sorted(trace.steps.items()):
        seen: dict[tuple[str, str], int] = {}
        for st in steps:
            if st.op in _REMOVABLE:
                call = (st.op, st.name)
                before = seen.get(call, 0)
                seen[call] = before + 1
                if st.group is not None and len(st.group) > 1:
                    found.setdefault((*call, before), []).append((r, st.index))
    return {Removed(*key): where for key, where in found.items()}


def same_outputs(a: dict[int, dict[str, float]], b: dict[int, dict[str, float]]) -> bool:
    if set(a) != set(b):
        return False
    for r, coeffs in a.items():
        other = b[r]
        labels = set(coeffs) | set(other)
        if any(abs(coeffs.get(k, 0.0) - other.get(k, 0.0)) > TOL for k in labels):
            return False
    return True


# Ops that keep every row of their input where it was: a value change flows
# through them to the output unless a later op drops or moves rows.
ROW_MOVING = ("trim_rows", "all_gather", "reduce_scatter", "dispatch", "combine", "sp_slice", "take_rows", "cat_rows")


def surely_needed(sim: Any, where: list[tuple[int, int]]) -> bool:
    """A shortcut that spares the what-if: on some rank, removing the
    collective provably changes the layer output, because the collective
    changes its input's value and its result reaches the output through ops
    that keep every row, or it changes the row count and that change reaches
    the output's row count. (It can only miss a redundant collective, in
    contrived programs that cancel a change, e.g. a scale by 0; it never
    reports one.)"""
    for r, index in where:
        ops = sim.rank_ops[r]
        ins = ops.inputs[index] if index < len(ops.inputs) else ()
        before, after = (ops.values.get(ins[0]) if ins else None), ops.values.get(index)
        if before is not None and after is not None and before != after and _reaches_output(ops, index):
            return True
        if _row_count_reaches_output(ops, index):
            return True
    return False


def _consumers(ops: Any, i: int) -> list[int]:
    return [j for j in range(i + 1, len(ops.steps)) if i in ops.inputs[j]]


def _reaches_output(ops: Any, start: int) -> bool:
    todo, seen = [start], {start}
    while todo:
        for j in _consumers(ops, todo.pop()):
            if ops.steps[j].op == "layer_output":
                return True
            if j not in seen and ops.steps[j].op not in ROW_MOVING:
                seen.add(j)
                todo.append(j)
    return False


def _row_count_reaches_output(ops: Any, start: int) -> bool:
    """Without a gather or scatter its input's row count flows on: through
    row-keeping ops unchanged, through a row trim as far as the trim allows."""
    st = ops.steps[start]
    if not st.in_shapes or not st.in_shapes[0] or st.out_shape is None or st.in_shapes[0][0] == st.out_shape[0]:
        return False
    todo, seen = [(start, st.in_shapes[0][0])], {start}
    while todo:
        i, rows = todo.pop()
        for j in _consumers(ops, i):
            sj = ops.steps[j]
            base = sj.in_shapes[0][0] if sj.in_shapes and sj.in_shapes[0] else None
            if base is None or j in seen:
                continue
            if sj.op == "layer_output":
                if rows != base:
                    return True
                continue
            after = rows
            if sj.op == "trim_rows" and sj.out_shape is not None:
                if sj.out_shape[0] < base:  # the trim's bound is its output's row count
                    after = min(rows, sj.out_shape[0])
                elif rows > base:
                    continue  # the bound is unknown above the base row count
            elif sj.op in ROW_MOVING:
                continue
            seen.add(j)
            todo.append((j, after))
    return False


def redundant_collectives(sim: Any, cls: type[MoERunner], trace: Trace,
                          run: Callable[[type[MoERunner]], Trace]) -> list[Hazard]:
    """The REDUNDANT_COLLECTIVE hazards of `trace` (see module doc); `run`
    simulates a runner class on the same scenario and profile."""
    if any(h.kind not in PERFORMANCE for h in trace.hazards) or not trace.outputs:
        return []
    out: list[Hazard] = []
    found: list[Removed] = []
    for target, where in candidates(trace).items():
        if surely_needed(sim, where):
            continue
        alt = run(without_collective(cls, target))
        if alt.hazards or not same_outputs(trace.outputs, alt.outputs):
            continue
        saved = trace.latency_us - alt.latency_us
        if saved <= TOL:
            continue
        found.append(target)
        pct = 100.0 * saved / alt.latency_us if alt.latency_us > 0 else 0.0
        for r, index in where:
            st = trace.steps[r][index]
            out.append(Hazard(
                HazardKind.REDUNDANT_COLLECTIVE, index, st.name, r,
                f"{st.op} {target} can be removed: without it every rank's output is unchanged and "
                f"correct; layer {trace.latency_us:.1f} us vs {alt.latency_us:.1f} us (+{pct:.1f}%)",
                cost_us=saved,
            ))
    if len(found) > 1 and _break_together(cls, trace, found, run):
        names = ", ".join(map(str, found))
        for h in out:
            h.detail += f"; but not all of {names} at once: without all of them the layer goes wrong"
    return out


def _break_together(cls: type[MoERunner], trace: Trace, found: list[Removed],
                    run: Callable[[type[MoERunner]], Trace]) -> bool:
    """Whether the program without every one of `found` at once goes wrong
    (two copies of one collective are each redundant alone, never both).
    Calls of one op and name are not tried together (each removal counts
    the calls it sees, which another removal of that name would shift)."""
    if len({(t.op, t.name) for t in found}) < len(found):
        return False
    variant = cls
    for target in found:
        variant = without_collective(variant, target)
    alt = run(variant)
    return bool(alt.hazards) or not same_outputs(trace.outputs, alt.outputs)


__all__ = ["candidates", "redundant_collectives", "same_outputs", "surely_needed"]
