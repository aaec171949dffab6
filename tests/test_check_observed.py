"""What a real run shows besides wrong values is judged as such: a read the
CPU stream stand-in held back is an observed race (never a clean "agree"),
a predicted hang is not a divergence, and a race's earlier access makes the
values after it schedule-dependent."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from scenarios.spec import Scenario
from scenarios.trace import Hazard, HazardKind, OutputCheck, Step, Trace, Verdict
from twin.check.crosscheck import check, first_divergence
from twin.check.races import OBSERVED_PREFIX, Provocation, judge_race
from twin.check.report import agreement_line

RUNNERS = str(Path(__file__).resolve().parent / "observed_runners.py")

TP_AUX = Scenario(name="observed-tp-aux").with_(**{
    "model.hidden": 256, "model.moe_intermediate": 128, "model.num_experts": 8, "model.top_k": 2,
    "model.num_shared_experts": 1, "model.shared_intermediate": 512, "parallel.tp": 2,
    "runtime.platform": "cuda", "runtime.aux_stream": True, "workload.tokens": 8, "workload.seed": 4,
})
DP_ATTN = Scenario(name="observed-dp-attention").with_(**{
    "model.hidden": 128, "model.moe_intermediate": 64, "model.num_experts": 8, "model.top_k": 2,
    "model.num_shared_experts": 1, "parallel.tp": 2, "parallel.dp": 2, "runtime.platform": "cuda",
    "workload.tokens": [4, 3], "workload.seed": 6,
})
IDLE_DP = Scenario(name="observed-idle-dp").with_(**{
    "model.hidden": 128, "model.moe_intermediate": 64, "model.num_experts": 8, "model.top_k": 2,
    "parallel.tp": 1, "parallel.dp": 2, "parallel.ep": True, "workload.tokens": [4, 0], "workload.seed": 8,
})


def _pair(n: int = 3) -> tuple[Trace, Trace]:
    sim, real = Trace("sim", "s", "r", 1), Trace("real", "s", "r", 1)
    sim.steps[0] = [Step(0, i, "add", f"s{i}") for i in range(n)]
    real.steps[0] = [Step(0, i, "add", f"s{i}") for i in range(n)]
    real.output_checks[0] = OutputCheck(0, True, 0.0, 0.0, 0, 4, [], "", None)
    return sim, real


# ---------------------------------------------------------------- hand-made traces


def test_a_hang_the_simulator_predicted_is_not_a_divergence() -> None:
    sim, real = _pair()
    real.steps[0] = []  # the rank timed out: its steps are lost with it
    real.hazards.append(Hazard(HazardKind.HANG, 2, "s2", 0, "rank timed out"))
    assert first_divergence(sim, real) is not None  # not predicted: the lost rank diverges
    sim.hazards.append(Hazard(HazardKind.HANG, 1, "s1", 0, "waits in dispatch"))
    assert first_divergence(sim, real) is not None  # predicted elsewhere: still a divergence
    sim.hazards.append(Hazard(HazardKind.HANG, 2, "s2", 0, "waits in dispatch"))
    assert first_divergence(sim, real) is None


def test_values_after_a_races_earlier_access_are_not_compared() -> None:
    sim, real = _pair(4)
    real.steps[0][1].value, real.steps[0][1].residual = {"x": 2.0}, 0.0  # the early reader saw the late write

    from sim import algebra
    v = algebra.Value((algebra.Block("d0", 4, ((("x", "", None), 1.0),)),))
    sim.values = {0: {i: v for i in range(4)}}
    sim.hazards.append(Hazard(HazardKind.UNSAFE_OVERLAP, 3, "s3", 0, "s3 (main) writes ...; no event"))
    assert first_divergence(sim, real) == (0, 1, "coefficients: sim {'x': 1.0} vs real {'x': 2.0}")
    sim.hazards[0].opaque_from = 1
    assert first_divergence(sim, real) is None


def test_an_observed_race_is_never_called_not_provoked_nor_a_clean_agreement() -> None:
    sim, real = _pair()
    h = Hazard(HazardKind.UNSAFE_OVERLAP, 2, "s2", 0, "s2 (main) reads a buffer that step 1 s1 (aux) writes",
               opaque_from=1)
    sim.hazards.append(h)

    class Base:
        trace = real

    cache = {"campaign": Provocation(tried=["'aux' by 10 ms"])}
    quiet = judge_race(TP_AUX, None, sim, Base, h, 10.0, lambda _m: None, cache)
    assert quiet.verdict == Verdict.INCONCLUSIVE and "not provoked" in quiet.reason
    real.hazards.append(Hazard(HazardKind.UNSAFE_OVERLAP, 2, "s2", 0,
                               "step 2 s2 (main) read the output of step 1 (aux) before it was produced"))
    seen = judge_race(TP_AUX, None, sim, Base, h, 10.0, lambda _m: None, cache)
    assert seen.verdict == Verdict.INCONCLUSIVE and seen.reason.startswith(OBSERVED_PREFIX)
    assert "not provoked" not in seen.reason and "stand-in" in seen.reason


def test_an_over_counted_input_makes_its_non_linear_consumers_values_opaque() -> None:
    from sim import simulate

    trace = simulate(DP_ATTN, f"{RUNNERS}:GatherPartialOfReplicated")
    doubled = [h for h in trace.hazards if h.kind == HazardKind.DOUBLE_REDUCTION]
    assert doubled and all(h.opaque_from is not None and h.opaque_from > h.step for h in doubled)
    for h in doubled:  # from the consumer the detail names on
        assert trace.steps[h.rank][h.opaque_from].op == "router" and f"at step {h.opaque_from}" in h.detail


# ---------------------------------------------------------------- real ranks


@pytest.mark.slow
def test_a_lost_join_is_observed_at_the_predicted_step_and_not_headlined_agree() -> None:
    result = check(TP_AUX, f"{RUNNERS}:NoJoinOnAux", timeout_s=60)
    predicted = {(h.rank, h.step) for h in result.sim.hazards if h.kind == HazardKind.UNSAFE_OVERLAP}
    observed = {(h.rank, h.step) for h in result.real.hazards if h.kind == HazardKind.UNSAFE_OVERLAP}
    assert predicted and observed and observed <= predicted
    races = [v for v in result.verdicts if v.kind == "UNSAFE_OVERLAP"]
    # The stand-in held the early read: the output is right, so never CONFIRMED.
    assert races and all(v.verdict == Verdict.INCONCLUSIVE for v in races)
    assert all(v.reason.startswith(OBSERVED_PREFIX) for v in races if (v.rank, v.step) in observed)
    line = agreement_line(result)
    assert "observed the predicted race" in line.plain and line.style != "green"


@pytest.mark.slow
def test_an_over_counted_input_is_a_confirmed_prediction_not_a_divergence() -> None:
    result = check(DP_ATTN, f"{RUNNERS}:GatherPartialOfReplicated", timeout_s=60)
    assert result.divergence is None and result.confirmed_as_predicted


@pytest.mark.slow
def test_a_predicted_hang_is_headlined_as_a_confirmed_prediction() -> None:
    result = check(IDLE_DP, f"{RUNNERS}:IdleRankSkipsMoE", timeout_s=8)
    assert [v.verdict for v in result.verdicts if v.kind == "HANG"] == [Verdict.CONFIRMED]
    assert result.divergence is None and result.confirmed_as_predicted
    assert agreement_line(result).plain.startswith("prediction confirmed")


@pytest.mark.slow
@pytest.mark.parametrize("main_delay_s", [None, 0.3])
def test_an_in_place_race_read_early_in_program_order_is_no_divergence(main_delay_s, monkeypatch) -> None:
    """Whether the unperturbed run shows the race is up to its threads'
    schedule (a loaded machine may run the shared read first: delaying the
    main stream forces that): either way no divergence, the race CONFIRMED
    (by the wrong output, else by a provoked run), and "confirmed as
    predicted" exactly when an output came out wrong."""
    import real.runner

    run_real, calls = real.runner.run_real, []

    def base_delayed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - passes everything on
        if main_delay_s is not None and not calls:
            kwargs["delay"] = {"main": main_delay_s}
        calls.append(kwargs.get("delay"))
        return run_real(*args, **kwargs)

    monkeypatch.setattr(real.runner, "run_real", base_delayed)
    result = check(TP_AUX, f"{RUNNERS}:RoutedInplaceBesideShared", timeout_s=60)
    assert result.divergence is None
    assert [(v.kind, v.verdict.value) for v in result.verdicts] == [("UNSAFE_OVERLAP", "CONFIRMED")] * 2
    wrong = [r for r, c in result.real.output_checks.items() if not c.correct]
    assert result.confirmed_as_predicted == bool(wrong)
    if main_delay_s is not None:  # the shared read ran first: only a provoked run shows the race
        assert not wrong and len(calls) > 1


