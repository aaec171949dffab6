"""The Ops interface: the vocabulary a runner program is written in.

A runner program (scenarios/runners.py) is ordinary Python that calls these
methods. The simulator (sim/) gives each call an abstract value and a SimPy
timing; the real runner (real/) gives it real tensors, collectives, streams and
kernels. Both record one Step per call, named by the `name` argument (the
runner's name for the step, e.g. "final_all_reduce"), defaulting to the op.

Tensors are opaque handles; the only thing a runner may inspect is `.shape`,
a tuple (rows, width). Control logic must not depend on tensor values: the
twin's premise is that the bugs live in decisions, not in numbers.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from scenarios.spec import Scenario


class TensorLike(Protocol):
    @property
    def shape(self) -> tuple[int, ...]: ...


class EventLike(Protocol):
    @property
    def id(self) -> int: ...


GROUPS = ("tp", "dp", "ep", "world", "moe_ep", "moe_tp")


class Ops(ABC):
    """One rank's view of the machine. Subclassed by the two interpreters."""

    scenario: Scenario
    rank: int
    current_stream: str = "main"

    # ---- streams and events (CUDA semantics) ----

    @contextmanager
    def stream(self, name: str) -> Iterator[None]:
        """Issue the enclosed ops on stream `name` ("main", "aux", "comm")."""
        previous = self.current_stream
        self.current_stream = name
        try:
            yield
        finally:
            self.current_stream = previous

    @abstractmethod
    def record_event(self, name: str = "record_event") -> Any:
        """Record an event on the current stream after the work issued so far."""

    @abstractmethod
    def wait_event(self, event: Any, name: str = "wait_event") -> None:
        """Make the current stream wait until `event` has happened."""

    # ---- lifecycle and decisions (zero-cost steps that make the trace readable) ----

    @abstractmethod
    def lifecycle(self, phase: str) -> None:
        """Mark a lifecycle phase: construct, build_kernel, forward."""

    @abstractmethod
    def decide(self, point: str, value: Any) -> None:
        """Record the outcome of a decision point (e.g. shared_experts_order)."""

    # ---- model side ----

    @abstractmethod
    def layer_input(self, name: str = "layer_input") -> Any:
        """This rank's hidden states [tokens, hidden] as the model hands them over."""

    @abstractmethod
    def sp_slice(self, x: Any, name: str = "sp_slice") -> Any:
        """Sequence parallel: pad rows to a multiple of tp, keep this TP rank's slice."""

    @abstractmethod
    def trim_rows(self, x: Any, rows: int, name: str = "trim_rows") -> Any:
        """Drop padding rows: keep the first `rows` rows."""

    @abstractmethod
    def take_rows(self, x: Any, start: int, end: int, name: str = "take_rows") -> Any:
        """Rows [start, end) of x, as a view (its buffer): one chunk of a
        chunked MoE forward. `end` past x's rows is a shape error."""

    @abstractmethod
    def cat_rows(self, parts: Sequence[Any], name: str = "cat_rows") -> Any:
        """The rows of `parts`, one after another, in a new buffer (the
        chunks' outputs joined); parts of different widths are a shape error."""

    @abstractmethod
    def layer_output(self, x: Any, name: str = "layer_output") -> Any:
        """Hand the result back to the model; checked against the expected output."""

    @abstractmethod
    def boundary(self, x: Any, shape: tuple[int, ...], name: str = "custom_op_boundary") -> Any:
        """The fused-MoE custom op returns here; its declared output shape is `shape`
        (what torch.compile's fake implementation promised). A mismatch is a shape error."""

    # ---- elementwise and layout ----

    @abstractmethod
    def pad(self, x: Any, width: int, name: str = "pad") -> Any: ...

    @abstractmethod
    def trim(self, x: Any, width: int, name: str = "trim") -> Any:
        """Keep the first `width` columns; `width` beyond x's width is a shape error."""

    @abstractmethod
    def view(self, x: Any, shape: tuple[int, ...], name: str = "view") -> Any:
        """Reshape like torch's `view` (one dimension may be -1): a shape error
        when the element counts differ. Only views that keep the row count are
        modeled (values are tracked per token row)."""

    @abstractmethod
    def add(self, a: Any, b: Any, name: str = "add") -> Any: ...

    @abstractmethod
    def scale(self, x: Any, factor: float, name: str = "scale") -> Any: ...

    @abstractmethod
    def clone(self, x: Any, name: str = "clone") -> Any: ...

    # ---- MoE compute ----

    @abstractmethod
    def router(self, x: Any, name: str = "router") -> Any:
        """Gate GEMM + top-k: a routing handle of shape [tokens, top_k]."""

    @abstractmethod
    def latent_down(self, x: Any, name: str = "latent_down") -> Any:
        """Routed input transform (latent MoE): [T, hidden] -> [T, latent]."""

    @abstractmethod
    def latent_up(self, x: Any, name: str = "latent_up", row_parallel: bool = False) -> Any:
        """Routed output transform: [T, latent] -> [T, hidden]; non-linear if the
        scenario says so (then it must see the reduced routed output).

        `row_parallel` (RowParallelLinear-style, over the TP group): x is still
        the full [T, latent] routed output; TP rank t multiplies only its latent
        slice [t*L/tp, (t+1)*L/tp) by the rows of the projection it holds, so
        the output is a TP partial (sources tagged `+up<t>`, e.g.
        `routed@ep1+up0`) that a later reduction over tp must sum. Right only
        on the complete routed output; linear transforms only. With tp = 1 it
        is the replicated projection."""

    @abstractmethod
    def experts(
        self, x: Any, routing: Any, inplace: bool = False, name: str = "routed_experts", fused_shared: float = 0.0,
        valid_rows: int | None = None,
    ) -> Any:
        """This rank's routed experts (fused kernel): a partial routed output.
        `inplace` writes the result into x's buffer, as fused kernels can.

        `valid_rows`: the kernel is told how many leading rows are tokens (an
        engine's non-padded token count): it computes those only, and the
        rows after them come out zero. None: every row is a token.

        `fused_shared` > 0: the shared expert is one more expert slot of the
        kernel (shared-experts fusion), every token routed to it with this
        weight; like the routed experts it is split over moe_tp (sources
        `shared@moe_tp1`, or `shared@full` without MoE-TP) and replicated over
        moe_ep, so a sum over moe_ep counts moe_ep copies. Later ops on the
        output (routed scaling) apply to the slot too."""

    @abstractmethod
    def shared_experts(
        self, x: Any, sharded: bool = True, name: str = "shared_experts", reduce_results: bool = False,
        group: str = "tp",
    ) -> Any:
        """The shared-expert MLP: sharded over `group` (its intermediate split
        over the group's ranks: partial sums, sources `shared@tp1`, or e.g.
        `shared@world3` over the whole world) or unsharded (complete on every
        rank, `shared@full`). `reduce_results`: a sharded MLP all-reduces its
        own output over its group (a collective step `<name>_all_reduce`), so it
        returns the complete sum; an unsharded MLP has nothing to reduce."""

    # ---- communication ----

    @abstractmethod
    def dispatch(self, x: Any, routing: Any, name: str = "dispatch") -> tuple[Any, Any]:
        """Prepare: send tokens to the experts' ranks with the scenario's backend."""

    @abstractmethod
    def combine(self, y: Any, name: str = "combine") -> Any:
        """Finalize: bring expert outputs back to the tokens' home rank."""

    @abstractmethod
    def all_reduce(self, x: Any, group: str = "tp", name: str = "all_reduce") -> Any: ...

    @abstractmethod
    def all_gather(self, x: Any, group: str = "tp", name: str = "all_gather") -> Any: ...

    @abstractmethod
    def reduce_scatter(self, x: Any, group: str = "tp", name: str = "reduce_scatter") -> Any: ...

    # Row counts that differ per member (uneven tokens per DP rank). torch's
    # all_gather / reduce_scatter need equal sizes; these do not. gloo on CPU
    # has neither: the real interpreter's stand-ins pad to the largest member
    # and all-gather then unpad, and all-reduce then keep this member's rows.

    # Model-side communicator of attention data parallelism (SGLang's DP
    # attention, moe_block.md section 2): the MoE runs on every DP rank's rows
    # (FULL layout), then each DP rank takes its own rows back.

    @abstractmethod
    def dp_gather(self, x: Any, name: str = "dp_gather", padded: bool = False) -> Any:
        """Every DP rank's layer-input rows, gathered over the dp group in DP-rank
        order. The gathered rows become the tokens the layer routes (the router
        and the shared experts expect them).

        `padded=False` (SGLang's SUM_LEN): an all_gatherv of the true counts,
        DP rank e's rows at [sum(counts[:e]), +counts[e]). `padded=True`
        (MAX_LEN): each rank pads its rows with zeros to the largest count M
        and all-gathers equal blocks: e's rows at [e*M, e*M + counts[e]),
        padding rows after them, routed like e's first token."""

    @abstractmethod
    def dp_scatter(self, x: Any, name: str = "dp_scatter", padded: bool = False) -> Any:
        """This DP rank's rows of a gathered (FULL-layout) tensor: a local copy of
        T_d rows from its slot (`padded` as in dp_gather says where the slot
        starts), which must already hold complete sums. Like a copy out of a
        buffer, it only fails when the buffer is too short. The layer's tokens
        are this DP rank's again."""

    @abstractmethod
    def all_gatherv(self, x: Any, group: str = "dp", name: str = "all_gatherv") -> Any:
        """Every member's rows (any count, equal width), concatenated in group order."""

    @abstractmethod
    def reduce_scatterv(self, x: Any, sizes: Sequence[int], group: str = "dp", name: str = "reduce_scatterv") -> Any:
        """The sum over the group; member i keeps rows [sum(sizes[:i]), +sizes[i]).
        `sizes` is each member's row count in group order, the same on every
        member; to undo an all_gatherv of the members' layer tokens it is
        `scenario.group_rows(group, rank)`."""


