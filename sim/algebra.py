"""The linear reduction algebra over sources (design.md, "Abstract domains").

A simulated tensor is a sequence of row blocks. Each block covers the rows of
one token set (its key, e.g. "d0" = all tokens of DP rank 0, "d1s0" = SP slice
0 of DP rank 1) and holds a linear combination of *sources*:
(component, shard, foreign_key). `component` is what produced the partial
("x", "xlat", "routed", "shared"); `shard` is the rank or weight shard
("ep3", "tp1", "full"); `foreign_key` is None when the source's rows are the
block's own tokens, else the key of the other tokens it came from (adding
blocks of different tokens is the error of regression R1).

Coefficients
------------
A term's coefficient is the *effective* factor of that partial in the value:
the product of every scaling applied to it and of how many times it was summed
in. Scaling by 1/n and summing n copies gives exactly 1, like the real
numbers do. No check looks at "how many times summed" or "how much scaled"
apart: only the product is meaningful (a runner that pre-scales replicated
shared experts by 1/tp and lets the final all-reduce sum tp copies is right).

Coefficients are floats, snapped to the nearest integer within 1e-9 (so 1/3
summed three times is exactly 1). Exact rationals would not be more exact: a
runner's factors are floats, and the rational of the float 0.1 times 10 is not
1. Non-finite coefficients (a runner scaling by NaN or inf) are kept as they
are and reported by the simulator's checks.

What is right, what is beyond repair
------------------------------------
At the layer output every expected source must have coefficient `expected`:
the routed scaling factor (rsf) for `routed`, 1 for `shared`.

Mid-program, a correct program may still (a) sum partials in (reductions only
ever add: partials are summed with positive multiplicity) and (b) apply the
routed scaling factor once, if routed has not been scaled yet. So the most a
correct program can hold at any point, its *ceiling*, is 1 for every
component, except routed once it has been through a scale op, where it is
rsf. A coefficient below the ceiling is never a hazard mid-program (a 1/n
pre-scaling waits for its sum). A coefficient above the ceiling is beyond
repair by any such continuation: routed counted twice before its rsf scaling
(2 > 1), shared summed twice (2 > 1); shared scaled 1/2 then summed twice
(1 <= 1) is clean everywhere.

A runner may also divide after summing (sum n copies, then scale by 1/n),
which repairs an over-count with a scaling the ceiling does not expect. So
the simulator treats a crossing of the ceiling as a *candidate*: it becomes a
DOUBLE_REDUCTION, reported at the step that first crossed the ceiling, only
when the value reaches a consumer that cannot undo it: the layer output with
a coefficient above `expected`, a non-linear op (router, experts, shared
experts, latent transforms) fed the over-counted input, or the end of a rank's
program without any output (it crashed or hung with the over-count pending).
Sums of different tokens' rows (foreign sources) are never right and are
reported where they arise, whatever the scaling.
"""

from __future__ import annotations

import math
import re
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from typing import NamedTuple

Source = tuple[str, str, "str | None"]  # (component, shard, foreign token key)

INPUT_COMPONENTS = ("x", "xlat")
EPS = 1e-9


class Block(NamedTuple):
    """Rows of one token set and their linear combination of sources. A named
    tuple: wide worlds build one per member block, and this is the cheapest
    immutable record to build."""

    key: str
    rows: int
    terms: tuple[tuple[Source, float], ...]  # sorted, coefficient != 0

    def coeffs(self) -> dict[Source, float]:
        return dict(self.terms)


