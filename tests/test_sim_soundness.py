"""Simulator soundness: exact coefficients, token and input identity, in-place
writes, the output table, non-finite coefficients and usage errors.

Each wrong runner is a short subclass with the hazard the simulator must
predict; each correct-but-unusual runner must come back with no hazard at all.
"""

import json
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from cli import main
from scenarios.loader import load
from scenarios.ops import OpsUsageError
from scenarios.runners import MoERunner
from scenarios.strategies import moe_scenarios
from sim import RunnerUsageError, algebra, simulate
from twin.search.asserts import assert_no_hazard

# ---------------------------------------------------------------- scenarios

SP_DECODE = load("r1-sp-deepep").with_(**{"workload.tokens": 1, "parallel.eplb": False})  # TP=2 DP=2 EP, SP
TP_SERIAL = load("r3-tp-decode").with_(**{"runtime.platform": "cpu"})  # TP=2, shared, NO_OVERLAP
TP_AUX = load("r3-tp-decode")  # TP=2, shared, MULTI_STREAM (cuda, aux stream, 4 tokens)
LATENT_AUX = load("latent-moe")  # latent 1024, shared, MULTI_STREAM
FI_SHARED = load("r2-fi-two-sided").with_(**{"model.num_shared_experts": 1})  # reducing combine, not SP


def kinds_by_rank(trace):
    out = {}
    for h in trace.hazards:
        out.setdefault(h.rank, set()).add(h.kind.value)
    return out


# ---------------------------------------------------------------- algebra


def leaf(comp, shard, key="d0", rows=2):
    return algebra.leaf(key, rows, comp, shard)


def test_one_nth_summed_n_times_is_exactly_one():
    for n in (2, 3, 7, 10):
        part = algebra.scale(leaf("shared", "full"), 1.0 / n)
        total = algebra.add([part] * n)
        assert total.blocks[0].terms == ((("shared", "full", None), 1.0),)
        assert algebra.over_ceiling(total, 1.0) == {}
    # 0.1 ten times: a float sum of 0.9999999999999999, snapped to 1.
    tenth = algebra.scale(leaf("shared", "full"), 0.1)
    assert algebra.coefficients(algebra.add([tenth] * 10), {"shared": 1.0}) == {"shared@full": 1.0}


def test_coefficient_is_scale_times_multiplicity():
    half = algebra.scale(leaf("routed", "tp0"), 0.5)
    four = algebra.add([half] * 4)
    assert algebra.max_coefficient(four)[0] == 2.0
    assert "routed" in algebra.over_ceiling(four, 1.0)


def test_ceiling_follows_the_routed_scaling_factor():
    rsf = 2.5
    twice = algebra.add([leaf("routed", "tp0")] * 2)
    assert "routed" in algebra.over_ceiling(twice, rsf)  # counted twice before rsf: beyond repair
    scaled = algebra.scale(leaf("routed", "tp0"), rsf)
    assert algebra.over_ceiling(scaled, rsf) == {}  # rsf itself is not a reduction
    assert "routed" in algebra.over_ceiling(algebra.add([scaled] * 2), rsf)
    shared = algebra.scale(leaf("shared", "full"), rsf)
    assert "shared" in algebra.over_ceiling(shared, rsf)  # rsf is routed's only
    assert algebra.coefficients(scaled, {"routed": rsf}) == {"routed@tp0": 1.0}


def test_foreign_tokens_are_flagged_whatever_the_scaling():
    a = algebra.scale(leaf("shared", "full", "d0s0"), 0.5)
    b = algebra.scale(leaf("shared", "full", "d0s1"), 0.5)
    out = algebra.add([a, b], own=0)
    assert [src for _b, src in algebra.foreign_sources(out)] == [("shared", "full", "d0s1")]
    assert out.blocks[0].coeffs()[("shared", "full", None)] == 0.5


def test_non_finite_coefficients_are_kept_and_found():
    v = algebra.scale(leaf("routed", "tp0"), float("nan"))
    b, src, coef = algebra.non_finite(v)
    assert src == ("routed", "tp0", None) and math.isnan(coef)
    assert math.isnan(algebra.coefficients(v, {"routed": 1.0})["routed@tp0"])
    assert algebra.non_finite(algebra.scale(leaf("routed", "tp0"), 3.0)) is None


def test_missing_sources_show_as_zero():
    v = leaf("routed", "tp0")
    want = ("routed@tp0", "routed@tp1", "shared@tp0")
    assert algebra.coefficients(v, {"routed": 1.0}, want) == {"routed@tp0": 1.0, "routed@tp1": 0.0, "shared@tp0": 0.0}


