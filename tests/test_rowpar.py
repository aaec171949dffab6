"""The latent up-projection replicated or row-parallel: the algebra of its
shares, the scenario knob, the fixed runner clean in both layouts (sim and
real, against the exact reference) and the wrong variants caught with the
right kind and CONFIRMED on real ranks."""

from pathlib import Path

import families_rowpar as fam
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scenarios import layout
from scenarios.runners import MoERunner
from scenarios.spec import ModelTraits, ParallelConfig, Scenario, ScenarioError, Workload
from scenarios.spec_io import scenario_from_dict, scenario_to_toml
from scenarios.trace import Verdict
from sim import algebra, simulate

HERE = Path(__file__).parent


def _spec(cls: type) -> str:
    return f"{HERE / 'families_rowpar.py'}:{cls.__name__}"


# ---- the algebra of a row-parallel projection's shares ----


def _routed(shards: dict[str, float], key: str = "d0", rows: int = 3) -> algebra.Value:
    return algebra.add([algebra.scale(algebra.leaf(key, rows, "routed", sh), c) for sh, c in shards.items()])


@given(n=st.integers(1, 4), tp=st.integers(1, 4))
def test_shares_of_the_complete_output_sum_to_every_share_once(n, tp):
    whole = _routed({f"ep{i}": 1.0 for i in range(n)})
    total = algebra.add([algebra.row_shard(whole, f"up{j}") for j in range(tp)])
    want = {f"routed@ep{i}+up{j}": 1.0 for i in range(n) for j in range(tp)}
    assert algebra.coefficients(total, {}) == want


@given(tp=st.integers(2, 4))
def test_shares_of_partials_miss_the_cross_terms(tp):
    # Rank j projects its own partial routed@tp<j> through its rows only.
    total = algebra.add([algebra.row_shard(_routed({f"tp{j}": 1.0}), f"up{j}") for j in range(tp)])
    c = algebra.coefficients(total, {}, [f"routed@tp{i}+up{j}" for i in range(tp) for j in range(tp)])
    assert all(c[f"routed@tp{i}+up{j}"] == (1.0 if i == j else 0.0) for i in range(tp) for j in range(tp))


def test_a_share_keeps_coefficients_scale_and_other_components():
    v = algebra.add([algebra.scale(_routed({"tp0": 1.0, "tp1": 1.0}), 2.5), algebra.leaf("d0", 3, "shared", "tp0")])
    out = algebra.row_shard(v, "up1")
    assert algebra.coefficients(out, {}) == {"routed@tp0+up1": 2.5, "routed@tp1+up1": 2.5, "shared@tp0": 1.0}
    assert out.scale_of("routed") == v.scale_of("routed") and out.rows == v.rows


def test_share_labels_parse_back():
    assert layout.split_row_shard("ep1.tp0+up3") == ("ep1.tp0", 3)
    assert layout.split_row_shard("tp2") == ("tp2", None)


# ---- the knob ----


def _scenario(model: dict, parallel: dict) -> Scenario:
    base = {"hidden": 128, "moe_intermediate": 64, "num_experts": 8, "top_k": 2, "latent_dim": 64}
    return Scenario(model=ModelTraits(**{**base, **model}), parallel=ParallelConfig(**parallel),
                    workload=Workload(tokens=4, seed=3), kernel="torch")


@pytest.mark.parametrize("model,parallel,words", [
    ({"latent_up_parallel": "rows"}, {}, "unknown layout 'rows'"),
    ({"latent_up_parallel": "row", "latent_dim": None}, {}, "needs model.latent_dim"),
    ({"latent_up_parallel": "row", "transform_nonlinear": True}, {}, "non-linear"),
    ({"latent_up_parallel": "row", "latent_dim": 60}, {"tp": 8}, "divisible by tp=8"),
    ({"latent_up_parallel": "row"}, {"tp": 2, "dp": 2, "ep": True, "backend": "deepep_low_latency"}, "sequence-parallel"),
])
def test_knob_errors_are_one_line(model, parallel, words):
    with pytest.raises(ScenarioError) as e:
        _scenario(model, parallel)
    assert "model.latent_up_parallel" in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_knob_round_trips_and_the_default_is_not_written():
    row = _scenario({"latent_up_parallel": "row"}, {"tp": 2})
    assert scenario_from_dict(__import__("tomllib").loads(scenario_to_toml(row))) == row
    assert "latent_up_parallel" not in scenario_to_toml(_scenario({}, {"tp": 2}))


