"""explore's first phase, verify's enumeration: what it finds and covers, and
that its findings go through explore's store (files, resume, --confirm)."""

import json
from functools import cache

import pytest
from default_space import verified_default
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cli as moe_cli
from scenarios.runners import BEFORE_RUNNERS
from scenarios.space import SPACES, classify, restrict, space_axes
from twin.check.replay import CASES
from twin.search.explore import explore
from twin.search.verify import verify

EXPECTED = {c.runner: c.expected for c in CASES}  # each historical runner's hazard kind
# The default space with fewer backends and platforms and one engine version:
# ~2 s per runner, and each historical regression still has a class in it.
SMALL = restrict(space_axes("default"), backend=("allgather_reducescatter", "deepep_low_latency",
                                                 "flashinfer_nvlink_two_sided"),
                 platform=("cpu", "cuda"), latent=("none", "nonlinear"), version=("newest",))
# Every scenario moe_scenarios(max_world=2) draws has its class in this space.
WIDE2 = restrict(SPACES["wide"], tp=(1, 2), dp=(1, 2), ep_size=("all",), platform=("cpu", "cuda"))


@cache
def _verify(runner: str):
    return verify(runner, SMALL, max_world=4, polish_findings=False)


def _signatures(findings) -> set[str]:
    return {f.signature for f in findings}


def test_expected_runners_are_the_six_regressions():
    assert set(EXPECTED) == set(BEFORE_RUNNERS)


@pytest.mark.parametrize("runner", sorted(EXPECTED))
def test_enumeration_finds_every_regression_with_a_tiny_hypothesis_budget(runner, tmp_path):
    res = explore(runner, budget=3, seed=0, out=tmp_path, enumerate_first=True, enumerate_space=SMALL)
    enumerated = [f for f in res.findings if f.found_by == "enumeration"]
    assert EXPECTED[runner] in {f.kind for f in enumerated}
    e = res.enumeration
    assert e["complete"] and e["stopped"] is None
    assert set(e["findings"]) == _signatures(_verify(runner).findings) <= _signatures(res.findings)
    assert (e["classes"], e["simulated"], e["pruned"]) == (_verify(runner).classes, _verify(runner).simulated,
                                                           _verify(runner).pruned)


# One runner: explore's enumeration phase is verify's (checked class by class
# for every runner on SMALL above), and test_verify checks that verify finds
# each regression in the default space; this checks the two agree there too.
@pytest.mark.slow
@pytest.mark.parametrize("runner", ["before-40673"])
def test_default_enumeration_agrees_with_verify_and_finds_the_regression(runner):
    res = explore(runner, budget=3, seed=0, out=None, enumerate_first=True, enumerate_s=600.0)
    e = res.enumeration
    assert e["complete"] and e["space"] == "default"
    assert EXPECTED[runner] in {f.kind for f in res.findings if f.found_by == "enumeration"}
    whole = verified_default(runner)
    assert e["classes"] == whole.classes and set(e["findings"]) == _signatures(whole.findings)


# explore runs Hypothesis inside: a nested search, one per drawn (runner, seed).
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.nested_given])
@given(runner=st.sampled_from(sorted(EXPECTED) + ["no-early-trim-40865", "first-fix-40865", "fixed"]),
       seed=st.integers(0, 2**16))
def test_everything_the_hypothesis_phase_finds_verify_finds(runner, seed):
    """On a small space (tp x dp <= 2, cpu/cuda): each finding of the search
    has its class in the space, and verify's representative of that class
    shows the same signature."""
    res = explore(runner, budget=25, seed=seed, out=None, do_shrink=False, strategy_kwargs={"max_world": 2})
    for f in res.findings:
        a = classify(f.found, WIDE2)
        assert a is not None, f.found.summary_line()
        one = verify(runner, restrict(WIDE2, **{k: (v,) for k, v in a.items()}), max_world=2,
                     polish_findings=False)
        assert one.classes == 1 and f.signature in _signatures(one.findings), (f.signature, a)


