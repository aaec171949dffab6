"""explore (Hypothesis search + shrink + files + resume) and mutate (mutants of fixed)."""

import json
from pathlib import Path

import pytest

import cli as moe_cli
from scenarios.loader import load_file
from scenarios.runners import BEFORE_RUNNERS, MoERunner, load_runner
from scenarios.spec import ModelTraits, ParallelConfig, Scenario, ScenarioError, Workload
from scenarios.trace import Hazard, HazardKind, Trace
from sim import simulate
from twin.search import explore_cli
from twin.search.explore import (
    Finding,
    Progress,
    _candidates,
    explore,
    finding_signature,
    target_signals,
    trace_findings,
)
from twin.search.mutate import INFO, KNOWN_EQUIVALENT, MUTANTS, behaviour, run_mutation

EXPECTED = {
    "before-40673": "DOUBLE_REDUCTION",
    "stale-cache-40673": "DOUBLE_REDUCTION",
    "before-41382": "DOUBLE_REDUCTION",
    "before-38990": "LOST_OVERLAP",
    "before-40865": "SHAPE_MISMATCH",
    "before-39222": "UNSAFE_OVERLAP",
}
BUDGET = 200  # what the default-budget search needs for all six at seed 0


def cli(capsys, *argv):
    code = moe_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def before_results(tmp_path_factory):
    """One search per historical regression, each from a fresh --out."""
    out = {}
    for runner in BEFORE_RUNNERS:
        d = tmp_path_factory.mktemp(runner)
        out[runner] = explore(runner, budget=BUDGET, seed=0, out=d)
    return out


# ---------------------------------------------------------------- search


def test_expected_runners_are_the_six_regressions():
    assert set(EXPECTED) == set(BEFORE_RUNNERS)


@pytest.mark.parametrize("runner", sorted(EXPECTED))
def test_explore_finds_the_regression_kind(before_results, runner):
    res = before_results[runner]
    assert EXPECTED[runner] in {f.kind for f in res.findings}, [f.signature for f in res.findings]
    assert all(f.new and f.shrunk and f.reproduces for f in res.findings)
    assert res.examples >= BUDGET and res.first_finding_at is not None


def test_fixed_has_no_finding(tmp_path):
    res = explore("fixed", budget=300, seed=0, out=tmp_path)
    assert res.findings == [] and res.examples >= 300
    data = json.loads((tmp_path / "findings.json").read_text())
    assert data["runner"] == "fixed" and data["findings"] == []


@pytest.mark.parametrize("runner", sorted(EXPECTED))
def test_written_toml_loads_back_and_reproduces(before_results, runner):
    for f in before_results[runner].findings:
        s = load_file(f.scenario_file)
        assert s.runner == runner
        assert s == f.scenario
        trace = simulate(s)  # the TOML's own runner
        assert f.signature in trace_findings(trace)
        assert f.detail == s.summary


@pytest.mark.parametrize("runner", sorted(EXPECTED))
def test_shrunk_scenario_is_minimal(before_results, runner):
    for f in before_results[runner].findings:
        s = f.scenario
        assert s.world <= 4 and max(s.token_counts) <= 2, s.summary_line()
        assert s.model.hidden == 32 and s.model.top_k == 1
        cls = load_runner(runner)
        # 1-minimal: no single simplification keeps the finding.
        for change in _candidates(s):
            try:
                smaller = s.with_(**change)
            except ScenarioError:
                continue
            assert f.signature not in trace_findings(simulate(smaller, cls)), change


def test_reduction_findings_keep_the_tp_group_they_need(before_results):
    # The runner's second reduction is over the tp group: the double reduction
    # needs tp=2, and DP for the all-to-all kernels, and nothing bigger.
    for runner in ("stale-cache-40673", "before-41382"):
        found = [f for f in before_results[runner].findings if f.kind == "DOUBLE_REDUCTION"]
        assert "DOUBLE_REDUCTION@final_all_reduce" in {f.signature for f in found}
        for f in found:
            p = f.scenario.parallel
            assert (p.tp, p.dp, p.ep) == (2, 2, True), f.scenario.summary_line()


def test_same_seed_same_search(tmp_path):
    a = explore("before-39222", budget=60, seed=7, out=tmp_path / "a", do_shrink=False)
    b = explore("before-39222", budget=60, seed=7, out=tmp_path / "b", do_shrink=False)
    assert [(f.signature, f.found_at) for f in a.findings] == [(f.signature, f.found_at) for f in b.findings]


