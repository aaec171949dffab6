"""The MoE compute half of SimOps: router, latent projections, routed and shared experts.

Each op records its step with a duration from the cost model, checks what it
consumes (sim/checks.py) and makes its output's abstract value: a fresh
source per expert shard (sim/algebra.py relabel), so reductions and their
coefficients can be followed through the rest of the program.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scenarios.ops import fused_shared_misuse, row_parallel_misuse
from scenarios.trace import COMPUTE, Step
from scenarios.workload import dp_of, tokens_of
from sim import algebra
from sim.cost import elementwise_us, experts_us, gemm_us
from sim.simtypes import SimTensor

if TYPE_CHECKING:
    from scenarios.spec import Scenario
    from sim.engine import Simulation
    from sim.errors import RunnerUsageError


ROUTING_OF_ROWS = "with the routing of rows"  # the WRONG_INPUT of a routing handle of other rows


class SimCompute:
    """Compute ops of one simulated rank (a mixin: SimOps provides the rest)."""

    sim: Simulation
    scenario: Scenario
    rank: int
    steps: list[Step]
    writes: dict[int, tuple[int, SimTensor]]
    layer_rows: tuple[str, ...]
    layer_nrows: int
    routed_shard: str
    shared_shards: tuple[str, ...] | None
    latent_up_tags: tuple[str, ...] | None

    # Provided by SimOps (declared for the type checker only: a stub here must
    # never shadow the real method in the MRO).
    if TYPE_CHECKING:
        def _misuse(self, name: str, misuse: str) -> RunnerUsageError: ...
        def _tensor(self, t: Any, name: str, what: str = "x") -> SimTensor: ...
        def _bytes(self, shape: tuple[int, ...]) -> float: ...
        def _group(self, kind: Any, st_name: str) -> tuple[int, ...]: ...
        def _step(self, op: str, name: str, category: str, ins: tuple[SimTensor, ...] = (), out_shape: tuple[int, ...] | None = None, dur: float = 0.0, component: str | None = None, group: tuple[int, ...] | None = None) -> Step: ...
        def _access(self, st: Step, t: SimTensor, write: bool) -> None: ...
        def _new(self, st: Step, shape: tuple[int, ...], value: Any, ins: tuple[SimTensor, ...] = (), buf: int | None = None, fresh: bool = False, rows_of: SimTensor | None = None, writes: bool = True) -> SimTensor: ...
        def _shape_error(self, st: Step, message: str) -> None: ...
        def all_reduce(self, x: SimTensor, group: str = "tp", name: str = "all_reduce") -> SimTensor: ...

    def router(self, x: SimTensor, name: str = "router") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        m, p = self.scenario.model, self.sim.profile
        rows = x.shape[0]
        shape = (rows, m.top_k)
        dur = gemm_us(p, 2 * rows * m.hidden * m.num_experts, (m.hidden * m.num_experts + rows * m.hidden) * p.bytes_per_elem, 2)
        st = self._step("router", name, COMPUTE, (x,), shape, dur)
        if x.shape[-1] != m.hidden:
            self._shape_error(st, f"gate expects width {m.hidden}, got {x.shape[-1]}")
        routed_rows = self.layer_nrows  # the workload routes this rank's layer tokens
        if rows != routed_rows and not self._holds_tokens(x):
            # Rows of other tokens are routed by the tokens they hold (as an
            # engine's router would); rows no token is known for are not.
            self._shape_error(st, f"{rows} rows but the workload routes {routed_rows}, and these rows "
                                  "are not known tokens (e.g. rows an all-to-all dispatched)")
        self.sim.checks.consume(self, st, x, "router", "x")
        return self._new(st, shape, x.value, (x,), fresh=True)

    def _holds_tokens(self, x: SimTensor) -> bool:
        """Every row of x is a known token (or padding) of the layer input:
        its row blocks name token sets whose sizes add up to its rows."""
        s = self.scenario
        try:
            n = sum([len(tokens_of(s, b.key)) for b in x.value.blocks])
        except ValueError:
            return False
        return n == x.shape[0]

    def _routing_of_the_rows(self, st: Step, x: SimTensor, routing_h: SimTensor, what: str) -> None:
        """In a chunked program (take_rows), the routing must be that of the
        same tokens as the rows (another chunk's routes every token wrong)."""
        rows, routed = self._row_tokens(x), self._row_tokens(routing_h)
        if rows is not None and routed is not None and rows != routed:
            self.sim.checks.wrong_input(self, st, f"{what} rows {','.join(x.value.keys())} {ROUTING_OF_ROWS} "
                                                  f"{','.join(routing_h.value.keys())}", st.name)

    def _row_tokens(self, t: SimTensor) -> list[tuple[int, int]] | None:
        """(DP rank, token) of every row, in order; None when a row is no known token."""
        s = self.scenario
        try:
            return [(dp_of(k), tok) for k in t.value.keys() for tok in tokens_of(s, k)]
        except ValueError:
            return None

    def latent_down(self, x: SimTensor, name: str = "latent_down") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        m, p = self.scenario.model, self.sim.profile
        lat = m.latent_dim or m.hidden
        shape = (x.shape[0], lat)
        dur = gemm_us(p, 2 * x.shape[0] * m.hidden * lat, m.hidden * lat * p.bytes_per_elem, 1)
        st = self._step("latent_down", name, COMPUTE, (x,), shape, dur, component="routed")
        if x.shape[-1] != m.hidden:
            self._shape_error(st, f"down-projection expects width {m.hidden}, got {x.shape[-1]}")
        self.sim.checks.consume(self, st, x, "latent_down", "x")
        return self._new(st, shape, algebra.relabel(x.value, "xlat", ""), (x,), fresh=True)

    def latent_up(self, x: SimTensor, name: str = "latent_up", row_parallel: bool = False) -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        m, p = self.scenario.model, self.sim.profile
        lat = m.latent_dim or m.hidden
        members = self._row_parallel_members(name, row_parallel)
        shape = (x.shape[0], m.hidden)
        dur = gemm_us(p, 2 * x.shape[0] * m.hidden * lat / len(members), m.hidden * lat / len(members) * p.bytes_per_elem,
                      2 if m.transform_nonlinear else 1)
        st = self._step("latent_up", name, COMPUTE, (x,), shape, dur, component="routed")
        if x.shape[-1] != lat:
            self._shape_error(st, f"up-projection expects width {lat}, got {x.shape[-1]}")
        self.sim.checks.latent_up(self, st, x, row_parallel=len(members) > 1)
        if len(members) == 1:
            return self._new(st, shape, x.value, (x,))
        tags = self.sim.shard_labels("up", len(members))
        if self.latent_up_tags is None:
            self.latent_up_tags = tags
        return self._new(st, shape, algebra.row_shard(x.value, tags[members.index(self.rank)]), (x,))

    def _row_parallel_members(self, name: str, row_parallel: Any) -> tuple[int, ...]:
        """The TP group a row-parallel up-projection is split over ((rank,) when replicated)."""
        members = self._group("tp", name) if row_parallel is True else (self.rank,)
        misuse = row_parallel_misuse(self.scenario, row_parallel, len(members))
        if misuse:
            raise self._misuse(name, misuse)
        return members

    def experts(
        self, x: SimTensor, routing_h: SimTensor, inplace: bool = False, name: str = "routed_experts",
        fused_shared: float = 0.0, valid_rows: int | None = None,
    ) -> SimTensor:
        if x.__class__ is not SimTensor or routing_h.__class__ is not SimTensor:
            x, routing_h = self._tensor(x, name), self._tensor(routing_h, name, "routing")
        if valid_rows is not None and not 0 <= self._int(valid_rows, name, "valid_rows") <= x.shape[0]:
            raise self._misuse(name, f"valid_rows {valid_rows} is not within the input's {x.shape[0]} rows")
        s, m, p = self.scenario, self.scenario.model, self.sim.profile
        shared_shard = self._fused_shared_shard(name, fused_shared)
        if m.quantized_input:
            x = self._quantize_input(x)
        width = s.kernel_width
        shape = (x.shape[0], s.expert_output_width)
        pairs, active = self.sim.loads[self.rank]
        inter = m.moe_intermediate // s.moe_tp
        if shared_shard is not None:  # every token also visits the shared slot
            pairs, active = pairs + x.shape[0], active + 1
        dur = experts_us(p, pairs, active, s.local_experts + (shared_shard is not None), width, inter)
        st = self._step("experts", name, COMPUTE, (x, routing_h), shape, dur, component="routed")
        if x.shape[-1] != width:
            self._shape_error(st, f"routed kernel expects width {width}, got {x.shape[-1]}")
        if routing_h.shape[0] != x.shape[0]:
            self._shape_error(st, f"{x.shape[0]} rows but routing for {routing_h.shape[0]}")
        self.sim.checks.consume(self, st, x, "routed experts", "xlat" if m.has_transform else "x")
        if self.sim.took_rows:
            self._routing_of_the_rows(st, x, routing_h, "routed experts run")
        value = algebra.relabel(x.value, "routed", self.routed_shard)
        if shared_shard is not None:
            slot = algebra.scale(algebra.relabel(x.value, "shared", shared_shard), float(fused_shared))
            value = algebra.add([value, slot])
        if valid_rows is not None and valid_rows < x.shape[0]:
            value = algebra.zero_rows_from(value, valid_rows)
        if not inplace:
            return self._new(st, shape, value, (x, routing_h), fresh=True)
        # The fused kernel writes into x's buffer: a new version of it.
        self._access(st, routing_h, False)
        out = self._new(st, shape, value, (x,), buf=x.buf, fresh=True)
        prev = self.writes.get(x.buf)
        out.version = (prev[0] if prev is not None else 0) + 1
        self.writes[x.buf] = (out.version, out)
        return out

    def _fused_shared_shard(self, name: str, weight: Any) -> str | None:
        """The shard label of a fused shared-expert slot, None when not fused."""
        misuse = fused_shared_misuse(self.scenario, weight)
        if misuse is not None:
            raise self._misuse(name, misuse)
        if not weight:
            return None
        s, m = self.scenario, self.scenario.model
        if s.moe_tp == 1:
            shards: tuple[str, ...] = ("full",)
        else:
            if m.shared_inter % s.moe_tp:
                raise self._misuse(name, f"shared intermediate {m.shared_inter} is not divisible by moe_tp={s.moe_tp}")
            shards = self.sim.shard_labels("moe_tp", s.moe_tp)
        if self.shared_shards is None:
            self.shared_shards = shards
        return shards[0] if s.moe_tp == 1 else shards[self._group("moe_tp", name).index(self.rank)]

    def _quantize_input(self, x: SimTensor) -> SimTensor:
        """The routed kernel's own quantized copy of x (a stale x stays visible)."""
        st = self._step("quantize", "quantize_routed_input", COMPUTE, (x,), x.shape,
                        elementwise_us(self.sim.profile, 2 * self._bytes(x.shape)), component="routed")
        q = self._new(st, x.shape, x.value, (x,))
        q.clobbered_by, q.clobber_partial = x.clobbered_by, x.clobber_partial
        return q

    def shared_experts(
        self, x: SimTensor, sharded: bool = True, name: str = "shared_experts", reduce_results: bool = False,
        group: str = "tp",
    ) -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        m, p = self.scenario.model, self.sim.profile
        members = self._group(group, name) if sharded else (self.rank,)
        n = len(members)
        if m.shared_inter % n:
            raise self._misuse(name, f"shared intermediate {m.shared_inter} is not divisible by the {group} group's {n} ranks")
        inter = m.shared_inter // n
        rows = x.shape[0]
        shape = (rows, m.hidden)
        bpe = p.bytes_per_elem
        dur = gemm_us(p, 6.0 * rows * m.hidden * inter, (3 * m.hidden * inter + 2 * rows * m.hidden) * bpe, 3)
        st = self._step("shared_experts", name, COMPUTE, (x,), shape, dur, component="shared")
        if x.shape[-1] != m.hidden:
            self._shape_error(st, f"shared MLP expects width {m.hidden}, got {x.shape[-1]}")
        self.sim.checks.consume(self, st, x, "shared experts", "x", self.layer_rows)
        shards = self.sim.shard_labels(group, n) if sharded else ("full",)
        if self.shared_shards is None:
            self.shared_shards = shards
        shard = shards[members.index(self.rank)] if sharded else "full"
        out = self._new(st, shape, algebra.relabel(x.value, "shared", shard), (x,), fresh=True)
        if reduce_results and sharded:
            return self.all_reduce(out, group, name=f"{name}_all_reduce")
        return out
