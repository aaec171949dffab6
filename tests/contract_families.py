"""Wrong runners for the kernel/transform and backend contracts: each a short
override of one decision, with the scenario that exposes it and the hazard the
twin must predict. Rank processes load these classes by file path
(`contract_families.py:Name`), like a user's runner."""

from __future__ import annotations

from typing import Any

from scenarios.backends import eplb_overlap_safe
from scenarios.ops import Ops
from scenarios.runners import MoERunner, Order, overlap_order
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, Workload


class ViewInsteadOfTrim(MoERunner):
    """Reshapes the padded result to the hidden width instead of trimming it."""

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        result = super().final_reduce(ops, result, routed_reduced)
        return ops.view(result, (result.shape[0], self.scenario.model.hidden))


class IgnoresBackendRounding(MoERunner):
    """Pads only for the model's own kernel width, not for the backend's rounding."""

    def should_pad(self) -> bool:
        return self.scenario.model.padded


class AssumesPaddedOutput(MoERunner):
    """Treats the routed output as padded although the kernel writes it unpadded."""

    def routed_output_padded(self) -> bool:
        return self.scenario.padded


class NoEarlyReduceBeforeNonlinear(MoERunner):
    """Applies the non-linear output transform to partial sums (no early reduce)."""

    def needs_pre_transform_reduce(self, reduced: bool) -> bool:
        return False


class EplbOnEffectiveBackend(MoERunner):
    """Decides EPLB overlap safety on the backend in effect, not the configured one."""

    def shared_experts_order(self, num_tokens: int) -> Order:
        s = self.scenario
        if s.parallel.eplb and not eplb_overlap_safe(s.effective_backend, s.parallel.version):
            return Order.NO_OVERLAP
        return overlap_order(s, num_tokens)


def _s(name: str, model: dict, parallel: dict, runtime: dict | None = None, tokens: int = 4, **top: Any) -> Scenario:
    return Scenario(name=name, model=ModelTraits(**{"num_experts": 8, "moe_intermediate": 32, **model}),
                    parallel=ParallelConfig(**parallel), runtime=Runtime(**(runtime or {})),
                    workload=Workload(tokens=tokens, seed=1), **top)


# Model padding 120 -> 128, no shared experts: the result is trimmed after the op.
PADDED_TP2 = _s("padded-tp2", {"hidden": 120, "moe_hidden": 128}, {"tp": 2})
# DeepEP high-throughput rounds 120 bf16 elements (240 bytes) up to 512 bytes: 256 elements.
DEEPEP_HT_120 = _s("deepep-ht-120", {"hidden": 120}, {"dp": 2, "ep": True, "backend": "deepep_high_throughput"})
DEEPEP_HT_120_SHARED = _s("deepep-ht-120-shared", {"hidden": 120, "num_shared_experts": 1},
                          {"dp": 2, "ep": True, "backend": "deepep_high_throughput"})
# The kernel writes its output unpadded (no shared experts: the op returns the hidden width).
UNPADDED_TP2 = _s("unpadded-tp2", {"hidden": 120, "moe_hidden": 128}, {"tp": 2}, kernel_writes_unpadded=True)
UNPADDED_SHARED_TP2 = _s("unpadded-shared-tp2", {"hidden": 120, "moe_hidden": 128, "num_shared_experts": 1},
                         {"tp": 2}, kernel_writes_unpadded=True)
NONLINEAR_LATENT_TP2 = _s("nonlinear-latent-tp2", {"hidden": 64, "latent_dim": 32, "transform_nonlinear": True},
                          {"tp": 2})
# EPLB with DeepEP low-latency configured but dp = 1 (no all-to-all kernel in use).
EPLB_DP1 = _s("eplb-deepep-ll-dp1", {"num_shared_experts": 1},
              {"tp": 2, "ep": True, "eplb": True, "backend": "deepep_low_latency"},
              {"platform": "cuda", "aux_stream": True})

# (runner, scenario, hazard kind, step name, ranks)
WRONG = [
    (ViewInsteadOfTrim, PADDED_TP2, "SHAPE_MISMATCH", "view", (0, 1)),
    (IgnoresBackendRounding, DEEPEP_HT_120, "SHAPE_MISMATCH", "routed_experts", (0, 1)),
    (AssumesPaddedOutput, UNPADDED_TP2, "SHAPE_MISMATCH", "custom_op_boundary", (0, 1)),
    (NoEarlyReduceBeforeNonlinear, NONLINEAR_LATENT_TP2, "MISSING_REDUCTION", "latent_up", (0, 1)),
    (EplbOnEffectiveBackend, EPLB_DP1, "UNSAFE_OVERLAP", "shared_experts", (0, 1)),
]
