"""Uneven tokens per DP rank: the list form of workload.tokens, routing and
slicing per DP rank, all_gatherv / reduce_scatterv in both interpreters, the
naive DP gather with each member's own count, and wrong runners that assume
equal counts (tests/families_uneven.py)."""

import json
import tomllib
from pathlib import Path

import families_uneven as fam
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from scenarios.runners import MoERunner
from scenarios.spec import (
    ModelTraits,
    ParallelConfig,
    Scenario,
    ScenarioError,
    Workload,
    scenario_from_dict,
    scenario_to_toml,
)
from scenarios.strategies import moe_scenarios
from scenarios.trace import Verdict
from scenarios.workload import owned_tokens, rank_token_ids, route_arrays, routing, tokens_of
from sim import algebra, simulate

HERE = Path(__file__).parent


def _uneven(tokens, **parallel) -> Scenario:
    return Scenario(parallel=ParallelConfig(**parallel), workload=Workload(tokens=tokens))


# ---- the spec ----


def test_list_form_accessors_and_toml_round_trip():
    s = _uneven([5, 2], tp=2, dp=2, ep=True)
    assert s.workload.tokens == (5, 2) and s.token_counts == (5, 2) and s.total_tokens == 7
    assert s.uneven_tokens and s.sp
    # SP: each rank of DP rank d holds ceil(T_d / tp) rows.
    assert [s.rank_rows(r) for r in range(4)] == [3, 3, 1, 1] and s.sp_tokens == 3
    assert s.group_rows("ep", 0) == (3, 3, 1, 1)
    text = scenario_to_toml(s)
    assert "tokens = [5, 2]" in text
    assert scenario_from_dict(tomllib.loads(text)) == s
    assert json.loads(json.dumps(s.to_dict()))["workload"]["tokens"] == [5, 2]
    assert s.summary_line().endswith("T=[5,2]")
    assert s.derived()["rows_per_dp_rank"] == [3, 1]
    even = _uneven(4, dp=2)
    assert even.token_counts == (4, 4) and not even.uneven_tokens and even.summary_line().endswith("T=4")


@pytest.mark.parametrize("data,field", [
    ({"workload": {"tokens": [1, 2, 3]}, "parallel": {"dp": 2}}, "workload.tokens"),
    ({"workload": {"tokens": [0, 0]}, "parallel": {"dp": 2}}, "workload.tokens"),
    ({"workload": {"tokens": 0}, "parallel": {"dp": 2}}, "workload.tokens"),
    ({"workload": {"tokens": [3, -1]}, "parallel": {"dp": 2}}, "workload.tokens[1]"),
    ({"workload": {"tokens": []}}, "workload.tokens"),
    ({"workload": {"tokens": ["a"]}}, "workload.tokens"),
    ({"workload": {"tokens": [True]}}, "workload.tokens"),
    ({"workload": {"tokens": [70000, 1]}, "parallel": {"dp": 2}}, "workload.tokens[0]"),
    ({"workload": {"tokens": [65536] * 5}, "parallel": {"dp": 5}}, "workload.tokens"),
])
def test_bad_token_lists_are_refused_by_name(data, field):
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict(data)
    assert err.value.field_name == field and "\n" not in str(err.value)


def test_static_dispatch_capacity_refuses_a_larger_batch():
    ll = {"dp": 2, "ep": True, "backend": "deepep_low_latency", "max_dispatch_tokens": 128}
    with pytest.raises(ScenarioError) as err:
        scenario_from_dict({"parallel": ll, "workload": {"tokens": [200, 3]}})
    assert err.value.field_name == "parallel.max_dispatch_tokens" and "DP rank 0 dispatches 200" in str(err.value)
    ok = scenario_from_dict({"parallel": ll, "workload": {"tokens": [128, 3]}})
    assert scenario_from_dict(tomllib.loads(scenario_to_toml(ok))) == ok
    # Under SP a rank dispatches its slice: 200 tokens over tp=2 fit.
    sp = scenario_from_dict({"parallel": {**ll, "tp": 2, "backend": "deepep_high_throughput"},
                             "workload": {"tokens": [200, 3]}})
    assert sp.sp and sp.layer_rows(0) == 100
    # Without a dispatch there is nothing to hold.
    assert scenario_from_dict({"parallel": {"max_dispatch_tokens": 1}, "workload": {"tokens": 4}})
    with pytest.raises(ScenarioError):
        scenario_from_dict({"parallel": {"max_dispatch_tokens": 0}})


