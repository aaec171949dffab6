"""`replay --engine vllm`: the seeds on vLLM's own releases. The release cases
need the traced runner `vllm@X.Y.Z` (scenarios.runners.load_runner) and the
release under .engines/; without them each case is skipped, reported, and the
exit code is unchanged. The decision logic is checked here with the twin's own
runners standing in for a release's traced program."""

from __future__ import annotations

import json

import pytest

from cli import main
from scenarios.loader import load
from scenarios.runners import RunnerLoadError, load_runner
from sim import simulate
from twin.check.replay_engine import (
    CLEAN,
    ENGINE_CASES,
    EngineCase,
    EngineCaseResult,
    expected_coefficient,
    replay_engine_sim,
    routed_coefficients,
    skip_reason,
)


def loadable(release: str) -> str | None:
    try:
        load_runner(f"vllm@{release}")
    except RunnerLoadError as exc:
        return str(exc)
    return None


def case_of(version: str) -> EngineCase:
    return next(c for c in ENGINE_CASES if c.release == version)


def release(version: str):  # type: ignore[no-untyped-def]
    why = skip_reason(case_of(version))
    return pytest.mark.skipif(why is not None, reason=f"vllm@{version}: {why}")


def _result(case: EngineCase, runner: str) -> EngineCaseResult:
    """The case's result with `runner`'s program in place of the release's."""
    s = load(case.scenario)
    return EngineCaseResult(case, before=simulate(s, runner), fixed=simulate(s, "fixed"),
                            twin=simulate(s, case.twin_runner), want_coefficient=expected_coefficient(case, s))


def test_cases_name_catalog_scenarios_and_the_r2_pair() -> None:
    got = {(c.regression, c.release, c.expected) for c in ENGINE_CASES}
    assert {("R2", "0.20.0", "DOUBLE_REDUCTION"), ("R2", "0.21.0", "DOUBLE_REDUCTION"), ("R2", "0.22.0", CLEAN)} <= got
    for c in ENGINE_CASES:
        load(c.scenario)
        load_runner(c.twin_runner)
        assert c.runner == f"vllm@{c.release}"


def test_the_r2_release_logic_on_the_twin_runners() -> None:
    bad, good = case_of("0.21.0"), case_of("0.22.0")
    # The twin's model of 0.21.0's code: DOUBLE_REDUCTION with routed coefficient tp = 2.
    r = _result(bad, "before-41382")
    assert r.want_coefficient == 2.0 and routed_coefficients(r.before) == [2.0]
    assert r.hit and r.agrees_with_twin and r.caught
    # A program that does not double-reduce is a miss for 0.21.0 ...
    assert not _result(bad, "fixed").caught
    # ... and exactly what 0.22.0 must be; the double reduction there is a miss.
    assert _result(good, "fixed").caught
    miss = _result(good, "before-41382")
    assert not miss.hit and not miss.caught and not miss.agrees_with_twin


def test_a_wrong_coefficient_is_a_miss() -> None:
    bad = case_of("0.21.0")
    r = _result(bad, "before-41382")
    r.want_coefficient = 4.0  # e.g. a release reducing over tp*dp would show 4
    assert not r.coefficient_ok and not r.hit and not r.caught


def test_release_not_installed_is_reported_and_skipped() -> None:
    case = EngineCase("R2", "0.0.1", "r2-fi-two-sided", "DOUBLE_REDUCTION", "before-41382", "absent release", "tp")
    (res,) = replay_engine_sim(cases=(case,))
    assert res.skipped == "not installed: run scripts/install-engine.sh vllm==0.0.1"
    assert res.before is None and res.caught  # reported, never a miss
    assert res.to_dict()["caught"] is None


def test_unknown_engine_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown engine"):
        replay_engine_sim("sglang")


def test_cli_engine_json_shape_and_exit_code(capsys) -> None:  # type: ignore[no-untyped-def]
    code = main(["replay", "--engine", "vllm", "--json", "--fail-on-hazard"])
    data = json.loads(capsys.readouterr().out)
    assert data["engine"] == "vllm"
    assert [(c["regression"], c["release"]) for c in data["cases"]] == [(c.regression, c.release) for c in ENGINE_CASES]
    assert data["skipped"] == sum(1 for c in data["cases"] if c["skipped"])
    for c in data["cases"]:
        assert {"regression", "runner", "scenario", "expected", "predicted", "fixed_predicted", "caught"} <= set(c)
    ran = [c for c in data["cases"] if not c["skipped"]]
    assert code == (1 if any(not c["caught"] for c in ran) else 0)