# ---------------------------------------------------------------- a scaling bug reads like a reduction bug


def _scaled_twice() -> type:
    from scenarios.runners import MoERunner

    class ScaledTwice(MoERunner):
        def join_outputs(self, ops, shared, routed):  # noqa: ANN001, ANN202 - a runner under test
            routed = ops.scale(routed, self.scenario.model.routed_scaling_factor, name="extra_scaling")
            return super().join_outputs(ops, shared, routed)

    return ScaledTwice


def _reduced_twice() -> type:
    from scenarios.runners import MoERunner

    class ReducedTwice(MoERunner):
        def final_reduce(self, ops, result, routed_reduced):  # noqa: ANN001, ANN202
            return super().final_reduce(ops, super().final_reduce(ops, result, routed_reduced), routed_reduced)

    return ReducedTwice


@pytest.mark.parametrize("runner,hinted", [(_scaled_twice, True), (_reduced_twice, False)])
def test_an_over_count_by_the_routed_scaling_factor_says_so(runner, hinted: bool) -> None:  # noqa: ANN001
    from sim import simulate

    s = TP_AUX.with_(**{"model.routed_scaling_factor": 2.5, "runtime.aux_stream": False})
    doubled = [h.detail for h in simulate(s, runner()).hazards if h.kind == HazardKind.DOUBLE_REDUCTION]
    assert doubled and all(("routed_scaling_factor" in d) == hinted for d in doubled), doubled