class OpsShapeError(RuntimeError):
    """An op's shapes are incompatible, where torch would raise (both
    interpreters raise this type, so errors are matched by class, not words)."""


class OpsUsageError(ValueError):
    """A runner called an Ops method wrongly (unknown group name, a value that
    is not a tensor handle or event): a mistake in the runner's code, reported
    with the step of the call, not a finding about the configuration."""


VIEW_ROWS_UNMODELED = (
    "a view that changes the row count is outside the twin's model "
    "(values are tracked per token row): keep the rows, change the columns only"
)


def row_parallel_misuse(scenario: Scenario, row_parallel: Any, members: int) -> str | None:
    """Why a latent_up(row_parallel=...) call over a TP group of `members`
    ranks is a mistake in the runner's code (None: it is not); one message
    for both interpreters."""
    if not isinstance(row_parallel, bool):
        return f"argument row_parallel must be a bool, got {type(row_parallel).__name__}"
    m = scenario.model
    if not row_parallel:
        return None
    if m.transform_nonlinear:
        return "row_parallel needs a linear transform (a non-linear one cannot take partial sums)"
    lat = m.latent_dim or m.hidden
    if lat % members:
        return f"latent width {lat} is not divisible by the tp group's {members} ranks"
    return None


def fused_shared_misuse(scenario: Scenario, weight: Any) -> str | None:
    """What is wrong with an `experts(fused_shared=weight)` call (None: nothing),
    in the one wording both interpreters give."""
    if isinstance(weight, bool) or not isinstance(weight, int | float) or not math.isfinite(weight) or weight < 0:
        return f"argument fused_shared must be a finite weight >= 0, got {weight!r}"
    m = scenario.model
    if weight and (not m.has_shared or m.has_transform):
        return "fused_shared needs shared experts and no latent transform"
    return None


def trim_error(shape: tuple[int, ...], width: int) -> str:
    """The one message both interpreters give for a trim past the width."""
    return f"cannot trim width {shape[-1]} to {width} (keeps 1..{shape[-1]} columns)"


def view_shape(shape: tuple[int, ...], want: tuple[int, ...]) -> tuple[tuple[int, ...], str | None]:
    """torch `view` shape rules: (the resolved shape, None) or (a best-effort
    shape, the error torch would raise), so both interpreters agree."""
    numel = 1
    for d in shape:
        numel *= d
    if len(want) != 2:
        return tuple(want), f"view to {list(want)}: tensors here are 2-D [rows, width]"
    if sum(1 for d in want if d == -1) > 1 or any(d < -1 for d in want):
        return tuple(want), f"view to {list(want)}: only one dimension can be inferred (-1)"
    known = 1
    for d in want:
        if d != -1:
            known *= d
    if -1 in want:
        if known == 0 or numel % known:
            return tuple(want), f"shape {list(want)} is invalid for input of size {numel}"
        want = tuple(numel // known if d == -1 else d for d in want)
    elif known != numel:
        return tuple(want), f"shape {list(want)} is invalid for input of size {numel}"
    return tuple(want), None
