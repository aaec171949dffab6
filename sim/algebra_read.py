"""Reading a value of the reduction algebra (sim/algebra.py): what the checks
ask of it (ceilings, over-counts, non-finite and foreign sources) and its
labels, summaries and per-source coefficients."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from sim.algebra_values import EPS, Block, Source, Value, snap

# ---- what checks ask of a value ----


def ceiling(v: Value, component: str, rsf: float) -> float:
    """The most a correct program can hold of one source of `component` at
    this point (module docstring): rsf for routed once scaled, else 1."""
    if component == "routed" and v.scale_of("routed") != 1.0:
        return rsf
    return 1.0


def above(coef: float, bound: float) -> bool:
    return coef > bound * (1.0 + EPS) + EPS


def below(coef: float, bound: float) -> bool:
    return coef < bound * (1.0 - EPS) - EPS


def over_ceiling(v: Value, rsf: float) -> dict[str, tuple[Block, float, float]]:
    """Per component: (first block, its largest coefficient, the ceiling) where
    an own-rows source exceeds the ceiling. Foreign sources are checked apart."""
    out: dict[str, tuple[Block, float, float]] = {}
    bounds: dict[str, float] = {}
    for b in v.blocks:
        for (c, _s, f), coef in b.terms:
            if f is not None or coef <= 1.0:
                continue
            bound = bounds.get(c)
            if bound is None:
                bound = bounds[c] = ceiling(v, c, rsf)
            if above(coef, bound) and (c not in out or (out[c][0] is b and coef > out[c][1])):
                out[c] = (b, coef, bound)
    return out


def non_finite(v: Value) -> tuple[Block, Source, float] | None:
    for b in v.blocks:
        for src, coef in b.terms:
            if not math.isfinite(coef):
                return b, src, coef
    return None


def max_coefficient(v: Value) -> tuple[float, Block | None, Source | None]:
    """The largest coefficient of any source (scaling included)."""
    best, best_b, best_s = 0.0, None, None
    for b in v.blocks:
        for src, coef in b.terms:
            if coef > best:
                best, best_b, best_s = coef, b, src
    return best, best_b, best_s


def foreign_sources(v: Value) -> list[tuple[Block, Source]]:
    return [(b, src) for b in v.blocks for src, _ in b.terms if src[2] is not None]


# ---- labels and summaries ----

_LABELS: dict[Source, str] = {}


def source_label(src: Source) -> str:
    label = _LABELS.get(src)
    if label is None:
        label = _LABELS[src] = _make_label(src)
    return label


def _make_label(src: Source) -> str:
    c, s, f = src
    text = f"{c}@{s}" if s else c
    if f is not None:
        text += f"[tokens {f}]"
    return text


def shard_range(shards: list[str]) -> str:
    """ep0, ep1, ep2, ep3 -> ep0..ep3 (when contiguous)."""
    if len(shards) <= 2:
        return ",".join(shards)
    prefix = shards[0].rstrip("0123456789")
    try:
        nums = [int(s[len(prefix):]) for s in shards if s.startswith(prefix)]
    except ValueError:
        return ",".join(shards)
    if len(nums) == len(shards) and nums == list(range(nums[0], nums[0] + len(nums))):
        return f"{prefix}{nums[0]}..{prefix}{nums[-1]}"
    return ",".join(shards)


def group_label(component: str, shards: list[str]) -> str:
    """routed + [ep0, ep1, ep2, ep3] -> routed@ep0..ep3."""
    shards = sorted(shards, key=shard_sort_key)
    return f"{component}@{shard_range(shards)}" if any(shards) else component


def shard_sort_key(s: str) -> tuple[str | int, ...]:
    """Natural order: ep2 before ep10, ep1.tp3 before ep10.tp0."""
    parts = re.split(r"(\d+)", s)  # text, number, text, ...: the types line up across labels
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts))


def describe_terms(terms: Iterable[tuple[Source, float]]) -> str:
    """Group sources of one component and coefficient: routed@ep0..ep3 x1."""
    groups: dict[tuple[str, float, str | None], list[str]] = {}
    for (c, s, f), coef in terms:
        groups.setdefault((c, round(coef, 6) if math.isfinite(coef) else coef, f), []).append(s)
    parts = []
    for (c, coef, f), shards in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2] or "")):
        label = group_label(c, shards)
        if f is not None:
            label += f"[tokens {f}]"
        parts.append(f"{label} x{coef:g}")
    return " + ".join(parts) if parts else "0"


def summarize(v: Value) -> str:
    """Compact value summary for traces: identical blocks are folded."""
    seen: dict[str, list[str]] = {}
    for b in v.blocks:
        seen.setdefault(describe_terms(b.terms), []).append(b.key)
    return "; ".join(f"{','.join(keys)}: {desc}" for desc, keys in seen.items())


def coefficients(
    v: Value,
    expected_scale: dict[str, float],
    expected_sources: Iterable[str] | None = None,
) -> dict[str, float]:
    """Per-source coefficients in the reference unit: the coefficient divided
    by the intended one (`expected_scale`, e.g. rsf for routed; what a
    least-squares fit of the real tensor against float64 partials that include
    the intended scaling measures). Sources that differ only by rows are
    folded (they carry the same coefficient in a correct run; a disagreement
    keeps the one farthest from 1). Every label of `expected_sources` appears,
    with 0 when the value lacks it."""
    out: dict[str, float] = {}
    want = tuple(expected_sources) if expected_sources is not None else ()
    seen_terms: set[tuple] = set()
    # A uniform value's blocks all hold one terms tuple: one of them says it all.
    blocks = v.blocks if v.uniform is None else (Block("", 0, v.uniform),) if v.n_blocks else ()
    for b in blocks:
        if b.terms in seen_terms:  # identical blocks (same sources) say nothing new
            continue
        seen_terms.add(b.terms)
        here: set[str] = set()
        for src, coef in b.terms:
            label = source_label(src)
            here.add(label)
            keep_extreme(out, label, snap(coef / expected_scale.get(src[0], 1.0)))
        for label in want:  # an expected source absent from these rows: 0 here
            if label not in here:
                keep_extreme(out, label, 0.0)
    for label in want:  # a value with no rows at all
        out.setdefault(label, 0.0)
    return out


def lowest_coefficients(v: Value, expected_scale: dict[str, float], want: Iterable[str]) -> dict[str, float]:
    """Per expected source, its smallest coefficient over the rows (0 where
    some rows lack it), in the unit of `coefficients`: rows missing a source
    stay visible when other rows over-count it (`coefficients` keeps the
    value farthest from 1)."""
    want = tuple(want)
    out = {label: math.inf for label in want}
    blocks = v.blocks if v.uniform is None else (Block("", 0, v.uniform),) if v.n_blocks else ()
    seen: set[tuple] = set()
    for b in blocks:
        if b.terms in seen:
            continue
        seen.add(b.terms)
        here = {source_label(src): snap(coef / expected_scale.get(src[0], 1.0)) for src, coef in b.terms}
        for label in want:
            c = here.get(label, 0.0)
            if math.isfinite(c) and c < out[label]:
                out[label] = c
    return {label: (0.0 if c == math.inf else c) for label, c in out.items()}


def keep_extreme(out: dict[str, float], label: str, val: float) -> None:
    """Fold `val` into out[label], keeping the value farthest from 1 (a
    non-finite one always): how coefficients of one source over several row
    groups are reported."""
    prev = out.get(label)
    if not math.isfinite(val):
        out[label] = val
    elif prev is None or (math.isfinite(prev) and abs(val - 1.0) > abs(prev - 1.0)):
        out[label] = round(val, 9)
