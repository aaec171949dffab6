"""The routing sampler's fast pieces equal their plain definitions: the
bucketed inverse CDF is np.searchsorted (capped at the last id), and the
column-wise draws give the same ids, per seed, as the row-wise sampler that
defines them (np.searchsorted per draw, redraws of rows that hit a held id)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.workload import _draw_without_replacement, _InverseCdf, _popularity, _seed


def _searchsorted(cum: np.ndarray, x: np.ndarray) -> np.ndarray:
    return np.minimum(np.searchsorted(cum, x, side="right"), len(cum) - 1)


def _draw_by_definition(rng, w, n, k):
    """Row-major sequential weighted sampling without replacement, drawing the
    same random numbers in the same order as the sampler under test."""
    cum = np.cumsum(w)
    ids = np.empty((n, k), dtype=np.int64)
    for j in range(k):
        e = _searchsorted(cum, rng.random(n) * cum[-1])
        if j:
            again = np.nonzero((ids[:, :j] == e[:, None]).any(axis=1))[0]
            if len(again):
                held = ids[again, :j]
                ws = w[held]
                t = rng.random(len(again)) * (cum[-1] - ws.sum(axis=1))
                r = _searchsorted(cum, t)
                for _ in range(j + 1):  # the fixed point of r <- C^-1(t + weight held at ids <= r)
                    r = _searchsorted(cum, t + (ws * (held <= r[:, None])).sum(axis=1))
                e[again] = r
        ids[:, j] = e
    for row in ids:  # a rounding repeat takes the next free id
        seen: set[int] = set()
        for j, e in enumerate(row.tolist()):
            while e in seen:
                e = (e + 1) % len(w)
            seen.add(e)
            row[j] = e
    return ids


@given(st.lists(st.floats(1e-6, 1e3), min_size=1, max_size=300), st.integers(0, 2**32 - 1))
@settings(max_examples=80, deadline=None)
def test_inverse_cdf_is_searchsorted(weights, seed):
    w = np.array(weights)
    inv = _InverseCdf(w)
    rng = np.random.default_rng(seed)
    # Random points, every boundary exactly, its neighbours, 0 and the total (capped).
    x = np.concatenate([
        rng.random(2000) * inv.total, inv.cum, np.nextafter(inv.cum, 0), np.nextafter(inv.cum, np.inf),
        [0.0, inv.total, inv.total * 2],
    ])
    assert (inv(x) == _searchsorted(inv.cum, x)).all()


@given(
    st.integers(0, 2**40), st.sampled_from([0.0, 0.3, 0.9, 1.0]),
    st.sampled_from([(2, 2), (8, 2), (64, 6), (256, 8), (300, 64)]), st.integers(1, 700),
)
@settings(max_examples=60, deadline=None)
def test_draws_equal_the_row_wise_definition(seed, skew, ek, n):
    experts, k = ek
    fast_rng = np.random.default_rng(_seed(seed, experts, k))
    ref_rng = np.random.default_rng(_seed(seed, experts, k))
    w = _popularity(fast_rng, skew, experts)
    assert (_popularity(ref_rng, skew, experts) == w).all()
    ids = _draw_without_replacement(fast_rng, w, n, k)
    assert ids.flags.c_contiguous
    assert (ids == _draw_by_definition(ref_rng, w, n, k)).all()
    # Both consumed the same random numbers: the weights drawn next agree.
    assert (fast_rng.random(4) == ref_rng.random(4)).all()