def test_cli_engine_human_table(capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["replay", "--engine", "vllm"]) == 0
    out = capsys.readouterr().out
    assert "R2 vllm@0.21.0" in out and "R2 vllm@0.22.0" in out
    for c in ENGINE_CASES:
        why = skip_reason(c)
        assert ("SKIPPED" in out) if why else ("CAUGHT" in out)


@pytest.mark.slow
@release("0.20.0")
def test_0_20_0_double_reduces_on_r2() -> None:
    (res,) = replay_engine_sim(cases=(case_of("0.20.0"),))
    assert "DOUBLE_REDUCTION" in res.before.hazard_kinds() and routed_coefficients(res.before) == [2.0]
    assert res.caught


@pytest.mark.slow
@release("0.21.0")
def test_0_21_0_double_reduces_on_r2() -> None:
    (res,) = replay_engine_sim(cases=(case_of("0.21.0"),))
    assert "DOUBLE_REDUCTION" in res.before.hazard_kinds()
    assert routed_coefficients(res.before) == [float(load("r2-fi-two-sided").parallel.tp)]
    assert res.caught


@pytest.mark.slow
@release("0.22.0")
def test_0_22_0_is_clean_on_r2() -> None:
    (res,) = replay_engine_sim(cases=(case_of("0.22.0"),))
    assert not res.before.hazards and routed_coefficients(res.before) == [1.0]
    assert res.caught


@pytest.mark.slow
@release("0.21.0")
@release("0.22.0")
def test_real_ranks_confirm_the_release_pair() -> None:
    from twin.check.replay_engine import replay_engine_real

    bad, good = replay_engine_real(timeout_s=120.0, cases=(case_of("0.21.0"), case_of("0.22.0")))
    assert bad.real is not None and bad.real_ok
    assert good.real is not None and good.release_real_clean and good.real_ok


class TwinStandIn(EngineCase):
    """A release case whose program is the twin's own runner for the same code
    (a stand-in for the traced `vllm@X.Y.Z`, so the command's path runs
    whether or not the traced runner exists)."""

    @property
    def runner(self) -> str:
        return self.twin_runner


STAND_INS = tuple(TwinStandIn(c.regression, c.release, c.scenario, c.expected, c.twin_runner,
                              f"stand-in: {c.what}", c.routed_coefficient)
                  for c in ENGINE_CASES if c.release in ("0.21.0", "0.22.0"))


@pytest.fixture
def stand_ins(monkeypatch):  # type: ignore[no-untyped-def]
    import twin.check.replay_engine as re_mod

    monkeypatch.setattr(re_mod, "ENGINE_CASES", STAND_INS)
    monkeypatch.setattr(re_mod, "skip_reason", lambda case: None)
    return STAND_INS