# ---------------------------------------------------------------- signatures and signals


def _trace(hazards, outputs=None, decisions=None):
    t = Trace(source="sim", scenario="s", runner="r", world=2)
    t.hazards = hazards
    t.outputs = outputs or {}
    t.decisions = decisions or {"shared_experts_order": "MK_INTERNAL_OVERLAPPED"}
    t.latency_us = 100.0
    return t


def test_signature_adds_the_order_only_to_overlap_hazards():
    race = Hazard(HazardKind.UNSAFE_OVERLAP, 3, "shared_experts", 0, "x")
    double = Hazard(HazardKind.DOUBLE_REDUCTION, 9, "final_all_reduce", 0, "y")
    t = _trace([race, double])
    assert finding_signature(race, t) == "UNSAFE_OVERLAP@shared_experts[shared_experts_order=MK_INTERNAL_OVERLAPPED]"
    assert finding_signature(double, t) == "DOUBLE_REDUCTION@final_all_reduce"
    assert set(trace_findings(t)) == {finding_signature(race, t), finding_signature(double, t)}


def test_target_signals_grade_how_broken_a_run_is():
    clean = target_signals(_trace([], {0: {"routed@ep0": 1.0}}))
    assert all(v == 0.0 for v in clean.values())
    double = target_signals(_trace([Hazard(HazardKind.DOUBLE_REDUCTION, 1, "a", 0, "")],
                                   {0: {"routed@ep0": 2.0}}))
    quadruple = target_signals(_trace([Hazard(HazardKind.DOUBLE_REDUCTION, 1, "a", 0, "")],
                                      {0: {"routed@ep0": 4.0}}))
    assert 0 < double["coefficient_error"] < quadruple["coefficient_error"]
    lost = target_signals(_trace([Hazard(HazardKind.LOST_OVERLAP, 1, "s", 0, "", cost_us=25.0)]))
    assert lost["lost_overlap_cost"] == pytest.approx(0.25)
    assert lost["hazard_signatures"] == 1.0


# ---------------------------------------------------------------- disk, resume, interrupt


def test_resume_lists_the_same_findings_none_new(tmp_path):
    first = explore("before-40865", budget=80, seed=0, out=tmp_path)
    second = explore("before-40865", budget=80, seed=1, out=tmp_path)
    assert first.findings and all(f.new for f in first.findings)
    assert [f.signature for f in second.findings] == [f.signature for f in first.findings]
    assert not any(f.new for f in second.findings)
    assert [f.scenario for f in second.findings] == [f.scenario for f in first.findings]
    assert any((tmp_path / "hypothesis-db").iterdir())  # the example database is kept
    data = json.loads((tmp_path / "findings.json").read_text())
    assert data["examples_total"] == first.examples + second.examples


def test_resume_marks_only_later_findings_new(tmp_path):
    # Stop at the first finding, then search on: what the second run adds is new.
    first = explore("twin.search.mutate:M_negate_is_sequence_parallel",
                    budget=200, seed=0, out=tmp_path, stop_on_first=True)
    # One example, so its signatures only (one example may show two at once).
    assert first.findings and len({f.found_at for f in first.findings}) == 1
    second = explore("twin.search.mutate:M_negate_is_sequence_parallel", budget=200, seed=0, out=tmp_path)
    old = {f.signature for f in first.findings}
    assert len(second.findings) > len(first.findings)
    for f in second.findings:
        assert f.new == (f.signature not in old)


def test_interrupt_keeps_findings_and_resume_shrinks_them(tmp_path):
    def interrupt(p: Progress) -> None:
        if p.findings:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        explore("before-40865", budget=200, seed=0, out=tmp_path, progress=interrupt)
    data = json.loads((tmp_path / "findings.json").read_text())
    (saved,) = data["findings"]
    assert saved["shrunk"] is False and Path(saved["scenario_file"]).is_file()
    assert load_file(saved["scenario_file"]).runner == "before-40865"

    res = explore("before-40865", budget=20, seed=0, out=tmp_path)
    (f,) = [f for f in res.findings if f.signature == saved["signature"]]
    assert not f.new and f.shrunk and f.scenario.workload.tokens == 1


