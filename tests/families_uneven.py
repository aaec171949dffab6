"""Runner families for uneven tokens per DP rank (tests/families.py style):
wrong runners that assume every DP rank holds as many tokens as this one,
and correct ones that gather and scatter with each member's own row count.

Each entry names its scenario and the outcome the twin must reach. Rank
processes load these classes by file path (`families_uneven.py:Name`)."""

from __future__ import annotations

from typing import Any

from scenarios.ops import Ops
from scenarios.runners import MoERunner, Order
from scenarios.spec import ModelTraits, ParallelConfig, Scenario, Workload

# ---- wrong ----


class GatherAssumingEqualCounts(MoERunner):
    """The naive DP gather written with torch's all_gather / reduce_scatter,
    as if every DP rank held this rank's token count."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        xd = ops.all_gather(x, "dp", name="dp_all_gather")
        rd = ops.all_gather(routing, "dp", name="dp_all_gather_routing")
        y = ops.experts(xd, rd)
        return ops.reduce_scatter(y, "dp", name="dp_reduce_scatter"), None


class KeepFirstRowsOfSum(MoERunner):
    """Combines by summing the gathered outputs over DP and keeping the first
    rows by its own count, as if its tokens came first in the gather."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        xd, rd = ops.dispatch(x, routing)
        y = ops.all_reduce(ops.experts(xd, rd), "dp", name="dp_all_reduce")
        return ops.trim_rows(y, x.shape[0], name="keep_own_count"), None


class ScatterBySizesOfItsOwn(MoERunner):
    """Passes reduce_scatterv sizes made up from its own count (this rank's
    tokens first, the rest to the others), so the members disagree."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        xd, rd = ops.dispatch(x, routing)
        y = ops.experts(xd, rd)
        mine, rest = x.shape[0], y.shape[0] - x.shape[0]
        return ops.reduce_scatterv(y, (mine, rest), "dp", name="scatterv"), None


# ---- correct ----


class ExplicitGatherv(MoERunner):
    """The naive DP gather spelled out with all_gatherv and reduce_scatterv,
    the sizes being each DP member's layer rows."""

    def routed_path(self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any) -> tuple[Any, Any]:
        xd = ops.all_gatherv(x, "dp", name="dp_all_gatherv")
        y = ops.experts(xd, ops.all_gatherv(routing, "dp", name="dp_all_gatherv_routing"))
        sizes = self.scenario.group_rows("dp", ops.rank)
        return ops.reduce_scatterv(y, sizes, "dp", name="dp_reduce_scatterv"), None


# ---- scenarios ----


def _s(name: str, parallel: dict, tokens: list[int], shared: int = 1) -> Scenario:
    return Scenario(
        name=name,
        model=ModelTraits(hidden=128, moe_intermediate=64, num_experts=8, top_k=2, num_shared_experts=shared),
        parallel=ParallelConfig(**parallel),
        workload=Workload(tokens=tuple(tokens), seed=3),
        kernel="torch",
    )


NAIVE_DP2 = _s("naive-dp2-uneven", {"dp": 2}, [5, 2])
NAIVE_DP2_ROUTED_ONLY = _s("naive-dp2-uneven-routed-only", {"dp": 2}, [5, 2], shared=0)
NAIVE_TP2_DP2 = _s("naive-tp2-dp2-uneven", {"tp": 2, "dp": 2}, [3, 6])
DEEPEP_DP2 = _s("deepep-ll-dp2-uneven", {"dp": 2, "ep": True, "backend": "deepep_low_latency"}, [5, 2])
SP_TP2_DP2 = _s("sp-tp2-dp2-uneven", {"tp": 2, "dp": 2, "ep": True}, [5, 2])
SP_DEEPEP_TP2_DP2 = _s("sp-deepep-ht-tp2-dp2-uneven", {"tp": 2, "dp": 2, "ep": True,
                                                      "backend": "deepep_high_throughput"}, [7, 2])
FI_TWO_SIDED_TP2_DP2 = _s("fi-two-sided-tp2-dp2-uneven", {"tp": 2, "dp": 2, "ep": True,
                                                        "backend": "flashinfer_nvlink_two_sided"}, [2, 5])
# An idle DP rank (0 tokens): empty tensors on every path.
IDLE_NAIVE_DP2 = _s("naive-dp2-idle", {"dp": 2}, [5, 0])
IDLE_DEEPEP_DP2 = _s("deepep-ll-dp2-idle", {"dp": 2, "ep": True, "backend": "deepep_low_latency"}, [0, 4])
IDLE_SP_TP2_DP2 = _s("sp-deepep-ht-tp2-dp2-idle", {"tp": 2, "dp": 2, "ep": True,
                                                  "backend": "deepep_high_throughput"}, [0, 3])

# (runner, scenario, predicted kind, the ranks it must hit, expected verdict)
WRONG = [
    (GatherAssumingEqualCounts, NAIVE_DP2, "SHAPE_MISMATCH", (0, 1), "CONFIRMED"),
    (KeepFirstRowsOfSum, NAIVE_DP2_ROUTED_ONLY, "WRONG_TOKENS", (1,), "CONFIRMED"),
    (ScatterBySizesOfItsOwn, NAIVE_DP2_ROUTED_ONLY, "SHAPE_MISMATCH", (0, 1), "CONFIRMED"),
]

# (runner, scenario): clean in sim and real
CORRECT = [
    (ExplicitGatherv, NAIVE_DP2),
    (ExplicitGatherv, NAIVE_TP2_DP2),
    (ExplicitGatherv, IDLE_NAIVE_DP2),
]

# The reference runner on uneven scenarios: clean in sim and real.
FIXED = [NAIVE_DP2, NAIVE_TP2_DP2, DEEPEP_DP2, SP_TP2_DP2, SP_DEEPEP_TP2_DP2, FI_TWO_SIDED_TP2_DP2,
         IDLE_NAIVE_DP2, IDLE_DEEPEP_DP2, IDLE_SP_TP2_DP2]