class Value:
    """A simulated tensor's row blocks and, per component, the product of the
    scale ops applied to it (already part of the coefficients; kept to know
    whether routed's scaling has happened). Immutable.

    A value whose blocks all hold one terms tuple (what a non-linear op makes)
    may be built `uniform`: its row layout (offsets and keys, shared with the
    value it was made from) plus that terms tuple, its blocks built only if
    asked for. A wide world's expert outputs are such values: building world
    blocks per rank would be world^2 work."""

    # n_blocks is a plain slot, set once: the op budget reads it for every
    # input of every op (scenarios/contain.py), a property would be a call.
    __slots__ = ("_blocks", "scale", "_starts", "_keys", "uniform", "n_blocks")

    def __init__(
        self,
        blocks: tuple[Block, ...] | None,
        scale: tuple[tuple[str, float], ...] = (),
        starts: list[int] | None = None,
        keys: tuple[str, ...] | None = None,
        uniform: tuple[tuple[Source, float], ...] | None = None,
    ) -> None:
        if blocks is None and (starts is None or keys is None or uniform is None):
            raise ValueError("a value without blocks needs its layout and uniform terms")
        self._blocks = blocks
        self.scale = scale
        # Row offset where each block starts, plus the total (built on first
        # use): splitting a wide value bisects it instead of scanning it.
        self._starts = starts
        self._keys = keys
        self.uniform = uniform
        self.n_blocks: int = len(keys) if blocks is None else len(blocks)  # type: ignore[arg-type]

    @property
    def blocks(self) -> tuple[Block, ...]:
        bl = self._blocks
        if bl is None:
            st, terms, new = self._starts, self.uniform, tuple.__new__
            bl = self._blocks = tuple(
                new(Block, (k, st[i + 1] - st[i], terms)) for i, k in enumerate(self._keys))  # type: ignore[index]
        return bl

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Value):
            return NotImplemented
        return self.blocks == other.blocks and self.scale == other.scale

    def __hash__(self) -> int:
        return hash((self.blocks, self.scale))

    def __repr__(self) -> str:
        return f"Value(blocks={self.blocks!r}, scale={self.scale!r})"

    def starts(self) -> list[int]:
        st = self._starts
        if st is None:
            st, pos = [], 0
            for b in self.blocks:
                st.append(pos)
                pos += b.rows
            st.append(pos)
            self._starts = st
        return st

    @property
    def rows(self) -> int:
        return self.starts()[-1]

    def scale_of(self, component: str) -> float:
        for c, f in self.scale:
            if c == component:
                return f
        return 1.0

    def components(self) -> set[str]:
        return {src[0] for b in self.blocks for src, _ in b.terms}

    def keys(self) -> tuple[str, ...]:
        ks = self._keys
        if ks is None:
            ks = self._keys = tuple(b.key for b in self.blocks)
        return ks

    def same_rows(self, other: Value) -> bool:
        """The same row blocks (keys and sizes) as `other`."""
        if self is other or (self._blocks is not None and self._blocks is other._blocks):
            return True
        if self.n_blocks != other.n_blocks:
            return False
        # The cached layouts read directly (a call each only when not built yet).
        ka, kb = self._keys or self.keys(), other._keys or other.keys()
        if not (ka is kb or ka == kb):
            return False
        sa, sb = self._starts or self.starts(), other._starts or other.starts()
        return sa is sb or sa == sb


def snap(v: float) -> float:
    """v, or the integer within EPS of it (finite values only)."""
    if v == 1.0 or v == 0.0:
        return v
    if math.isfinite(v):
        r = round(v)
        if abs(v - r) < EPS:
            return float(r)
    return v


def _terms(d: dict[Source, float]) -> tuple[tuple[Source, float], ...]:
    items = []
    for k, v in d.items():
        v = snap(v)
        if v != 0.0:  # NaN != 0.0: kept
            items.append((k, v))
    if len(items) > 1:
        items.sort(key=_src_sort)
    return tuple(items)


def _src_sort(item: tuple[Source, float]) -> tuple[str, str, str]:
    (c, s, f), _ = item
    return (c, s, f or "")


def leaf(key: str, rows: int, component: str, shard: str) -> Value:
    """A value whose only source is one partial on its own rows."""
    return Value((Block(key, rows, (((component, shard, None), 1.0),)),))


