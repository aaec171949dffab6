"""Expert layout inside the MoE group: moe_ep x moe_tp (docs: moe_block.md s.1).

The MoE group is the whole world (tp x dp ranks). It is split into moe_ep
expert-parallel shards (expert e lives on EP index e // local_experts) times
moe_tp tensor-parallel shards of every expert's intermediate dimension.
SGLang's rank order: inside the MoE group, index = ep_idx * moe_tp + tp_idx
(moe_tp fastest), over world ranks in order. So the moe_ep group of a rank is
the ranks with its tp_idx, the moe_tp group the ranks with its ep_idx.

Routed-expert source labels (the simulator's shards and the reference's
partials) name a rank's shard: `ep3` when moe_tp is 1, `tp1` when moe_ep is 1
(today's labels), `ep1.tp0` when both axes are > 1.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from scenarios.spec import Scenario

MOE_GROUPS = ("moe_ep", "moe_tp")
_SHARD = re.compile(r"^(?:ep(\d+)\.tp(\d+)|ep(\d+)|tp(\d+))$")


def moe_coords(s: Scenario, rank: int) -> tuple[int, int]:
    """(ep_idx, tp_idx) of a world rank inside the MoE group."""
    moe_tp = s.moe_tp
    return rank // moe_tp, rank % moe_tp


def moe_group(s: Scenario, kind: str, rank: int) -> tuple[int, ...]:
    """World ranks of `rank`'s moe_ep group (same tp_idx) or moe_tp group (same ep_idx)."""
    e, t = moe_coords(s, rank)
    moe_tp = s.moe_tp
    if kind == "moe_ep":
        return tuple(i * moe_tp + t for i in range(s.moe_ep))
    if kind == "moe_tp":
        return tuple(e * moe_tp + j for j in range(moe_tp))
    raise ValueError(f"not a MoE group kind: {kind!r}")


def hybrid(s: Scenario) -> bool:
    """Experts sharded on both axes (moe_ep > 1 and moe_tp > 1)."""
    return s.moe_ep > 1 and s.moe_tp > 1


def routed_shard(s: Scenario, rank: int) -> str:
    """The label of the routed-expert shard `rank` computes."""
    if hybrid(s):
        e, t = moe_coords(s, rank)
        return f"ep{e}.tp{t}"
    # One axis only: the shard index is the world rank (as before the layout
    # could be hybrid); with a single rank, "ep0" under EP, else "tp0".
    if s.moe_ep > 1 or (s.moe_tp == 1 and s.parallel.ep):
        return f"ep{rank}"
    return f"tp{rank}"


def routed_shards(s: Scenario) -> tuple[str, ...]:
    """Every routed shard label, in world-rank order."""
    return tuple(routed_shard(s, r) for r in range(s.world))


def shard_coords(s: Scenario, shard: str) -> tuple[int, int]:
    """(ep_idx, tp_idx) of a routed shard label; ValueError if it is not one."""
    m = _SHARD.match(shard)
    if m is None:
        raise ValueError(f"not a routed shard label: {shard!r}")
    if m.group(1) is not None:
        return int(m.group(1)), int(m.group(2))
    if m.group(3) is not None:
        return int(m.group(3)), 0
    return 0, int(m.group(4))


def split_row_shard(shard: str) -> tuple[str, int | None]:
    """("ep1", 0) for "ep1+up0" (a row-parallel up-projection's share, TP rank
    0's, of routed shard ep1: sim.algebra.row_shard); (shard, None) untagged."""
    base, sep, tag = shard.partition("+up")
    return (base, int(tag)) if sep and tag.isdigit() else (shard, None)


def expert_range(s: Scenario, ep_idx: int) -> tuple[int, int]:
    """[lo, hi) of the global experts EP index `ep_idx` holds."""
    per = s.local_experts
    return ep_idx * per, (ep_idx + 1) * per


def intermediate_range(s: Scenario, tp_idx: int) -> tuple[int, int]:
    """[lo, hi) of the intermediate columns MoE-TP index `tp_idx` holds."""
    per = s.model.moe_intermediate // s.moe_tp
    return tp_idx * per, (tp_idx + 1) * per
