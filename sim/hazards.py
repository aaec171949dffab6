"""Hazard detectors that need the whole program of a rank: races between
streams, overlap the backend contract forbids, and lost overlap (which needs a
second simulation of the best safe order).

The per-op detectors (reductions, wrong inputs and tokens) live in
sim/checks.py; shape errors in sim/simops.py, where shapes are computed; hangs
in sim/engine.py, where collectives meet. Same-stream in-place writes are
values (sim/simops.py: buffer versions), not races: only streams race here.
"""

from __future__ import annotations

from collections import defaultdict

from scenarios.runners import OVERLAPPED, MoERunner, Order
from scenarios.trace import Hazard, HazardKind, Step

ROUTED_OPS = ("dispatch", "experts", "combine")


def happens_before(a_stream: str, a_vc: dict[str, int], b_vc: dict[str, int]) -> bool:
    """Vector-clock order between two steps of one rank."""
    return b_vc.get(a_stream, 0) >= a_vc.get(a_stream, 0)


def concurrent(a_stream: str, a_vc: dict[str, int], b_stream: str, b_vc: dict[str, int]) -> bool:
    if a_stream == b_stream:
        return False
    return not happens_before(a_stream, a_vc, b_vc) and not happens_before(b_stream, b_vc, a_vc)


def detect_races(sim) -> list[Hazard]:  # noqa: ANN001 - sim.engine.Simulation (import cycle)
    """Two streams touch one buffer, at least one writes, no event orders them."""
    # Only buffers some non-main stream touches can race (the engine collects
    # them as accesses are made), on ranks that used more than one stream
    # (vector clocks are set for every step of those, for none of the others).
    rank_ops = sim.rank_ops
    side = {key for key in sim.side_buffers if rank_ops[key[0]].plans[0].vc is not None}
    if not side:
        return []
    # Buffer numbers are global: the (rank, buffer) key is built only for
    # accesses to a side buffer of some rank.
    side_bufs = {buf for _, buf in side}
    by_buf: dict[tuple[int, int], list] = defaultdict(list)
    for acc in sim.accesses:
        if acc[2] in side_bufs:
            key = (acc[0], acc[2])
            if key in side:
                by_buf[key].append(acc)
    out: list[Hazard] = []
    reported: set[tuple[int, int, int]] = set()
    # Which accesses of a buffer race depends on their (step, write) and the
    # rank's streams and clocks only; ranks of one plan shape share their
    # clock dicts (SimOps.assign_clocks), so the first one's identity names
    # the shape and ranks of one shape analyse each access pattern once.
    memo: dict[tuple, list[tuple[int, int]]] = {}
    for (rank, _buf), accs in by_buf.items():
        plans = rank_ops[rank].plans
        mkey = (id(plans[0].vc), tuple([(a.step, a.write) for a in accs]))
        pairs = memo.get(mkey)
        if pairs is None:
            pairs = memo[mkey] = _racing_pairs(plans, accs)
        if not pairs:
            continue
        steps = rank_ops[rank].steps
        for i, j in pairs:
            first, second = accs[i], accs[j]
            key = (rank, first.step, second.step)
            if key in reported:
                continue
            reported.add(key)
            s1, s2 = steps[first.step], steps[second.step]
            verb1 = "writes" if first.write else "reads"
            verb2 = "writes" if second.write else "reads"
            out.append(Hazard(
                HazardKind.UNSAFE_OVERLAP, s2.index, s2.name, rank,
                f"{s2.name} ({s2.stream}) {verb2} a buffer that step {s1.index} {s1.name} "
                f"({s1.stream}) {verb1}; no event orders them",
                opaque_from=s1.index,
            ))
    return out


# Collectives that use the group's own communicator (a dispatch or combine
# uses the all-to-all manager's, another one even over the same ranks).
COLLECTIVE_ORDER = "are collectives over one group"  # in the detail of detect_collective_order's hazards
GROUP_COMMUNICATOR_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_gatherv", "reduce_scatterv",
                          "dp_gather", "dp_scatter")