def relabel(v: Value, component: str, shard: str) -> Value:
    """Output of a (non-linear) op on v: same row blocks, one fresh source."""
    # One terms tuple for every block: sums over a group's values can then be
    # shared across members (reduce_scatter_all) and checks memoised.
    terms = _FRESH.get((component, shard))
    if terms is None:
        terms = _FRESH[(component, shard)] = (((component, shard, None), 1.0),)
    return Value(None, (), v.starts(), v.keys(), terms)


def row_shard(v: Value, tag: str) -> Value:
    """A row-parallel projection's share of v: every routed source becomes
    its share through projection shard `tag` (routed@ep1 -> routed@ep1+up0),
    same coefficient. Linear: the shares of every tag summed once each make
    the whole projection; a share of a partial misses the cross terms for
    good (other shards' partials through this shard's rows)."""
    memo: dict[tuple, tuple] = {}
    blocks = []
    for b in v.blocks:
        terms = memo.get(b.terms)
        if terms is None:
            terms = memo[b.terms] = _terms({
                ((c, f"{sh}+{tag}", f) if c == "routed" else (c, sh, f)): coef for (c, sh, f), coef in b.terms})
        blocks.append(Block(b.key, b.rows, terms))
    return Value(tuple(blocks), v.scale)


# One terms tuple per fresh source (interned): equal terms are the same object,
# so sums and analyses can be memoised by identity.
_FRESH: dict[tuple[str, str], tuple[tuple[Source, float], ...]] = {}

# Sums of blocks on the same rows by the identities of their terms tuples
# (the tuples are kept in the entry, so an id cannot be reused while cached).
_SUMS: dict[tuple[int, ...], tuple[list, tuple]] = {}
_SUMS_MAX = 4096
_SUM_MEMO_MIN_TERMS = 16  # below this a sum is cheaper than the lookup


def _same_rows_sum(blocks: list[Block]) -> tuple[tuple[Source, float], ...]:
    """_terms of the sum of blocks that all hold the same rows."""
    memo = sum(len(b.terms) for b in blocks) >= _SUM_MEMO_MIN_TERMS
    if memo:
        ids = tuple(id(b.terms) for b in blocks)
        hit = _SUMS.get(ids)
        if hit is not None and all(a is b.terms for a, b in zip(hit[0], blocks, strict=True)):
            return hit[1]
    acc: dict[Source, float] = {}
    for b in blocks:
        for src, coef in b.terms:
            acc[src] = acc.get(src, 0.0) + coef
    terms = _terms(acc)
    if memo:
        if len(_SUMS) >= _SUMS_MAX:
            _SUMS.clear()
        _SUMS[ids] = ([b.terms for b in blocks], terms)
    return terms


def split_rows(v: Value, start: int, end: int) -> Value:
    """Rows [start, end) of v; cut blocks get a sub-range key."""
    out: list[Block] = []
    starts = v.starts()
    blocks = v.blocks
    # First block that ends after `start` (zero-row blocks at the edge are skipped
    # anyway: they hold no rows of the range).
    i = max(0, bisect_right(starts, start) - 1)
    while i < len(blocks) and starts[i] < end:
        b, pos = blocks[i], starts[i]
        lo, hi = max(start, pos), min(end, pos + b.rows)
        if lo < hi:
            if lo == pos and hi == pos + b.rows:
                out.append(b)
            else:
                out.append(Block(f"{b.key}[{lo - pos}:{hi - pos}]", hi - lo, b.terms))
        i += 1
    return Value(tuple(out), v.scale)


def _boundaries(v: Value) -> list[int]:
    return v.starts()[1:]


def _resegment(v: Value, cuts: Sequence[int]) -> list[Block]:
    blocks: list[Block] = []
    prev = 0
    for c in cuts:
        blocks.extend(split_rows(v, prev, c).blocks)
        prev = c
    return blocks


def _merge_scale(values: Sequence[Value], own: int) -> tuple[tuple[str, float], ...]:
    base = dict(values[own].scale)
    for v in values:
        for c, f in v.scale:
            base.setdefault(c, f)
    return tuple(sorted(base.items()))