def test_the_scale_hint_names_the_factor_or_its_inverse_only() -> None:
    from sim.checks import scale_hint

    assert "applied twice" in scale_hint("routed@tp0 coefficient 2.5, expected 1", 2.5)
    assert "never applied" in scale_hint("output holds routed@ep0,ep1 coefficient 0.4, expected 1", 2.5)
    assert scale_hint("routed@tp0 coefficient 2, expected 1", 2.5) == ""  # a reduction count, not the factor
    assert scale_hint("routed@tp0 coefficient 2.5, expected 1", 1.0) == ""
    # Only routed sources take the factor: elsewhere it was applied to the wrong part.
    assert "applied to shared too" in scale_hint("shared@moe_tp1 coefficient 2.5, expected 1", 2.5)
    assert "applied to x too" in scale_hint("routed experts input x coefficient 2.5, expected 1", 2.5)


def test_an_output_no_fit_explains_shows_no_coefficients() -> None:
    from rich.console import Console

    from twin.check.report import outputs_table

    def table(residual: float) -> str:
        _sim, real = _pair()
        fit = {"routed@tp0": 4.4, "shared@full": 4.5}
        real.steps[0][-1].value, real.steps[0][-1].residual = dict(fit), residual
        real.outputs[0] = fit
        console = Console(width=120, file=io.StringIO())
        console.print(outputs_table(real))
        return console.file.getvalue()

    assert "not a combination of the expected sources (fit residual 0.15)" in table(0.15)
    assert "routed@tp0=4.4" in table(1e-9)  # an exact fit: its coefficients are the finding


# ---------------------------------------------------------------- a kernel told how many rows are tokens


def test_valid_rows_zero_the_rows_after_them_and_keep_the_tokens() -> None:
    from sim import algebra

    v = algebra.concat([algebra.leaf("d0", 4, "routed", "tp0"), algebra.leaf("d1", 3, "routed", "tp0")])
    z = algebra.zero_rows_from(v, 5)
    assert z.rows == 7 and [b.rows for b in z.blocks] == [4, 1, 2]
    assert [bool(b.terms) for b in z.blocks] == [True, True, False]
    assert [b.key for b in z.blocks] == ["d0", "d1[0:1]", "d1[1:3]"]  # the rows are still those tokens


@pytest.mark.parametrize("runner,missing", [("MasksGatheredRowsWithLocalCount", True),
                                            ("MasksGatheredRowsWithTheirCount", False)])
def test_masking_gathered_rows_with_the_local_count_drops_the_other_dp_ranks(runner: str, missing: bool) -> None:
    from sim import simulate

    trace = simulate(DP_ATTN, f"{RUNNERS}:{runner}")
    kinds = {(h.kind, h.rank) for h in trace.hazards}
    assert kinds == ({(HazardKind.MISSING_REDUCTION, r) for r in range(4)} if missing else set())
    if missing:  # DP rank 0's last row was past DP rank 1's count: only that row lacks tp2, tp3
        detail = {h.rank: h.detail for h in trace.hazards}
        assert detail[0].endswith("routed@tp2,tp3 coefficient 0, expected 1 in rows [d0t3]"), detail[0]


