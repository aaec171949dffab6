"""CPU tests of the FlashInfer entry points real.flashinfer_a2a calls, against
the pinned flashinfer-python: every entry point the adapter calls exists and
accepts the arguments it passes (signature binding: on the pinned version an
absent or changed entry point fails; on any other version it is reported as
drift from the pin), the pin in pyproject.toml is the one the code checks,
and drift is reported as such. Split from tests/test_flashinfer_a2a.py.
"""

from __future__ import annotations

import inspect
import re
import tomllib
from pathlib import Path

import pytest
import torch

import real.fi_api as api
import real.fi_engines as fe
import real.flashinfer_a2a as fa
from real.flashinfer_a2a import (
    BACKENDS,
    ONE_SIDED,
    PINNED_FLASHINFER,
    TWO_SIDED,
    A2AUnavailable,
    FlashInferA2A,
)

# ---- the installed API against the pin ---------------------------------------------------


def _absent(what: str) -> None:
    """An entry point is missing: a failure on the pinned version, drift on any other."""
    report = fa.drift_report()
    if report["is_pinned"]:
        pytest.fail(f"the pinned flashinfer {PINNED_FLASHINFER} lacks {what}")
    pytest.skip(f"drift: installed flashinfer {report['installed']} is not the pinned "
                f"{PINNED_FLASHINFER}; {what}; all drift: {report['problems']}")


def test_pyproject_pins_the_version_the_code_checks():
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    pins = [d for d in pyproject["project"]["dependencies"] if d.startswith("flashinfer-python")]
    assert pins == [f"flashinfer-python=={PINNED_FLASHINFER}"]


def _calls():
    out = []
    for backend in BACKENDS:
        for call in fa.library_calls(backend):
            out.append(pytest.param(call, id=f"{backend.rsplit('_', 2)[-2]}-{call.target.split(':')[1]}"))
    return out


@pytest.mark.parametrize("call", _calls())
def test_entry_point_exists_and_accepts_our_arguments(call):
    try:
        fn = fa.resolve(call.target)
    except (ImportError, AttributeError) as exc:
        _absent(f"{call.target} ({exc})")
    sig, lead = api.call_signature(fn)
    # Raises TypeError (test failure) if a parameter was renamed, removed or added as required.
    sig.bind(*lead, *call.args, **call.kwargs)


def test_api_problems_empty_for_installed_version():
    if fa.api_problems():
        _absent(f"entry points: {fa.api_problems()}")
    assert fa.api_problems() == []
    report = fa.drift_report()
    assert report["problems"] == [] and report["defect"] is False


def test_engine_entry_points_are_the_engines_path():
    # The one-sided engine goes through MoeAlltoAll (as vLLM's one-sided
    # manager does), the two-sided one through MnnvlMoe's static methods.
    one = {c.target for c in fa.library_calls(ONE_SIDED)}
    two = {c.target for c in fa.library_calls(TWO_SIDED)}
    assert {"flashinfer.comm.trtllm_moe_alltoall:MoeAlltoAll",
            "flashinfer.comm.trtllm_moe_alltoall:MoeAlltoAll.dispatch",
            "flashinfer.comm.trtllm_moe_alltoall:MoeAlltoAll.combine",
            "flashinfer.comm.trtllm_moe_alltoall:moe_a2a_get_workspace_size_per_rank"} <= one
    assert {f"flashinfer.comm.trtllm_alltoall:MnnvlMoe.{m}" for m in (
        "get_moe_workspaces", "get_moe_prepare_workspace",
        "mnnvl_moe_alltoallv_prepare_without_allgather", "mnnvl_moe_alltoallv",
        "mnnvl_moe_alltoallv_combine")} <= two


def _engine_call_names(obj) -> set[str]:
    return set(re.findall(r"\b(\w+_call)\(", inspect.getsource(obj)))


def test_library_calls_cover_every_call_the_engines_make():
    # An engine call missing from library_calls would escape the API check.
    listed = _engine_call_names(api.library_calls)
    used = set()
    for obj in (fe.mnnvl_setup, fe.OneSidedEngine, fe.TwoSidedEngine):
        used |= _engine_call_names(obj)
    assert used and used <= listed, used - listed


def test_api_drift_is_reported_as_api_not_found(monkeypatch):
    real_resolve = api.resolve

    def drifted(target):
        if target.endswith(":MoeAlltoAll.dispatch"):
            def dispatch(self, token_selected_experts, payloads, max_tokens):  # renamed
                raise AssertionError("never called")
            return dispatch
        if target.endswith("MnnvlMoe.mnnvl_moe_alltoallv"):
            raise AttributeError("type object 'MnnvlMoe' has no attribute 'mnnvl_moe_alltoallv'")
        return real_resolve(target)

    monkeypatch.setattr(api, "resolve", drifted)
    problems = fa.api_problems()
    assert any("MoeAlltoAll.dispatch" in p and "rejects our arguments" in p for p in problems)
    assert any("mnnvl_moe_alltoallv not found" in p for p in problems)
    for backend in BACKENDS:
        ok, reason = fa.available(backend)
        assert not ok and reason.startswith("API not found in flashinfer")
        with pytest.raises(A2AUnavailable, match="API not found"):
            FlashInferA2A(backend, 0, 2, 8, 2, 64, 16, torch.bfloat16)


def _without_trtllm_modules(monkeypatch, version):
    # What 0.7.4 looks like: both trtllm_* all-to-all modules are gone.
    real_resolve = api.resolve

    def resolve(target):
        if target.startswith(("flashinfer.comm.trtllm_alltoall:", "flashinfer.comm.trtllm_moe_alltoall:")):
            raise ModuleNotFoundError(f"No module named {target.split(':')[0]!r}")
        return real_resolve(target)

    monkeypatch.setattr(api, "resolve", resolve)
    monkeypatch.setattr(api, "flashinfer_version", lambda: version)


def test_drift_report_on_another_version_is_drift_not_defect(monkeypatch):
    _without_trtllm_modules(monkeypatch, "0.7.4")
    report = fa.drift_report()
    assert report["installed"] == "0.7.4" and report["pinned"] == PINNED_FLASHINFER
    assert not report["is_pinned"] and not report["defect"]
    assert len(report["problems"]) == 9 and all("not found" in p for p in report["problems"])
    ok, reason = fa.available(ONE_SIDED)
    assert not ok and f"flashinfer 0.7.4 (this project pins {PINNED_FLASHINFER})" in reason


def test_drift_report_on_the_pinned_version_is_a_defect(monkeypatch):
    _without_trtllm_modules(monkeypatch, PINNED_FLASHINFER)
    report = fa.drift_report(TWO_SIDED)
    assert report["is_pinned"] and report["defect"] and len(report["problems"]) == 5
    assert "this project pins" not in fa.available(TWO_SIDED)[1]


@pytest.mark.parametrize("deprecated, successor", sorted(api.SUCCESSORS.items()))
def test_deprecated_entry_points_and_their_successors(deprecated, successor):
    # The pinned version deprecates the classes the engine calls in favour of
    # flashinfer.moe_ep's, which wrap the same calls; a later version drops them.
    try:
        old, new = fa.resolve(deprecated), fa.resolve(successor)
    except (ImportError, AttributeError) as exc:
        _absent(f"{deprecated} or {successor} ({exc})")
    assert "deprecated" in (old.__doc__ or "").lower()
    assert successor.rsplit(":", 1)[1] in (old.__doc__ or "")
    assert new.__name__ == successor.rsplit(":", 1)[1]