def add(values: Sequence[Value], own: int = 0) -> Value:
    """Elementwise sum of same-shaped values (an add, or an all-reduce).

    Row keys come from values[own] (the receiving rank); sources of other
    values whose rows hold different tokens become foreign sources.
    Coefficients simply add: they already include every scaling.
    """
    if len(values) == 1:
        return values[0]
    if values[own].rows == 0:  # an idle DP rank's empty rows: nothing to sum
        return Value(values[own].blocks, _merge_scale(values, own))
    layout = [b.rows for b in values[own].blocks]
    if all([b.rows for b in v.blocks] == layout for v in values):
        # Common case (same row layout everywhere): no re-segmentation.
        n = len(layout)
        segs = [v.blocks for v in values]
    else:
        cuts = sorted(set().union(*(_boundaries(v) for v in values)))
        n = len(cuts)
        segs = [tuple(_resegment(v, cuts)) for v in values]
    out: list[Block] = []
    for i in range(n):
        mine = segs[own][i]
        key = mine.key
        here = [seg[i] for seg in segs]
        if all(blk.key == key for blk in here):
            out.append(Block(key, mine.rows, _same_rows_sum(here)))
            continue
        acc: dict[Source, float] = {}
        for seg in segs:
            blk = seg[i]
            if blk.key == key:
                for src, coef in blk.terms:
                    acc[src] = acc.get(src, 0.0) + coef
            else:
                for (c, s, f), coef in blk.terms:
                    src = (c, s, blk.key if f is None else f)
                    acc[src] = acc.get(src, 0.0) + coef
        out.append(Block(key, mine.rows, _terms(acc)))
    return Value(tuple(out), _merge_scale(values, own))


def concat(values: Iterable[Value]) -> Value:
    blocks: list[Block] = []
    scale: dict[str, float] = {}
    for v in values:
        blocks.extend(v.blocks)
        for c, f in v.scale:
            scale.setdefault(c, f)
    return Value(tuple(blocks), tuple(sorted(scale.items())))


def scale(v: Value, factor: float) -> Value:
    """Every coefficient times `factor` (a non-finite factor gives non-finite
    coefficients, which the checks report)."""
    memo: dict[tuple, tuple] = {}
    blocks = []
    for b in v.blocks:
        terms = memo.get(b.terms)
        if terms is None:
            terms = memo[b.terms] = _terms({src: coef * factor for src, coef in b.terms})
        blocks.append(Block(b.key, b.rows, terms))
    cur = dict(v.scale)
    for c in v.components():
        cur[c] = cur.get(c, 1.0) * factor
    return Value(tuple(blocks), tuple(sorted(cur.items())))


def reduce_scatter(values: Sequence[Value], index: int) -> Value:
    """Chunk `index` of the sum; only that chunk is summed (n times cheaper)."""
    n = len(values)
    chunk = values[index].rows // n
    parts = [split_rows(v, index * chunk, (index + 1) * chunk) for v in values]
    return add(parts, own=index)


def reduce_scatterv(values: Sequence[Value], sizes: Sequence[int]) -> list[Value]:
    """Member i keeps rows [sum(sizes[:i]), +sizes[i]) of the sum (sizes
    given per member, summing to the rows of every value)."""
    out, start = [], 0
    for i, n in enumerate(sizes):
        out.append(add([split_rows(v, start, start + n) for v in values], own=i))
        start += n
    return out


