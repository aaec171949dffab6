"""Unit tests of the linear reduction algebra."""

from sim import algebra


def partial(key, comp, shard, rows=4):
    return algebra.leaf(key, rows, comp, shard)


def test_all_reduce_twice_doubles():
    a, b = partial("d0", "routed", "tp0"), partial("d0", "routed", "tp1")
    once = [algebra.add([a, b], own=0), algebra.add([a, b], own=1)]
    twice = algebra.add(once, own=0)
    coef, _, _ = algebra.max_coefficient(twice)
    assert coef == 2.0
    assert algebra.max_coefficient(once[0])[0] == 1.0


def test_reduce_scatter_then_all_gather_equals_all_reduce():
    vals = [algebra.concat([partial("d0", "routed", f"tp{r}", 2), partial("d1", "routed", f"tp{r}", 2)]) for r in range(2)]
    ar = algebra.add(vals, own=0)
    rs = [algebra.reduce_scatter(vals, i) for i in range(2)]
    ag = algebra.concat(rs)
    assert [b.key for b in ag.blocks] == [b.key for b in ar.blocks]
    assert [b.terms for b in ag.blocks] == [b.terms for b in ar.blocks]


def test_adding_different_tokens_is_flagged():
    a = partial("d0s0", "shared", "full")
    b = partial("d0s1", "shared", "full")
    out = algebra.add([a, b], own=0)
    foreign = algebra.foreign_sources(out)
    assert foreign and foreign[0][1] == ("shared", "full", "d0s1")
    same = algebra.add([a, partial("d0s0", "routed", "ep0")], own=0)
    assert not algebra.foreign_sources(same)


def test_scaling_is_not_a_reduction():
    # The coefficient is the product (2.5), but scaling routed by the routed
    # scaling factor raises its ceiling to rsf: not beyond repair.
    v = algebra.scale(partial("d0", "routed", "ep0"), 2.5)
    assert algebra.max_coefficient(v)[0] == 2.5
    assert algebra.over_ceiling(v, 2.5) == {}
    assert algebra.coefficients(v, {"routed": 2.5}) == {"routed@ep0": 1.0}
    assert algebra.coefficients(v, {"routed": 1.0}) == {"routed@ep0": 2.5}


def test_split_rows_keeps_own_sources():
    v = partial("d0", "x", "", rows=6)
    part = algebra.split_rows(v, 2, 5)
    assert part.rows == 3 and part.blocks[0].key == "d0[2:5]"
    assert part.blocks[0].terms == ((("x", "", None), 1.0),)


def test_describe_groups_shards():
    terms = tuple(((("routed", f"ep{i}", None), 2.0)) for i in range(4))
    assert algebra.describe_terms(terms) == "routed@ep0..ep3 x2"


def test_sum_of_scaled_and_unscaled_partials():
    scaled = algebra.scale(partial("d0", "routed", "tp0"), 2.0)
    plain = partial("d0", "routed", "tp1")
    for own in (0, 1):
        out = algebra.add([scaled, plain], own=own)
        assert algebra.coefficients(out, {"routed": 1.0}) == {"routed@tp0": 2.0, "routed@tp1": 1.0}
