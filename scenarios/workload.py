"""Deterministic routing of the workload's tokens.

Routing is part of the workload (seeded, with a skew knob) so that the
simulator and the real runner route every token identically: the real router
still runs its gate GEMM, then takes these top-k ids and weights.
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np

from scenarios import layout
from scenarios.dispatch_layout import VLLM_LAYOUT, DispatchLayout
from scenarios.spec import Scenario

Route = tuple[tuple[tuple[tuple[int, ...], tuple[float, ...]], ...], ...]


def _seed(seed: int, experts: int, top_k: int) -> list[int]:
    # SeedSequence wants non-negative words: a negative seed keeps its bits.
    return [seed & (2**64 - 1), experts, top_k, 1]


def _popularity(rng: np.random.Generator, skew: float, experts: int) -> np.ndarray:
    """Zipf-like popularity per expert id: skew 0 is uniform, towards 1 a few
    experts are hot; the hot ones are shuffled (not always the low ids)."""
    alpha = 3.0 * skew
    pop = 1.0 / np.arange(1, experts + 1, dtype=np.float64) ** alpha
    out = np.empty(experts)
    out[rng.permutation(experts)] = pop
    return out


class _InverseCdf:
    """x -> the id whose cumulative-weight interval holds x: exactly
    min(np.searchsorted(cum, x, side="right"), last id), faster.

    A table over BUCKETS_PER_ID * ids equal buckets of [0, total) proposes the
    first id of x's bucket; the proposal is checked against the interval's two
    bounds, and the few that miss (x past a boundary inside its bucket, or a
    bucket rounded off by one) take np.searchsorted. Unsorted keys make
    np.searchsorted a branchy binary search per key; the table is a few
    vectorised gathers and compares."""

    BUCKETS_PER_ID = 64

    def __init__(self, w: np.ndarray) -> None:
        self.cum = np.cumsum(w)
        self.total = float(self.cum[-1])
        self.last = len(w) - 1
        buckets = self.BUCKETS_PER_ID * len(w)
        self.scale = buckets / self.total
        edges = np.arange(buckets, dtype=np.float64) * (self.total / buckets)
        self.first = np.minimum(np.searchsorted(self.cum, edges, side="right"), self.last)
        inf = np.array([np.inf])
        # Id c holds x iff below[c] <= x < above[c]; the last id also holds x >= total (the cap).
        self.below = np.concatenate([-inf, self.cum[:-1]])
        self.above = np.concatenate([self.cum[:-1], inf])
        self.buckets = buckets

    def __call__(self, x: np.ndarray) -> np.ndarray:
        b = (x * self.scale).astype(np.int64)
        np.clip(b, 0, self.buckets - 1, out=b)
        e = self.first[b]
        miss = np.nonzero((self.below[e] > x) | (self.above[e] <= x))[0]
        if len(miss):
            e[miss] = np.minimum(np.searchsorted(self.cum, x[miss], side="right"), self.last)
        return e


def _draw_without_replacement(rng: np.random.Generator, w: np.ndarray, n: int, k: int) -> np.ndarray:
    """[n, k] expert ids, each row k distinct draws in order, each draw
    proportional to `w` among the experts not yet chosen (sequential weighted
    sampling without replacement, vectorised over rows).

    Draw j first draws from all experts; a row that hit an expert it already
    holds redraws from its remaining ones (together: exactly proportional to
    the remaining weights). The redraw inverts the remaining weights' CDF: the
    smallest id e with C(e) - S(e) >= u * R, where C is the cumulative weight
    and S(e) the weight of already-chosen ids <= e; that e is the fixed point
    of e <- searchsorted(C, u*R + S(e)), reached in at most j + 1 steps.

    Draws are kept one row per draw (cols[j] = every token's j-th id) so each
    draw reads and writes contiguous memory; the result is transposed once."""
    inv = _InverseCdf(w)
    cols = np.empty((k, n), dtype=np.int64)
    dup_rows: list[np.ndarray] = []
    for j in range(k):
        e = inv(rng.random(n) * inv.total)
        if j:
            again = np.nonzero(_held(cols[:j], e))[0]
            if len(again):
                held = np.ascontiguousarray(cols[:j, again].T)  # [rows, j], as the sums below expect
                e[again] = redrawn = _redraw(rng, inv, held, w[held])
                dup_rows.append(again[(held == redrawn[:, None]).any(axis=1)])
        cols[j] = e
    ids = np.ascontiguousarray(cols.T)
    if dup_rows:
        _repair_duplicates(ids, np.unique(np.concatenate(dup_rows)), len(w))
    return ids


def _held(cols: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Per token: does it already hold expert e[token] among its draws `cols`?"""
    hit = cols[0] == e
    for c in cols[1:]:
        hit |= c == e
    return hit


def _redraw(rng: np.random.Generator, inv: _InverseCdf, ids: np.ndarray, ws: np.ndarray) -> np.ndarray:
    """One draw per row among the experts the row does not hold yet (`ids`,
    their weights `ws`, [rows, held] C-ordered: row sums add in numpy's order
    for a contiguous row)."""
    t = rng.random(len(ids)) * (inv.total - ws.sum(axis=1))
    e = inv(t)
    out = e.copy()
    todo = np.arange(len(ids))  # rows still moving, with their own copies of ids, ws, t, e
    for _ in range(ids.shape[1] + 1):
        s = np.where(ids <= e[:, None], ws, 0.0).sum(axis=1)
        nxt = inv(t + s)
        moved = np.nonzero(nxt != e)[0]
        out[todo] = nxt
        if not len(moved):
            break
        todo, ids, ws, t, e = todo[moved], ids[moved], ws[moved], t[moved], nxt[moved]
    return out


def _repair_duplicates(ids: np.ndarray, rows: np.ndarray, experts: int) -> None:
    """Rounding at a CDF boundary can make a redraw repeat an id (never in
    exact arithmetic; `rows` are the rows where it did): such a draw takes the
    next free id, so rows always hold distinct experts."""
    for r in rows:
        seen: set[int] = set()
        for j in range(ids.shape[1]):
            e = int(ids[r, j])
            while e in seen:
                e = (e + 1) % experts
            seen.add(e)
            ids[r, j] = e


@lru_cache(maxsize=64)
def routing_arrays(
    seed: int, skew: float, experts: int, top_k: int, tokens: int | tuple[int, ...], dp: int
) -> tuple[np.ndarray, np.ndarray]:
    """(ids [n, top_k] int64, weights [n, top_k] float64) over every token of
    every DP rank, DP rank 0's first (n = total tokens): the routing of every
    token, seeded; weights of a token sum to 1. Read-only. `tokens` is one
    count for every DP rank or one per DP rank; equal counts route alike
    either way (one draw over all tokens, in DP-rank order)."""
    rng = np.random.default_rng(_seed(seed, experts, top_k))
    w = _popularity(rng, skew, experts)
    n = sum(tokens) if isinstance(tokens, tuple) else dp * tokens
    ids = _draw_without_replacement(rng, w, n, top_k)
    weights = rng.random((n, top_k))
    weights += 0.1
    weights /= weights.sum(axis=1, keepdims=True)
    ids.flags.writeable = False
    weights.flags.writeable = False
    return ids, weights


def token_offsets(s: Scenario) -> tuple[int, ...]:
    """Row of each DP rank's first token in the stacked [total tokens] order,
    plus the total at the end."""
    out = [0]
    for t in s.token_counts:
        out.append(out[-1] + t)
    return tuple(out)


def route_arrays(s: Scenario) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The scenario's routing as arrays: ids[d] [T_d, top_k], weights[d] likewise."""
    w, m = s.workload, s.model
    ids, weights = routing_arrays(w.seed, w.skew, m.num_experts, m.top_k, w.tokens, s.parallel.dp)
    off = token_offsets(s)
    dp = s.parallel.dp
    return [ids[off[d] : off[d + 1]] for d in range(dp)], [weights[off[d] : off[d + 1]] for d in range(dp)]


def rows_per_owner(owners: list[np.ndarray], world: int) -> np.ndarray:
    """Per world rank: how many rows have at least one expert there, given
    each row's expert owners (arrays [rows, top_k] of ranks): what a
    token-routing dispatch delivers to each rank."""
    if not owners:
        return np.zeros(world, dtype=np.int64)
    o = np.sort(np.concatenate(owners), axis=1)
    first = np.ones(o.shape, dtype=bool)  # each owner once per row: the first of equal sorted entries
    first[:, 1:] = o[:, 1:] != o[:, :-1]
    return np.bincount(o[first], minlength=world)[:world]


@lru_cache(maxsize=64)
def _routing(seed: int, skew: float, experts: int, top_k: int, tokens: int | tuple[int, ...], dp: int) -> Route:
    ids, weights = routing_arrays(seed, skew, experts, top_k, tokens, dp)
    counts = tokens if isinstance(tokens, tuple) else (tokens,) * dp
    pairs = list(zip(map(tuple, ids.tolist()), map(tuple, weights.tolist()), strict=True))
    out, start = [], 0
    for t in counts:
        out.append(tuple(pairs[start : start + t]))
        start += t
    return tuple(out)


def routing(s: Scenario) -> Route:
    """routing(s)[d][t] = (expert ids, weights) of token t of DP rank d.

    Under SP the padding rows of the last slice route like token 0 (their
    values are zero, so their outputs are zero too)."""
    w, m = s.workload, s.model
    return _routing(w.seed, w.skew, m.num_experts, m.top_k, w.tokens, s.parallel.dp)


def rank_token_ids(s: Scenario, rank: int, dl: DispatchLayout = VLLM_LAYOUT) -> list[int]:
    """Token indices (within its DP rank) that `rank` holds inside the layer
    (hands the dispatch, under the engine's layout `dl`); -1 for SP padding rows."""
    d, t = s.coords(rank)
    T = s.dp_tokens(d)
    if not dl.slices_tokens(s):
        return list(range(T))
    return slice_token_ids(T, s.parallel.tp, t)


def slice_token_ids(tokens: int, tp: int, t: int) -> list[int]:
    """Token indices in TP rank t's slice of `tokens` rows padded to a multiple
    of tp (ops.sp_slice); -1 for padding rows."""
    per = -(-tokens // tp)
    return [i if i < tokens else -1 for i in range(t * per, (t + 1) * per)]


@lru_cache(maxsize=4096)
def expert_loads(s: Scenario, dl: DispatchLayout = VLLM_LAYOUT) -> tuple[tuple[int, int], ...]:
    """Per world rank: (token-expert pairs computed, distinct experts active),
    after dispatch under the engine's layout `dl`, for the expert cost model."""
    ids_d, _w = route_arrays(s)
    E, world, dp = s.model.num_experts, s.world, s.parallel.dp
    backend = dl.dispatch_backend(s)
    # Token-routing all-to-all without slicing: every TP rank of a DP group
    # sends the same tokens, so each expert sees them tp times.
    token_routing = dl.all2all_kernels(s) and backend != "allgather_reducescatter"
    dup = s.parallel.tp if (token_routing and not dl.slices_tokens(s)) else 1
    # hits[d, e]: how many of DP rank d's tokens chose expert e.
    hits = np.stack([np.bincount(ids.ravel(), minlength=E) for ids in ids_d]).reshape(dp, E)
    # Which DP ranks' tokens reach a rank's experts: its own (backend none) or all.
    own_only = backend == "none"
    per_source = hits if own_only else hits.sum(axis=0, keepdims=True)
    zero = np.zeros((per_source.shape[0], 1), dtype=np.int64)
    pairs_cum = np.concatenate([zero, np.cumsum(per_source, axis=1)], axis=1)
    active_cum = np.concatenate([zero, np.cumsum(per_source > 0, axis=1)], axis=1)
    per = s.local_experts
    out = []
    for r in range(world):
        row = s.coords(r)[0] if own_only else 0
        e = layout.moe_coords(s, r)[0]  # the EP index owns experts [e*per, (e+1)*per)
        lo, hi = (min(e * per, E), min(e * per + per, E))
        pairs = int(pairs_cum[row, hi] - pairs_cum[row, lo]) * dup
        out.append((pairs, int(active_cum[row, hi] - active_cum[row, lo])))
    return tuple(out)


# Row-block keys of the simulator's values name token sets: "d1" = all tokens
# of DP rank 1, "d1s0" = SP slice 0 of them, "d1m4" = them padded to 4 rows
# (a MAX_LEN DP gather), "[a:b]" a sub-range of rows.
_KEY = re.compile(r"^d(\d+)(?:s(\d+)|m(\d+))?((?:\[\d+:\d+\])*)$")
_CUT = re.compile(r"\[(\d+):(\d+)\]")


def tokens_of(s: Scenario, key: str) -> list[int]:
    """Token indices (within the DP rank) of a row-block key; -1 for SP padding."""
    m = _KEY.match(key)
    if m is None:
        raise ValueError(f"unknown row-block key {key!r}")
    T = s.dp_tokens(int(m.group(1)))
    if m.group(2) is not None:  # an SP slice (ops.sp_slice): ceil(T / tp) rows, whoever slices
        per, t = -(-T // s.parallel.tp), int(m.group(2))
        toks = [i if i < T else -1 for i in range(t * per, (t + 1) * per)]
    elif m.group(3) is not None:  # padded to M rows for a MAX_LEN DP gather
        toks = padded_token_ids(T, int(m.group(3)))
    else:
        toks = list(range(T))
    for a, b in _CUT.findall(m.group(4)):
        toks = toks[int(a) : int(b)]
    return toks


def dp_of(key: str) -> int:
    m = _KEY.match(key)
    if m is None:
        raise ValueError(f"unknown row-block key {key!r}")
    return int(m.group(1))


def padded_token_ids(tokens: int, rows: int) -> list[int]:
    """A DP rank's token indices padded to `rows` (-1 for the padding rows)."""
    return list(range(tokens)) + [-1] * (rows - tokens)


def dp_slot(s: Scenario, d: int, padded: bool) -> tuple[int, int]:
    """(first row, rows) of DP rank d's tokens in a DP-gathered buffer: after
    the other ranks' true counts (SUM_LEN) or at d * the largest count (MAX_LEN)."""
    counts = s.token_counts
    return (d * max(counts) if padded else sum(counts[:d])), counts[d]


def gathered_tokens(s: Scenario, padded: bool) -> list[tuple[int, int]]:
    """(dp rank, token) of every row of a DP-gathered buffer; token -1 for
    MAX_LEN padding rows."""
    counts = s.token_counts
    if not padded:
        return [(e, t) for e, n in enumerate(counts) for t in range(n)]
    most = max(counts)
    return [(e, t) for e, n in enumerate(counts) for t in padded_token_ids(n, most)]


def owned_tokens(s: Scenario, rank: int) -> list[tuple[int, int]]:
    """The layer-output contract: the (dp rank, token) rows `rank` must hand
    back, in order. Each rank returns its DP rank's tokens in their original
    order; under SP every TP rank of the DP group returns all of them."""
    d, _t = s.coords(rank)
    return [(d, i) for i in range(s.dp_tokens(d))]


def token_label(d: int, tok: int) -> str:
    """Human name of a token row: "d0t3"; SP padding rows are "d0pad"."""
    return f"d{d}pad" if tok < 0 else f"d{d}t{tok}"