# ---------------------------------------------------------------- wrong runners


class SkipGatherOnRowCount(MoERunner):
    def model_forward(self, ops):
        x = ops.layer_input()
        tokens = x.shape[0]
        x = ops.sp_slice(x) if self.scenario.sp else x
        out = self.forward(ops, x)
        if out.shape[0] != tokens:  # "is it sharded?" guessed from the row count
            out = ops.trim_rows(ops.all_gather(out, "tp", name="sp_all_gather"), tokens, name="sp_drop_pad_rows")
        return ops.layer_output(out)


def test_skipped_sp_gather_returns_padding_rows():
    trace = simulate(SP_DECODE, SkipGatherOnRowCount)
    assert kinds_by_rank(trace) == {1: {"WRONG_TOKENS"}, 3: {"WRONG_TOKENS"}}  # tp index 1 only
    h = next(h for h in trace.hazards if h.rank == 1)
    assert h.step_name == "layer_output"
    assert "rank 1 returns [d0pad] instead of [d0t0]" in h.detail and "sp_slice" in h.detail
    # With 3 tokens the row count differs and the guess happens to gather: clean.
    assert not simulate(SP_DECODE.with_(**{"workload.tokens": 3}), SkipGatherOnRowCount).hazards


class GatherOverDP(SkipGatherOnRowCount):
    def model_forward(self, ops):
        x = ops.layer_input()
        tokens = x.shape[0]
        out = self.forward(ops, ops.sp_slice(x))
        out = ops.all_gather(out, "dp", name="sp_all_gather")  # the wrong group
        return ops.layer_output(ops.trim_rows(out, tokens, name="sp_drop_pad_rows"))


def test_another_ranks_tokens_are_wrong_tokens():
    trace = simulate(SP_DECODE.with_(**{"workload.tokens": 2}), GatherOverDP)
    assert trace.hazard_kinds() == {"WRONG_TOKENS"}
    by_rank = {h.rank: h.detail for h in trace.hazards}
    assert "rank 0 returns [d1t0] instead of [d0t1] in rows 1..1" in by_rank[0]
    assert "sp_all_gather" in by_rank[0]
    assert set(by_rank) == {0, 1, 2, 3}


class SharedOnLatent(MoERunner):
    def shared_input(self, ops, x):
        return ops.pad(ops.latent_down(x, name="shared_latent_down"), self.scenario.model.hidden)


def test_shared_experts_on_the_padded_latent_is_wrong_input():
    trace = simulate(LATENT_AUX, SharedOnLatent)
    assert trace.decisions["shared_experts_order"] == "MULTI_STREAM_OVERLAPPED"
    assert trace.hazard_kinds() == {"WRONG_INPUT"}
    h = trace.hazards[0]
    assert h.step_name == "shared_experts" and "xlat" in h.detail and "expected the layer input x" in h.detail


class SharedOnDispatched(MoERunner):
    def shared_input(self, ops, x):
        xd, _routing = ops.dispatch(x, ops.router(x, name="shared_router"), name="shared_dispatch")
        return xd


def test_shared_experts_on_all_to_all_dispatched_tokens_is_wrong_input():
    s = TP_AUX.with_(**{"parallel.tp": 1, "parallel.dp": 2, "parallel.ep": True,
                        "parallel.backend": "deepep_high_throughput", "model.shared_intermediate": None})
    trace = simulate(s, SharedOnDispatched)
    wrong = [h for h in trace.hazards if h.kind.value == "WRONG_INPUT"]
    assert {h.rank for h in wrong} == {0, 1} and all(h.step_name == "shared_experts" for h in wrong)
    assert "x of rows d0,d1; expected the layer input x of rows d1" in next(h.detail for h in wrong if h.rank == 1)


def test_shared_experts_on_gathered_tokens_fail_where_they_join_unnarrowed():
    # The naive dispatch all-gathers every DP rank's tokens in order: rows
    # the shared MLP may take if they are narrowed again; here they are not.
    s = TP_AUX.with_(**{"parallel.tp": 1, "parallel.dp": 2, "model.shared_intermediate": None})
    trace = simulate(s, SharedOnDispatched)
    assert {(h.kind.value, h.step_name, h.rank) for h in trace.hazards} == {
        ("SHAPE_MISMATCH", "shared_add", 0), ("SHAPE_MISMATCH", "shared_add", 1)}


class SharedAfterInplaceRouted(MoERunner):
    def shared_after_routed(self, order):
        return True

    def routed_inplace(self, order):
        return True


