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

from bisect import bisect_right
from collections.abc import Iterable, Sequence

# The value types and the read side live apart; every name stays importable here.
from sim.algebra_read import (  # noqa: F401
    _make_label,
    above,
    below,
    ceiling,
    coefficients,
    describe_terms,
    foreign_sources,
    group_label,
    keep_extreme,
    lowest_coefficients,
    max_coefficient,
    non_finite,
    over_ceiling,
    shard_range,
    shard_sort_key,
    source_label,
    summarize,
)
from sim.algebra_values import (  # noqa: F401
    EPS,
    INPUT_COMPONENTS,
    Block,
    Source,
    Value,
    _src_sort,
    _terms,
    snap,
)


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
    memo = sum([len(b.terms) for b in blocks]) >= _SUM_MEMO_MIN_TERMS  # (lists: no generator per call)
    if memo:
        ids = tuple([id(b.terms) for b in blocks])
        hit = _SUMS.get(ids)
        if hit is not None and all([a is b.terms for a, b in zip(hit[0], blocks, strict=True)]):
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


def zero_rows_from(v: Value, n: int) -> Value:
    """v with every row from `n` on zero (no terms): a kernel told that only
    the first n rows are tokens."""
    head, tail = split_rows(v, 0, n), split_rows(v, n, v.rows)
    return Value(head.blocks + tuple(Block(b.key, b.rows, ()) for b in tail.blocks), v.scale)


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


def _uniform_sum(values: Sequence[Value], own: int) -> Value | None:
    """The sum when every value holds one terms tuple on the same row blocks
    (each block's sum is then the same): one sum, not one per block. A wide
    DP gather's expert and shared outputs are such values (a block per DP
    rank), summed on every member. None when it does not apply."""
    mine = values[own]
    for v in values:
        if v.uniform is None or not v.same_rows(mine):
            return None
    terms = _same_rows_sum([Block("", 0, v.uniform) for v in values])  # type: ignore[arg-type]
    return Value(None, _merge_scale(values, own), mine.starts(), mine.keys(), terms)


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
    uniform = _uniform_sum(values, own)
    if uniform is not None:
        return uniform
    segs = [v.blocks for v in values]
    layout = [b.rows for b in segs[own]]
    if all([[b.rows for b in seg] == layout for seg in segs]):  # (lists, here and below: no generator per call)
        # Common case (same row layout everywhere): no re-segmentation.
        n = len(layout)
    else:
        cuts = sorted(set().union(*(_boundaries(v) for v in values)))
        n = len(cuts)
        segs = [tuple(_resegment(v, cuts)) for v in values]
    out: list[Block] = []
    for i in range(n):
        mine = segs[own][i]
        key = mine.key
        here = [seg[i] for seg in segs]
        if all([blk.key == key for blk in here]):
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
    same_scale = all([v.scale == scale0 for v in values])  # (a list: no generator resumed per member)
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
    if keys is None or len(keys) != len(values) or any([
            v.uniform is None or v._keys is not keys or v._starts is not starts for v in values]):
        return None
    if any([starts[i] != i * chunk for i in range(len(starts))]):
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
