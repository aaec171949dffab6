"""Runner families for the latent up-projection replicated or row-parallel
(tests/families.py style): wrong runners, each a short override of one
decision, and the scenarios the fixed runner must come back clean on.

Rank processes load these classes by file path (`families_rowpar.py:Name`)."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.runners import MoERunner
from scenarios.spec import ModelTraits, ParallelConfig, Scenario, Workload

# ---- wrong ----


class RowUpReducedTwice(MoERunner):
    """The row-parallel projection reduces its own output (a RowParallelLinear
    built with reduce_results=True), fed the reduced routed output, and the
    runner's final all-reduce sums it again."""

    def up_project(self, ops: Ops, routed: Any) -> Any:
        return ops.all_reduce(super().up_project(ops, routed), "tp", name="latent_up_all_reduce")


class RowUpWithoutReduction(MoERunner):
    """Forgets that a row-parallel projection emits a TP partial: the routed
    output counts as reduced after it, so nothing sums the shares."""

    def reduced_after_transform(self, reduced: bool) -> bool:
        return reduced


class RowUpOnPartial(MoERunner):
    """Skips the reduction before a row-parallel projection (as before a
    linear replicated one): each rank slices its own unreduced partial."""

    def needs_pre_projection_reduce(self, reduced: bool) -> bool:
        return False


class ReplicatedUpOnLatentShard(MoERunner):
    """Hands the replicated projection this rank's latent slice, as if it
    were row-parallel (the slice is the first L/tp columns: `trim`)."""

    def up_project(self, ops: Ops, routed: Any) -> Any:
        shard = ops.trim(routed, routed.shape[-1] // self.scenario.parallel.tp, name="latent_shard")
        return ops.latent_up(shard)


# ---- scenarios ----


def _s(name: str, model: dict, parallel: dict, tokens: int = 4) -> Scenario:
    base = {"hidden": 128, "moe_intermediate": 64, "num_experts": 8, "top_k": 2, "num_shared_experts": 1,
            "latent_dim": 64}
    return Scenario(name=name, model=ModelTraits(**{**base, **model}), parallel=ParallelConfig(**parallel),
                    workload=Workload(tokens=tokens, seed=3), kernel="torch")


ROW = {"latent_up_parallel": "row"}
REPL_TP2 = _s("latent-replicated-up-tp2", {}, {"tp": 2})
ROW_TP2 = _s("latent-row-up-tp2", ROW, {"tp": 2})
ROW_RSF_TP2 = _s("latent-row-up-rsf-tp2", {**ROW, "routed_scaling_factor": 2.5}, {"tp": 2})
# The combine already reduced (FlashInfer two-sided, not SP): no early reduce.
ROW_FI_TP2_DP2 = _s("latent-row-up-fi-tp2-dp2", ROW,
                    {"tp": 2, "dp": 2, "ep": True, "backend": "flashinfer_nvlink_two_sided"})
# Experts over moe_ep=2 x moe_tp=2, no shared experts.
ROW_HYBRID_TP4 = _s("latent-row-up-tp4-ep-size-2", {**ROW, "num_shared_experts": 0}, {"tp": 4, "ep": True, "ep_size": 2})

# (runner, scenario, predicted kind, the ranks it must hit, expected verdict)
WRONG = [
    (RowUpReducedTwice, ROW_TP2, "DOUBLE_REDUCTION", (0, 1), "CONFIRMED"),
    (RowUpWithoutReduction, ROW_TP2, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
    (RowUpOnPartial, ROW_TP2, "MISSING_REDUCTION", (0, 1), "CONFIRMED"),
    (ReplicatedUpOnLatentShard, REPL_TP2, "SHAPE_MISMATCH", (0, 1), "CONFIRMED"),
]

# The fixed runner, both layouts.
CORRECT = [REPL_TP2, ROW_TP2, ROW_RSF_TP2, ROW_FI_TP2_DP2, ROW_HYBRID_TP4]
