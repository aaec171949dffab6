"""The model side of SimOps: the layer's input and output, SP slicing, the
DP gather and scatter of the model's communicators, row trims and the
custom-op boundary. Each sets which rows the router routes from here on
(`layer_rows`, `layer_nrows`) where the token set changes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from scenarios.trace import PADDING, Step
from scenarios.workload import dp_slot
from sim import algebra
from sim.cost import elementwise_us
from sim.simtypes import SimTensor

if TYPE_CHECKING:
    from scenarios.spec import Scenario
    from sim.engine import Simulation
    from sim.errors import RunnerUsageError

MODEL = "model"  # category of model-side steps (input, output, SP slicing)


def _as_slice(v: algebra.Value, t: int, per: int) -> algebra.Value:
    """A one-block value's SP slice t of `per` rows, its block named as
    tokens_of reads an SP slice ("d0s1")."""
    b = v.blocks[0]
    return algebra.Value((algebra.Block(f"{b.key}s{t}", per, b.terms),), v.scale)


class SimModel:
    """Model-side ops of one simulated rank (a mixin: SimOps provides the rest)."""

    sim: Simulation
    scenario: Scenario
    d: int
    t: int
    rank: int
    steps: list[Step]
    tokens: int
    layer_rows: tuple[str, ...]
    layer_nrows: int
    input_rows: tuple[str, ...]
    output: SimTensor | None
    values: dict[int, algebra.Value]

    # Provided by SimOps and SimComm (declared for the type checker only: a
    # stub here must never shadow the real method in the MRO).
    if TYPE_CHECKING:
        def _misuse(self, name: str, misuse: str) -> RunnerUsageError: ...
        def _tensor(self, t: Any, name: str, what: str = "x") -> SimTensor: ...
        def _int(self, n: Any, name: str, what: str) -> int: ...
        def _step(self, op: str, name: str, category: str, ins: tuple[SimTensor, ...] = (), out_shape: tuple[int, ...] | None = None, dur: float = 0.0, component: str | None = None, group: tuple[int, ...] | None = None) -> Step: ...
        def _new(self, st: Step, shape: tuple[int, ...], value: Any, ins: tuple[SimTensor, ...] = (), buf: int | None = None, fresh: bool = False, rows_of: SimTensor | None = None, writes: bool = True) -> SimTensor: ...
        def _shape_error(self, st: Step, message: str) -> None: ...
        def _bytes(self, shape: tuple[int, ...]) -> float: ...
        def all_gather(self, x: SimTensor, group: str = "tp", name: str = "all_gather") -> SimTensor: ...
        def all_gatherv(self, x: SimTensor, group: str = "dp", name: str = "all_gatherv") -> SimTensor: ...

    def layer_input(self, name: str = "layer_input") -> SimTensor:
        s = self.scenario
        shape = (self.tokens, s.model.hidden)
        st = self._step("layer_input", name, MODEL, (), shape)
        out = self._new(st, shape, algebra.leaf(f"d{self.d}", self.tokens, "x", ""), fresh=True)
        self.layer_rows = self.input_rows = out.value.keys()
        return out

    def sp_slice(self, x: SimTensor, name: str = "sp_slice") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        tp = self.scenario.parallel.tp
        per = -(-x.shape[0] // tp)
        shape = (per, *x.shape[1:])
        st = self._step("sp_slice", name, MODEL, (x,), shape, self.sim.view_us)
        value = _as_slice(x.value, self.t, per) if x.value.n_blocks == 1 else algebra.split_rows(x.value, self.t * per, (self.t + 1) * per)
        # Padding to a multiple of tp copies (F.pad), so the slice is a new buffer.
        out = self._new(st, shape, value, (x,))
        self.layer_rows, self.layer_nrows = out.value.keys(), shape[0]
        return out

    def dp_gather(self, x: SimTensor, name: str = "dp_gather", padded: bool = False) -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        s = self.sim.scenario
        if x.shape[0] != s.dp_tokens(self.d):
            st = self._step("dp_gather", name, MODEL, (x,), x.shape)
            self._shape_error(st, f"gathers {x.shape[0]} rows but DP rank {self.d} holds {s.dp_tokens(self.d)} tokens")
        if padded:
            out = self.all_gather(self._pad_rows_to_max(x, name), "dp", name=name)
        else:
            out = self.all_gatherv(x, "dp", name=name)
        self.layer_rows, self.layer_nrows = out.value.keys(), out.shape[0]
        return out

    def _pad_rows_to_max(self, x: SimTensor, name: str) -> SimTensor:
        """MAX_LEN: this DP rank's rows, zero-padded to the largest DP count
        (a copy into the gather's send buffer)."""
        most = max(self.sim.scenario.token_counts)
        blocks = x.value.blocks
        if len(blocks) != 1 or blocks[0].key != f"d{self.d}":
            raise self._misuse(name, "a padded dp_gather takes this DP rank's layer rows, as the model handed them")
        shape = (most, *x.shape[1:])
        st = self._step("pad_rows", f"{name}_pad_rows", PADDING, (x,), shape, self.sim.view_us)
        value = algebra.Value((algebra.Block(f"d{self.d}m{most}", most, blocks[0].terms),), x.value.scale)
        return self._new(st, shape, value, (x,))

    def dp_scatter(self, x: SimTensor, name: str = "dp_scatter", padded: bool = False) -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        s = self.sim.scenario
        lo, n = dp_slot(s, self.d, padded)
        shape = (n, *x.shape[1:])
        st = self._step("dp_scatter", name, MODEL, (x,), shape, self.sim.view_us)
        if x.shape[0] < lo + n:
            self._shape_error(st, f"{x.shape[0]} rows, but DP rank {self.d}'s slot is rows {lo}..{lo + n - 1}")
        self.layer_rows, self.layer_nrows = self.input_rows, n
        return self._new(st, shape, algebra.split_rows(x.value, lo, lo + n), (x,))

    def trim_rows(self, x: SimTensor, rows: int, name: str = "trim_rows") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        rows = self._int(rows, name, "rows")
        shape = (min(rows, x.shape[0]), *x.shape[1:])
        st = self._step("trim_rows", name, PADDING, (x,), shape, self.sim.view_us)
        if self._takes_own_sp_slice(x, shape[0]):
            # The first rows of the layer input are TP rank 0's SP slice (no
            # padding in it): named as sp_slice names it, the rank's own tokens.
            out = self._new(st, shape, _as_slice(x.value, 0, shape[0]), (x,), buf=x.buf)
            self.layer_rows, self.layer_nrows = out.value.keys(), shape[0]
            return out
        return self._new(st, shape, algebra.split_rows(x.value, 0, rows), (x,), buf=x.buf)

    def take_rows(self, x: SimTensor, start: int, end: int, name: str = "take_rows") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        start, end = self._int(start, name, "start"), self._int(end, name, "end")
        if not 0 <= start <= end:
            raise self._misuse(name, f"rows [{start}, {end}) are not a range of rows")
        if self.all_to_all_rows(x):
            raise self._misuse(name, "rows an all-to-all dispatched are modelled by the tokens they hold, not by "
                                     "position: take chunks of rows before the dispatch")
        shape = (max(0, min(end, x.shape[0]) - start), *x.shape[1:])
        st = self._step("take_rows", name, PADDING, (x,), shape, self.sim.view_us)
        self.sim.took_rows = True  # a chunked program: the routed experts check their routing's rows
        if end > x.shape[0]:
            self._shape_error(st, f"rows [{start}, {end}) of a tensor of {x.shape[0]} rows")
        return self._new(st, shape, algebra.split_rows(x.value, start, min(end, x.shape[0])), (x,), buf=x.buf)

    def rows_source(self, x: SimTensor) -> Step | None:
        """The step that set x's row set (None for the layer input's own)."""
        return self.steps[x.rows_from] if 0 <= x.rows_from < len(self.steps) else None

    def all_to_all_rows(self, x: SimTensor) -> bool:
        """x holds rows an all-to-all dispatched: the value names the group's
        tokens, the rows are only those routed here, in expert order."""
        src = self.rows_source(x)
        return src is not None and src.op == "dispatch" and self.sim.dispatch_group(self.rank)[1]

    def cat_rows(self, parts: Sequence[SimTensor], name: str = "cat_rows") -> SimTensor:
        if not isinstance(parts, list | tuple) or not parts:
            raise self._misuse(name, "argument parts must be a non-empty list of tensors")
        ins = tuple(self._tensor(t, name, f"parts[{i}]") for i, t in enumerate(parts))
        shape = (sum(t.shape[0] for t in ins), *ins[0].shape[1:])
        st = self._step("cat_rows", name, PADDING, ins, shape, elementwise_us(self.sim.profile, 2 * self._bytes(shape)))
        widths = {tuple(t.shape[1:]) for t in ins}
        if len(widths) > 1:
            self._shape_error(st, f"parts of widths {sorted(list(w) for w in widths)}")
        return self._new(st, shape, algebra.concat([t.value for t in ins]), ins)

    def _takes_own_sp_slice(self, x: SimTensor, rows: int) -> bool:
        """Under SP, TP rank 0 trimming the layer input to exactly its slice."""
        s = self.scenario
        if self.t != 0 or not s.sp or x.value.keys() != (f"d{self.d}",) or self.layer_rows != self.input_rows:
            return False
        per = -(-self.tokens // s.parallel.tp)
        return rows == per <= self.tokens

    def layer_output(self, x: SimTensor, name: str = "layer_output") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        st = self._step("layer_output", name, MODEL, (x,), x.shape)
        expected = (self.tokens, self.scenario.model.hidden)
        if tuple(x.shape) != expected:
            self._shape_error(st, f"layer output {list(x.shape)}, the model expects {list(expected)}")
        self.output = x
        self.values[st.index] = x.value
        self.sim.checks.output(self, st, x)
        return x

    def boundary(self, x: SimTensor, shape: tuple[int, ...], name: str = "custom_op_boundary") -> SimTensor:
        if x.__class__ is not SimTensor:
            x = self._tensor(x, name)
        if not isinstance(shape, tuple | list):
            raise self._misuse(name, f"argument shape must be a tuple, got {type(shape).__name__}")
        st = self._step("boundary", name, MODEL, (x,), tuple(shape))
        if tuple(x.shape) != tuple(shape):
            self._shape_error(
                st, f"returns {list(x.shape)} but its fake implementation declared {list(shape)}"
            )
        self.values[st.index] = x.value
        return x

