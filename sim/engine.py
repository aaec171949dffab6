"""The simulator: an interpreter of runner programs over abstract values, timed in SimPy.

Two phases, both per scenario:

1. Program phase. Every rank's runner program runs in its own greenlet, in
   lock-step: a collective suspends the rank until every member of its group
   has arrived, then computes all members' abstract outputs at once. Values
   (sim/algebra.py), symbolic shapes and buffer accesses are computed as the
   ops are issued; shape errors raise inside the runner exactly where torch
   would. A rank that never arrives is a HANG, never a wait forever.
2. Timing phase. A SimPy process per (rank, stream) replays the issued steps
   with durations from the cost model; event waits and collective
   rendezvous are SimPy events. This gives start/end per step, the latency
   and the shared/routed overlap.

Hazard detectors run over the results (sim/hazards.py).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import greenlet
import simpy

from scenarios import contain
from scenarios.ops import Ops, OpsShapeError
from scenarios.runners import MoERunner, run_program
from scenarios.spec import Scenario
from scenarios.trace import (
    COLLECTIVE,
    COMPUTE,
    DECISION,
    EVENT,
    LIFECYCLE,
    PADDING,
    WAIT,
    Hazard,
    HazardKind,
    Step,
    Trace,
)
from scenarios.workload import expert_loads, rank_token_ids, routing
from sim import algebra
from sim.cost import Profile, collective_us, elementwise_us, experts_us, gemm_us

MODEL = "model"  # category of model-side steps (input, output, SP slicing)


class SimShapeError(OpsShapeError):
    """Raised inside a runner program where the real op would raise."""


class CollectiveFailed(RuntimeError):
    """Members of a collective disagreed (op or shape): real gloo/NCCL would fail."""


class _Abort(greenlet.GreenletExit):
    """Thrown into ranks still blocked when the program phase ends (hang)."""


@dataclass(slots=True)
class SimTensor:
    shape: tuple[int, ...]
    value: algebra.Value
    buf: int
    step: int  # index of the producing step


@dataclass(slots=True)
class SimEvent:
    id: int
    stream: str


@dataclass(slots=True)
class Plan:
    """What the timing phase needs to replay one step."""

    step: Step
    dur: float
    coll: tuple | None = None
    waits: tuple[int, ...] = ()
    record: int | None = None
    vc: dict[str, int] | None = None


@dataclass
class _Pending:
    kind: str
    group: tuple[int, ...]
    arrivals: dict[int, tuple[str, SimTensor, Step]] = field(default_factory=dict)
    results: dict[int, Any] = field(default_factory=dict)


@dataclass(slots=True)
class Access:
    rank: int
    step: int
    buf: int
    write: bool


class SimOps(Ops):
    """One rank's Ops in the simulator."""

    def __init__(self, sim: Simulation, rank: int) -> None:
        self.sim = sim
        self.scenario = sim.scenario
        self.rank = rank
        self.current_stream = "main"
        self.d, self.t = self.scenario.coords(rank)
        self.steps: list[Step] = []
        self.plans: list[Plan] = []
        self.values: dict[int, algebra.Value] = {}
        self.coll_seq: dict[tuple[int, ...], int] = {}
        self.shared_sharded: bool | None = None
        self.output: SimTensor | None = None
        self.tokens = self.scenario.workload.tokens

    # ---- recording ----

    def _step(
        self,
        op: str,
        name: str,
        category: str,
        ins: tuple[SimTensor, ...] = (),
        out_shape: tuple[int, ...] | None = None,
        dur: float = 0.0,
        component: str | None = None,
        group: tuple[int, ...] | None = None,
    ) -> Step:
        # Op, wall-clock and value-size budgets (scenarios/contain.py): raises
        # BudgetExceeded into the runner before anything is recorded.
        contain.check_op(len(self.steps), ins, out_shape, self.scenario.world)
        st = Step(self.rank, len(self.steps), op, name, self.current_stream, category, component,
                  group, [t.shape for t in ins] if ins else [], out_shape)
        self.steps.append(st)
        self.plans.append(Plan(st, dur))
        return st

    def _access(self, st: Step, t: SimTensor, write: bool) -> None:
        self.sim.accesses.append(Access(self.rank, st.index, t.buf, write))

    def _new(self, st: Step, shape: tuple[int, ...], value: algebra.Value, ins: tuple[SimTensor, ...] = (), buf: int | None = None, fresh: bool = False) -> SimTensor:
        accesses = self.sim.accesses
        for t in ins:
            accesses.append(Access(self.rank, st.index, t.buf, False))
        if buf is None:
            buf = self.sim.new_buffer()
        out = SimTensor(shape, value, buf, st.index)
        accesses.append(Access(self.rank, st.index, buf, True))
        self.values[st.index] = value
        if not fresh:  # a fresh partial (one source, coefficient 1) cannot be double
            self.sim.check_value(self, st, value)
        return out

    def _shape_error(self, st: Step, message: str) -> None:
        st.error = message
        self.sim.add_hazard(HazardKind.SHAPE_MISMATCH, self.rank, st, message)
        raise SimShapeError(f"{st.name}: {message}")

    def _input_check(self, st: Step, x: SimTensor, what: str) -> None:
        problem = algebra.is_pure_input(x.value)
        if problem is not None:
            coef, _, _ = algebra.max_multiplicity(x.value)
            summed_in = coef > 1.0 + 1e-9 or bool(algebra.foreign_sources(x.value))
            kind = HazardKind.DOUBLE_REDUCTION if summed_in else HazardKind.MISSING_REDUCTION
            self.sim.add_hazard(kind, self.rank, st, f"{what} input is not the layer input: {problem}")

    # ---- streams, lifecycle, decisions ----

    def record_event(self, name: str = "record_event") -> SimEvent:
        st = self._step("record_event", name, EVENT)
        ev_id = self.sim.new_event()
        self.plans[-1].record = ev_id
        st.records = ev_id
        return SimEvent(ev_id, self.current_stream)

    def wait_event(self, event: Any, name: str = "wait_event") -> None:
        if not isinstance(event, SimEvent):
            raise TypeError(f"{name}: wait_event needs an event from record_event, got {type(event).__name__}")
        st = self._step("wait_event", name, WAIT)
        st.waits = [event.id]
        self.plans[-1].waits = (event.id,)

    def assign_clocks(self) -> None:
        """Vector clocks per step (happens-before across this rank's streams),
        computed after the program phase and only for ranks that used more
        than one stream: with one stream everything is ordered."""
        if len({st.stream for st in self.steps}) < 2:
            return
        vcs: dict[str, dict[str, int]] = {}
        ev_vc: dict[int, dict[str, int]] = {}
        for pl in self.plans:
            st = pl.step
            cur = vcs.setdefault(st.stream, {})
            cur[st.stream] = cur.get(st.stream, 0) + 1
            for w in pl.waits:
                for s, c in ev_vc.get(w, {}).items():
                    if cur.get(s, 0) < c:
                        cur[s] = c
            pl.vc = dict(cur)
            if pl.record is not None:
                ev_vc[pl.record] = pl.vc

    def lifecycle(self, phase: str) -> None:
        self._step("lifecycle", phase, LIFECYCLE)

    def decide(self, point: str, value: Any) -> None:
        st = self._step("decide", point, DECISION)
        st.detail = str(value)
        if self.rank == 0:
            self.sim.decisions[point] = str(value)

    # ---- model side ----

    def layer_input(self, name: str = "layer_input") -> SimTensor:
        s = self.scenario
        shape = (self.tokens, s.model.hidden)
        st = self._step("layer_input", name, MODEL, (), shape)
        return self._new(st, shape, algebra.leaf(f"d{self.d}", self.tokens, "x", ""), fresh=True)

    def sp_slice(self, x: SimTensor, name: str = "sp_slice") -> SimTensor:
        tp = self.scenario.parallel.tp
        per = -(-x.shape[0] // tp)
        shape = (per, *x.shape[1:])
        st = self._step("sp_slice", name, MODEL, (x,), shape, self.sim.view_us)
        blocks = tuple(algebra.Block(f"{b.key}s{self.t}", per, b.terms) for b in x.value.blocks)
        value = algebra.Value(blocks, x.value.scale) if len(blocks) == 1 else algebra.split_rows(x.value, self.t * per, (self.t + 1) * per)
        return self._new(st, shape, value, (x,), buf=x.buf)

    def trim_rows(self, x: SimTensor, rows: int, name: str = "trim_rows") -> SimTensor:
        shape = (min(rows, x.shape[0]), *x.shape[1:])
        st = self._step("trim_rows", name, PADDING, (x,), shape, self.sim.view_us)
        return self._new(st, shape, algebra.split_rows(x.value, 0, rows), (x,), buf=x.buf)

    def layer_output(self, x: SimTensor, name: str = "layer_output") -> SimTensor:
        st = self._step("layer_output", name, MODEL, (x,), x.shape)
        expected = (self.tokens, self.scenario.model.hidden)
        if tuple(x.shape) != expected:
            self._shape_error(st, f"layer output {list(x.shape)}, the model expects {list(expected)}")
        self.output = x
        self.values[st.index] = x.value
        self.sim.check_output(self, st, x.value)
        return x

    def boundary(self, x: SimTensor, shape: tuple[int, ...], name: str = "custom_op_boundary") -> SimTensor:
        st = self._step("boundary", name, MODEL, (x,), tuple(shape))
        if tuple(x.shape) != tuple(shape):
            self._shape_error(
                st, f"returns {list(x.shape)} but its fake implementation declared {list(shape)}"
            )
        self.values[st.index] = x.value
        return x

    # ---- elementwise and layout ----

    def _bytes(self, shape: tuple[int, ...]) -> float:
        n = 1
        for d in shape:
            n *= d
        return n * self.sim.profile.bytes_per_elem

    def pad(self, x: SimTensor, width: int, name: str = "pad") -> SimTensor:
        shape = (x.shape[0], width)
        st = self._step("pad", name, PADDING, (x,), shape, elementwise_us(self.sim.profile, 2 * self._bytes(shape)))
        if width < x.shape[-1]:
            self._shape_error(st, f"cannot pad width {x.shape[-1]} down to {width}")
        return self._new(st, shape, x.value, (x,))

    def trim(self, x: SimTensor, width: int, name: str = "trim") -> SimTensor:
        # torch slicing x[..., :w] with w beyond the width is a silent no-op.
        shape = (x.shape[0], min(width, x.shape[-1]))
        st = self._step("trim", name, PADDING, (x,), shape, self.sim.view_us)
        return self._new(st, shape, x.value, (x,), buf=x.buf)

    def add(self, a: SimTensor, b: SimTensor, name: str = "add") -> SimTensor:
        st = self._step("add", name, COMPUTE, (a, b), a.shape, elementwise_us(self.sim.profile, 3 * self._bytes(a.shape)))
        if tuple(a.shape) != tuple(b.shape):
            self._shape_error(st, f"{list(a.shape)} + {list(b.shape)}")
        return self._new(st, a.shape, algebra.add([a.value, b.value]), (a, b))

    def scale(self, x: SimTensor, factor: float, name: str = "scale") -> SimTensor:
        st = self._step("scale", name, COMPUTE, (x,), x.shape, elementwise_us(self.sim.profile, 2 * self._bytes(x.shape)))
        return self._new(st, x.shape, algebra.scale(x.value, factor), (x,))

    def clone(self, x: SimTensor, name: str = "clone") -> SimTensor:
        st = self._step("clone", name, COMPUTE, (x,), x.shape, elementwise_us(self.sim.profile, 2 * self._bytes(x.shape)))
        return self._new(st, x.shape, x.value, (x,))

    # ---- MoE compute ----

    def router(self, x: SimTensor, name: str = "router") -> SimTensor:
        m, p = self.scenario.model, self.sim.profile
        rows = x.shape[0]
        shape = (rows, m.top_k)
        dur = gemm_us(p, 2 * rows * m.hidden * m.num_experts, (m.hidden * m.num_experts + rows * m.hidden) * p.bytes_per_elem, 2)
        st = self._step("router", name, COMPUTE, (x,), shape, dur)
        if x.shape[-1] != m.hidden:
            self._shape_error(st, f"gate expects width {m.hidden}, got {x.shape[-1]}")
        self._input_check(st, x, "router")
        return self._new(st, shape, x.value, (x,))

    def latent_down(self, x: SimTensor, name: str = "latent_down") -> SimTensor:
        m, p = self.scenario.model, self.sim.profile
        lat = m.latent_dim or m.hidden
        shape = (x.shape[0], lat)
        dur = gemm_us(p, 2 * x.shape[0] * m.hidden * lat, m.hidden * lat * p.bytes_per_elem, 1)
        st = self._step("latent_down", name, COMPUTE, (x,), shape, dur, component="routed")
        if x.shape[-1] != m.hidden:
            self._shape_error(st, f"down-projection expects width {m.hidden}, got {x.shape[-1]}")
        self._input_check(st, x, "latent_down")
        value = algebra.Value(tuple(algebra.Block(b.key, b.rows, ((("xlat", "", None), 1.0),)) for b in x.value.blocks))
        return self._new(st, shape, value, (x,))

    def latent_up(self, x: SimTensor, name: str = "latent_up") -> SimTensor:
        m, p = self.scenario.model, self.sim.profile
        lat = m.latent_dim or m.hidden
        shape = (x.shape[0], m.hidden)
        dur = gemm_us(p, 2 * x.shape[0] * m.hidden * lat, m.hidden * lat * p.bytes_per_elem, 2 if m.transform_nonlinear else 1)
        st = self._step("latent_up", name, COMPUTE, (x,), shape, dur, component="routed")
        if x.shape[-1] != lat:
            self._shape_error(st, f"up-projection expects width {lat}, got {x.shape[-1]}")
        if m.transform_nonlinear:
            self.sim.check_complete(self, st, x.value, ("routed",), "non-linear routed-output transform applied to")
        return self._new(st, shape, x.value, (x,))

    def experts(self, x: SimTensor, routing_h: SimTensor, inplace: bool = False, name: str = "routed_experts") -> SimTensor:
        s, m, p = self.scenario, self.scenario.model, self.sim.profile
        width = m.kernel_width
        shape = (x.shape[0], width)
        pairs, active = self.sim.loads[self.rank]
        inter = m.moe_intermediate // s.moe_tp
        dur = experts_us(p, pairs, active, s.local_experts, width, inter)
        st = self._step("experts", name, COMPUTE, (x, routing_h), shape, dur, component="routed")
        if x.shape[-1] != width:
            self._shape_error(st, f"routed kernel expects width {width}, got {x.shape[-1]}")
        if routing_h.shape[0] != x.shape[0]:
            self._shape_error(st, f"{x.shape[0]} rows but routing for {routing_h.shape[0]}")
        self._input_check(st, x, "routed experts")
        shard = f"ep{self.rank}" if s.parallel.ep else f"tp{self.rank}"
        value = algebra.relabel(x.value, "routed", shard)
        if inplace:
            self._access(st, routing_h, False)
            return self._new(st, shape, value, (x,), buf=x.buf, fresh=True)
        return self._new(st, shape, value, (x, routing_h), fresh=True)

    def shared_experts(self, x: SimTensor, sharded: bool = True, name: str = "shared_experts") -> SimTensor:
        s, m, p = self.scenario, self.scenario.model, self.sim.profile
        tp = s.parallel.tp
        inter = m.shared_inter // tp if sharded else m.shared_inter
        rows = x.shape[0]
        shape = (rows, m.hidden)
        bpe = p.bytes_per_elem
        dur = gemm_us(p, 6.0 * rows * m.hidden * inter, (3 * m.hidden * inter + 2 * rows * m.hidden) * bpe, 3)
        st = self._step("shared_experts", name, COMPUTE, (x,), shape, dur, component="shared")
        if x.shape[-1] != m.hidden:
            self._shape_error(st, f"shared MLP expects width {m.hidden}, got {x.shape[-1]}")
        self._input_check(st, x, "shared experts")
        if self.shared_sharded is None:
            self.shared_sharded = sharded
        shard = f"tp{self.t}" if sharded else "full"
        return self._new(st, shape, algebra.relabel(x.value, "shared", shard), (x,), fresh=True)

    # ---- communication ----

    def _group(self, kind: str, st_name: str) -> tuple[int, ...]:
        try:
            return self.scenario.group(kind, self.rank)
        except ValueError as exc:
            raise ValueError(f"{st_name}: {exc}") from None

    def _collective(self, kind: str, x: SimTensor, group: tuple[int, ...], name: str, op: str, out_shape: tuple[int, ...], nbytes: float, component: str | None = None, a2a: bool = False) -> Any:
        p = self.sim.profile
        dur = collective_us(p, "all_to_all" if a2a else kind, len(group), nbytes)
        st = self._step(op, name, COLLECTIVE, (x,), out_shape, dur, component=component, group=group)
        seq = self.coll_seq.get(group, 0)
        self.coll_seq[group] = seq + 1
        key = (group, seq)
        self.plans[-1].coll = key
        self._access(st, x, False)
        result = self.sim.arrive(self, key, kind, x, st)
        if isinstance(result, Exception):
            st.error = str(result)
            raise result
        out_shape_final, value = result
        st.out_shape = out_shape_final
        return self._new(st, out_shape_final, value)

    def all_reduce(self, x: SimTensor, group: str = "tp", name: str = "all_reduce") -> SimTensor:
        g = self._group(group, name)
        return self._collective("all_reduce", x, g, name, "all_reduce", x.shape, self._bytes(x.shape))

    def all_gather(self, x: SimTensor, group: str = "tp", name: str = "all_gather") -> SimTensor:
        g = self._group(group, name)
        shape = (x.shape[0] * len(g), *x.shape[1:])
        return self._collective("all_gather", x, g, name, "all_gather", shape, self._bytes(shape))

    def reduce_scatter(self, x: SimTensor, group: str = "tp", name: str = "reduce_scatter") -> SimTensor:
        g = self._group(group, name)
        shape = (x.shape[0] // len(g), *x.shape[1:])
        return self._collective("reduce_scatter", x, g, name, "reduce_scatter", shape, self._bytes(x.shape))

    def dispatch(self, x: SimTensor, routing_h: SimTensor, name: str = "dispatch") -> tuple[SimTensor, SimTensor]:
        s = self.scenario
        if s.effective_backend == "none":
            raise ValueError(f"{name}: no all-to-all or DP gather in this scenario (backend none)")
        group, token_routing = self.scenario.dispatch_group(self.rank)
        if token_routing:
            rows = self.sim.received_rows(self.rank, group)
            kind = "dispatch_a2a"
        else:
            rows = x.shape[0] * len(group)
            kind = "all_gather"
        shape = (rows, x.shape[-1])
        out = self._collective(kind, x, group, name, "dispatch", shape, self._bytes((x.shape[0] * min(s.model.top_k, len(group)), x.shape[-1])) if token_routing else self._bytes(shape), component="routed", a2a=token_routing)
        out.shape = shape
        self.steps[out.step].out_shape = shape
        rh = SimTensor((rows, s.model.top_k), out.value, self.sim.new_buffer(), out.step)
        return out, rh

    def combine(self, y: SimTensor, name: str = "combine") -> SimTensor:
        s = self.scenario
        group, token_routing = self.scenario.dispatch_group(self.rank)
        kind = "combine_a2a" if token_routing else "reduce_scatter"
        rows = y.value.rows // len(group) if y.value.rows else 0
        shape = (rows, y.shape[-1])
        nbytes = self._bytes((rows * min(s.model.top_k, len(group)), y.shape[-1])) if token_routing else self._bytes(y.shape)
        return self._collective(kind, y, group, name, "combine", shape, nbytes, component="routed", a2a=token_routing)


@lru_cache(maxsize=1024)
def _received_rows(s: Scenario, group: tuple[int, ...]) -> tuple[int, ...]:
    route = routing(s)
    per = s.local_experts
    owners_of_token: dict[tuple[int, int], set[int]] = {}
    out = [0] * s.world
    for m in group:
        d, _ = s.coords(m)
        for tok in rank_token_ids(s, m):
            key = (d, tok if tok >= 0 else 0)
            owners = owners_of_token.get(key)
            if owners is None:
                owners = owners_of_token[key] = {e // per for e in route[key[0]][key[1]][0]}
            for o in owners:
                out[o] += 1
    return tuple(out)


class Simulation:
    """Simulates one scenario with one runner class."""

    collapse = True  # simulate identical rank programs once (tests turn it off to compare)

    def __init__(self, scenario: Scenario, runner_cls: type[MoERunner], profile: Profile, runner_label: str) -> None:
        self.scenario = scenario
        self.runner_cls = runner_cls
        self.runner_label = runner_label
        self.profile = profile
        self.view_us = profile.elementwise_us * 0.25
        self.hazards: list[Hazard] = []
        self.notes: list[str] = []
        self.decisions: dict[str, str] = {}
        self.accesses: list[Access] = []
        self.pending: dict[tuple, _Pending] = {}
        self.rank_ops: list[SimOps] = []
        self._buf = 0
        self._ev = 0
        # Streams matter only if a runner uses more than one; tracked always so a
        # user's runner that opens a stream late is still checked.
        self.track_streams = True
        self.expected_scale = {"routed": scenario.model.routed_scaling_factor, "shared": 1.0}
        self.loads = expert_loads(scenario)  # hashing the scenario once, not per op
        self._reported: set[tuple[int, str]] = set()
        self.budget_stop: str | None = None  # why a budget stopped the program phase

    # ---- counters ----

    def new_buffer(self) -> int:
        self._buf += 1
        return self._buf

    def new_event(self) -> int:
        self._ev += 1
        return self._ev

    def add_hazard(self, kind: HazardKind, rank: int, st: Step, detail: str, cost: float | None = None) -> None:
        self.hazards.append(Hazard(kind, st.index, st.name, rank, detail, cost))

    # ---- algebra checks ----

    def check_value(self, ops: SimOps, st: Step, value: algebra.Value) -> None:
        """Flag the first step on each rank where a source is summed in twice
        or rows of different tokens are added together."""
        key = (ops.rank, "double")
        if key in self._reported:
            return
        foreign = algebra.foreign_sources(value)
        if foreign:
            b, src = foreign[0]
            self._reported.add(key)
            n_foreign = sum(1 for (c, s, f), _ in b.terms if f is not None and (c, s) == src[:2])
            self.add_hazard(
                HazardKind.DOUBLE_REDUCTION, ops.rank, st,
                f"{src[0]}@{src[1]} of {1 + n_foreign} different token sets summed into each row "
                f"(coefficient {1 + n_foreign} per row, expected 1: own tokens only)",
            )
            return
        coef, b, src = algebra.max_multiplicity(value)
        if coef > 1.0 + 1e-9 and b is not None and src is not None:
            self._reported.add(key)
            same = sorted(s for (s, c) in b.terms if abs(c - coef) < 1e-9 and s[0] == src[0])
            label = f"{src[0]}@{algebra._shard_range([s[1] for s in same])}"
            self.add_hazard(
                HazardKind.DOUBLE_REDUCTION, ops.rank, st,
                f"{label} coefficient {coef:g}, expected 1",
            )

    def expected_sources(self, ops: SimOps, component: str) -> list[str]:
        s = self.scenario
        if component == "routed":
            prefix = "ep" if s.parallel.ep else "tp"
            return [f"{prefix}{r}" for r in range(s.world)]
        sharded = ops.shared_sharded if ops.shared_sharded is not None else not s.sp
        return [f"tp{t}" for t in range(s.parallel.tp)] if sharded else ["full"]

    def check_complete(self, ops: SimOps, st: Step, value: algebra.Value, components: tuple[str, ...], what: str) -> None:
        for b in value.blocks:
            coeffs = b.coeffs()
            for comp in components:
                missing = [sh for sh in self.expected_sources(ops, comp) if coeffs.get((comp, sh, None), 0.0) < 1.0 - 1e-9]
                if missing and (ops.rank, "missing") not in self._reported:
                    self._reported.add((ops.rank, "missing"))
                    self.add_hazard(
                        HazardKind.MISSING_REDUCTION, ops.rank, st,
                        f"{what} partial sums: {comp}@{algebra._shard_range(missing)} coefficient 0 in rows {b.key}, expected 1",
                    )
                    return

    def check_output(self, ops: SimOps, st: Step, value: algebra.Value) -> None:
        m = self.scenario.model
        comps = ("routed", "shared") if m.has_shared else ("routed",)
        self.check_complete(ops, st, value, comps, "output holds")
        for comp in comps:
            got = value.scale_of(comp)
            want = self.expected_scale[comp]
            if abs(got - want) > 1e-9 and (ops.rank, "scale") not in self._reported:
                self._reported.add((ops.rank, "scale"))
                kind = HazardKind.DOUBLE_REDUCTION if got > want else HazardKind.MISSING_REDUCTION
                self.add_hazard(kind, ops.rank, st, f"{comp} scaled by {got:g}, expected {want:g}")

    # ---- collectives ----

    def received_rows(self, rank: int, group: tuple[int, ...]) -> int:
        """Rows a token-routing dispatch delivers to `rank`: each member's tokens
        with at least one expert on this rank."""
        return _received_rows(self.scenario, group)[rank]

    def arrive(self, ops: SimOps, key: tuple, kind: str, x: SimTensor, st: Step) -> Any:
        group = key[0]
        pend = self.pending.get(key)
        if pend is None:
            pend = self.pending[key] = _Pending(kind, group)
        pend.arrivals[ops.rank] = (kind, x, st)
        if len(pend.arrivals) == len(group):
            self._complete(pend, ops.rank)
            del self.pending[key]
        else:
            self._main.switch()  # blocked until the last member arrives
        return pend.results[ops.rank]

    def _complete(self, pend: _Pending, current: int) -> None:
        group = pend.group
        arrivals = [pend.arrivals[r] for r in group]
        kinds = {a[0] for a in arrivals}
        shapes = {tuple(a[1].shape) for a in arrivals}
        problem = None
        if len(kinds) > 1:
            problem = "ranks disagree on the collective: " + ", ".join(
                f"rank {r} {a[0]} ({a[2].name})" for r, a in zip(group, arrivals)
            )
        elif pend.kind not in ("dispatch_a2a", "combine_a2a") and len(shapes) > 1:
            problem = "ranks disagree on the shape: " + ", ".join(
                f"rank {r} {list(a[1].shape)}" for r, a in zip(group, arrivals)
            )
        elif pend.kind == "reduce_scatter" and arrivals[0][1].shape[0] % len(group):
            problem = f"{arrivals[0][1].shape[0]} rows do not split over {len(group)} ranks"
        if problem is not None:
            for r, (_k, _x, st) in zip(group, arrivals):
                self.add_hazard(HazardKind.SHAPE_MISMATCH, r, st, problem)
                pend.results[r] = CollectiveFailed(f"{st.name}: {problem}")
                if r != current:
                    self._ready.append(r)
            return
        values = [a[1].value for a in arrivals]
        kind = pend.kind
        shared_sum = None
        if kind == "all_reduce":
            keys = {tuple(b.key for b in v.blocks) for v in values}
            if len(keys) == 1:
                # Same rows on every member (TP): one sum serves them all.
                shared_sum = algebra.add(values, own=0)
        for i, r in enumerate(group):
            x = arrivals[i][1]
            if kind == "all_reduce":
                out = (x.shape, shared_sum if shared_sum is not None else algebra.add(values, own=i))
            elif kind in ("all_gather", "dispatch_a2a"):
                v = algebra.concat(values)
                out = ((x.shape[0] * len(group), *x.shape[1:]), v)
            else:  # reduce_scatter, combine_a2a
                v = algebra.reduce_scatter(values, i)
                rows = v.rows if kind == "combine_a2a" else x.shape[0] // len(group)
                out = ((rows, *x.shape[1:]), v)
            pend.results[r] = out
            if r != current:
                self._ready.append(r)

    # ---- the two phases ----

    def _program_phase(self) -> None:
        s = self.scenario
        self._main = greenlet.getcurrent()
        self._ready: deque[int] = deque()
        lets: list[greenlet.greenlet] = []
        self.finished: dict[int, str] = {}

        def make(rank: int) -> greenlet.greenlet:
            ops = SimOps(self, rank)
            self.rank_ops.append(ops)

            def body() -> None:
                try:
                    run_program(self.runner_cls, s, ops)
                    self.finished[rank] = "done"
                except (SimShapeError, CollectiveFailed) as exc:
                    self.finished[rank] = f"failed: {exc}"
                except greenlet.GreenletExit:
                    raise
                except contain.BudgetExceeded as exc:  # the whole program phase stops here
                    st = self._runner_error(ops, exc, f"runner stopped: {exc}")
                    self.budget_stop = f"{exc} on rank {rank} after step {st.index} {st.name}"
                    self._ready.clear()
                except Exception as exc:  # a runner bug: report it with its step
                    self._runner_error(ops, exc, f"runner raised {type(exc).__name__}: {exc}")
                except (SystemExit, KeyboardInterrupt) as exc:
                    if isinstance(exc, KeyboardInterrupt) and contain.user_interrupted():
                        raise  # the user's Ctrl-C ends the command
                    self._runner_error(ops, exc, str(contain.runner_exit(exc)))

            return greenlet.greenlet(body, parent=self._main)

        for r in range(s.world):
            lets.append(make(r))
            self._ready.append(r)
        while self._ready:
            r = self._ready.popleft()
            if not lets[r].dead:
                lets[r].switch()
        # Ranks still blocked in a collective: hang (unless a budget stopped them all).
        for key, pend in list(self.pending.items()) if self.budget_stop is None else ():
            group = key[0]
            missing = [r for r in group if r not in pend.arrivals]
            for r, (_k, _x, st) in pend.arrivals.items():
                why = "; ".join(f"rank {m} {self.finished.get(m, 'is blocked elsewhere')}" for m in missing)
                st.error = "hang"
                self.add_hazard(
                    HazardKind.HANG, r, st,
                    f"waits in {pend.kind} over ranks {list(group)}; never reached by {why}",
                )
        for g in lets:
            if not g.dead:
                g.throw(_Abort)
        self.pending.clear()
        for ops in self.rank_ops:
            ops.assign_clocks()

    def _timing_phase(self) -> float:
        env = simpy.Environment()
        events: dict[int, simpy.Event] = {}
        rendezvous: dict[tuple, list] = {}

        def ev(i: int) -> simpy.Event:
            e = events.get(i)
            if e is None:
                e = events[i] = env.event()
            return e

        symmetric = self._symmetric()
        gap = self.profile.host_gap_us

        def proc(plans: list[Plan]):  # noqa: ANN202 - SimPy generator
            for n, pl in enumerate(plans):
                if gap and n:
                    yield env.timeout(gap)
                for w in pl.waits:
                    e = ev(w)
                    if not e.triggered:
                        yield e
                if pl.coll is not None:
                    rv = rendezvous.get(pl.coll)
                    if rv is None:
                        # Symmetric ranks arrive together: the representative completes it.
                        n = 1 if symmetric else len(pl.coll[0])
                        rv = rendezvous[pl.coll] = [0, env.event(), n]
                    rv[0] += 1
                    if rv[0] == rv[2]:
                        rv[1].succeed()
                    else:
                        yield rv[1]
                start = env.now
                if pl.dur > 0:
                    yield env.timeout(pl.dur)
                pl.step.start, pl.step.end = start, env.now
                if pl.record is not None:
                    ev(pl.record).succeed()

        simulated = self.rank_ops[:1] if symmetric else self.rank_ops
        for ops in simulated:
            by_stream: dict[str, list[Plan]] = {}
            for pl in ops.plans:
                by_stream.setdefault(pl.step.stream, []).append(pl)
            for plans in by_stream.values():
                env.process(proc(plans))
        env.run()
        if symmetric:
            rep = self.rank_ops[0].steps
            for ops in self.rank_ops[1:]:
                for a, b in zip(rep, ops.steps):
                    b.start, b.end = a.start, a.end
            self.notes.append(f"timing: {len(self.rank_ops)} identical rank programs simulated once")
        return float(env.now)

    def _symmetric(self) -> bool:
        """True when every rank issued the same program with the same costs
        (then their timelines are identical and one SimPy rank stands for all)."""
        if not self.collapse or len(self.rank_ops) < 2 or any(v != "done" for v in self.finished.values()):
            return False

        def signature(ops: SimOps) -> tuple:
            rec_pos = {pl.record: i for i, pl in enumerate(ops.plans) if pl.record is not None}
            return tuple(
                (pl.step.stream, pl.dur, tuple(rec_pos.get(w, -1) for w in pl.waits),
                 pl.record is not None, None if pl.coll is None else len(pl.coll[0]))
                for pl in ops.plans
            )

        first = signature(self.rank_ops[0])
        return all(signature(ops) == first for ops in self.rank_ops[1:])

    def _runner_error(self, ops: SimOps, exc: BaseException, message: str) -> Step:
        """A RUNNER_ERROR at the rank's last step."""
        st = ops.steps[-1] if ops.steps else Step(ops.rank, 0, "construct", "construct")
        st.error = f"{type(exc).__name__}: {exc}"
        self.add_hazard(HazardKind.RUNNER_ERROR, ops.rank, st, f"{message} (after step {st.index} {st.name})")
        self.finished[ops.rank] = f"raised {type(exc).__name__}"
        return st

    def run(self) -> Trace:
        # Runner code runs only in the program phase: budgets and stdout apply there.
        with contain.RunnerGuard(run_program.__code__, contain.limits().sim_timeout_s):
            self._program_phase()
        if self.budget_stop is not None:
            self.notes.append(contain.BUDGET_NOTE + self.budget_stop)
        latency = self._timing_phase()
        trace = Trace(
            source="sim",
            scenario=self.scenario.name,
            runner=self.runner_label,
            world=self.scenario.world,
            hazards=self.hazards,
            latency_us=latency,
            decisions=self.decisions,
            notes=self.notes,
        )
        memo: dict[int, dict[str, float]] = {}
        for ops in self.rank_ops:
            trace.steps[ops.rank] = ops.steps
            trace.values[ops.rank] = ops.values
            if ops.output is not None:
                v = ops.output.value
                if id(v) not in memo:
                    memo[id(v)] = algebra.coefficients(v, self.expected_scale)
                trace.outputs[ops.rank] = dict(memo[id(v)])
        return trace
