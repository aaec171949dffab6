"""Every preset on its trigger scenario, the fixed runner on the same, and
Hypothesis shrinking a generated trigger to a minimal one."""

import pytest
from hypothesis import HealthCheck, find, settings

from scenarios.loader import load
from scenarios.runners import RUNNERS, MoERunner, RunnerLoadError, load_runner
from scenarios.strategies import moe_scenarios
from sim import simulate

TRIGGERS = [
    ("before-40673", "r1-sp-deepep", "DOUBLE_REDUCTION", "shared_all_reduce"),
    ("stale-cache-40673", "r1-stale-cache", "DOUBLE_REDUCTION", "final_all_reduce"),
    ("before-41382", "r2-fi-two-sided", "DOUBLE_REDUCTION", "final_all_reduce"),
    ("before-41382", "r2-fi-one-sided-previous", "DOUBLE_REDUCTION", "final_all_reduce"),
    ("before-38990", "r3-tp-decode", "LOST_OVERLAP", "shared_experts"),
    ("before-40865", "r4-gpt-oss-padded", "SHAPE_MISMATCH", "custom_op_boundary"),
    ("first-fix-40865", "r4-latent-padded", "SHAPE_MISMATCH", "latent_up"),
    ("no-early-trim-40865", "r4-nemotron-padded", "SHAPE_MISMATCH", "shared_add"),
    ("before-39222", "r5-eplb-deepep-ll", "UNSAFE_OVERLAP", "shared_experts"),
    ("before-39222", "r5-fi-two-sided", "UNSAFE_OVERLAP", "shared_experts"),
]


@pytest.mark.parametrize("runner,scenario,kind,step", TRIGGERS)
def test_preset_predicts_its_hazard_and_fixed_is_clean(runner, scenario, kind, step):
    s = load(scenario)
    trace = simulate(s, runner)
    hits = [h for h in trace.hazards if h.kind.value == kind]
    assert hits, trace.hazards
    assert hits[0].step_name == step
    assert not simulate(s, "fixed").hazards


def test_double_reduction_detail_names_coefficient():
    h = simulate(load("r1-stale-cache"), "stale-cache-40673").hazards[0]
    assert str(h).startswith("DOUBLE_REDUCTION at step")
    assert "routed@ep0..ep3 coefficient 2, expected 1" in h.detail


def test_lost_overlap_carries_cost_and_glm5_gap():
    s = load("glm5-tp8-decode")
    before, fixed = simulate(s, "before-38990"), simulate(s, "fixed")
    h = next(h for h in before.hazards if h.kind.value == "LOST_OVERLAP")
    assert h.cost_us == pytest.approx(before.latency_us - fixed.latency_us)
    assert (before.latency_us - fixed.latency_us) / fixed.latency_us >= 0.09


def test_fi_one_sided_is_eplb_safe_only_in_newest():
    s = load("r5-fi-two-sided").with_(**{
        "parallel.backend": "flashinfer_nvlink_one_sided", "parallel.eplb": True, "parallel.tp": 2})
    assert not simulate(s, "fixed").hazards
    prev = s.with_(**{"parallel.version": "previous"})
    assert simulate(prev, "fixed").decisions["shared_experts_order"] == "NO_OVERLAP"
    assert "UNSAFE_OVERLAP" in simulate(prev, "before-39222").hazard_kinds()
    assert "UNSAFE_OVERLAP" not in simulate(s, "before-39222").hazard_kinds()


def test_input_summed_three_times_is_a_double_reduction():
    class InputReduced(MoERunner):
        def forward(self, ops, x):
            return super().forward(ops, ops.all_reduce(x, "tp", name="reduce_input"))

    s = load("r4-gpt-oss-padded").with_(**{"parallel.tp": 3, "model.moe_intermediate": 192})
    kinds = {h.kind.value for h in simulate(s, InputReduced).hazards}
    assert "DOUBLE_REDUCTION" in kinds and "MISSING_REDUCTION" not in kinds


def test_r2_has_no_effect_at_tp1():
    s = load("r2-fi-two-sided").with_(**{"parallel.tp": 1, "parallel.dp": 4})
    assert not simulate(s, "before-41382").hazards


def test_runner_loading_errors(tmp_path):
    with pytest.raises(RunnerLoadError, match="unknown runner 'nope'"):
        load_runner("nope")
    f = tmp_path / "mine.py"
    f.write_text("class NotARunner:\n    pass\n")
    with pytest.raises(RunnerLoadError, match="is not a runner"):
        load_runner(f"{f}:NotARunner")
    with pytest.raises(RunnerLoadError, match="no attribute"):
        load_runner(f"{f}:Missing")
    with pytest.raises(RunnerLoadError, match="cannot import"):
        load_runner("no_such_module_xyz:Thing")


def test_user_runner_that_raises_is_reported_with_its_step(tmp_path):
    f = tmp_path / "broken.py"
    f.write_text(
        "from scenarios.runners import MoERunner\n"
        "class Broken(MoERunner):\n"
        "    def final_reduce(self, ops, result, reduced):\n"
        "        raise KeyError('oops')\n"
    )
    trace = simulate(load("r4-gpt-oss-padded"), f"{f}:Broken")
    errs = [h for h in trace.hazards if h.kind.value == "RUNNER_ERROR"]
    assert errs and "KeyError" in errs[0].detail and errs[0].step > 0


def test_race_without_wait_is_unsafe_overlap():
    class InplaceOverlap(MoERunner):
        def routed_inplace(self, order):
            return True  # writes into the buffer the aux stream's shared MLP reads

    trace = simulate(load("r3-tp-decode"), InplaceOverlap)
    races = [h for h in trace.hazards if h.kind.value == "UNSAFE_OVERLAP"]
    assert races and "no event orders them" in races[0].detail


def test_hang_is_reported_not_waited_on():
    class SkipOnRank1(MoERunner):
        def final_reduce(self, ops, result, reduced):
            if ops.rank == 1:
                return result
            return ops.all_reduce(result, "tp", name="final_all_reduce")

    trace = simulate(load("r4-gpt-oss-padded"), SkipOnRank1)
    hangs = [h for h in trace.hazards if h.kind.value == "HANG"]
    assert hangs and hangs[0].rank == 0 and "never reached by rank 1" in hangs[0].detail


@pytest.mark.parametrize("runner,kind", [
    ("before-40673", "DOUBLE_REDUCTION"),
    ("stale-cache-40673", "DOUBLE_REDUCTION"),
    ("before-41382", "DOUBLE_REDUCTION"),
    ("before-38990", "LOST_OVERLAP"),
    ("before-40865", "SHAPE_MISMATCH"),
    ("before-39222", "UNSAFE_OVERLAP"),
])
def test_hypothesis_shrinks_a_generated_trigger(runner, kind):
    found = find(
        moe_scenarios(),
        lambda s: kind in simulate(s, runner).hazard_kinds(),
        settings=settings(max_examples=3000, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck)),
    )
    assert kind in simulate(found, runner).hazard_kinds()
    assert not simulate(found, "fixed").hazards
    # Minimal: the fewest ranks that can show it, few tokens.
    assert found.world <= 4
    assert max(found.token_counts) <= 2
    if kind == "DOUBLE_REDUCTION":
        assert found.parallel.tp == 2  # needs a TP group; 2 suffices
    else:
        assert found.world <= 2  # R3, R4, R5 need no TP (R5 needs DP=2 for its backend)


def test_registry_has_every_preset():
    for name in ("fixed", "before-40673", "stale-cache-40673", "before-41382", "before-38990",
                 "before-40865", "before-39222"):
        assert RUNNERS[name].name == name
