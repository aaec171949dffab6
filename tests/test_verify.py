"""`verify`: the decision space, the read log that prunes it, soundness of the
pruning, and what it finds (every historical regression; nothing on fixed)."""

import json
from functools import cache
from pathlib import Path

import pytest
from default_space import verified_default
from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.loader import load
from scenarios.runners import BEFORE_RUNNERS, MoERunner
from scenarios.space import (
    SPACES,
    Enumeration,
    assignment_scenario,
    assignments,
    classify,
    restrict,
    space_axes,
)
from scenarios.spec import ScenarioError
from sim import simulate
from twin.check.replay import CASES
from twin.search.explore_oracle import trace_findings
from twin.search.verify import assert_verified, check_shard, merge, verify
from twin.search.verify_record import reads, recording, same_reads

DEFAULT = space_axes("default")
# Small enough to simulate every class in a few seconds, with every kind of
# decision still in it (SP, reducing and non-reducing backends, the unsafe
# EPLB overlap, multi-stream, padding, a non-linear transform, fusion).
SMALL = restrict(DEFAULT, backend=("allgather_reducescatter", "deepep_low_latency", "flashinfer_nvlink_two_sided"),
                 platform=("cpu", "cuda"), latent=("none", "nonlinear"), version=("newest",))


@cache
def _verified(runner: str, space: str = "small", prune: bool = True):
    axes = SMALL if space == "small" else space
    return verify(runner, axes, max_world=4, prune=prune, keep_outcomes=True, polish_findings=False)


def _signatures(res) -> set[str]:
    return {f.signature for f in res.findings}


# ---------------------------------------------------------------- the space


