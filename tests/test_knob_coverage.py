"""The decision knobs only some runners read (a row-parallel latent
up-projection, SGLang's shared-experts fusion and prefill padding mode,
TensorRT-LLM's weight block) are in verify's spaces and in moe_scenarios():
a wrong variant of each decision is found by verify on a slice of the space
that holds the knob, by nothing once the knob is held at its default, and
by a plain `@given(moe_scenarios())` run (benchmarks/bench_cover.py measures
the rate over seeds)."""

from __future__ import annotations

from typing import Any

import pytest
from families_rowpar import (
    ReplicatedUpOnLatentShard,
    RowUpOnPartial,
    RowUpReducedTwice,
    RowUpWithoutReduction,
)
from families_sglang import FusedSharedNoEpScale, FusedSharedScaledTwice, ScatterAtSumLenOffset
from families_trtllm import NoSharedOutputScale

from scenarios.ops import Ops
from scenarios.runners import unsupported_reason
from scenarios.sglang import SGLangRunner
from scenarios.space import SPACES, classify, restrict
from scenarios.strategies import moe_scenarios
from twin.search.detection import detects
from twin.search.verify import verify


class ScatterIgnoresPhase(SGLangRunner):
    """Scatters the DP ranks' rows back by the decode cost rule whatever the
    phase: a prefill batch gathered at its true counts (SUM_LEN) is read at
    the padded (MAX_LEN) offsets."""

    def postprocess_layer(self, ops: Ops, out: Any, tokens: int) -> Any:
        if self.dp_attention() and not self.mlp_scattered() and not self.use_reduce_scatterv():
            counts = self.scenario.token_counts
            padded = 2 * sum(counts) >= max(counts) * len(counts)
            return ops.dp_scatter(out, name="dp_scatter", padded=padded)
        return super().postprocess_layer(ops, out, tokens)


_FEW = {"backend": ("allgather_reducescatter", "deepep_low_latency"), "version": ("newest",), "eplb": (False,),
        "platform": ("cpu",), "aux_stream": (False,), "padded": (False,)}
ROW = restrict(SPACES["default"], **_FEW, latent=("linear", "linear-row"))
TRT = restrict(SPACES["default"], **{**_FEW, "backend": ("allgather_reducescatter",)}, latent=("none",), shared=(1,))
_WIDE = {**_FEW, "backend": ("allgather_reducescatter",), "tp": (1, 2), "dp": (1, 2), "ep_size": ("all",),
         "tokens": ("small",), "latent": ("none",), "shared": (1,), "quantized_input": (False,)}
FUSION = restrict(SPACES["wide"], **{**_WIDE, "platform": ("cpu", "rocm")}, phase=("decode",), uneven_tokens=(False,))
# A large uneven batch (5, 7): the second DP rank's offset differs between the modes.
PHASE = restrict(SPACES["wide"], **{**_WIDE, "tokens": ("small", "large")}, shared_fusion=(False,), routed_scaling_factor=(1.0,))

# (wrong runner, space holding the knob, {axis: default}: the same space
# without the knob, where the runner is clean; None: wrong without it too)
CASES = [
    (RowUpReducedTwice, ROW, None),  # reduces a replicated projection's output too
    (RowUpWithoutReduction, ROW, {"latent": ("linear",)}),
    (RowUpOnPartial, ROW, {"latent": ("linear",)}),
    (NoSharedOutputScale, TRT, {"weight_block": ("none",)}),
    (FusedSharedNoEpScale, FUSION, {"shared_fusion": (False,)}),
    (FusedSharedScaledTwice, FUSION, {"shared_fusion": (False,)}),
    (ScatterIgnoresPhase, PHASE, {"phase": ("decode",)}),
]


@pytest.mark.parametrize("runner,axes,default", CASES, ids=[c[0].__name__ for c in CASES])
def test_verify_finds_the_wrong_decision_only_with_its_knob(runner, axes, default):
    found = verify(runner, axes, max_world=4, polish_findings=False)
    assert found.findings, runner.__name__
    for f in found.findings:
        assert classify(f.scenario, axes) is not None
    if default is not None:  # a wrong decision only the knob reaches
        without = verify(runner, restrict(axes, **default), max_world=4, polish_findings=False)
        assert without.proved_clean, [f.signature for f in without.findings]


@pytest.mark.parametrize("reference,axes", [("fixed", ROW), ("trtllm", TRT), ("sglang", FUSION), ("sglang", PHASE)])
def test_the_references_are_clean_on_those_spaces(reference, axes):
    res = verify(reference, axes, max_world=4, polish_findings=False)
    assert res.proved_clean and res.classes > 0, [f.signature for f in res.findings]


def test_the_old_knobs_stay_found():
    """The decisions the knobs sit beside: found as before."""
    assert verify(ReplicatedUpOnLatentShard, ROW, max_world=4, polish_findings=False).findings
    assert verify(ScatterAtSumLenOffset, restrict(PHASE, phase=("decode",)), max_world=4,
                  polish_findings=False).findings


def in_scope(runner: type, **kwargs: Any) -> Any:
    """moe_scenarios() less what the runner refuses (latent MoE for the
    engines' runners, ...), as a user's test of an engine runner draws."""
    return moe_scenarios(**kwargs).filter(lambda s: unsupported_reason(runner, s) is None)


# (knob, wrong runner, moe_scenarios keyword arguments)
GIVEN = [
    ("row", RowUpWithoutReduction, {}),
    ("row", RowUpOnPartial, {}),
    ("fusion", FusedSharedScaledTwice, {}),
    # Fusion under EP is ROCm's (AITER) only: rocm is not in the default platforms.
    ("fusion_rocm", FusedSharedNoEpScale, {"platforms": ("cpu", "cuda", "rocm")}),
    ("phase", ScatterIgnoresPhase, {}),
    ("weight_block", NoSharedOutputScale, {}),
]


@pytest.mark.parametrize("runner,kwargs", [g[1:] for g in GIVEN], ids=[g[0] for g in GIVEN])
def test_a_plain_given_run_meets_each_knob(runner, kwargs):
    """At least one of three seeds (the rates over 50 are in benchmarks/bench_cover.py)."""
    assert any(detects(runner, seed, in_scope(runner, **kwargs)) for seed in range(3)), runner.__name__