def test_valid_rows_past_the_input_is_a_usage_error() -> None:
    from sim import simulate
    from sim.errors import RunnerUsageError

    with pytest.raises(RunnerUsageError, match="valid_rows 5 is not within the input's 4 rows"):
        simulate(DP_ATTN.with_(**{"parallel.dp": 1, "workload.tokens": 4}), f"{RUNNERS}:MasksPastItsRows")


@pytest.mark.slow
def test_masking_gathered_rows_with_the_local_count_is_confirmed_on_real_ranks() -> None:
    result = check(DP_ATTN, f"{RUNNERS}:MasksGatheredRowsWithLocalCount", timeout_s=60)
    assert result.divergence is None and result.confirmed_as_predicted
    assert {v.verdict for v in result.verdicts} == {Verdict.CONFIRMED}


@pytest.mark.slow
def test_a_kernel_told_every_row_agrees_on_real_ranks() -> None:
    result = check(DP_ATTN, f"{RUNNERS}:MasksGatheredRowsWithTheirCount", timeout_s=60)
    assert result.agree and not result.sim.hazards and not result.real.hazards


# ---------------------------------------------------------------- a wrong router input


TP_PLAIN = TP_AUX.with_(**{"runtime.aux_stream": False})


def test_a_wrong_value_records_who_took_it() -> None:
    from sim import simulate

    doubled = [h for h in simulate(TP_PLAIN, f"{RUNNERS}:RouterOnReducedInput").hazards]
    assert doubled and all(h.kind == HazardKind.DOUBLE_REDUCTION and h.consumers == ["router"] for h in doubled)
    both = [h for h in simulate(DP_ATTN, f"{RUNNERS}:GatherPartialOfReplicated").hazards
            if h.kind == HazardKind.DOUBLE_REDUCTION]
    assert both and all(h.consumers[0] == "router" and len(h.consumers) > 1 for h in both)


@pytest.mark.parametrize("consumers,verdict", [(["router"], Verdict.INCONCLUSIVE),
                                               (["router", "routed experts"], Verdict.REFUTED), (None, Verdict.REFUTED)])
def test_a_correct_output_refutes_a_wrong_input_unless_only_the_router_took_it(consumers, verdict) -> None:  # noqa: ANN001
    from twin.check.verdicts import judge_characterised, judge_reduction

    sim, real = _pair()
    h = Hazard(HazardKind.DOUBLE_REDUCTION, 1, "s1", 0, "x coefficient 2, expected 1 (fed to router at step 2)",
               consumers=consumers)
    assert judge_reduction(sim, real, h, 1.0).verdict == verdict
    w = Hazard(HazardKind.WRONG_INPUT, 2, "s2", 0, "router input is ...", consumers=consumers)
    assert judge_characterised(real, w).verdict == verdict


@pytest.mark.slow
def test_an_over_counted_router_input_is_inconclusive_on_real_ranks() -> None:
    result = check(TP_PLAIN, f"{RUNNERS}:RouterOnReducedInput", timeout_s=60)
    assert result.verdicts and all(v.verdict == Verdict.INCONCLUSIVE and "only the router" in v.reason
                                   and v.reason.startswith("measured x=2") for v in result.verdicts)
    assert result.agree


@pytest.mark.slow
def test_an_idle_dp_rank_under_max_len_padding_runs_on_real_ranks() -> None:
    # Its padded block holds padding rows only: the real router routed them
    # like "the rank's first token", which an idle rank does not have.
    idle = DP_ATTN.with_(**{"workload.tokens": [3, 0]})
    result = check(idle, "sglang", timeout_s=60)
    assert result.agree and not result.real.hazards


# ---------------------------------------------------------------- a lost overlap, against its own engine


def test_a_lost_overlap_is_measured_against_the_runners_own_engine() -> None:
    from twin.check.crosscheck import overlap_reference

    assert overlap_reference(TP_AUX, "fixed") == "fixed"
    assert overlap_reference(TP_AUX, "sglang") == "sglang"
    assert overlap_reference(TP_AUX, "trtllm") == "trtllm"
    assert overlap_reference(TP_AUX, f"{RUNNERS}:SGLangNeverOverlaps") == "sglang"
    assert overlap_reference(TP_AUX, f"{RUNNERS}:NoJoinOnAux") == "fixed"