def test_cli_refuses_an_over_capacity_batch_in_one_line(tmp_path):
    import subprocess
    import sys

    f = tmp_path / "cap.toml"
    f.write_text('name = "cap"\n[parallel]\ndp = 2\nep = true\nbackend = "deepep_low_latency"\n'
                 'max_dispatch_tokens = 4\n[workload]\ntokens = [5, 2]\n')
    out = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "simulate", str(f)],
                         cwd=HERE.parent, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "parallel.max_dispatch_tokens" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr


@given(moe_scenarios(max_world=8))
@settings(max_examples=60, deadline=None)
def test_generated_scenarios_round_trip_and_hold_one_count_per_dp_rank(s):
    assert len(s.token_counts) == s.parallel.dp and min(s.token_counts) >= 0 and s.total_tokens >= 1
    assert scenario_from_dict(tomllib.loads(scenario_to_toml(s)), s.name) == s


def test_strategy_draws_uneven_counts():
    seen = []

    @given(moe_scenarios(max_world=4, tp=[1, 2], dp=[2]))
    @settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
    def probe(s):
        seen.append(s.uneven_tokens)

    probe()
    assert any(seen) and not all(seen)


# ---- routing and token identity per DP rank ----


def test_routing_and_ownership_per_dp_rank():
    s = _uneven([5, 2], dp=2)
    r = routing(s)
    assert [len(r[d]) for d in range(2)] == [5, 2]
    ids, w = route_arrays(s)
    assert [len(ids[0]), len(ids[1])] == [5, 2] and abs(w[1].sum(axis=1) - 1).max() < 1e-12
    assert owned_tokens(s, 1) == [(1, 0), (1, 1)]
    assert tokens_of(s, "d1") == [0, 1] and tokens_of(s, "d0[1:3]") == [1, 2]
    # Equal counts given as a list route exactly like the single count.
    assert routing(_uneven([3, 3], dp=2)) == routing(_uneven(3, dp=2))


def test_sp_slices_per_dp_rank():
    s = _uneven([5, 2], tp=2, dp=2, ep=True)
    assert rank_token_ids(s, 0) == [0, 1, 2] and rank_token_ids(s, 1) == [3, 4, -1]
    assert rank_token_ids(s, 2) == [0] and rank_token_ids(s, 3) == [1]
    assert tokens_of(s, "d1s1") == [1] and tokens_of(s, "d0s1") == [3, 4, -1]


def test_explore_shrinks_per_dp_rank_counts():
    from twin.search.explore_shrink import _fewer_tokens

    assert list(_fewer_tokens((5, 2))) == [2, (1, 2), (2, 2), (4, 2), (5, 1)]
    assert list(_fewer_tokens(4)) == [1, 2, 2, 3]


def test_exact_reference_of_every_dp_rank_follows_its_own_count():
    import torch
    from test_reference import direct_output

    from real.reference import ExactReference

    s = Scenario(parallel=ParallelConfig(dp=3, ep=True), model=ModelTraits(num_experts=6, num_shared_experts=1),
                 workload=Workload(tokens=(4, 1, 3), seed=2))
    ref = ExactReference(s)
    for d, n in enumerate((4, 1, 3)):
        assert ref.output(d).shape == (n, 128)
        assert torch.allclose(ref.output(d), direct_output(s, d), rtol=0, atol=1e-12)


# ---- the algebra ----