def test_a_resumed_run_knows_the_enumerated_findings(tmp_path):
    first = explore("before-39222", budget=3, seed=0, out=tmp_path, enumerate_first=True, enumerate_space=SMALL)
    second = explore("before-39222", budget=3, seed=1, out=tmp_path, enumerate_first=True, enumerate_space=SMALL)
    assert first.enumeration["new_findings"] == len(first.enumeration["findings"]) > 0
    assert second.enumeration["new_findings"] == 0
    assert second.enumeration["findings"] == first.enumeration["findings"]
    assert not any(f.new for f in second.findings if f.signature in second.enumeration["findings"])
    disk = json.loads((tmp_path / "findings.json").read_text())
    assert disk["examples_total"] == first.examples + second.examples
    assert {d["signature"]: d["found_by"] for d in disk["findings"]}.keys() >= set(first.enumeration["findings"])
    for f in first.findings:
        assert f.scenario_file and f.scenario.name.startswith("explore-")


def test_a_stop_request_ends_the_enumeration_and_keeps_what_it_found(tmp_path):
    polls = [0]

    def stop() -> bool:
        polls[0] += 1
        return polls[0] > 400

    res = explore("before-40865", budget=50, seed=0, out=tmp_path, enumerate_first=True, enumerate_space=SMALL,
                  partial_on_interrupt=True, stop_requested=stop)
    assert res.interrupted and res.examples == 0
    e = res.enumeration
    assert e["stopped"] == "interrupted" and not e["complete"]
    assert 0 < e["assignments_done"] < e["assignments_total"]
    disk = json.loads((tmp_path / "findings.json").read_text())
    assert {d["signature"] for d in disk["findings"]} == set(e["findings"])


def test_the_time_bound_stops_the_enumeration_and_says_what_it_covered():
    res = explore("fixed", budget=3, seed=0, out=None, enumerate_first=True, enumerate_s=0.5)
    e = res.enumeration
    assert not e["complete"] and e["stopped"] == "time bound of 0.5 s"
    assert 0 < e["classes"] and e["assignments_done"] < e["assignments_total"] == 270336  # with the idle DP rank
    assert res.examples == 3  # the Hypothesis phase still runs


def test_confirm_judges_the_enumerated_findings(tmp_path, monkeypatch):
    import twin.search.explore as ex

    judged = []

    def fake_confirm(f, spec, timeout_s=60.0):  # stands in for a real run: records the call
        judged.append(f.signature)
        f.verdict, f.verdict_reason = "INCONCLUSIVE", "stand-in for a real run (test)"

    monkeypatch.setattr(ex, "confirm_finding", fake_confirm)
    res = explore("before-40673", budget=2, seed=0, out=tmp_path, confirm=True, enumerate_first=True,
                  enumerate_space=SMALL)
    assert set(res.enumeration["findings"]) <= set(judged)


def _cli(capsys, *argv):
    code = moe_cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_runs_the_enumeration_first_and_reports_it(capsys, tmp_path):
    code, out, err = _cli(capsys, "explore", "--runner", "before-40865", "--budget", "5", "--seed", "0",
                          "--enumerate-time", "3", "--out", str(tmp_path), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert set(d) >= {"runner", "examples", "findings", "out", "first_finding_at", "elapsed_s", "interrupted"}
    e = d["enumeration"]
    assert set(e) >= {"space", "classes", "simulated", "pruned", "complete", "findings", "new_findings",
                      "assignments_done", "assignments_total", "stopped"}
    assert e["space"] == "default" and e["classes"] > 0
    assert "explore before-40865: enumerate:" in err and "assignments" in err
    assert d["examples"] == 5


def test_cli_no_enumerate_is_hypothesis_only(capsys, tmp_path):
    code, out, err = _cli(capsys, "explore", "--runner", "before-40865", "--budget", "5", "--seed", "0",
                          "--no-enumerate", "--out", str(tmp_path), "--json")
    assert code == 0, err
    d = json.loads(out)
    assert d["enumeration"] is None and "enumerate:" not in err
    assert all(f["found_by"] in ("search", None) for f in d["findings"])


@pytest.mark.parametrize("value", ["0", "-1", "inf", "soon"])
def test_cli_bad_enumerate_time_is_one_line(capsys, tmp_path, value):
    code, out, err = _cli(capsys, "explore", "--enumerate-time", value, "--out", str(tmp_path))
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "--enumerate-time" in err