def test_a_finding_that_no_longer_reproduces_is_flagged(tmp_path):
    explore("before-40865", budget=60, seed=0, out=tmp_path)
    data = json.loads((tmp_path / "findings.json").read_text())
    # The user "fixed" the runner: same spec, other behaviour. Simulate by
    # rewriting the file as if found for this spec by a different class.
    data["runner"] = "first-fix-40865"
    (tmp_path / "findings.json").write_text(json.dumps(data))
    res = explore("first-fix-40865", budget=20, seed=0, out=tmp_path)
    stale = [f for f in res.findings if f.signature == "SHAPE_MISMATCH@custom_op_boundary" and not f.new]
    assert stale and not stale[0].reproduces


# ---------------------------------------------------------------- CLI


def test_cli_json_is_the_only_stdout(capsys, tmp_path):
    # 100 examples: the generated scenarios find this runner's bug in ~90% of
    # seeded 100-example runs (benchmarks/bench_verify.py), this seed included.
    code, out, err = cli(capsys, "explore", "--runner", "before-38990", "--budget", "100", "--no-enumerate",
                         "--seed", "0", "--out", str(tmp_path), "--json")
    assert code == 0
    data = json.loads(out)
    assert set(data) >= {"runner", "examples", "findings"}
    assert data["runner"] == "before-38990" and data["examples"] >= 100
    (f,) = data["findings"]
    assert set(f) >= {"kind", "signature", "scenario_file", "minimal", "verdict", "detail", "new"}
    assert f["kind"] == "LOST_OVERLAP" and f["new"] is True and f["verdict"] is None
    assert f["minimal"]["parallel"]["tp"] == 1
    assert "examples" in err and "new finding" in err  # plain progress lines, not a tty


def test_cli_text_and_fail_on_hazard(capsys, tmp_path):
    code, out, _ = cli(capsys, "explore", "--runner", "before-38990", "--budget", "100", "--no-enumerate",
                       "--seed", "0", "--out", str(tmp_path / "a"), "--fail-on-hazard")
    assert code == 1 and "NEW" in out
    # Brackets in signatures are text, not rich markup.
    assert "LOST_OVERLAP@shared_experts[shared_experts_order=EXTERNAL]" in out
    code, out, _ = cli(capsys, "explore", "--runner", "fixed", "--budget", "40", "--no-enumerate",
                       "--seed", "0", "--out", str(tmp_path / "b"), "--fail-on-hazard")
    assert code == 0 and "no hazard found" in out


def test_terminal_progress_is_a_live_bar_on_stderr(tmp_path):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    with explore_cli.ExploreProgress("explore before-40865", stream=stream) as progress:
        # 60 examples: seed 0 reaches the trigger (a dp > 1 scenario the SP gather skips) by then.
        explore("before-40865", budget=60, seed=0, out=tmp_path, progress=progress)
    text = stream.getvalue()
    assert "\x1b[" in text and "new finding SHAPE_MISMATCH@custom_op_boundary" in text


NOT_A_RUNNER = "class NotARunner:\n    pass\n"
WRONG_SIGNATURE = (
    "from scenarios.runners import MoERunner\n\n"
    "class Wrong(MoERunner):\n"
    "    def needs_final_reduce(self):\n"
    "        return False\n"
)


@pytest.mark.parametrize("argv,needle", [
    (["explore", "--runner", "bogus"], "unknown runner 'bogus'"),
    (["explore", "--runner", "{dir}/mine.py:NotARunner"], "is not a runner"),
    (["explore", "--runner", "{dir}/wrong.py:Wrong"], "does not implement the runner interface"),
    (["explore", "--runner", "fixed", "--budget", "0"], "--budget: must be a positive"),
    (["explore", "--runner", "fixed", "--budget", "-3"], "--budget: must be a positive"),
    (["explore", "--runner", "fixed", "--budget", "many"], "invalid int value"),
    (["explore", "--runner", "fixed", "--out", "{dir}/afile/sub"], "not a writable directory"),
    (["mutate", "--budget", "0"], "--budget: must be a positive"),
    (["mutate", "--mutant", "nothing_like_this"], "no mutant matches"),
])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path, argv, needle):
    (tmp_path / "mine.py").write_text(NOT_A_RUNNER)
    (tmp_path / "wrong.py").write_text(WRONG_SIGNATURE)
    (tmp_path / "afile").write_text("")
    argv = [a.replace("{dir}", str(tmp_path)) for a in argv]
    if "--out" not in argv and argv[0] == "explore":
        argv += ["--out", str(tmp_path / "out")]
    code, out, err = cli(capsys, *argv)
    assert code == 2, err
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and needle in err