def test_shared_after_inplace_routed_on_one_stream_reads_the_routed_output():
    trace = simulate(TP_SERIAL, SharedAfterInplaceRouted)
    assert trace.decisions["shared_experts_order"] == "NO_OVERLAP"
    assert trace.hazard_kinds() == {"WRONG_INPUT"}
    assert {h.rank for h in trace.hazards} == {0, 1}
    h = trace.hazards[0]
    assert h.step_name == "shared_experts" and "routed@tp0" in h.detail
    assert "overwritten in place by step" in h.detail and "routed_experts" in h.detail
    # The same order with an out-of-place kernel is clean.
    class NotInplace(SharedAfterInplaceRouted):
        def routed_inplace(self, order):
            return False
    assert not simulate(TP_SERIAL, NotInplace).hazards


class DropFinalReduce(MoERunner):
    def needs_final_reduce(self, routed_reduced):
        return False


def test_dropped_final_reduction_shows_zero_coefficients():
    trace = simulate(TP_SERIAL, DropFinalReduce)
    assert trace.hazard_kinds() == {"MISSING_REDUCTION"}
    h = next(h for h in trace.hazards if h.rank == 0)
    assert h.detail == ("output holds routed@tp1 coefficient 0 and shared@tp1 coefficient 0, expected 1: "
                        "routed and shared partials of tp never summed")
    assert trace.outputs[0] == {"routed@tp0": 1.0, "routed@tp1": 0.0, "shared@tp0": 1.0, "shared@tp1": 0.0}


class AuxWithoutForkWait(MoERunner):
    def routed_inplace(self, order):
        return True

    def launch_shared_on_aux(self, ops, x, sharded):
        with ops.stream("aux"):  # no wait on the main stream's fork event
            shared = ops.shared_experts(self.shared_input(ops, x), sharded=sharded)
            done = ops.record_event("shared_done")
        return shared, done


def test_aux_launch_without_fork_wait_is_still_a_race():
    trace = simulate(TP_AUX, AuxWithoutForkWait)
    assert trace.hazard_kinds() == {"UNSAFE_OVERLAP"}
    assert any(h.step_name == "routed_experts" and "shared_experts (aux)" in h.detail for h in trace.hazards)


class ReduceRoutedTwiceEarly(MoERunner):
    def routed_path(self, ops, x, routing, order, shared_inside):
        y, shared = super().routed_path(ops, x, routing, order, shared_inside)
        once = ops.all_reduce(y, "tp", name="early_reduce_1")
        return ops.all_reduce(once, "tp", name="early_reduce_2"), shared

    def needs_final_reduce(self, routed_reduced):
        return False


def test_routed_counted_twice_before_its_scaling_is_double_at_that_step():
    s = TP_SERIAL.with_(**{"model.num_shared_experts": 0, "model.shared_intermediate": None,
                           "model.routed_scaling_factor": 2.5})
    trace = simulate(s, ReduceRoutedTwiceEarly)
    assert trace.hazard_kinds() == {"DOUBLE_REDUCTION"}
    h = trace.hazards[0]
    assert h.step_name == "early_reduce_2" and "routed@tp0,tp1 coefficient 2, expected 1" in h.detail
    assert trace.outputs[0] == {"routed@tp0": 2.0, "routed@tp1": 2.0}

    class DivideBack(ReduceRoutedTwiceEarly):  # sum twice, then halve: the right numbers
        def routed_path(self, ops, x, routing, order, shared_inside):
            y, shared = super().routed_path(ops, x, routing, order, shared_inside)
            return ops.scale(y, 0.5, name="divide_back"), shared
    assert not simulate(s, DivideBack).hazards


class ReduceTwiceAtTheEnd(MoERunner):
    def final_reduce(self, ops, result, routed_reduced):
        return ops.all_reduce(super().final_reduce(ops, result, routed_reduced), "tp", name="again")


def test_a_double_reduction_names_every_doubled_component():
    trace = simulate(TP_SERIAL, ReduceTwiceAtTheEnd)
    assert [(h.rank, h.kind.value, h.step_name) for h in sorted(trace.hazards, key=lambda h: h.rank)] == [
        (0, "DOUBLE_REDUCTION", "again"), (1, "DOUBLE_REDUCTION", "again")]
    assert trace.hazards[0].detail == "routed@tp0,tp1 coefficient 2 and shared@tp0,tp1 coefficient 2, expected 1"


class ReduceInput(MoERunner):
    def forward(self, ops, x):
        return super().forward(ops, ops.all_reduce(x, "tp", name="reduce_input"))