def test_assignments_are_representative_and_invalid_ones_are_skipped():
    every = list(assignments(DEFAULT, 4))
    assert every[0]["tp"] == 1 and every[0]["backend"] == "allgather_reducescatter"  # simplest first
    invalid = 0
    for a in every[:: max(1, len(every) // 400)]:
        try:
            s = assignment_scenario(DEFAULT, a, "fixed")
        except ScenarioError as exc:
            invalid += 1
            # EPLB without EP or on one rank; a backend of the newest version only;
            # the previous version's known non-linear-transform defect; a weight
            # block without shared experts; a row-parallel up-projection under SP;
            # an idle DP rank with one DP rank.
            assert exc.field_name in ("parallel.eplb", "parallel.backend", "model.transform_nonlinear",
                                      "model.weight_block_size", "model.latent_up_parallel",
                                      "workload.tokens"), exc
            continue
        assert s.parallel.tp == a["tp"] and s.parallel.backend == a["backend"]
        assert s.model.has_shared == bool(a["shared"]) and s.model.padded == a["padded"]
        assert all(c % 2 == 1 for c in s.token_counts[:-1])  # an uneven SP split over tp = 2
        assert s.token_counts[-1] == (0 if a["idle_dp_rank"] else 3)
    assert invalid > 0


def test_enumeration_indexes_the_product_without_listing_it():
    e = Enumeration(DEFAULT, 2)
    listed = list(assignments(DEFAULT, 2))
    got = [a for a in (e.get(i) for i in range(len(e))) if a is not None]
    assert got == listed
    for i in (0, 1, 777, len(e) - 1):
        a = e.get(i)
        assert a is None or e.index(tuple(a.values())) == i
    assert len(Enumeration(SPACES["wide"], 8)) > 10**6


def test_restrict_names_unknown_axes_and_values():
    with pytest.raises(ScenarioError, match="unknown axes"):
        restrict(DEFAULT, nope=(1,))
    with pytest.raises(ScenarioError, match="space.tp"):
        restrict(DEFAULT, tp=(3,))


def test_wide_space_adds_axes():
    names = {a.name for a in SPACES["wide"]}
    assert {"ep_size", "tokens", "quantized_input", "routed_scaling_factor"} <= names
    assert names > {a.name for a in DEFAULT}


# ---------------------------------------------------------------- the read log


def test_reads_log_outermost_predicates_with_values():
    s = assignment_scenario(DEFAULT, {**next(assignments(DEFAULT, 4)), "tp": 2, "dp": 2, "ep": True,
                                      "backend": "deepep_low_latency", "shared": 1}, "fixed")
    with reads() as log:
        simulate(recording(s), "fixed")
    paths = log.consulted()
    assert log.values[("sp", None)] is True
    assert "parallel.version" not in paths  # read inside `sp` only: not a predicate of its own
    assert not log.opaque and same_reads(s, log)
    assert not same_reads(s.with_(**{"parallel.dp": 1, "parallel.backend": "allgather_reducescatter"}), log)


@pytest.mark.parametrize("runner", ["sglang", "trtllm"])
def test_an_engine_runners_reads_are_plain_data(runner):
    # The engine's view of the scenario copies its fields as attribute reads
    # (one call returning them all as a dict would leave nothing prunable).
    s = assignment_scenario(DEFAULT, {**next(assignments(DEFAULT, 4)), "tp": 1 if runner == "trtllm" else 2,
                                      "dp": 2, "ep": True, "shared": 1}, runner)
    with reads() as log:
        simulate(recording(s), runner)
    assert not log.opaque and same_reads(s, log)


def test_a_read_that_is_not_plain_data_makes_the_run_stand_for_nothing():
    class Copies(MoERunner):
        def should_pad(self):
            return self.scenario.with_(name="x").model.padded

    s = assignment_scenario(DEFAULT, next(assignments(DEFAULT, 4)), "fixed")
    with reads() as log:
        simulate(recording(s), Copies)
    assert log.opaque and not same_reads(s, log)


@pytest.mark.parametrize("space,max_world", [("default", 4), ("wide", 8)])
def test_each_representative_is_in_its_own_class(space, max_world):
    """The scenario an assignment becomes classifies back to that assignment:
    its sizes (e.g. uneven batches) keep it on the assignment's side of every
    predicate, so a finding of explore in a class is a finding of verify there."""
    axes = SPACES[space]
    every = Enumeration(axes, max_world)
    checked = 0
    # 6000 samples: the knobs that need shared experts or no SP (fusion, the
    # weight block, a row-parallel up-projection) leave about one in seven valid.
    for i in range(0, len(every), max(1, len(every) // 6000)):
        a = every.get(i)
        if a is None:
            continue
        try:
            s = assignment_scenario(axes, a, "fixed")
        except ScenarioError:
            continue
        assert classify(s, axes) == a, s.summary_line()
        checked += 1
    assert checked > 500


# ---------------------------------------------------------------- soundness of the pruning


@given(st.data())
@settings(max_examples=120, deadline=None)
def test_a_pruned_class_has_the_outcome_of_its_representative(data):
    """Any class of the small space, simulated on its own, shows exactly the
    findings verify assigned to it (from the class it was pruned into)."""
    runner = data.draw(st.sampled_from(("fixed", "before-40673", "before-39222", "before-38990")))
    res = _verified(runner)
    i = data.draw(st.sampled_from(sorted(res.outcomes)))
    s = assignment_scenario(SMALL, Enumeration(SMALL, 4).get(i), runner)
    assert frozenset(trace_findings(simulate(s, runner))) == res.outcomes[i]


@pytest.mark.slow
@pytest.mark.parametrize("runner", ("fixed", *BEFORE_RUNNERS, "no-early-trim-40865", "first-fix-40865"))
def test_pruned_and_unpruned_enumerations_agree_class_by_class(runner):
    pruned, full = _verified(runner), _verified(runner, prune=False)
    assert full.pruned == 0 and pruned.pruned > pruned.classes // 2
    assert pruned.classes == full.classes and pruned.invalid == full.invalid
    assert pruned.outcomes == full.outcomes
    assert _signatures(pruned) == _signatures(full)


# ---------------------------------------------------------------- what it finds


def test_small_space_finds_the_regressions_and_nothing_on_fixed():
    assert _verified("fixed").proved_clean
    assert "no hazard in" in _verified("fixed").statement()
    for runner, kind in (("before-40673", "DOUBLE_REDUCTION"), ("before-39222", "UNSAFE_OVERLAP"),
                         ("before-38990", "LOST_OVERLAP")):
        assert kind in {f.kind for f in _verified(runner).findings}, runner


@pytest.mark.slow
def test_default_space_proves_fixed_clean():
    # Its cost is a benchmark figure (benchmarks/bench_cover.py), not a test limit.
    res = verify("fixed", jobs=1)
    assert res.proved_clean, [f.signature for f in res.findings]
    assert res.pruned > res.classes // 2


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.runner)
def test_default_space_finds_every_historical_regression(case):
    res = verified_default(case.runner)
    found = _signatures(res)
    assert case.expected in {f.kind for f in res.findings}
    # Every signature the regression's catalog scenario shows is among them.
    assert set(trace_findings(simulate(load(case.scenario), case.runner))) <= found
    for f in res.findings:  # each minimal scenario still shows its finding
        assert f.signature in trace_findings(simulate(f.scenario, case.runner))


@pytest.mark.parametrize("runner", ("before-40673", "stale-cache-40673", "before-39222", "before-40865"))
def test_whatever_explore_finds_verify_finds_on_its_class(runner):
    """explore's search (Hypothesis, sizes drawn freely) meets no finding
    that verify's one small representative of the same class misses."""
    from twin.search.explore import explore

    wide = SPACES["wide"]
    res = explore(runner, budget=150, seed=0, out=None, do_shrink=False)
    assert res.findings
    for f in res.findings:
        a = classify(f.found, wide)
        assert a is not None, f.found.summary_line()
        one = verify(runner, restrict(wide, **{k: (v,) for k, v in a.items()}), max_world=8,
                     polish_findings=False)
        assert one.classes == 1 and f.signature in _signatures(one), (f.signature, a)


# ---------------------------------------------------------------- helper, shards, CLI


def test_assert_verified_lists_findings():
    class ForgetsSPGuard(MoERunner):
        def maybe_reduce_shared(self, ops, shared, routed_reduced):
            if shared is not None and routed_reduced:
                return ops.all_reduce(shared, "tp", name="shared_all_reduce")
            return shared

    with pytest.raises(AssertionError, match="DOUBLE_REDUCTION@shared_all_reduce"):
        assert_verified(ForgetsSPGuard, space=SMALL, max_world=4)
    assert assert_verified("fixed", space=restrict(SMALL, tp=(1,)), max_world=4).proved_clean


def test_shards_cover_the_space_once_and_merge_by_signature():
    space = restrict(SMALL, dp=(2,), tp=(2,), ep=(True,))
    whole = verify("before-40673", space, max_world=4, polish_findings=False)
    parts = [verify("before-40673", space, max_world=4, shard=(i, 3), polish_findings=False).to_dict()
             for i in range(3)]
    m = merge(parts)
    assert m["classes"] == whole.classes and m["invalid"] == whole.invalid
    assert [f["signature"] for f in m["findings"]] == sorted(_signatures(whole))
    assert m["proved_clean"] is False and "distinct finding" in m["statement"]


# One cause seen at several steps downstream: a TP rank whose SP slice ends
# in padding rows doubles its shared output.
PAD_SLICE_DOUBLES = str(Path(__file__).resolve().parent / "compound_runners.py") + ":PadSliceRankDoublesShared"


def _classes_of(res, sig: str) -> set[int]:
    return {i for i, sigs in res.outcomes.items() if sig in sigs}


@pytest.mark.parametrize("runner", ("before-40673", "before-39222", PAD_SLICE_DOUBLES))
def test_findings_say_which_others_every_one_of_their_classes_showed(runner):
    """classes_found, found_with and same_classes_as agree with the
    class-by-class outcomes."""
    res = _verified(runner)
    d = res.to_dict()
    assert d["findings"]
    for f in d["findings"]:
        sig, where = f["signature"], _classes_of(res, f["signature"])
        assert f["classes_found"] == len(where) > 0
        others = _signatures(res) - {sig}
        assert f["found_with"] == sorted(o for o in others if where <= _classes_of(res, o))
        assert f["same_classes_as"] == sorted(o for o in others if where == _classes_of(res, o))
    assert sum(x["classes"] for x in d["finding_sets"]) == sum(1 for sigs in res.outcomes.values() if sigs)
    if runner == PAD_SLICE_DOUBLES:  # the doubling step is met wherever a downstream step is
        assert any("DOUBLE_REDUCTION@pad_slice_double" in f["found_with"] for f in d["findings"])


def _together(d) -> dict:
    return {f["signature"]: (f["classes_found"], f["found_with"], f["same_classes_as"]) for f in d["findings"]}


def test_findings_found_together_survive_shards_and_workers():
    space = restrict(SMALL, dp=(1, 2), tp=(2,))
    whole = _together(verify(PAD_SLICE_DOUBLES, space, max_world=4, polish_findings=False).to_dict())
    assert any(w for _, w, _ in whole.values())
    parts = [verify(PAD_SLICE_DOUBLES, space, max_world=4, shard=(i, 3), polish_findings=False).to_dict()
             for i in range(3)]
    assert _together(merge(parts)) == whole


@pytest.mark.slow
def test_findings_found_together_survive_workers():
    # A named space: a custom one runs in-process whatever --jobs says.
    one, two = (verify(PAD_SLICE_DOUBLES, "default", max_world=2, polish_findings=False, jobs=j).to_dict()
                for j in (1, 2))
    assert any(w for _, w, _ in _together(one).values()) and _together(two) == _together(one)


@pytest.mark.parametrize("bad", ["1", "3/3", "-1/2", "a/b", "0/0"])
def test_bad_shard_is_one_line(bad):
    from twin.search.explore_store import ExploreInputError

    with pytest.raises(ExploreInputError, match="--shard"):
        check_shard(bad)


def test_cli_json_shape(capsys, tmp_path):
    import cli

    code = cli.main(["verify", "--runner", "before-38990", "--max-world", "1", "--jobs", "1", "--json",
                     "--out", str(tmp_path), "--fail-on-hazard"])
    d = json.loads(capsys.readouterr().out)
    assert code == 1
    assert {"runner", "classes", "pruned", "axes", "findings", "proved_clean"} <= set(d)
    assert d["axes"]["tp"] == [1] and d["classes"] > d["pruned"] > 0
    assert d["findings"] and all(f["scenario_file"].endswith(".toml") for f in d["findings"])
    shard = tmp_path / "s.json"
    shard.write_text(json.dumps(d))
    assert cli.main(["verify", "--merge", str(shard), str(shard), "--json"]) == 0
    merged = json.loads(capsys.readouterr().out)
    assert merged["classes"] == 2 * d["classes"] and len(merged["findings"]) == len(d["findings"])
    # What every class held fixed is part of the claim.
    assert d["held_fixed"]["routed_scaling_factor"] == 1.0 and merged["held_fixed"] == d["held_fixed"]
    assert "held fixed: " in d["statement"] and "routed_scaling_factor 1.0" in d["statement"]


def test_the_default_space_has_an_idle_dp_rank():
    a = {**next(assignments(DEFAULT, 4)), "tp": 1, "dp": 2, "idle_dp_rank": True}
    s = assignment_scenario(DEFAULT, a, "fixed")
    assert s.token_counts == (3, 0) or list(s.token_counts) == [3, 0]
    assert classify(s, DEFAULT)["idle_dp_rank"] is True
    with pytest.raises(ScenarioError):
        assignment_scenario(DEFAULT, {**a, "dp": 1}, "fixed")


def test_verify_finds_an_idle_dp_rank_that_skips_the_moe_layer():
    from scenarios.runners import MoERunner

    class IdleSkips(MoERunner):
        def forward(self, ops, x):
            return x if x.shape[0] == 0 else super().forward(ops, x)

    res = verify(IdleSkips, space=restrict(DEFAULT, dp=(2,), tp=(1,), ep=(True,), platform=("cuda",)), jobs=1)
    assert {f.kind for f in res.findings} == {"HANG"}


def test_cli_bad_input_is_one_line(capsys):
    import cli

    assert cli.main(["verify", "--shard", "5/2"]) == 2
    assert cli.main(["verify", "--max-world", "0"]) == 2
    assert cli.main(["verify", "--jobs", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("moe-twin: error: --") for line in err)


class RefusesLatent(MoERunner):
    """The fixed runner, declaring latent MoE out of its scope."""

    def unsupported(self) -> str | None:
        return "no latent MoE here" if self.scenario.model.has_transform else None


def test_classes_the_runner_refuses_are_counted_apart_not_proved():
    space = restrict(SPACES["default"], tp=(2,), dp=(1,), ep=(False,), backend=("allgather_reducescatter",),
                     version=("newest",), eplb=(False,), platform=("cuda",), aux_stream=(True,), shared=(1,),
                     padded=(False,), allreduce_fusion=(False,), weight_block=("none",),
                     latent=("none", "linear", "nonlinear"))
    everything = verify("fixed", space)
    res = verify(RefusesLatent, space)
    assert everything.classes == 3 and everything.unsupported == 0
    assert res.classes == 1 and res.unsupported == 2
    assert "2 more refused by the runner" in res.statement() and res.to_dict()["unsupported"] == 2


def test_a2a_space_holds_every_engines_all_to_all_layouts():
    """The `a2a` space is `default` plus top_k above moe_ep: it holds SGLang's
    DeepEP without DP attention and TensorRT-LLM's all-gather fallback, and
    both runners are proved clean on a slice of it that runs them."""
    from scenarios.runners import SGLangRunner, TRTLLMRunner

    a2a = space_axes("a2a")
    assert [a.name for a in a2a][:-1] == [a.name for a in DEFAULT] and a2a[-1].name == "top_k"
    base = {"tp": 1, "dp": 2, "ep": True, "backend": "deepep_high_throughput", "version": "newest", "eplb": False,
            "platform": "cuda", "aux_stream": False, "shared": 1, "weight_block": "none", "latent": "none",
            "padded": False, "allreduce_fusion": False, "idle_dp_rank": False}
    fallback = assignment_scenario(a2a, {**base, "top_k": "above_moe_ep"}, "trtllm")
    assert fallback.model.top_k > fallback.moe_ep and classify(fallback, a2a)["top_k"] == "above_moe_ep"
    assert TRTLLMRunner.engine_rules.dispatch_backend(fallback) == "allgather_reducescatter"
    no_dp_attn = assignment_scenario(a2a, {**base, "tp": 2, "dp": 1, "top_k": "2"}, "sglang")
    assert SGLangRunner.engine_rules.slices_tokens(no_dp_attn) and not no_dp_attn.sp
    layouts = restrict(a2a, ep=(True,), backend=("deepep_high_throughput", "moonep"), version=("newest",),
                       eplb=(False,), platform=("cuda",), latent=("none",), padded=(False,))
    for runner in ("sglang", "trtllm"):
        res = verify(runner, layouts, max_world=4, polish_findings=False)
        assert res.proved_clean and res.classes > 0, (runner, [f.signature for f in res.findings])


class LoopsInUnsupported(MoERunner):
    """Runner code that never returns from its scope check."""

    def unsupported(self) -> str | None:
        while True:
            pass


def test_a_looping_unsupported_check_stops_at_the_wall_clock_budget():
    from scenarios import contain

    space = restrict(SPACES["default"], tp=(2,), dp=(1,), ep=(False,), backend=("allgather_reducescatter",),
                     version=("newest",), eplb=(False,), platform=("cuda",), aux_stream=(True,), shared=(1,),
                     latent=("none",), padded=(False,), allreduce_fusion=(False,))
    old = contain.limits()
    contain.set_limits(contain.Limits(max_ops=old.max_ops, sim_timeout_s=0.3))
    try:
        res = verify(LoopsInUnsupported, space)
    finally:
        contain.set_limits(old)
    assert res.unsupported == 0 and res.classes >= 1  # left to the simulation, which reports it


def test_an_interrupted_verify_keeps_its_findings_and_proves_nothing(tmp_path):
    calls = []

    def ctrl_c(done, total, findings):
        calls.append(done)
        if len(calls) == 2:
            raise KeyboardInterrupt

    space = restrict(DEFAULT, tp=(2,), dp=(1,))
    res = verify("before-38990", space=space, jobs=1, progress=ctrl_c, partial_on_interrupt=True,
                 out=tmp_path)
    assert res.interrupted and not res.complete and not res.proved_clean
    assert 0 < res.assignments_done < res.assignments_total
    assert "[incomplete, interrupted:" in res.statement() and res.to_dict()["interrupted"] is True
    assert (tmp_path / "findings.json").exists()
    with pytest.raises(KeyboardInterrupt):  # without partial_on_interrupt the caller gets the Ctrl-C back
        calls.clear()
        verify("fixed", space=space, jobs=1, progress=ctrl_c)