def detect_collective_order(sim) -> list[Hazard]:  # noqa: ANN001
    """Two collectives over one group issued on different streams with no
    event ordering them: a communicator runs its collectives in one order on
    every rank, and nothing makes the ranks agree on it (NCCL can deadlock;
    the ranks may pair one's sum with the other's). One per rank: its first."""
    out: list[Hazard] = []
    for rank in sorted(sim.side_collectives):  # on main only, program order is the order
        ops = sim.rank_ops[rank]
        if not ops.plans or ops.plans[0].vc is None:
            continue
        colls = [p for p in ops.plans if p.step.op in GROUP_COMMUNICATOR_OPS and p.step.group
                 and len(p.step.group) > 1]
        pair = _unordered_collectives(colls)
        if pair is not None:
            s1, s2 = pair
            out.append(Hazard(
                HazardKind.UNSAFE_OVERLAP, s2.index, s2.name, ops.rank,
                f"{s2.name} ({s2.stream}) and step {s1.index} {s1.name} ({s1.stream}) {COLLECTIVE_ORDER} "
                f"(ranks {list(s2.group)}) that no event orders: the ranks may run them in different orders "
                "(a hang, or one's sum paired with the other's)",
                opaque_from=s1.index,
            ))
    return out


def _unordered_collectives(colls: list) -> tuple[Step, Step] | None:
    for i, a in enumerate(colls):
        for b in colls[i + 1:]:
            if a.step.group == b.step.group and concurrent(a.step.stream, a.vc or {}, b.step.stream, b.vc or {}):
                return a.step, b.step
    return None


def shared_routed_pairs(sim, rank: int) -> list[tuple[Step, Step]]:  # noqa: ANN001
    """(shared step, routed step) pairs of one rank that may run concurrently."""
    ops = sim.rank_ops[rank]
    shared = [p for p in ops.plans if p.step.component == "shared"]
    routed = [p for p in ops.plans if p.step.component == "routed" and p.step.op in ROUTED_OPS]
    pairs = []
    for sp in shared:
        for rp in routed:
            if sp.vc is not None and rp.vc is not None and concurrent(sp.step.stream, sp.vc, rp.step.stream, rp.vc):
                pairs.append((sp.step, rp.step))
    return pairs


def _racing_pairs(plans: list, accs: list) -> list[tuple[int, int]]:
    """(earlier, later) positions in `accs` (one buffer's accesses on one
    rank) of the unordered cross-stream pairs with a write, in scan order."""
    if len({plans[a.step].step.stream for a in accs}) < 2:
        return []
    pairs = []
    for i, a in enumerate(accs):
        pa = plans[a.step]
        for j in range(i + 1, len(accs)):
            b = accs[j]
            pb = plans[b.step]
            if pa.step.stream == pb.step.stream or not (a.write or b.write):
                continue
            if not concurrent(pa.step.stream, pa.vc or {}, pb.step.stream, pb.vc or {}):
                continue
            if a.step == b.step:
                continue
            pairs.append((i, j) if a.step < b.step else (j, i))
    return pairs


def detect_forbidden_overlap(sim) -> list[Hazard]:  # noqa: ANN001
    s, rules = sim.scenario, sim.runner_cls.engine_rules
    if not rules.overlap_forbidden(s):
        return []
    out = []
    order = sim.decisions.get("shared_experts_order", "?")
    for ops in sim.rank_ops:
        pairs = shared_routed_pairs(sim, ops.rank)
        if pairs:
            sh, rt = pairs[0]
            out.append(Hazard(
                HazardKind.UNSAFE_OVERLAP, sh.index, sh.name, ops.rank,
                f"shared experts overlap {rt.name} (order {order}) but {rules.forbidden_reason(s)}",
            ))
    return out


def detect_missing_stream(sim) -> list[Hazard]:  # noqa: ANN001
    """Work issued on a stream the modelled platform lacks (an order the
    platform cannot execute): the first such step of each rank. The engine
    crashes there; the timeline after it is what would run had the stream
    existed."""
    s, rules = sim.scenario, sim.runner_cls.engine_rules
    out = []
    order = sim.decisions.get("shared_experts_order", "?")
    # Only the streams some rank used are asked about (each question is a
    # read of the scenario, which verify's pruning keys on), each once.
    available: dict[str, bool] = {}
    for ops in sim.rank_ops:
        st = None
        for step in ops.steps:
            stream = step.stream
            if stream == "main":
                continue
            ok = available.get(stream)
            if ok is None:
                ok = available[stream] = rules.stream_available(s, stream)
            if not ok:
                st = step
                break
        if st is not None:
            where = f"platform {s.runtime.platform}" + ("" if s.runtime.aux_stream else " without an aux stream")
            out.append(Hazard(
                HazardKind.MISSING_STREAM, st.index, st.name, ops.rank,
                f"{st.name} is issued on the {st.stream} stream (order {order}), which the {where} "
                f"does not have: {rules.missing_stream_consequence(st.stream)}",
            ))
    return out