@pytest.mark.slow
def test_sglangs_lost_dual_stream_is_judged_against_sglangs_overlap() -> None:
    s = TP_AUX.with_(**{"runtime.platform": "rocm", "parallel.version": "previous", "workload.tokens": 6,
                        "workload.seed": 16})
    result = check(s, f"{RUNNERS}:SGLangNeverOverlaps", timeout_s=60)
    lost = [v for v in result.verdicts if v.kind == "LOST_OVERLAP"]
    assert lost and all(" vs sglang " in v.reason for v in lost)


@pytest.mark.parametrize("runner,engine", [("TrtllmForcesTheAuxStream", "maybe_execute_in_parallel"),
                                           ("VllmForcesTheAuxStream", "vLLM's SharedExperts")])
def test_a_missing_stream_names_what_the_runners_own_engine_does(runner: str, engine: str) -> None:
    from sim import simulate

    s = TP_AUX.with_(**{"runtime.platform": "cpu"})
    missing = [h.detail for h in simulate(s, f"{RUNNERS}:{runner}").hazards if h.kind == HazardKind.MISSING_STREAM]
    assert missing and all(engine in d for d in missing), missing


def test_a_sum_of_other_tokens_rows_names_every_source_that_took_them() -> None:
    from sim import simulate

    s = IDLE_DP.with_(**{"model.num_shared_experts": 1, "workload.tokens": [4, 4]})
    mixed = [h.detail for h in simulate(s, f"{RUNNERS}:TrtllmReducesUnderAttentionDp").hazards
             if "different token sets" in h.detail]
    assert mixed and all(d.startswith("routed@ep0,ep1 and shared@full of 2 different token sets") for d in mixed), mixed


# ---------------------------------------------------------------- the real interpreter's own failures


def test_a_programming_error_inside_an_op_is_the_interpreters() -> None:
    from real.errors import IN_OP, INTERNAL, RUNNER, SHAPE, error_kind, internal_error
    from scenarios.ops import OpsShapeError

    def tagged(exc: BaseException) -> BaseException:
        setattr(exc, IN_OP, True)
        return exc

    assert error_kind(tagged(IndexError("tuple index out of range"))) == INTERNAL
    assert error_kind(IndexError("raised by the runner's own code")) == RUNNER
    assert error_kind(tagged(RuntimeError("a torch error"))) == RUNNER
    assert error_kind(tagged(OpsShapeError("gate expects width 128, got 64"))) == SHAPE
    steps = [Step(0, i, "router", "router") for i in range(3)]
    err = internal_error({1: {"error": "IndexError: list index out of range", "error_kind": INTERNAL,
                              "error_step": 2, "steps": steps}})
    assert err is not None and "rank 1 at step 2 router" in str(err) and "not of the runner" in str(err)


@pytest.mark.slow
def test_an_interpreter_failure_on_a_rank_ends_check_with_exit_3_and_one_line() -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    p = subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "run", "r3-tp-decode",
                        "--runner", f"{RUNNERS}:BreaksTheRealRouter", "--timeout", "60"],
                       cwd=root, capture_output=True, text=True, timeout=300)
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and "calibrat" not in ln]
    assert p.returncode == 3, p.stderr
    assert any("the real interpreter failed on rank" in ln and "IndexError" in ln for ln in lines), p.stderr
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_other_tokens_partial_sums_summed_in_are_characterised_per_shard() -> None:
    s = DP_ATTN.with_(**{"runtime.allreduce_fusion": True, "workload.tokens": [4, 4]})
    result = check(s, f"{RUNNERS}:FusesWithTheNextLayerUnderDpAttention", timeout_s=60)
    causes = [c.cause for c in result.real.output_checks.values() if not c.correct]
    assert causes and all(c.startswith("outputs of other tokens summed in") and "[tokens d" in c for c in causes), causes
    assert result.divergence is None and result.confirmed_as_predicted


# ---------------------------------------------------------------- a missing shard that holds nothing


# Seed 66: both tokens route only to experts 0-3 (rank 0's); rank 1's experts get nothing.
EP_ONE_SIDED = Scenario(name="observed-ep-one-sided").with_(**{
    "model.hidden": 128, "model.moe_intermediate": 64, "model.num_experts": 8, "model.top_k": 2,
    "parallel.tp": 2, "parallel.ep": True, "workload.tokens": 2, "workload.seed": 66,
})


