"""`conform` against the installed vLLM (the engine extra). Skipped, with the
reason, when the pinned engine is not installed (scripts/install-engine.sh);
.ci/run installs it first."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines.vllm import PINNED_VERSION, installed
from engines.vllm.config_map import engine_config, not_expressible
from scenarios.spec import ParallelConfig, Scenario

_engine_absent = pytest.mark.skipif(
    not installed(),
    reason=f"vllm {PINNED_VERSION} not installed: run scripts/install-engine.sh vllm=={PINNED_VERSION}",
)


def needs_engine(fn):  # type: ignore[no-untyped-def]
    """Runs the engine probe (its own process, ~12 s to start): slow, and
    skipped with the reason when the engine extra is absent."""
    return pytest.mark.slow(_engine_absent(fn))


def test_config_map_carries_knobs_not_derived_decisions() -> None:
    s = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, backend="mori"))
    cfg = engine_config(s)
    assert cfg["backend"] == "mori_high_throughput"  # the twin's older name
    assert "sp" not in cfg and "kernel_width" not in cfg  # the engine decides those
    hybrid = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, ep_size=2))
    assert "ep_size" in (not_expressible(hybrid, "newest") or "")


@pytest.fixture(scope="module")
def client():  # type: ignore[no-untyped-def]
    from twin.check.conform import ProbeClient

    with ProbeClient() as c:
        yield c


@needs_engine
def test_probe_builds_sp_deepep_layer_with_engine_code(client) -> None:  # type: ignore[no-untyped-def]
    from twin.check.conform import engine_decisions, twin_decisions

    s = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, backend="deepep_low_latency"),
                 model=Scenario().model.__class__(hidden=32, moe_intermediate=32, num_experts=8,
                                                  num_shared_experts=1))
    ans = client.ask(engine_config(s))
    assert ans["accepted"], ans
    assert ans["prepare_finalize"] == "DeepEPLLPrepareAndFinalize"  # the engine's own PF choice
    eng = engine_decisions(ans)
    assert eng["sp"] is True and eng["kernel_width"] == 2048  # LL rounding to its size list
    assert eng == twin_decisions(s)


def test_reference_models_engine_refusals() -> None:
    from scenarios.runner_base import engine_refusal
    from scenarios.spec import Runtime

    cuda = Runtime(platform="cuda")
    eplb = ParallelConfig(tp=2, dp=2, ep=True, eplb=True, backend="deepep_low_latency")
    assert engine_refusal(Scenario(parallel=eplb, runtime=cuda)) is None
    assert "CPU" in (engine_refusal(Scenario(parallel=eplb)) or "")
    moonep = ParallelConfig(tp=2, dp=1, ep=True, eplb=True, backend="moonep")
    assert "MoonEP" in (engine_refusal(Scenario(parallel=moonep, runtime=cuda)) or "")
    mori = ParallelConfig(tp=1, dp=2, ep=True, backend="mori_low_latency")
    assert "ROCm" in (engine_refusal(Scenario(parallel=mori, runtime=cuda)) or "")
    assert engine_refusal(Scenario(parallel=mori, runtime=Runtime(platform="rocm"))) is None
    # Without all-to-all kernels (one DP rank, no SP) MORI is never built.
    idle = ParallelConfig(tp=2, dp=1, ep=True, backend="mori_low_latency")
    assert engine_refusal(Scenario(parallel=idle, runtime=cuda)) is None


@needs_engine
@pytest.mark.parametrize("parallel, platform", [
    (ParallelConfig(tp=2, dp=1, ep=True, eplb=True, backend="moonep"), "cuda"),
    (ParallelConfig(tp=2, dp=2, ep=True, eplb=True), "cpu"),
    (ParallelConfig(tp=1, dp=2, ep=True, backend="mori_high_throughput"), "cuda"),
])
def test_probe_refusals_match_the_reference(client, parallel, platform) -> None:  # type: ignore[no-untyped-def]
    from scenarios.runner_base import engine_refusal
    from scenarios.spec import Runtime

    s = Scenario(parallel=parallel, runtime=Runtime(platform=platform))
    ans = client.ask(engine_config(s))
    assert ans["accepted"] is False and ans["message"]  # the engine's own words
    assert engine_refusal(s) is not None


@needs_engine
def test_conform_small_space_agrees_on_decisions(client) -> None:  # type: ignore[no-untyped-def]
    from twin.check.conform import conform

    small = {"tp": (2,), "dp": (1, 2), "ep": (True,), "eplb": (False, True), "platform": ("cpu", "cuda"),
             "backend": ("allgather_reducescatter", "deepep_high_throughput", "flashinfer_nvlink_two_sided",
                         "moonep"),
             "latent": ("none", "nonlinear"), "allreduce_fusion": (False,)}
    r = conform("default", restrict=small, client=client)
    json.dumps(r)  # the --json document is plain data
    assert r["scenarios"] > 0 and 0 < r["both_run"] < r["scenarios"]  # some refused on both sides
    assert r["probe_error_count"] == 0
    for field, rate in r["agreement"].items():
        assert rate == 1.0, (field, r["mismatches"][:3])


@needs_engine
@pytest.mark.parametrize("runner, field", [("before-40673", "reductions"), ("before-38990", "shared_experts_order"),
                                           ("before-40865", "pre_trim")])
def test_conform_catches_a_historical_regression(client, runner, field) -> None:  # type: ignore[no-untyped-def]
    """The comparison is not vacuous: a runner with a known defect disagrees
    with the engine's own code on that defect's field."""
    from scenarios.runners import load_runner
    from twin.check.conform import conform

    small = {"tp": (2,), "dp": (1, 2), "ep": (True,), "eplb": (False,), "platform": ("cuda",),
             "aux_stream": (True,), "shared": (0, 1), "backend": ("deepep_high_throughput",),
             "latent": ("none",), "allreduce_fusion": (False,)}
    r = conform("default", restrict=small, client=client, runner_cls=load_runner(runner))
    assert r["agreement"][field] < 1.0
    assert any(m["class"].startswith(field) for m in r["mismatches"])


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", "conform", *args],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **(env or {})},
                          cwd=Path(__file__).resolve().parent.parent)


def test_cli_bad_sample_is_one_line_exit_2() -> None:
    r = _cli("--sample", "0")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--sample" in r.stderr


def test_cli_missing_engine_interpreter_is_exit_2() -> None:
    r = _cli("--sample", "1", env={"MOE_TWIN_VLLM_PYTHON": "/nonexistent/python"})
    assert r.returncode == 2 and "/nonexistent/python" in r.stderr and r.stdout == ""


@needs_engine
def test_probe_records_the_engines_aux_stream_fork_and_join(client) -> None:  # type: ignore[no-untyped-def]
    from scenarios.spec import ModelTraits, Runtime
    from twin.check.conform import engine_decisions, twin_decisions

    s = Scenario(parallel=ParallelConfig(tp=2), runtime=Runtime(platform="cuda", aux_stream=True),
                 model=ModelTraits(hidden=32, moe_intermediate=16, num_experts=4, num_shared_experts=1),
                 workload=Scenario().workload.__class__(tokens=3))
    ans = client.ask(engine_config(s))
    steps = [(e["op"], e["stream"]) for e in ans["events"]]
    assert steps[:4] == [("record_event", "main"), ("wait_event", "aux"), ("shared_experts", "aux"),
                         ("record_event", "aux")]
    assert ("wait_event", "main") in steps[4:]  # the main stream joins before the add
    assert engine_decisions(ans) == twin_decisions(s)
    assert engine_decisions(ans)["shared_stream"] == "aux"