def test_out_of_another_runner_is_refused(capsys, tmp_path):
    explore("before-40865", budget=20, seed=0, out=tmp_path, do_shrink=False)
    code, _, err = cli(capsys, "explore", "--runner", "fixed", "--out", str(tmp_path))
    assert code == 2 and "holds findings of runner 'before-40865'" in err


def test_user_runner_from_a_file_gets_an_absolute_spec(tmp_path, monkeypatch):
    (tmp_path / "myrunner.py").write_text(
        "from scenarios.runners import Before40865\n\nclass Mine(Before40865):\n    pass\n")
    monkeypatch.chdir(tmp_path)
    res = explore("myrunner.py:Mine", budget=60, seed=0, out=tmp_path / "out")
    assert res.runner == f"{(tmp_path / 'myrunner.py').as_posix()}:Mine"
    (f,) = res.findings
    monkeypatch.chdir("/")
    assert f.signature in trace_findings(simulate(load_file(f.scenario_file)))


def test_confirm_error_when_the_real_run_cannot_be_done():
    from twin.search.explore import confirm_finding

    big = Scenario(model=ModelTraits(hidden=32, moe_intermediate=512, num_experts=64),
                   parallel=ParallelConfig(tp=8, dp=8), workload=Workload(tokens=1))
    f = Finding("DOUBLE_REDUCTION", "DOUBLE_REDUCTION@final_all_reduce", "x", big)
    confirm_finding(f, "fixed", timeout_s=10)
    assert f.verdict.startswith("ERROR: ") and "world size 64" in f.verdict


@pytest.mark.slow
def test_confirm_attaches_the_real_verdict(tmp_path):
    res = explore("before-40865", budget=60, seed=0, out=tmp_path, confirm=True, timeout_s=120)
    (f,) = res.findings
    assert f.verdict == "CONFIRMED", (f.verdict, f.verdict_reason)
    data = json.loads((tmp_path / "findings.json").read_text())
    assert data["findings"][0]["verdict"] == "CONFIRMED"
    # Resume does not run it again.
    again = explore("before-40865", budget=10, seed=0, out=tmp_path, confirm=True)
    assert again.findings[0].verdict == "CONFIRMED"


# ---------------------------------------------------------------- mutants


def test_mutants_are_importable_runners_with_distinct_behaviour_descriptions():
    assert len(MUTANTS) >= 50
    assert len({i.description for i in INFO.values()}) == len(INFO)
    for name, cls in MUTANTS.items():
        assert load_runner(f"twin.search.mutate:{name}") is cls
        assert issubclass(cls, MoERunner) and name.isidentifier()
    ops = {i.operator for i in INFO.values()}
    assert ops == {"negate", "always", "never", "dropcond", "order", "dropop"}
    # The examples the issue names are among them.
    for name in ("M_dropcond_maybe_reduce_shared_2", "M_dropop_join_shared",
                 "M_order_mk_before_disable", "M_order_multistream_before_disable",
                 "M_order_always_no_overlap", "M_dropop_sp_all_gather", "M_negate_should_pad"):
        assert name in MUTANTS


def test_known_mutants_match_the_historical_regressions():
    s = load_file("scenarios/catalog/r1-sp-deepep.toml")
    # Dropping the SP guard of maybe_reduce_shared is regression R1.
    mine = simulate(s, MUTANTS["M_dropcond_maybe_reduce_shared_2"])
    assert {h.signature for h in mine.hazards} == {h.signature for h in simulate(s, "before-40673").hazards}


def test_behaviour_ignores_zero_effect_steps():
    s = Scenario(parallel=ParallelConfig(tp=1, dp=1), workload=Workload(tokens=2))
    fixed = behaviour(simulate(s, MoERunner))
    assert behaviour(simulate(s, MUTANTS["M_always_post_trim_width"])) == fixed
    assert behaviour(simulate(s, MUTANTS["M_dropcond_needs_final_reduce_2"])) == fixed
    assert behaviour(simulate(s.with_(**{"parallel.tp": 2}), MUTANTS["M_dropop_final_all_reduce"])) != \
        behaviour(simulate(s.with_(**{"parallel.tp": 2}), MoERunner))


