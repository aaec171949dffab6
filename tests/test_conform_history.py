"""`conform --engine-version` against the engine's own history: the R2 seed
(FlashInfer NVLink prepare/finalize declaring `output_is_reduced() = False`)
shipped in vLLM 0.21.0 and was fixed in 0.22.0. Each slow test is skipped,
with the reason, when that release is not installed under .engines/ (CI
installs only the pinned release)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from engines.vllm import EngineMissing, installed
from engines.vllm.client import ProbeClient
from engines.vllm.config_map import engine_config, not_expressible
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario

FI = ("flashinfer_nvlink_two_sided", "flashinfer_nvlink_one_sided")
# The R2 trigger: EP with DP > 1 and TP > 1 (engine_frontend.md), on CUDA
# (FlashInfer's NVLink kernels; on the CPU platform 0.21/0.22 take the
# monolithic CPU path and build no prepare/finalize at all).
R2_SPACE = {"backend": FI, "ep": (True,), "tp": (2,), "dp": (2,), "platform": ("cuda",)}


def release(version: str):  # type: ignore[no-untyped-def]
    skip = pytest.mark.skipif(not installed(version),
                              reason=f"vllm {version} not installed: run scripts/install-engine.sh vllm=={version}")
    return lambda fn: pytest.mark.slow(skip(fn))


def test_old_release_backend_names_and_knobs() -> None:
    s = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, backend="mori_high_throughput", version="previous"))
    assert engine_config(s, renamed_backends=False)["backend"] == "mori"  # 0.21/0.22's name
    moon = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, backend="moonep", version="previous"))
    assert "not a backend of this release" in (not_expressible(moon, "previous", renamed_backends=False) or "")
    assert not_expressible(moon, "previous") is None
    fused = Scenario(parallel=ParallelConfig(tp=2, version="previous"), runtime=Runtime(allreduce_fusion=True))
    assert fused.next_layer_fuses_reduce
    assert "reduce_results" in (not_expressible(fused, "previous", reduce_results_knob=False) or "")


def test_unknown_release_is_refused() -> None:
    from twin.check.conform import conform

    with pytest.raises(EngineMissing, match="not a supported release"):
        conform(engine_version="0.19.0")


@pytest.fixture(scope="module")
def probe() -> Iterator[Callable[[str], ProbeClient]]:
    """One probe process per release for the module: its start-up (importing
    that release's vLLM) is most of a test's time. One that exited is
    replaced, so a test that killed it does not fail the next ones."""
    started: dict[str, ProbeClient] = {}

    def get(version: str) -> ProbeClient:
        client = started.get(version)
        if client is None or client.proc.poll() is not None:
            client = started[version] = ProbeClient(version=version)
        return client

    yield get
    for c in started.values():
        c.close()


def _r2(version: str, probe) -> dict:  # type: ignore[no-untyped-def, type-arg]
    from twin.check.conform import conform

    return conform("default", restrict=R2_SPACE, engine_version=version, client=probe(version))


@release("0.21.0")
def test_r2_in_0_21_0_engine_code_disagrees_with_fixed(probe) -> None:  # type: ignore[no-untyped-def]
    d = _r2("0.21.0", probe)
    assert d["version"] == "0.21.0" and d["twin_version"] == "previous"
    assert d["both_run"] > 0 and d["probe_error_count"] == 0
    # Every R2-trigger scenario: the engine's PF says not reduced, `fixed` says reduced.
    assert d["agreement"]["fused_output_is_reduced"] == 0.0
    classes = {m["class"] for m in d["mismatches"]}
    assert "fused_output_is_reduced: engine False / twin True" in classes


@release("0.22.0")
def test_r2_fixed_in_0_22_0_engine_code_agrees_with_fixed(probe) -> None:  # type: ignore[no-untyped-def]
    d = _r2("0.22.0", probe)
    assert d["version"] == "0.22.0" and d["both_run"] > 0 and d["probe_error_count"] == 0
    assert d["agreement"]["fused_output_is_reduced"] == 1.0
    assert not [m for m in d["mismatches"] if m["class"].startswith(("fused_output", "reductions"))]


@pytest.mark.slow
@pytest.mark.parametrize("version,reduced", [("0.21.0", False), ("0.22.0", True)])
def test_r2_double_reduction_seen_in_the_release_forward(probe, version: str,  # type: ignore[no-untyped-def]
                                                         reduced: bool) -> None:
    """One R2 scenario with shared experts: 0.21.0's runner reduces the
    already-reduced routed output again in its final all-reduce; 0.22.0
    reduces the shared output alone."""
    if not installed(version):
        pytest.skip(f"vllm {version} not installed: run scripts/install-engine.sh vllm=={version}")
    from twin.check.conform import engine_decisions

    s = Scenario(parallel=ParallelConfig(tp=2, dp=2, ep=True, backend=FI[0], version="previous"),
                 runtime=Runtime(platform="cuda"),
                 model=ModelTraits(hidden=32, moe_intermediate=32, num_experts=8, num_shared_experts=1))
    ans = probe(version).ask(engine_config(s, renamed_backends=False))
    assert ans["accepted"], ans
    assert ans["prepare_finalize"] == "FlashInferNVLinkTwoSidedPrepareAndFinalize"
    eng = engine_decisions(ans)
    assert eng["fused_output_is_reduced"] is reduced
    assert eng["reductions"] == (["shared_all_reduce@tp"] if reduced else ["final_all_reduce@tp"])


@release("0.20.0")
def test_r2_in_0_20_0_two_sided_and_one_sided_refused_unquantized(probe) -> None:  # type: ignore[no-untyped-def]
    """0.20.0 shipped R2 too (two-sided: not reduced, the runner reduces again);
    its one-sided backend refuses unquantized activations (nvfp4 only), so the
    unquantized probe sees that refusal instead of the flag."""
    d = _r2("0.20.0", probe)
    assert d["version"] == "0.20.0" and d["both_run"] > 0 and d["probe_error_count"] == 0
    assert d["agreement"]["fused_output_is_reduced"] == 0.0
    classes = {m["class"] for m in d["mismatches"]}
    assert "fused_output_is_reduced: engine False / twin True" in classes
    assert "reductions: engine ['final_all_reduce@tp'] / twin []" in classes
    refused = [m for m in d["mismatches"] if m["class"].startswith("accept:")]
    assert refused and all(m["example"]["backend"] == FI[1] and "nvfp4" in m["class"] for m in refused)