def test_reduce_scatterv_keeps_each_members_rows_of_the_sum():
    gathered = algebra.concat([algebra.leaf("d0", 5, "x", ""), algebra.leaf("d1", 2, "x", "")])
    parts = [algebra.relabel(gathered, "routed", f"tp{i}") for i in range(2)]
    out = algebra.reduce_scatterv(parts, [5, 2])
    assert [v.keys() for v in out] == [("d0",), ("d1",)] and [v.rows for v in out] == [5, 2]
    assert out[1].blocks[0].coeffs() == {("routed", "tp0", None): 1.0, ("routed", "tp1", None): 1.0}


# ---- the simulator ----


class _AllGatherUnequal(MoERunner):
    def model_forward(self, ops):
        x = ops.layer_input()
        return ops.layer_output(ops.all_gather(x, "dp"))


class _SizesDisagree(MoERunner):
    def model_forward(self, ops):
        x = ops.all_gatherv(ops.layer_input(), "dp")
        return ops.layer_output(ops.reduce_scatterv(x, (ops.rank + 4, 3 - ops.rank), "dp"))


class _GathervRoundTrip(MoERunner):
    def model_forward(self, ops):
        x = ops.all_gatherv(ops.layer_input(), "dp")
        # Each member keeps its own rows of the sum of two copies: scale by 1/2.
        y = ops.reduce_scatterv(x, self.scenario.group_rows("dp", ops.rank), "dp")
        return ops.layer_output(ops.scale(y, 0.5))


def test_all_gather_of_unequal_counts_is_a_shape_mismatch():
    trace = simulate(_uneven([5, 2], dp=2), _AllGatherUnequal)
    assert {(h.kind.value, h.rank) for h in trace.hazards} == {("SHAPE_MISMATCH", 0), ("SHAPE_MISMATCH", 1)}


def test_reduce_scatterv_sizes_must_agree():
    trace = simulate(_uneven([5, 2], dp=2), _SizesDisagree)
    assert {h.kind.value for h in trace.hazards} == {"SHAPE_MISMATCH"}
    assert "disagree on reduce_scatterv sizes" in trace.hazards[0].detail


def test_gatherv_then_scatterv_gives_each_member_its_own_rows():
    trace = simulate(_uneven([5, 2], dp=2), _GathervRoundTrip)
    steps = trace.steps[1]
    gv = next(st for st in steps if st.op == "all_gatherv")
    sv = next(st for st in steps if st.op == "reduce_scatterv")
    assert gv.out_shape == (7, 128) and sv.out_shape == (2, 128)


def test_gatherv_costs_the_rows_really_moved():
    from sim.cost import for_world, load_profile
    from sim.engine import Simulation

    s = _uneven([6, 2], dp=2)
    prof = for_world(load_profile("h100"), s.world)
    sim = Simulation(s, _GathervRoundTrip, prof, "round-trip")
    sim.run()
    dur = {ops.rank: {pl.step.op: pl.dur for pl in ops.plans} for ops in sim.rank_ops}
    # Rank 0 receives 2 rows and sends 2 back; rank 1 receives and sends 6.
    assert 0 < dur[0]["all_gatherv"] < dur[1]["all_gatherv"]
    assert 0 < dur[0]["reduce_scatterv"] < dur[1]["reduce_scatterv"]


@pytest.mark.parametrize("cls,scenario,kind,ranks,_verdict", fam.WRONG, ids=lambda x: getattr(x, "__name__", None))
def test_sim_predicts_the_wrong_uneven_runner(cls, scenario, kind, ranks, _verdict):
    trace = simulate(scenario, cls)
    hit = {h.rank for h in trace.hazards if h.kind.value == kind}
    assert hit == set(ranks), [str(h) for h in trace.hazards]


@pytest.mark.parametrize("scenario", fam.FIXED, ids=lambda s: s.name)
def test_sim_clean_on_fixed_uneven(scenario):
    trace = simulate(scenario, "fixed")
    assert not trace.hazards, [str(h) for h in trace.hazards]


@pytest.mark.parametrize("cls,scenario", fam.CORRECT, ids=lambda x: getattr(x, "__name__", getattr(x, "name", None)))
def test_sim_clean_on_correct_uneven_runner(cls, scenario):
    trace = simulate(scenario, cls)
    assert not trace.hazards, [str(h) for h in trace.hazards]