def test_mutation_report_tells_survivors_apart():
    only = ["M_dropop_final_all_reduce", "M_always_post_trim_width",
            "M_dropcond_order_multistream_3", "M_dropop_join_shared"]
    rep = run_mutation(budget=100, seed=0, only=only, equivalence_examples=50)
    by = {r.mutant: r for r in rep.results}
    assert set(by) == set(only)
    assert by["M_dropop_final_all_reduce"].killed
    assert by["M_dropop_final_all_reduce"].signature.startswith("MISSING_REDUCTION")
    assert by["M_dropop_join_shared"].killed
    assert by["M_dropop_join_shared"].signature.startswith("UNSAFE_OVERLAP")
    eq = by["M_always_post_trim_width"]
    assert not eq.killed and eq.equivalent is True and eq.status == "equivalent"
    assert KNOWN_EQUIVALENT["M_always_post_trim_width"] in eq.reason
    blind = by["M_dropcond_order_multistream_3"]  # ignores the token threshold
    assert blind.status == "blind_spot" and blind.equivalent is False
    assert "MULTI_STREAM_OVERLAPPED instead of NO_OVERLAP" in blind.reason
    d = rep.to_dict()
    assert d["mutants"] == 4 and d["killed"] == 2 and d["kill_rate"] == 0.5
    assert set(d["results"][0]) >= {"mutant", "description", "killed", "signature", "verdict",
                                    "equivalent", "reason"}


def test_mutate_cli_json(capsys):
    # 100 examples: enough for the generated scenarios to reach both mutants'
    # triggers (a padded kernel; tp > 1 without SP) with this default seed.
    code, out, err = cli(capsys, "mutate", "--kill", "search", "--budget", "100", "--mutant", "M_dropop_final_*",
                         "--mutant", "negate_should_pad", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["mutants"] == 2 and d["killed"] == 2 and d["kill_rate"] == 1.0
    assert "mutate:" in err


@pytest.mark.slow
def test_full_mutation_report():
    rep = run_mutation(budget=200, seed=0)
    d = rep.to_dict()
    assert d["mutants"] == sum(1 for name in MUTANTS if name.startswith("M_"))  # the fixed runner's
    assert d["kill_rate"] >= 0.65, d
    by = {r.mutant: r for r in rep.results}
    # Every hand-annotated equivalence is confirmed by the traces.
    for name in KNOWN_EQUIVALENT:
        assert by[name].status == "equivalent", (name, by[name].reason)
    for r in rep.results:
        assert r.killed == (r.status == "killed")
        assert r.reason
        if not r.killed:
            assert r.status in ("equivalent", "blind_spot", "missed")


def test_polish_sets_every_knob_the_finding_does_not_need_back_to_its_default():
    from scenarios.spec import Scenario
    from twin.search.explore_shrink import polish

    knobs = Scenario(name="knobs").with_(**{
        "model.quantized_input": True, "runtime.allreduce_fusion": True, "workload.phase": "prefill",
        "model.routed_scaling_factor": 2.5, "parallel.tp": 2, "model.num_shared_experts": 1,
        "runtime.shared_experts_fusion": True})
    plain = polish(knobs, lambda s: s.parallel.tp == 2)  # the "finding" needs tp = 2 only
    assert plain.parallel.tp == 2
    assert not plain.model.quantized_input and not plain.runtime.allreduce_fusion
    assert not plain.runtime.shared_experts_fusion and plain.workload.phase == "decode"
    assert plain.model.routed_scaling_factor == 1.0


def test_a_runner_misusing_ops_is_a_finding_that_says_so() -> None:
    """A misuse of Ops found by a search is the runner's bug, not the
    simulator's: the finding says so and that `check` will refuse it."""
    from tests.error_runners import UnknownGroup
    from twin.search.explore_oracle import simulate_safe

    s = Scenario(name="misuse", model=ModelTraits(hidden=64, moe_intermediate=32, num_experts=4, top_k=2),
                 parallel=ParallelConfig(tp=2), workload=Workload(tokens=4))
    trace = simulate_safe(s, UnknownGroup)
    [hz] = trace.hazards
    assert hz.kind is HazardKind.RUNNER_ERROR
    assert "misuses Ops" in hz.detail and "exit 2" in hz.detail
    assert "the simulator raised" not in hz.detail
