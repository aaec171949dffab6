"""The communication half of SimOps: collectives, dispatch and combine.

A collective records its step, then suspends the rank in the engine's
rendezvous (sim/engine.py) until every member has arrived; the engine checks
that the members agree (kind, shapes, sizes) and computes every member's
abstract output at once.

Row counts may differ per member only where the op says so: `all_gatherv`
(each member contributes its own rows; torch's `all_gather` needs equal
sizes) and `reduce_scatterv` (each member keeps its own `sizes[i]` rows of
the sum). The naive DP dispatch/combine (no token routing) are these two,
with the sizes from the DP metadata: each member's layer rows, as vLLM's
all_gatherv / reduce_scatterv take them. Which backend, group and rows: the
runner's engine layout (`Simulation.layout`, scenarios/dispatch_layout.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from scenarios.trace import COLLECTIVE, Step
from scenarios.workload import dp_of, route_arrays, rows_per_owner, tokens_of
from sim.cost import collective_us
from sim.hazards import GROUP_COMMUNICATOR_OPS
from sim.simtypes import Plan, Sent, SimTensor

if TYPE_CHECKING:
    from sim.engine import Simulation
    from sim.errors import RunnerUsageError


class SimComm:
    """Communication ops of one simulated rank (a mixin: SimOps provides the rest)."""

    sim: Simulation
    rank: int
    steps: list[Step]
    plans: list[Plan]
    coll_seq: dict[tuple[int, ...], int]
    sent: Sent  # what this rank's dispatches sent

    # Provided by SimOps (declared for the type checker only: a stub here must
    # never shadow the real method in the MRO).
    if TYPE_CHECKING:
        def _misuse(self, name: str, misuse: str) -> RunnerUsageError: ...
        def _tensor(self, t: Any, name: str, what: str = "x") -> SimTensor: ...
        def _int(self, n: Any, name: str, what: str) -> int: ...
        def _bytes(self, shape: tuple[int, ...]) -> float: ...
        def _step(self, op: str, name: str, category: str, ins: tuple[SimTensor, ...] = (), out_shape: tuple[int, ...] | None = None, dur: float = 0.0, component: str | None = None, group: tuple[int, ...] | None = None) -> Step: ...
        def _access(self, st: Step, t: SimTensor, write: bool) -> None: ...
        def _new(self, st: Step, shape: tuple[int, ...], value: Any, ins: tuple[SimTensor, ...] = (), buf: int | None = None, fresh: bool = False, rows_of: SimTensor | None = None) -> SimTensor: ...
        def _routing_of_the_rows(self, st: Step, x: SimTensor, routing_h: SimTensor, what: str) -> None: ...

    def _group(self, kind: Any, st_name: str) -> tuple[int, ...]:
        try:
            return self.sim.group(kind, self.rank)
        except ValueError as exc:
            raise self._misuse(st_name, str(exc)) from None

    def _collective(self, kind: str, x: SimTensor, group: tuple[int, ...], name: str, op: str, out_shape: tuple[int, ...], nbytes: float, component: str | None = None, a2a: bool = False, sizes: tuple[int, ...] | None = None, cost_kind: str | None = None) -> Any:
        p = self.sim.profile
        dur = collective_us(p, "all_to_all" if a2a else cost_kind or kind, len(group), nbytes)
        st = self._step(op, name, COLLECTIVE, (x,), out_shape, dur, component=component, group=group)
        if st.stream != "main" and op in GROUP_COMMUNICATOR_OPS:  # the only ranks whose collectives may go unordered
            self.sim.side_collectives.add(self.rank)
        # One lookup by the group per call (a wide group hashes in Python):
        # its counter is a one-element list, bumped in place.
        count = self.coll_seq.get(group)
        if count is None:
            count = self.coll_seq[group] = [0]
        seq = count[0]
        count[0] = seq + 1
        key = (group, seq)
        self.plans[-1].coll = key
        self._access(st, x, False)
        result = self.sim.arrive(self, key, kind, x, st, sizes)
        if isinstance(result, Exception):
            st.error = str(result)
            raise result
        out_shape_final, value = result
        st.out_shape = out_shape_final
        return self._new(st, out_shape_final, value, rows_of=x)

    def _recost(self, out: SimTensor, kind: str, n: int, nbytes: float) -> None:
        """Set a step's duration once the members' row counts are known."""
        self.plans[out.step].dur = collective_us(self.sim.profile, kind, n, nbytes)

    def all_reduce(self, x: SimTensor, group: str = "tp", name: str = "all_reduce") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        g = self._group(group, name)
        return self._collective("all_reduce", x, g, name, "all_reduce", x.shape, self._bytes(x.shape))

    def all_gather(self, x: SimTensor, group: str = "tp", name: str = "all_gather") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        g = self._group(group, name)
        shape = (x.shape[0] * len(g), *x.shape[1:])
        return self._collective("all_gather", x, g, name, "all_gather", shape, self._bytes(shape))

    def reduce_scatter(self, x: SimTensor, group: str = "tp", name: str = "reduce_scatter") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        g = self._group(group, name)
        shape = (x.shape[0] // len(g), *x.shape[1:])
        return self._collective("reduce_scatter", x, g, name, "reduce_scatter", shape, self._bytes(x.shape))

    def all_gatherv(self, x: SimTensor, group: str = "dp", name: str = "all_gatherv") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        g = self._group(group, name)
        shape = (x.shape[0] * len(g), *x.shape[1:])  # until the members' rows are known
        out = self._collective("all_gatherv", x, g, name, "all_gatherv", shape, self._bytes(shape))
        # Bytes really moved: every other member's rows come in.
        self._recost(out, "all_gatherv", len(g), self._bytes((out.shape[0] - x.shape[0], *x.shape[1:])))
        return out

    def reduce_scatterv(self, x: SimTensor, sizes: Sequence[int], group: str = "dp", name: str = "reduce_scatterv") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        g = self._group(group, name)
        if not isinstance(sizes, Sequence) or isinstance(sizes, str):
            raise self._misuse(name, f"argument sizes must be a sequence of ints, got {type(sizes).__name__}")
        sz = tuple(self._int(n, name, "sizes[i]") for n in sizes)
        mine = sz[g.index(self.rank)] if len(sz) == len(g) else x.shape[0]
        shape = (mine, *x.shape[1:])
        # Bytes really moved: every row but this member's own goes out.
        nbytes = self._bytes((max(0, x.shape[0] - mine), *x.shape[1:]))
        return self._collective("reduce_scatterv", x, g, name, "reduce_scatterv", shape, nbytes, sizes=sz)

    def dispatch(self, x: SimTensor, routing_h: SimTensor, name: str = "dispatch") -> tuple[SimTensor, SimTensor]:
        if x.__class__ is not SimTensor or routing_h.__class__ is not SimTensor:
            x, routing_h = self._tensor(x, name), self._tensor(routing_h, name, "routing")
        s = self.sim.scenario
        if self.sim.layout.dispatch_backend(s) == "none":
            raise self._misuse(name, "dispatch without an all-to-all or DP gather in this scenario (backend none)")
        group, token_routing = self.sim.dispatch_group(self.rank)
        self.sent.rows, self.sent.routing = x.shape[0], routing_h.value
        if x.shape[0] != self._layer_rows_sent(group):
            self.sim.sent_other_rows = True  # e.g. a chunk: sizes from the rows sent from now on
        if token_routing:
            rows = self.sim.received_rows(self.rank, group)
            kind = "dispatch_a2a"
            nbytes = self._bytes((x.shape[0] * min(s.model.top_k, len(group)), x.shape[-1]))
        else:  # the naive gather: all_gatherv of every member's rows (costed as the all-gather it is)
            rows = sum(self.sim.member_rows(group))
            kind = "all_gatherv"
            nbytes = self._bytes((rows, x.shape[-1]))
        shape = (rows, x.shape[-1])
        out = self._collective(kind, x, group, name, "dispatch", shape, nbytes, component="routed", a2a=token_routing,
                               cost_kind=None if token_routing else "all_gather")
        if self.sim.took_rows:
            self._routing_of_the_rows(self.steps[out.step], x, routing_h, "dispatch sends")
        if token_routing:
            if self.sim.sent_other_rows:  # (every member has sent by now: the collective met)
                shape = (self._received(group, self.plans[out.step].coll), x.shape[-1])
            out.shape = shape
            self.steps[out.step].out_shape = shape
        rh = SimTensor((out.shape[0], s.model.top_k), out.value, self.sim.new_buffer(), out.step, 0, out.rows_from)
        return out, rh

    def combine(self, y: SimTensor, name: str = "combine") -> SimTensor:
        if y.__class__ is not SimTensor:
            y = self._tensor(y, name, "y")
        s = self.sim.scenario
        group, token_routing = self.sim.dispatch_group(self.rank)
        # Every member gets back the rows it dispatched: its layer rows (the DP
        # metadata's counts) unless some member sent others (a chunk).
        sizes = self.sim.member_rows(group)
        if self.sim.sent_other_rows:
            sizes = self._sent_sizes(group)
        mine = sizes[group.index(self.rank)]
        shape = (mine, y.shape[-1])
        if not token_routing:  # the naive combine: reduce_scatterv
            return self._collective("reduce_scatterv", y, group, name, "combine", shape,
                                    self._bytes(y.shape), component="routed", sizes=sizes, cost_kind="reduce_scatter")
        nbytes = self._bytes((mine * min(s.model.top_k, len(group)), y.shape[-1]))
        return self._collective("combine_a2a", y, group, name, "combine", shape, nbytes, component="routed", a2a=True,
                                sizes=sizes)

    def _layer_rows_sent(self, group: tuple[int, ...]) -> int:
        """The rows this rank hands a dispatch of its whole layer (looked up once:
        finding the rank in a world-wide group is a scan)."""
        sent = self.sent
        if sent.layer_rows is None:
            sent.layer_rows = self.sim.member_rows(group)[group.index(self.rank)]
        return sent.layer_rows

    def _sent_sizes(self, group: tuple[int, ...]) -> tuple[int, ...]:
        """Rows each member sent in its latest dispatch, built once per
        combine (its members share the collective's next sequence number)."""
        key = (group, self.coll_seq.get(group, [0])[0])
        sizes = self.sim.chunk_sizes.get(key)
        if sizes is None:
            members = self.sim.rank_ops
            sizes = self.sim.chunk_sizes[key] = tuple([members[m].sent.rows for m in group])
        return sizes

    def _received(self, group: tuple[int, ...], key: Any) -> int:
        """Rows a token-routing dispatch delivers to this rank, from the rows
        the members sent: one per row whose routing has at least one expert
        here (SP padding rows route like token 0). Counted for every member
        at once, once per dispatch."""
        counts = self.sim.chunk_sizes.get(key)
        if counts is None:
            counts = self.sim.chunk_sizes[key] = self._count_received(group)
        return int(counts[self.rank])

    def _count_received(self, group: tuple[int, ...]) -> Any:
        s = self.sim.scenario
        ids, _w = route_arrays(s)
        per = s.local_experts
        owners = []
        for m in group:
            for b in self.sim.rank_ops[m].sent.routing.blocks:
                toks = np.maximum(np.asarray(tokens_of(s, b.key), dtype=np.int64), 0)
                if len(toks):
                    owners.append(ids[dp_of(b.key)][toks] // per)
        return rows_per_owner(owners, s.world)