def _force_uneven(s: Scenario, data, most: int = 9) -> Scenario:
    """The scenario with one count per DP rank, not all equal (0: an idle DP rank)."""
    if s.uneven_tokens:
        return s
    counts = data.draw(st.lists(st.integers(0, most), min_size=s.parallel.dp, max_size=s.parallel.dp))
    assume(len(set(counts)) > 1)  # (so not every DP rank is idle either)
    return s.with_(**{"workload.tokens": tuple(counts)})


@given(moe_scenarios(max_world=4, tp=[1, 2], dp=[2, 4]), st.data())
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_fixed_is_clean_on_generated_uneven_scenarios(s, data):
    assume(s.parallel.dp > 1)
    s = _force_uneven(s, data)
    trace = simulate(s, "fixed")
    assert not trace.hazards, (s.summary_line(), [str(h) for h in trace.hazards])
    assert all(abs(c - 1.0) < 1e-9 for coeffs in trace.outputs.values() for c in coeffs.values()), trace.outputs


# ---- real ranks against the exact reference ----


def _spec(cls: type) -> str:
    return f"{HERE / 'families_uneven.py'}:{cls.__name__}"


@pytest.mark.slow
@pytest.mark.parametrize("scenario", fam.FIXED, ids=lambda s: s.name)
def test_real_fixed_matches_the_reference_on_uneven(scenario):
    from twin.check.crosscheck import check

    res = check(scenario, "fixed", timeout_s=120)
    assert len(res.real.output_checks) == scenario.world
    assert all(c.correct for c in res.real.output_checks.values()), [c.to_dict() for c in res.real.output_checks.values()]
    assert res.divergence is None and res.agree and not res.verdicts


@pytest.mark.slow
@pytest.mark.parametrize("cls,scenario", fam.CORRECT, ids=lambda x: getattr(x, "__name__", getattr(x, "name", None)))
def test_real_clean_on_correct_uneven_runner(cls, scenario):
    from twin.check.crosscheck import check

    res = check(scenario, _spec(cls), timeout_s=120)
    assert len(res.real.output_checks) == scenario.world
    assert all(c.correct for c in res.real.output_checks.values()), [c.to_dict() for c in res.real.output_checks.values()]
    assert res.divergence is None and res.agree and not res.verdicts
    steps = res.real.steps[0]
    assert any(st.op == "reduce_scatterv" and st.detail.startswith("stand-in:") for st in steps)


@pytest.mark.slow
@pytest.mark.parametrize("cls,scenario,kind,ranks,verdict", fam.WRONG, ids=lambda x: getattr(x, "__name__", None))
def test_real_confirms_the_wrong_uneven_runner(cls, scenario, kind, ranks, verdict):
    from twin.check.crosscheck import check

    res = check(scenario, _spec(cls), timeout_s=120)
    wrong = {r for r, c in res.real.output_checks.items() if not c.correct}
    vs = [v for v in res.verdicts if v.kind == kind]
    assert vs and all(v.verdict.value == verdict for v in vs), [v.to_dict() for v in res.verdicts]
    assert wrong == set(ranks), [c.to_dict() for c in res.real.output_checks.values()]
    assert not res.agree and res.confirmed_as_predicted, [v.to_dict() for v in res.verdicts]
    for v in res.verdicts:
        if v.verdict == Verdict.CONFIRMED and v.rank is not None:
            assert not res.real.output_checks[v.rank].correct


@pytest.mark.slow
@given(moe_scenarios(max_world=4, tp=[1, 2], dp=[2], max_tokens=6, platforms=("cpu",)), st.data())
@settings(max_examples=6, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_real_fixed_matches_the_reference_on_generated_uneven(s, data):
    from twin.check.crosscheck import check

    s = _force_uneven(s, data, most=6)
    res = check(s, "fixed", timeout_s=120)
    assert len(res.real.output_checks) == s.world
    assert all(c.correct for c in res.real.output_checks.values()), (
        s.summary_line(), [c.to_dict() for c in res.real.output_checks.values()])
    assert res.agree, (s.summary_line(), res.divergence, [v.to_dict() for v in res.verdicts])