# ---- the runner's decisions ----


def test_default_decision_is_replicated_and_unchanged():
    r = MoERunner(fam.REPL_TP2)
    assert not r.latent_up_row_parallel() and not r.up_projection_splits()
    names = [s.name for s in simulate(fam.REPL_TP2).steps[0]]
    assert "pre_transform_all_reduce" not in names and names.index("latent_up") < names.index("final_all_reduce")


def test_row_parallel_moves_the_reduction_after_the_projection():
    trace = simulate(fam.ROW_TP2)
    names = [s.name for s in trace.steps[0]]
    assert names.index("pre_transform_all_reduce") < names.index("latent_up") < names.index("final_all_reduce")
    assert "shared_all_reduce" not in names  # the shared partial joins the final all-reduce
    assert set(trace.outputs[0]) == {f"routed@tp{i}+up{j}" for i in range(2) for j in range(2)} | {"shared@tp0", "shared@tp1"}


def test_row_parallel_misuse_is_named():
    class RowOnNonLinear(MoERunner):
        def latent_up_row_parallel(self) -> bool:
            return True

    s = _scenario({"transform_nonlinear": True, "num_shared_experts": 1}, {"tp": 2})
    with pytest.raises(ValueError, match="row_parallel needs a linear transform"):
        simulate(s, RowOnNonLinear)


@pytest.mark.parametrize("scenario", fam.CORRECT, ids=lambda s: s.name)
def test_sim_clean_on_the_fixed_runner(scenario):
    trace = simulate(scenario)
    assert not trace.hazards, [str(h) for h in trace.hazards]
    assert all(abs(c - 1.0) < 1e-9 for coeffs in trace.outputs.values() for c in coeffs.values())


@pytest.mark.parametrize("cls,scenario,kind,ranks,_verdict", fam.WRONG, ids=lambda x: getattr(x, "__name__", None))
def test_sim_predicts_the_wrong_runner(cls, scenario, kind, ranks, _verdict):
    trace = simulate(scenario, cls)
    hit = {h.rank for h in trace.hazards if h.kind.value == kind}
    assert hit == set(ranks), [str(h) for h in trace.hazards]
    assert {h.kind.value for h in trace.hazards} == {kind}, [str(h) for h in trace.hazards]


def test_missing_reduction_names_the_tp_shares():
    trace = simulate(fam.ROW_TP2, fam.RowUpWithoutReduction)
    assert trace.outputs[0]["routed@tp1+up1"] == 0.0 and trace.outputs[0]["routed@tp1+up0"] == 1.0
    assert all("of tp never summed" in h.detail for h in trace.hazards)


# ---- real ranks against the exact reference ----


@pytest.mark.slow
@pytest.mark.parametrize("scenario", fam.CORRECT, ids=lambda s: s.name)
def test_real_clean_on_the_fixed_runner(scenario):
    from twin.check.crosscheck import check

    res = check(scenario, None, timeout_s=120)
    assert len(res.real.output_checks) == scenario.world
    assert all(c.correct for c in res.real.output_checks.values()), [c.to_dict() for c in res.real.output_checks.values()]
    assert not res.verdicts and res.agree


@pytest.mark.slow
@pytest.mark.parametrize("cls,scenario,kind,ranks,verdict", fam.WRONG, ids=lambda x: getattr(x, "__name__", None))
def test_real_confirms_the_wrong_runner(cls, scenario, kind, ranks, verdict):
    from twin.check.crosscheck import check

    res = check(scenario, _spec(cls), timeout_s=120)
    wrong = {r for r, c in res.real.output_checks.items() if not c.correct}
    vs = [v for v in res.verdicts if v.kind == kind]
    assert vs and all(v.verdict.value == verdict for v in vs), [v.to_dict() for v in res.verdicts]
    if kind != "SHAPE_MISMATCH":  # a shape error leaves no output to judge
        assert wrong == set(ranks), [c.to_dict() for c in res.real.output_checks.values()]
        assert not res.agree and res.confirmed_as_predicted, [v.to_dict() for v in res.verdicts]
        # The explainer names the projection's shares (fitted per TP rank's rows).
        assert all("+up" in res.real.output_checks[r].cause for r in ranks)
    for v in res.verdicts:
        if v.verdict == Verdict.CONFIRMED and v.rank is not None and v.rank in res.real.output_checks:
            assert not res.real.output_checks[v.rank].correct