def test_a_missing_shard_that_holds_nothing_for_the_tokens_is_empty_or_unobservable() -> None:
    from scenarios.workload import route_arrays
    from sim import simulate
    from twin.check.verdicts import _missing_hold_nothing, predicted_empty_rows

    assert {int(e) // 4 for e in route_arrays(EP_ONE_SIDED)[0][0].flatten()} == {0}  # the premise
    sim = simulate(EP_ONE_SIDED, f"{RUNNERS}:SkipsFinalReduceUnderEp")
    h0, h1 = sorted((h for h in sim.hazards if h.kind == HazardKind.MISSING_REDUCTION), key=lambda h: h.rank)
    # Rank 1 holds only its own shard, which none of the tokens routes to: its rows are predicted empty.
    assert predicted_empty_rows(sim, h1, EP_ONE_SIDED) == ["d0t0", "d0t1"]
    # Rank 0 lacks rank 1's shard, which holds nothing for them: exact rows, the fault unobservable here.
    assert predicted_empty_rows(sim, h0, EP_ONE_SIDED) == [] and _missing_hold_nothing(sim, h0, EP_ONE_SIDED)
    assert not _missing_hold_nothing(sim, h1, EP_ONE_SIDED)
    other = simulate(EP_ONE_SIDED.with_(**{"workload.seed": 3}), f"{RUNNERS}:SkipsFinalReduceUnderEp")
    assert not any(_missing_hold_nothing(other, h, EP_ONE_SIDED.with_(**{"workload.seed": 3}))
                   for h in other.hazards if h.kind == HazardKind.MISSING_REDUCTION)


@pytest.mark.slow
def test_a_missing_shard_that_holds_nothing_is_judged_on_real_ranks() -> None:
    result = check(EP_ONE_SIDED, f"{RUNNERS}:SkipsFinalReduceUnderEp", timeout_s=60)
    verdicts = {v.rank: v for v in result.verdicts if v.kind == "MISSING_REDUCTION"}
    assert result.real.output_checks[0].correct and not result.real.output_checks[1].correct
    assert verdicts[0].verdict == Verdict.INCONCLUSIVE and "cannot show the missing reduction" in verdicts[0].reason
    assert verdicts[1].verdict == Verdict.CONFIRMED and "zero, as predicted" in verdicts[1].reason


# ---------------------------------------------------------------- collectives the ranks may order differently


AUX_SKEW = Scenario(name="observed-aux-collectives").with_(**{
    "model.hidden": 256, "model.moe_intermediate": 512, "model.num_experts": 8, "model.top_k": 2,
    "model.num_shared_experts": 1, "model.shared_intermediate": 256, "parallel.tp": 2, "parallel.ep": True,
    "runtime.platform": "cuda", "runtime.aux_stream": True, "workload.tokens": 32, "workload.seed": 0,
    "workload.skew": 0.95,
})


def test_collectives_over_one_group_on_two_unordered_streams_are_an_unsafe_overlap() -> None:
    from sim import simulate
    from sim.hazards import COLLECTIVE_ORDER

    found = [h for h in simulate(AUX_SKEW, f"{RUNNERS}:SharedReducesOnAuxJoinedLate").hazards
             if h.kind == HazardKind.UNSAFE_OVERLAP]
    assert sorted(h.rank for h in found) == [0, 1]
    assert all(COLLECTIVE_ORDER in h.detail and h.step_name == "final_all_reduce" for h in found), found
    assert all("shared_experts_all_reduce (aux)" in h.detail for h in found)
    # Ordered by the wait before the post-experts all-reduce: nothing to report.
    assert simulate(AUX_SKEW, f"{RUNNERS}:SharedReducesOnAuxJoinedFirst").hazards == []


@pytest.mark.slow
def test_collectives_the_ranks_may_order_differently_are_never_refuted_nor_unpredicted() -> None:
    """Which order each rank's threads take is the schedule's: a hang, a
    mismatch, crossed sums or the same order; a hang or mismatch at either
    collective is the prediction's, never an unpredicted finding."""
    result = check(AUX_SKEW, f"{RUNNERS}:SharedReducesOnAuxJoinedLate", timeout_s=10)
    kinds = {(v.kind, v.verdict.value) for v in result.verdicts}
    assert kinds <= {("UNSAFE_OVERLAP", "CONFIRMED"), ("UNSAFE_OVERLAP", "INCONCLUSIVE")}, kinds
    assert not result.agree or not [c for c in result.real.output_checks.values() if not c.correct]