def test_cli_with_stand_ins_catches_and_reports(stand_ins, capsys) -> None:  # type: ignore[no-untyped-def]
    assert main(["replay", "--engine", "vllm", "--fail-on-hazard", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["skipped"] == 0 and [c["caught"] for c in data["cases"]] == [True, True]
    bad, good = data["cases"]
    assert bad["routed_coefficients"] == [2.0] and bad["expected_routed_coefficient"] == 2.0
    assert {p["kind"] for p in bad["predicted"]} == {"DOUBLE_REDUCTION"} and bad["agrees_with_twin"]
    assert good["predicted"] == [] and good["routed_coefficients"] == [1.0]
    assert main(["replay", "--engine", "vllm"]) == 0
    out = capsys.readouterr().out
    assert out.count("CAUGHT") == 2 and "coefficient 2" in out and "routed coefficients 2 (expected 2)" in out


def test_cli_exit_code_when_a_release_case_misses(monkeypatch, capsys) -> None:  # type: ignore[no-untyped-def]
    import twin.check.replay_engine as re_mod

    wrong = (TwinStandIn("R2", "0.22.0", "r2-fi-two-sided", CLEAN, "before-41382", "a clean claim that is false"),)
    monkeypatch.setattr(re_mod, "ENGINE_CASES", wrong)
    monkeypatch.setattr(re_mod, "skip_reason", lambda case: None)
    assert main(["replay", "--engine", "vllm", "--fail-on-hazard"]) == 1
    assert "MISSED" in capsys.readouterr().out
    assert main(["replay", "--engine", "vllm"]) == 0  # without the flag: reported, exit 0


@pytest.mark.slow
def test_real_path_with_stand_ins(stand_ins, capsys) -> None:  # type: ignore[no-untyped-def]
    from twin.check.replay_engine import replay_engine_real

    bad, good = replay_engine_real(timeout_s=120.0)
    assert bad.real_ok and bad.real is not None and bad.real.expected_verdict is not None
    assert good.real_ok and good.release_real_clean
    d = bad.to_dict()
    assert d["real_ok"] and {"verdicts", "measured", "fixed_real_ok"} <= set(d)
    assert main(["replay", "--engine", "vllm", "--real", "--fail-on-hazard"]) == 0
    out = capsys.readouterr().out
    assert out.count("CAUGHT") == 2 and "CONFIRMED" in out


# ---- one simulation per case: check() takes the caller's prediction ----


class _Stop(Exception):
    """Ends a check() at its real run (the test looks at what it was given)."""


def test_check_runs_the_given_prediction_without_simulating_again(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import real.runner
    import twin.check.crosscheck as cc

    s = load("r2-fi-two-sided")
    given = simulate(s, "fixed")
    seen: list[object] = []

    def run_real(scenario, runner, prediction=None, **kw):  # type: ignore[no-untyped-def]
        seen.append(prediction)
        raise _Stop

    calls: list[str] = []
    monkeypatch.setattr(real.runner, "run_real", run_real)
    monkeypatch.setattr(cc, "simulate", lambda *a, **k: calls.append("simulate") or given)
    with pytest.raises(_Stop):
        cc.check(s, "fixed", prediction=given)
    assert seen == [given] and calls == []
    with pytest.raises(_Stop):
        cc.check(s, "fixed")  # without one: simulated here, as before
    assert calls == ["simulate"]


def test_replay_engine_real_checks_each_case_with_the_tables_simulations(stand_ins, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from types import SimpleNamespace

    import twin.check.replay_engine as re_mod

    given: list[tuple[str, object]] = []

    def check(s, runner, prediction=None, **kw):  # type: ignore[no-untyped-def]
        given.append((runner, prediction))
        return SimpleNamespace(sim=prediction, real=None)

    monkeypatch.setattr(re_mod, "check", check)
    results = re_mod.replay_engine_real(timeout_s=1.0)
    want = [pair for r in results for pair in ((("fixed", r.fixed)), (r.case.runner, r.before))]
    assert len(given) == len(want) == 4
    assert all(g[0] == w[0] and g[1] is w[1] and w[1] is not None for g, w in zip(given, want, strict=True))


@pytest.mark.parametrize(("calibrated", "profile", "stale"),
                         [(False, "cpu", False), (True, "cpu", True), (True, "h100", False)])
def test_cli_check_passes_its_simulation_unless_a_calibration_made_it_stale(
        calibrated: bool, profile: str, stale: bool, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import twin.check.check_cli as cli_mod
    import twin.check.crosscheck as cc

    given: list[object] = []

    def check(s, runner, prediction=None, **kw):  # type: ignore[no-untyped-def]
        given.append(prediction)
        raise _Stop

    real_scenario = cli_mod.real_scenario
    monkeypatch.setattr(cc, "check", check)
    monkeypatch.setattr(cli_mod, "autocalibrate", lambda args: calibrated)
    monkeypatch.setattr(cli_mod, "real_scenario", lambda args: real_scenario(args).with_(**{"runtime.profile": profile}))
    assert main(["check", "r2-fi-two-sided", "--runner", "fixed"]) != 0  # stopped at the real run
    assert len(given) == 1 and (given[0] is None) == stale


def test_a_release_venv_counts_as_installed_only_once_its_install_finished(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    # install-engine.sh creates the venv first and writes its stamp last: a
    # venv without the stamp (install under way or failed) is not a release.
    import engines.vllm as ev

    monkeypatch.setattr(ev, "ROOT", tmp_path)
    target = tmp_path / ".engines" / "vllm-0.21.0"
    (target / "bin").mkdir(parents=True)
    (target / "bin" / "python").touch()
    assert not ev.installed("0.21.0")
    assert skip_reason(case_of("0.21.0")) == "not installed: run scripts/install-engine.sh vllm==0.21.0"
    (target / ".moe-twin-engine-vllm-0.21.0").write_text("vllm==0.21.0\n")
    assert ev.installed("0.21.0") and ev.engine_python("0.21.0") == str(target / "bin" / "python")