def test_input_of_the_right_component_summed_twice_is_double_where_summed():
    trace = simulate(TP_SERIAL, ReduceInput)
    assert trace.hazard_kinds() == {"DOUBLE_REDUCTION"}
    assert {h.step_name for h in trace.hazards} == {"reduce_input"}
    assert "x coefficient 2, expected 1 (fed to router" in trace.hazards[0].detail


class NaNScale(MoERunner):
    def final_reduce(self, ops, result, routed_reduced):
        return super().final_reduce(ops, ops.scale(result, float("nan"), name="nan_scale"), routed_reduced)


def test_nan_scaling_is_a_runner_error_at_the_scale_step():
    trace = simulate(TP_SERIAL, NaNScale)
    assert trace.hazard_kinds() == {"RUNNER_ERROR"}
    assert {(h.rank, h.step_name) for h in trace.hazards} == {(0, "nan_scale"), (1, "nan_scale")}
    assert "non-finite coefficient" in trace.hazards[0].detail
    assert all(math.isnan(c) for c in trace.outputs[0].values())


def _strict(text):
    def refuse(const):
        raise ValueError(f"bare {const} in JSON")
    return json.loads(text, parse_constant=refuse)


def test_simulate_json_never_emits_bare_nan(capsys, tmp_path):
    f = tmp_path / "nan_runner.py"
    f.write_text(
        "from scenarios.runners import MoERunner\n"
        "class NaNScale(MoERunner):\n"
        "    def final_reduce(self, ops, result, reduced):\n"
        "        return super().final_reduce(ops, ops.scale(result, float('inf'), name='inf_scale'), reduced)\n"
    )
    code = main(["simulate", "r3-tp-decode", "--runner", f"{f}:NaNScale", "--json"])
    out, _err = capsys.readouterr()
    assert code == 0
    data = _strict(out)
    assert {h["kind"] for h in data["hazards"]} >= {"RUNNER_ERROR"}
    assert set(data["outputs"]["0"].values()) == {"inf"}


# ---------------------------------------------------------------- correct but unusual


class ReplicatedSharedScaled(MoERunner):
    def shared_experts_sharded(self):
        return False  # every rank computes the whole shared MLP

    def maybe_reduce_shared(self, ops, shared, routed_reduced):
        summed_later = self.needs_final_reduce(routed_reduced) or self.scenario.next_layer_fuses_reduce
        if shared is None or not summed_later:
            return shared  # complete already, and nothing sums it again
        return ops.scale(shared, 1 / self.scenario.parallel.tp, name="shared_pre_scale")


class ReduceScatterAllGather(MoERunner):
    def final_reduce(self, ops, result, routed_reduced):
        if not self.needs_final_reduce(routed_reduced):
            return result
        part = ops.reduce_scatter(result, "tp", name="final_reduce_scatter")
        return ops.all_gather(part, "tp", name="final_all_gather")


class AddSharedThenReduceBoth(MoERunner):
    def routed_path(self, ops, x, routing, order, shared_inside):
        y, shared = super().routed_path(ops, x, routing, order, shared_inside)
        return ops.scale(y, 1 / self.scenario.parallel.tp, name="routed_pre_scale"), shared

    def maybe_reduce_shared(self, ops, shared, routed_reduced):
        return shared  # summed below, with the routed output

    def needs_final_reduce(self, routed_reduced):
        return not self.is_sequence_parallel() and self.scenario.parallel.tp > 1


RSF = {"model.routed_scaling_factor": 2.5}
CORRECT = [
    (ReplicatedSharedScaled, TP_SERIAL),
    (ReplicatedSharedScaled, TP_SERIAL.with_(**RSF)),
    (ReplicatedSharedScaled, TP_AUX.with_(**{"parallel.tp": 4, "model.moe_intermediate": 1024})),
    (ReduceScatterAllGather, TP_SERIAL),
    (ReduceScatterAllGather, TP_AUX.with_(**RSF)),
    (AddSharedThenReduceBoth, FI_SHARED),
    (AddSharedThenReduceBoth, FI_SHARED.with_(**RSF)),
]


@pytest.mark.parametrize("runner,scenario", CORRECT, ids=lambda v: getattr(v, "__name__", None) or v.name)
def test_correct_but_unusual_runner_is_clean(runner, scenario):
    trace = simulate(scenario, runner)
    assert not trace.hazards, [str(h) for h in trace.hazards]
    for coeffs in trace.outputs.values():
        assert coeffs and all(c == 1.0 for c in coeffs.values()), coeffs


