"""The cpu profile: stored per machine, calibrated on the first real use (once,
reused, never taken from another machine), a failed calibration never costs
the command its result, and the fit recovers the profile behind its data.

The test suite opts out of auto-calibration (conftest sets
MOE_TWIN_NO_AUTOCALIBRATE=1); these tests clear it themselves, in a temporary
MOE_TWIN_HOME, with a stand-in calibration except in the slow tests.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from typing import Any

import pytest

import cli
from real import autocal
from sim import cost
from sim.cost import (
    DEFAULT_CPU,
    Profile,
    load_profile,
    machine_key,
    machine_label,
    save_cpu_profile,
)
from twin import cli_real

OTHER = {"host": "elsewhere", "cpu": "Other CPU 9000", "cores": "64", "torch": "2.0.0"}


@pytest.fixture
def home(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.setenv("MOE_TWIN_HOME", str(tmp_path))
    monkeypatch.delenv(autocal.OPT_OUT, raising=False)
    monkeypatch.setattr(autocal, "_cuda", lambda: False)
    cost._cpu_cache.clear()
    yield tmp_path
    cost._cpu_cache.clear()


def as_other_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cost, "machine_key", lambda: dict(OTHER))
    cost._cpu_cache.clear()


def fitted(kernel_us: float = 42.0) -> Profile:
    return replace(DEFAULT_CPU, calibrated=True, source="a test fit", kernel_us=kernel_us)


class FakeCalibrate:
    """Stands in for real.calibrate.calibrate: counts calls, may fail."""

    def __init__(self, fail: BaseException | None = None) -> None:
        self.calls = 0
        self.fail = fail

    def __call__(self, world_size: int = 2, repeats: int = 5, timeout_s: float = 120.0,
                 progress: Any = None) -> tuple[Profile, dict[str, float]]:
        self.calls += 1
        if progress is not None:
            progress("microbenchmarks (one thread)")
        if self.fail is not None:
            raise self.fail
        return fitted(40.0 + self.calls), {}


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> FakeCalibrate:
    f = FakeCalibrate()
    monkeypatch.setattr("real.calibrate.calibrate", f)
    return f


def autocalibrate(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """The CLI's first-real-use hook; its stderr lines."""
    cli_real.autocalibrate(argparse.Namespace(timeout=5.0))
    err = capsys.readouterr().err
    return [line for line in err.splitlines() if line.startswith("moe-twin:")]


# ---- storage under the machine key ----


def test_profile_is_stored_and_loaded_under_this_machines_key(home: Any) -> None:
    path = save_cpu_profile(fitted())
    data = json.loads(path.read_text())
    assert data["machine"] == machine_key()
    assert path.parent == home and path.name != "cpu_profile.json"
    got = load_profile("cpu")
    assert got.calibrated and got.kernel_us == 42.0
    assert got.machine == machine_label(machine_key())