def overlap_us(steps: list[Step]) -> float:
    """Time during which shared-expert work and routed work run at once."""
    shared: list[tuple[float, float]] = []
    routed: list[tuple[float, float]] = []
    for st in steps:  # one pass: most steps belong to neither component
        c = st.component
        if c is not None and st.end > st.start:
            if c == "shared":
                shared.append((st.start, st.end))
            elif c == "routed":
                routed.append((st.start, st.end))
    if not shared or not routed:
        return 0.0
    total = 0.0
    merged_routed = _merge(routed)
    for a0, a1 in _merge(shared):
        for b0, b1 in merged_routed:
            total += max(0.0, min(a1, b1) - max(a0, b0))
    return total


def _merge(iv: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(iv):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def with_order(runner_cls: type[MoERunner], order: Order) -> type[MoERunner]:
    """The same runner with its shared-experts order forced (the what-if)."""

    def shared_experts_order(self: MoERunner, num_tokens: int) -> Order:
        return order

    return type(f"{runner_cls.__name__}With{order.name.title().replace('_', '')}", (runner_cls,),
                {"shared_experts_order": shared_experts_order})


def decided_orders(sim) -> set[str]:  # noqa: ANN001
    """The shared-experts order every rank decided (one value when they agree)."""
    return {st.detail for ops in sim.rank_ops for st in ops.steps
            if st.op == "decide" and st.name == "shared_experts_order"}


def lost_overlap_candidate(sim) -> Order | None:  # noqa: ANN001
    """The best safe overlapped order this scenario allows, to simulate beside
    the runner's: when the runner used no overlap, or when every rank chose
    another overlapped order (a changed priority: the cheaper one wins, so it
    is a hazard only if the runner's order is slower)."""
    s, rules = sim.scenario, sim.runner_cls.engine_rules
    if not s.model.has_shared or rules.overlap_forbidden(s):
        return None
    ref = rules.best_safe_order(s)
    if ref not in OVERLAPPED:
        return None
    if ref == Order.MK_INTERNAL_OVERLAPPED and not rules.async_overlap_possible(s):
        return None
    if any(shared_routed_pairs(sim, ops.rank) for ops in sim.rank_ops):
        chosen = decided_orders(sim)
        if len(chosen) == 1 and next(iter(chosen)) in OVERLAPPED and next(iter(chosen)) != ref.value:
            return ref
        return None
    return ref


def lost_overlap_hazards(sim, trace_latency: float, alt_latency: float, order: Order, alt_name: str) -> list[Hazard]:  # noqa: ANN001
    cost = trace_latency - alt_latency
    if cost <= 1e-9:
        return []
    chosen = sim.decisions.get("shared_experts_order", "?")
    pct = 100.0 * cost / alt_latency if alt_latency > 0 else 0.0
    overlapped = any(shared_routed_pairs(sim, ops.rank) for ops in sim.rank_ops)
    how = (f"overlap less (order {chosen}) than with {order.value}, which is safe here"
           if overlapped else f"run serially (order {chosen}) although {order.value} is safe here")
    out = []
    for ops in sim.rank_ops:
        shared = next((st for st in ops.steps if st.component == "shared"), None)
        if shared is None:
            continue
        out.append(Hazard(
            HazardKind.LOST_OVERLAP, shared.index, shared.name, ops.rank,
            f"shared experts {how}: "
            f"layer {trace_latency:.1f} us vs {alt_latency:.1f} us with {alt_name} (+{pct:.1f}%)",
            cost_us=cost,
        ))
    return out


__all__ = [
    "concurrent",
    "decided_orders",
    "detect_forbidden_overlap",
    "detect_missing_stream",
    "detect_races",
    "lost_overlap_candidate",
    "lost_overlap_hazards",
    "overlap_us",
    "with_order",
]
