"""The linear reduction algebra over sources (design.md, "Abstract domains").

A simulated tensor is a sequence of row blocks. Each block covers the rows of
one token set (its key, e.g. "d0" = all tokens of DP rank 0, "d1s0" = SP slice
0 of DP rank 1) and holds a linear combination of *sources*:
(component, shard, foreign_key). `component` is what produced the partial
("x", "xlat", "routed", "shared"); `shard` is the rank or weight shard
("ep3", "tp1", "full"); `foreign_key` is None when the source's rows are the
block's own tokens, else the key of the other tokens it came from (adding
blocks of different tokens is the error of regression R1).

Coefficients count how many times each partial was summed in: 1 is right,
2 (or the group size) is a double reduction, a missing source is a missing
reduction. Scaling (routed scaling factor) is tracked per component apart from
the multiplicities so that scaling is never mistaken for a reduction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Source = tuple[str, str, "str | None"]  # (component, shard, foreign token key)

INPUT_COMPONENTS = ("x", "xlat")


@dataclass(frozen=True, slots=True)
class Block:
    key: str
    rows: int
    terms: tuple[tuple[Source, float], ...]  # sorted, coefficient != 0

    def coeffs(self) -> dict[Source, float]:
        return dict(self.terms)


@dataclass(frozen=True, slots=True)
class Value:
    blocks: tuple[Block, ...]
    scale: tuple[tuple[str, float], ...] = ()  # component -> product of scalings

    @property
    def rows(self) -> int:
        return sum(b.rows for b in self.blocks)

    def scale_of(self, component: str) -> float:
        for c, f in self.scale:
            if c == component:
                return f
        return 1.0

    def components(self) -> set[str]:
        return {src[0] for b in self.blocks for src, _ in b.terms}


def _terms(d: dict[Source, float]) -> tuple[tuple[Source, float], ...]:
    return tuple(sorted(((k, v) for k, v in d.items() if abs(v) > 1e-12), key=_src_sort))


def _src_sort(item: tuple[Source, float]) -> tuple[str, str, str]:
    (c, s, f), _ = item
    return (c, s, f or "")


def leaf(key: str, rows: int, component: str, shard: str) -> Value:
    """A value whose only source is one partial on its own rows."""
    return Value((Block(key, rows, (((component, shard, None), 1.0),)),))


def relabel(v: Value, component: str, shard: str) -> Value:
    """Output of a (non-linear) op on v: same row blocks, one fresh source."""
    return Value(
        tuple(Block(b.key, b.rows, (((component, shard, None), 1.0),)) for b in v.blocks)
    )


def split_rows(v: Value, start: int, end: int) -> Value:
    """Rows [start, end) of v; cut blocks get a sub-range key."""
    out: list[Block] = []
    pos = 0
    for b in v.blocks:
        lo, hi = max(start, pos), min(end, pos + b.rows)
        if lo < hi:
            if lo == pos and hi == pos + b.rows:
                out.append(b)
            else:
                out.append(Block(f"{b.key}[{lo - pos}:{hi - pos}]", hi - lo, b.terms))
        pos += b.rows
    return Value(tuple(out), v.scale)


def _boundaries(v: Value) -> list[int]:
    out, pos = [], 0
    for b in v.blocks:
        pos += b.rows
        out.append(pos)
    return out


def _resegment(v: Value, cuts: Sequence[int]) -> list[Block]:
    blocks: list[Block] = []
    prev = 0
    for c in cuts:
        blocks.extend(split_rows(v, prev, c).blocks)
        prev = c
    return blocks


def add(values: Sequence[Value], own: int = 0) -> Value:
    """Elementwise sum of same-shaped values (an add, or an all-reduce).

    Row keys come from values[own] (the receiving rank); sources of other
    values whose rows hold different tokens become foreign sources.
    """
    if len(values) == 1:
        return values[0]
    layout = [b.rows for b in values[own].blocks]
    if all([b.rows for b in v.blocks] == layout for v in values):
        # Common case (same row layout everywhere): no re-segmentation.
        cuts = layout
        segs = [list(v.blocks) for v in values]
    else:
        cuts = sorted(set().union(*(_boundaries(v) for v in values)))
        segs = [_resegment(v, cuts) for v in values]
    # Scale: rescale sources of a component whose scale differs from the receiver's.
    base_scale = dict(values[own].scale)
    for v in values:  # components the receiver never scaled take the first scale seen
        for c, f in v.scale:
            base_scale.setdefault(c, f)
    # Every component's scale relative to the receiver's; a value that was never
    # scaled has scale 1 for it (not "whatever the receiver has").
    ratios = []
    for v in values:
        own_scale = dict(v.scale)
        r = {c: own_scale.get(c, 1.0) / base for c, base in base_scale.items() if own_scale.get(c, 1.0) != base}
        ratios.append(r)
    out: list[Block] = []
    for i in range(len(cuts)):
        key = segs[own][i].key
        acc: dict[Source, float] = {}
        for j in range(len(values)):
            blk = segs[j][i]
            foreign = blk.key != key
            rj = ratios[j]
            for (c, s, f), coef in blk.terms:
                ratio = rj.get(c, 1.0) if rj else 1.0
                src = (c, s, blk.key if (foreign and f is None) else f)
                acc[src] = acc.get(src, 0.0) + coef * ratio
        out.append(Block(key, segs[own][i].rows, _terms(acc)))
    return Value(tuple(out), tuple(sorted(base_scale.items())))


def concat(values: Iterable[Value]) -> Value:
    blocks: list[Block] = []
    scale: dict[str, float] = {}
    for v in values:
        blocks.extend(v.blocks)
        for c, f in v.scale:
            scale.setdefault(c, f)
    return Value(tuple(blocks), tuple(sorted(scale.items())))


def scale(v: Value, factor: float) -> Value:
    comps = v.components()
    cur = dict(v.scale)
    for c in comps:
        cur[c] = cur.get(c, 1.0) * factor
    return Value(v.blocks, tuple(sorted(cur.items())))


def reduce_scatter(values: Sequence[Value], index: int) -> Value:
    """Chunk `index` of the sum; only that chunk is summed (n times cheaper)."""
    n = len(values)
    chunk = values[index].rows // n
    parts = [split_rows(v, index * chunk, (index + 1) * chunk) for v in values]
    return add(parts, own=index)


def is_pure_input(v: Value) -> str | None:
    """None if every block is exactly one input source with coefficient 1 on
    its own rows; else a description of what is wrong (a non-linear op on it
    would compute garbage)."""
    for b in v.blocks:
        if len(b.terms) != 1:
            return f"rows {b.key} hold {describe_terms(b.terms)}"
        (c, _s, f), coef = b.terms[0]
        if c not in INPUT_COMPONENTS or f is not None or abs(coef - 1.0) > 1e-9:
            return f"rows {b.key} hold {describe_terms(b.terms)}"
    return None


def max_multiplicity(v: Value) -> tuple[float, Block | None, Source | None]:
    best, best_b, best_s = 0.0, None, None
    for b in v.blocks:
        for src, coef in b.terms:
            if coef > best:
                best, best_b, best_s = coef, b, src
    return best, best_b, best_s


def foreign_sources(v: Value) -> list[tuple[Block, Source]]:
    return [(b, src) for b in v.blocks for src, _ in b.terms if src[2] is not None]


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


def _shard_range(shards: list[str]) -> str:
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


def describe_terms(terms: Iterable[tuple[Source, float]]) -> str:
    """Group sources of one component and coefficient: routed@ep0..ep3 x1."""
    groups: dict[tuple[str, float, str | None], list[str]] = {}
    for (c, s, f), coef in terms:
        groups.setdefault((c, round(coef, 6), f), []).append(s)
    parts = []
    for (c, coef, f), shards in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2] or "")):
        label = f"{c}@{_shard_range(shards)}" if any(shards) else c
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


def coefficients(v: Value, expected_scale: dict[str, float]) -> dict[str, float]:
    """Per-source coefficients in the reference unit: multiplicity times the
    value's scaling relative to the intended one (what a least-squares fit of
    the real tensor against float64 partials measures). Sources that differ
    only by rows are folded (they carry the same coefficient in a correct run;
    a disagreement keeps the extreme)."""
    out: dict[str, float] = {}
    ratios = {c: v.scale_of(c) / expected_scale.get(c, 1.0) for c in expected_scale}
    seen_terms: set[tuple] = set()
    for b in v.blocks:
        if b.terms in seen_terms:  # identical blocks (same sources) say nothing new
            continue
        seen_terms.add(b.terms)
        for src, coef in b.terms:
            label = source_label(src)
            val = coef * ratios.get(src[0], v.scale_of(src[0]))
            if label not in out or abs(val - 1.0) > abs(out[label] - 1.0):
                out[label] = round(val, 9)
    return out