def test_a_profile_of_another_machine_is_not_used(home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    save_cpu_profile(fitted())
    as_other_machine(monkeypatch)
    got = load_profile("cpu")
    assert not got.calibrated and got.kernel_us == DEFAULT_CPU.kernel_us
    assert "another machine" in got.source and machine_key()["host"] in got.source


def test_a_copied_profile_file_with_another_key_is_not_used(home: Any) -> None:
    from dataclasses import asdict

    # Another machine's file under this machine's file name (copied over).
    cost.profile_path().write_text(json.dumps({"machine": OTHER, "profile": asdict(fitted())}))
    got = load_profile("cpu")
    assert not got.calibrated and "calibrated on another machine: elsewhere" in got.source


def test_a_profile_without_machine_key_is_not_used(home: Any) -> None:
    from dataclasses import asdict

    (home / "cpu_profile.json").write_text(json.dumps(asdict(fitted())))  # the format before machine keys
    got = load_profile("cpu")
    assert not got.calibrated and "machine unknown" in got.source


def test_an_unreadable_profile_file_is_the_defaults_until_recalibrated(home: Any, fake: FakeCalibrate,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    cost.profile_path().write_text("{not json")
    got = load_profile("cpu")
    assert not got.calibrated and "is unreadable" in got.source
    lines = autocalibrate(capsys)
    assert fake.calls == 1 and "is unreadable" in lines[0]
    assert load_profile("cpu").calibrated


# ---- calibration on first real use ----


def test_autocalibration_runs_once_is_stored_and_reused(home: Any, fake: FakeCalibrate,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    lines = autocalibrate(capsys)
    assert fake.calls == 1
    assert len(lines) == 2
    assert "no cpu profile calibrated on this machine yet" in lines[0] and "calibrating" in lines[0]
    assert "calibrated in" in lines[1] and str(cost.profile_path()) in lines[1]
    assert load_profile("cpu").calibrated and load_profile("cpu").kernel_us == 41.0
    assert autocal.reason_to_calibrate() is None
    assert autocalibrate(capsys) == []  # the second real use: nothing to do
    assert fake.calls == 1


def test_another_machine_calibrates_its_own_profile(home: Any, fake: FakeCalibrate,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    autocalibrate(capsys)
    as_other_machine(monkeypatch)
    lines = autocalibrate(capsys)
    assert fake.calls == 2
    assert "for another machine" in lines[0]  # says why, naming what it will not use
    assert load_profile("cpu").kernel_us == 42.0
    assert len(list(home.glob("cpu_profile.*.json"))) == 2
    monkeypatch.setattr(cost, "machine_key", machine_key)  # back on the first machine: its own profile
    cost._cpu_cache.clear()
    assert load_profile("cpu").kernel_us == 41.0


def test_failed_calibration_falls_back_in_one_line(home: Any, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from real.pool import PoolStartupError

    failing = FakeCalibrate(PoolStartupError(2, 1.0, "spawning failed: no room\nsecond line"))
    monkeypatch.setattr("real.calibrate.calibrate", failing)
    lines = autocalibrate(capsys)
    assert len(lines) == 2
    assert lines[1].startswith("moe-twin: calibration failed (PoolStartupError: could not start 2 rank processes")
    assert lines[1].endswith("the simulated cpu timeline uses the uncalibrated defaults")
    assert not load_profile("cpu").calibrated
    assert not list(home.glob("cpu_profile.*.json"))


def test_ctrl_c_during_calibration_is_the_users(home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("real.calibrate.calibrate", FakeCalibrate(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        autocal.calibrate_now()


def test_opted_out_never_calibrates(home: Any, fake: FakeCalibrate, capsys: pytest.CaptureFixture[str],
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(autocal.OPT_OUT, "1")
    assert autocal.reason_to_calibrate() is None
    assert autocalibrate(capsys) == []
    assert fake.calls == 0


# ---- the fit ----


def test_fit_recovers_the_profile_behind_its_data() -> None:
    """Traces the model itself produced with known fixed costs: the fit
    (finite-difference features, collectives from the median issue less the
    predicted skew) gives those costs back."""
    from real.calibrate import (
        CALIBRATION_SCENARIOS,
        TERMS,
        Runs,
        base_profile,
        calibration_scenario,
        fit_profile,
    )
    from sim import simulate

    comp = {"flops": 30e9, "mem_bw": 3e9, "elementwise_us": 5.0, "kernel_us": 12.0,
            "expert_active_us": 200.0, "expert_idle_us": 20.0}
    base = replace(base_profile(comp, 0.7e9), cores=2)
    truth = replace(base, kernel_us=110.0, elementwise_us=60.0, coll_alpha_us=3000.0, a2a_alpha_us=4500.0,
                    expert_active_us=600.0, expert_idle_us=60.0, host_gap_us=95.0)
    runs = {}
    for name in CALIBRATION_SCENARIOS:
        s = calibration_scenario(name)
        runs[name] = Runs(s, [simulate(s, "fixed", profile=truth, what_if=False)])
    fit = fit_profile(base, runs)
    assert fit.calibrated
    for term in (*TERMS, "host_gap_us"):
        assert getattr(fit, term) == pytest.approx(getattr(truth, term), rel=1e-6), term


def test_more_ranks_than_cores_time_share_the_expert_loop() -> None:
    from sim.cost import for_world

    p = replace(DEFAULT_CPU, cores=2)
    assert for_world(p, 2) is p
    four = for_world(p, 4)
    assert four.expert_active_us == 2 * p.expert_active_us and four.flops == p.flops / 2
    assert four.kernel_us == p.kernel_us  # short ops are not time-shared
    assert for_world(cost.GPU_PROFILES["h100"], 1024) is cost.GPU_PROFILES["h100"]


# ---- really calibrating (slow) ----


@pytest.mark.slow
def test_first_real_use_really_calibrates_and_stores(home: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autocal, "AUTO_REPEATS", 1)
    note = autocal.calibrate_now(timeout_s=120.0)
    assert note.startswith("cpu profile calibrated in"), note
    prof = load_profile("cpu")
    assert prof.calibrated and prof.machine == machine_label(machine_key())
    assert prof.flops > 0 and prof.mem_bw > 0 and prof.bus_bw > 0
    assert prof.kernel_us > 0 and prof.expert_active_us > 0 and prof.host_gap_us > 0
    assert autocal.reason_to_calibrate() is None


@pytest.mark.slow
def test_a_real_command_keeps_its_result_when_calibration_fails(home: Any, monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    failing = FakeCalibrate(RuntimeError("ranks cannot start"))
    monkeypatch.setattr("real.calibrate.calibrate", failing)
    rc = cli.main(["run", "r4-gpt-oss-padded", "--runner", "fixed", "--json"])
    out, err = capsys.readouterr()
    assert rc == cli.EXIT_OK, err
    assert failing.calls == 1
    assert json.loads(out)["scenario"] == "r4-gpt-oss-padded"  # stdout is the JSON alone
    failed = [line for line in err.splitlines() if "calibration failed" in line]
    assert failed == ["moe-twin: calibration failed (RuntimeError: ranks cannot start); "
                      "the simulated cpu timeline uses the uncalibrated defaults"]