def reduce_scatter_all(values: Sequence[Value]) -> list[Value]:
    """reduce_scatter(values, i) for every member i, sharing the work: when
    every member's value has the same row layout (the usual case), each
    chunk's blocks are found once by bisection and sliced from every value,
    and chunks whose parts hold the same terms objects (a relabelled value
    shares one terms tuple over its blocks) are summed once for all members."""
    n = len(values)
    v0 = values[0]
    starts = v0.starts()
    if any(v.starts() is not starts and v.starts() != starts for v in values[1:]) or 0 in (
            b.rows for b in v0.blocks):
        return [reduce_scatter(values, i) for i in range(n)]
    scale0 = v0.scale
    same_scale = all(v.scale == scale0 for v in values)
    chunk = starts[-1] // n
    if same_scale:
        fast = _uniform_scatter(values, chunk)
        if fast is not None:
            return fast
    sums: dict[tuple[int, ...], tuple] = {}  # ids of the parts' terms -> their sum
    out = []
    for i in range(n):
        lo, hi = i * chunk, (i + 1) * chunk
        a, b = bisect_right(starts, lo) - 1, bisect_right(starts, hi) - 1
        if same_scale and a >= 0 and b == a + 1 and starts[a] == lo and starts[b] == hi:
            # The chunk is block a of every value: one row set, no cutting.
            out.append(_sum_block(values, a, i, sums, scale0))
            continue
        if a >= 0 and starts[a] == lo and starts[b] == hi:
            parts = [Value(v.blocks[a:b], v.scale) for v in values]
        else:
            parts = [split_rows(v, lo, hi) for v in values]
        out.append(add(parts, own=i))
    return out


def _uniform_scatter(values: Sequence[Value], chunk: int) -> list[Value] | None:
    """reduce_scatter_all when every value is uniform over one shared layout
    whose blocks are the chunks (expert outputs of one dispatched value): the
    sum of every chunk is the same terms, summed once; None otherwise."""
    v0 = values[0]
    keys, starts = v0._keys, v0._starts
    if keys is None or len(keys) != len(values) or any(
            v.uniform is None or v._keys is not keys or v._starts is not starts for v in values):
        return None
    if any(starts[i] != i * chunk for i in range(len(starts))):
        return None
    acc: dict[Source, float] = {}
    for v in values:
        for src, coef in v.uniform:  # type: ignore[union-attr]
            acc[src] = acc.get(src, 0.0) + coef
    terms = _terms(acc)
    scale = tuple(sorted(dict(v0.scale).items())) if len(values) > 1 else v0.scale
    new = tuple.__new__
    return [Value((new(Block, (k, chunk, terms)),), scale) for k in keys]


def _sum_block(values: Sequence[Value], a: int, own: int, sums: dict, scale0: tuple) -> Value:
    """Block a summed over every value, as add() would with the receiving
    rank's block as the row key: when every part holds those same rows, the
    sum depends only on the terms, so equal terms are summed once."""
    blocks = [v.blocks[a] for v in values]
    mine = blocks[own]
    key = mine.key
    if any(bl.key != key for bl in blocks):
        return add([Value((bl,), v.scale) for bl, v in zip(blocks, values, strict=True)], own=own)
    ids = tuple(id(bl.terms) for bl in blocks)
    hit = sums.get(ids)
    if hit is None:
        acc: dict[Source, float] = {}
        for bl in blocks:
            for src, coef in bl.terms:
                acc[src] = acc.get(src, 0.0) + coef
        hit = sums[ids] = _terms(acc)
    return Value((Block(key, mine.rows, hit),), tuple(sorted(dict(scale0).items())) if len(values) > 1 else scale0)


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
    for b in v.blocks:
        if b.terms in seen_terms:  # identical blocks (same sources) say nothing new
            continue
        seen_terms.add(b.terms)
        here: set[str] = set()
        for src, coef in b.terms:
            label = source_label(src)
            here.add(label)
            _keep_extreme(out, label, snap(coef / expected_scale.get(src[0], 1.0)))
        for label in want:  # an expected source absent from these rows: 0 here
            if label not in here:
                _keep_extreme(out, label, 0.0)
    for label in want:  # a value with no rows at all
        out.setdefault(label, 0.0)
    return out


def _keep_extreme(out: dict[str, float], label: str, val: float) -> None:
    prev = out.get(label)
    if not math.isfinite(val):
        out[label] = val
    elif prev is None or (math.isfinite(prev) and abs(val - 1.0) > abs(prev - 1.0)):
        out[label] = round(val, 9)
