"""Deterministic routing of the workload's tokens.

Routing is part of the workload (seeded, with a skew knob) so that the
simulator and the real runner route every token identically: the real router
still runs its gate GEMM, then takes these top-k ids and weights.
"""

from __future__ import annotations

import random
import re
from functools import lru_cache

from scenarios.spec import Scenario


@lru_cache(maxsize=256)
def _routing(
    seed: int, skew: float, experts: int, top_k: int, tokens: int, dp: int
) -> tuple[tuple[tuple[tuple[int, ...], tuple[float, ...]], ...], ...]:
    rng = random.Random(seed * 1_000_003 + experts * 131 + top_k)
    # Zipf-like popularity: skew 0 is uniform, towards 1 a few experts are hot.
    alpha = 3.0 * skew
    popularity = [1.0 / (i + 1) ** alpha for i in range(experts)]
    order = list(range(experts))
    rng.shuffle(order)  # hot experts are not always the low ids
    weights_by_expert = [0.0] * experts
    for rank_pos, e in enumerate(order):
        weights_by_expert[e] = popularity[rank_pos]
    ranks = []
    for _d in range(dp):
        toks = []
        for _t in range(tokens):
            chosen: list[int] = []
            pool = list(range(experts))
            w = [weights_by_expert[e] for e in pool]
            for _ in range(top_k):
                e = rng.choices(pool, weights=w)[0]
                i = pool.index(e)
                pool.pop(i)
                w.pop(i)
                chosen.append(e)
            raw = [rng.random() + 0.1 for _ in chosen]
            total = sum(raw)
            toks.append((tuple(chosen), tuple(r / total for r in raw)))
        ranks.append(tuple(toks))
    return tuple(ranks)


def routing(s: Scenario) -> tuple[tuple[tuple[tuple[int, ...], tuple[float, ...]], ...], ...]:
    """routing(s)[d][t] = (expert ids, weights) of token t of DP rank d.

    Under SP the padding rows of the last slice route like token 0 (their
    values are zero, so their outputs are zero too)."""
    w, m = s.workload, s.model
    return _routing(w.seed, w.skew, m.num_experts, m.top_k, w.tokens, s.parallel.dp)


def rank_token_ids(s: Scenario, rank: int) -> list[int]:
    """Token indices (within its DP rank) that `rank` holds inside the layer;
    -1 for SP padding rows."""
    d, t = s.coords(rank)
    T = s.workload.tokens
    if not s.sp:
        return list(range(T))
    per = s.sp_tokens
    return [i if i < T else -1 for i in range(t * per, (t + 1) * per)]


@lru_cache(maxsize=4096)
def expert_loads(s: Scenario) -> tuple[tuple[int, int], ...]:
    """Per world rank: (token-expert pairs computed, distinct experts active),
    after dispatch, for the expert cost model."""
    route = routing(s)
    world = s.world
    ep = s.parallel.ep
    per_rank_experts = s.local_experts
    # Token-routing all-to-all without SP: every TP rank of a DP group sends
    # the same tokens, so each expert sees them tp times.
    token_routing = s.use_all2all_kernels and s.effective_backend != "allgather_reducescatter"
    dup = s.parallel.tp if (token_routing and not s.sp) else 1
    out = []
    for r in range(world):
        d, _t = s.coords(r)
        # Which DP ranks' tokens reach this rank's experts.
        if s.effective_backend == "none":
            sources = [d]
        else:
            sources = list(range(s.parallel.dp))
        lo = r * per_rank_experts if ep else 0
        hi = lo + per_rank_experts if ep else s.model.num_experts
        pairs = 0
        active: set[int] = set()
        for sd in sources:
            for tok in range(s.workload.tokens):
                experts, _w = route[sd][tok]
                for e in experts:
                    if lo <= e < hi:
                        pairs += dup
                        active.add(e)
        out.append((pairs, len(active)))
    return tuple(out)


# Row-block keys of the simulator's values name token sets: "d1" = all tokens
# of DP rank 1, "d1s0" = SP slice 0 of them, "[a:b]" a sub-range of rows.
_KEY = re.compile(r"^d(\d+)(?:s(\d+))?((?:\[\d+:\d+\])*)$")
_CUT = re.compile(r"\[(\d+):(\d+)\]")


def tokens_of(s: Scenario, key: str) -> list[int]:
    """Token indices (within the DP rank) of a row-block key; -1 for SP padding."""
    m = _KEY.match(key)
    if m is None:
        raise ValueError(f"unknown row-block key {key!r}")
    T = s.workload.tokens
    if m.group(2) is None:
        toks = list(range(T))
    else:
        per, t = s.sp_tokens, int(m.group(2))
        toks = [i if i < T else -1 for i in range(t * per, (t + 1) * per)]
    for a, b in _CUT.findall(m.group(3)):
        toks = toks[int(a) : int(b)]
    return toks


def dp_of(key: str) -> int:
    m = _KEY.match(key)
    if m is None:
        raise ValueError(f"unknown row-block key {key!r}")
    return int(m.group(1))


def owned_tokens(s: Scenario, rank: int) -> list[tuple[int, int]]:
    """The layer-output contract: the (dp rank, token) rows `rank` must hand
    back, in order. Each rank returns its DP rank's tokens in their original
    order; under SP every TP rank of the DP group returns all of them."""
    d, _t = s.coords(rank)
    return [(d, i) for i in range(s.workload.tokens)]


def token_label(d: int, tok: int) -> str:
    """Human name of a token row: "d0t3"; SP padding rows are "d0pad"."""
    return f"d{d}pad" if tok < 0 else f"d{d}t{tok}"