@given(moe_scenarios(max_world=4), st.sampled_from([ReplicatedSharedScaled, ReduceScatterAllGather]))
@settings(max_examples=80, deadline=None)
def test_correct_but_unusual_runners_are_clean_on_generated_scenarios(s, runner):
    assume(all(t % s.parallel.tp == 0 for t in s.token_counts))  # reduce-scatter needs divisible rows
    assert_no_hazard(runner, s)


def test_correct_runners_exercise_what_they_claim():
    # Replicated shared experts: one "full" source, summed over TP after 1/tp.
    trace = simulate(TP_SERIAL, ReplicatedSharedScaled)
    assert set(trace.outputs[0]) == {"routed@tp0", "routed@tp1", "shared@full"}
    assert [st.name for st in trace.steps[0] if st.op == "all_reduce"] == ["final_all_reduce"]
    # The FI scenario's combine reduces, so the fixed runner reduces shared apart.
    fixed = [st.name for st in simulate(FI_SHARED, "fixed").steps[0] if st.op == "all_reduce"]
    mine = [st.name for st in simulate(FI_SHARED, AddSharedThenReduceBoth).steps[0] if st.op == "all_reduce"]
    assert fixed == ["shared_all_reduce"] and mine == ["final_all_reduce"]
    rs = [st.op for st in simulate(TP_SERIAL, ReduceScatterAllGather).steps[0]]
    assert "reduce_scatter" in rs and "all_gather" in rs and "all_reduce" not in rs


# ---------------------------------------------------------------- usage errors


class UnknownGroup(MoERunner):
    def final_reduce(self, ops, result, routed_reduced):
        return ops.all_reduce(result, "tensor", name="final_all_reduce")


class NotATensor(MoERunner):
    def final_reduce(self, ops, result, routed_reduced):
        return ops.all_reduce(result.shape, "tp", name="final_all_reduce")


class WaitOnName(MoERunner):
    def launch_shared_on_aux(self, ops, x, sharded):
        with ops.stream("aux"):
            ops.wait_event("fork_to_aux", name="aux_waits_fork")
            return ops.shared_experts(x, sharded=sharded), ops.record_event("shared_done")


@pytest.mark.parametrize("runner,scenario,step,misuse", [
    (UnknownGroup, TP_SERIAL, "final_all_reduce", "unknown group kind 'tensor'"),
    (NotATensor, TP_SERIAL, "final_all_reduce", "must be a tensor an op returned, got tuple"),
    (WaitOnName, TP_AUX, "aux_waits_fork", "needs an event from record_event, got str"),
])
def test_ops_misuse_raises_a_usage_error_naming_the_step(runner, scenario, step, misuse):
    with pytest.raises(RunnerUsageError) as info:
        simulate(scenario, runner)
    err = info.value
    assert isinstance(err, OpsUsageError) and isinstance(err, ValueError)
    assert err.step == step and misuse in str(err) and f"step {step}" in str(err)
    assert "\n" not in str(err)


def test_cli_usage_error_exits_2_with_one_line(capsys, tmp_path):
    f = tmp_path / "misuse.py"
    f.write_text(
        "from scenarios.runners import MoERunner\n"
        "class UnknownGroup(MoERunner):\n"
        "    def final_reduce(self, ops, result, reduced):\n"
        "        return ops.all_reduce(result, 'tensor', name='final_all_reduce')\n"
    )
    code = main(["simulate", "r3-tp-decode", "--runner", f"{f}:UnknownGroup"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "final_all_reduce" in err and "unknown group kind 'tensor'" in err


# ---------------------------------------------------------------- the output table


def _render(renderable):
    from rich.console import Console

    console = Console(width=200, record=True, force_terminal=False)
    console.print(renderable)
    return console.export_text()


def test_output_table_shows_missing_sources_as_zero_and_folds_shards():
    from twin.check.report import fold_sources, outputs_table

    text = _render(outputs_table(simulate(TP_SERIAL, DropFinalReduce)))
    assert "routed@tp0=1  routed@tp1=0  shared@tp0=1  shared@tp1=0" in text
    many = {f"routed@ep{i}": 1.0 for i in range(10)} | {"routed@ep10": 0.0, "shared@full": 1.0}
    assert fold_sources(many) == [("routed@ep0..ep9", 1.0), ("routed@ep10", 0.0), ("shared@full", 1.0)]
    assert fold_sources({"shared@tp1": 2.0, "shared@tp0": 2.0}) == [("shared@tp0,tp1", 2.0)]
