"""`conform` against the installed vLLM (the engine extra). Skipped, with the
reason, when the pinned engine is not installed (scripts/install-engine.sh);
.ci/run installs it first."""

from __future__ import annotations

import json

import pytest

from engines.vllm import PINNED_VERSION, installed
from engines.vllm.config_map import engine_config, not_expressible
from scenarios.spec import ParallelConfig, Scenario

needs_engine = pytest.mark.skipif(
    not installed(),
    reason=f"vllm {PINNED_VERSION} not installed: run scripts/install-engine.sh vllm=={PINNED_VERSION}",
)


def test_config_map_carries_knobs_not_derived_decisions() -> None:
    s = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, backend="mori"))
    cfg = engine_config(s)
    assert cfg["backend"] == "mori_high_throughput"  # the twin's older name
    assert "sp" not in cfg and "kernel_width" not in cfg  # the engine decides those
    hybrid = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, ep_size=2))
    assert "ep_size" in (not_expressible(hybrid, "newest") or "")


@pytest.fixture(scope="module")
def client():  # type: ignore[no-untyped-def]
    from twin.conform import ProbeClient

    with ProbeClient() as c:
        yield c


@needs_engine
def test_probe_builds_sp_deepep_layer_with_engine_code(client) -> None:  # type: ignore[no-untyped-def]
    from twin.conform import engine_decisions, twin_decisions

    s = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, backend="deepep_low_latency"),
                 model=Scenario().model.__class__(hidden=32, moe_intermediate=32, num_experts=8,
                                                  num_shared_experts=1))
    ans = client.ask(engine_config(s))
    assert ans["accepted"], ans
    assert ans["prepare_finalize"] == "DeepEPLLPrepareAndFinalize"  # the engine's own PF choice
    eng = engine_decisions(ans)
    assert eng["sp"] is True and eng["kernel_width"] == 2048  # LL rounding to its size list
    assert eng == twin_decisions(s)


@needs_engine
def test_probe_reports_engine_rejection_with_its_message(client) -> None:  # type: ignore[no-untyped-def]
    s = Scenario(parallel=ParallelConfig(tp=2, dp=1, ep=True, eplb=True, backend="moonep"))
    cfg = dict(engine_config(s), platform="cuda")
    ans = client.ask(cfg)
    assert ans["accepted"] is False and "EPLB" in ans["message"]


@needs_engine
def test_conform_small_space_agrees_on_decisions(client) -> None:  # type: ignore[no-untyped-def]
    from twin.conform import conform

    small = {"tp": (2,), "dp": (1, 2), "ep": (True,), "eplb": (False,), "platform": ("cuda",),
             "backend": ("allgather_reducescatter", "deepep_high_throughput", "flashinfer_nvlink_two_sided"),
             "latent": ("none", "nonlinear"), "allreduce_fusion": (False,)}
    r = conform("default", restrict=small, client=client)
    json.dumps(r)  # the --json document is plain data
    assert r["scenarios"] > 0 and r["both_run"] == r["scenarios"]
    for field, rate in r["agreement"].items():
        assert rate == 1.0, (field, r["mismatches"][:3])
