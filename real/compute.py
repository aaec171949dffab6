"""MoE compute ops of the real interpreter: router, latent projections, the
routed experts (with the fused shared-expert slot stand-in) and the shared
experts, on the rank's layer weights. A mixin of RealOps (real/ops.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from real.model import LayerWeights, layer_input, mlp
from real.streams import RealTensor
from scenarios.dispatch_layout import DispatchLayout
from scenarios.ops import OpsShapeError, OpsUsageError, fused_shared_misuse, row_parallel_misuse
from scenarios.spec import Scenario
from scenarios.trace import COMPUTE, Step
from scenarios.workload import rank_token_ids

_UNTIMED = threading.local()  # per thread running op functions: seconds of tool work inside the current one


@contextmanager
def untimed() -> Iterator[None]:
    """Tool bookkeeping inside an op's function, not the op's work: left out
    of the step's measured time (the cpu calibration fits those times)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        _UNTIMED.s = getattr(_UNTIMED, "s", 0.0) + time.perf_counter() - t0


def take_untimed_s() -> float:
    """The untimed seconds of this thread's op function so far; starts again at 0."""
    s = getattr(_UNTIMED, "s", 0.0)
    _UNTIMED.s = 0.0
    return s


ROW_KEY = 8  # leading and trailing values of a row that fingerprint it (random inputs: distinct)
_MIX = torch.randint(1, 2**62, (2 * ROW_KEY,), dtype=torch.int64, generator=torch.Generator().manual_seed(7)) | 1


def fingerprints(rows: torch.Tensor) -> torch.Tensor:
    """One int64 per row of a float32 matrix: the bits of its first and last
    ROW_KEY values mixed with integer arithmetic (exact: equal rows give equal
    numbers whatever the batch, unlike a floating-point product; a zero row
    gives 0)."""
    if rows.shape[0] == 0 or rows.shape[1] == 0:
        return torch.zeros(rows.shape[0], dtype=torch.int64)
    k = min(ROW_KEY, rows.shape[1])
    ends = torch.cat([rows[:, :k], rows[:, -k:]], dim=1).contiguous().view(torch.int32).to(torch.int64)
    return (ends * _MIX[: 2 * k]).sum(dim=1)


FUSED_SLOT = ("fused shared-expert slot: the shared MLP shard runs beside the routed kernel call, added with "
              "the slot weight (stands in for one more expert inside the kernel)")


class ComputeOps:
    """The MoE compute half of RealOps (a mixin: RealOps provides `_op`,
    CommOps `_group` and `all_reduce`)."""

    scenario: Scenario
    layout: DispatchLayout
    rank: int
    d: int
    layer_tokens: list[tuple[int, int]] | None
    weights: LayerWeights
    route: Any
    kernel: Callable[..., torch.Tensor]
    device: torch.device
    steps: list[Step]
    stand_ins: set[str]
    _local: tuple[torch.Tensor, torch.Tensor, int] | None
    _shared: dict[tuple[bool, str], tuple[torch.Tensor, torch.Tensor]]
    # Provided by CommOps; annotated only, so nothing here shadows them.
    _group: Callable[[str, str], tuple[int, ...]]
    all_reduce: Callable[..., RealTensor]

    def _op(self, *args: Any, **kwargs: Any) -> RealTensor:
        raise NotImplementedError


    def _rows_tokens(self) -> list[tuple[int, int]]:
        """(DP rank, token) of each row the layer routes: this rank's layer
        tokens, or what a model-side communicator made of them."""
        if self.layer_tokens is not None:
            return self.layer_tokens
        return [(self.d, t) for t in rank_token_ids(self.scenario, self.rank, self.layout)]

    def router(self, x: RealTensor, name: str = "router") -> RealTensor:
        s = self.scenario

        def fn(v: torch.Tensor) -> torch.Tensor:
            if v.shape[-1] != s.model.hidden:
                raise OpsShapeError(f"gate expects width {s.model.hidden}, got {v.shape[-1]}")
            # The gate GEMM runs for real (timing); the top-k choice comes from
            # the workload so that sim and real route identically, for the
            # token each row holds, as an engine's router would route it.
            _logits = v @ self.weights.gate.to(v.device).t()
            with untimed():
                tokens = self._held_tokens(v)
            routes = [self._route_of(d, t) for d, t in tokens]
            ids = torch.tensor([r[0] for r in routes], dtype=torch.int64, device=v.device)
            w = torch.tensor([r[1] for r in routes], dtype=torch.float32, device=v.device)
            if ids.shape[0] != v.shape[0]:
                # The stand-in router cannot route rows the workload does not know.
                raise OpsShapeError(f"{v.shape[0]} rows but the workload routes {ids.shape[0]} on this rank")
            return torch.cat([ids.to(torch.float32), w], dim=1).reshape(v.shape[0], 2, s.model.top_k)

        out = self._op("router", name, COMPUTE, (x,), fn)
        return out

    def _held_tokens(self, v: torch.Tensor) -> list[tuple[int, int]]:
        """(DP rank, token) of the layer input each row of `v` holds, found by
        its contents (the inputs are seeded per DP rank: any rank can make
        them); a zero row is padding, as the rank expects at that position or
        its own DP rank's. When some row is no token's input (e.g. the runner
        transformed it before the router) the rank's expected tokens stand in."""
        expected = self._rows_tokens()
        rows = v.detach().to("cpu", torch.float32)
        prints = fingerprints(rows)
        if self._are_expected_rows(prints, expected):
            return expected  # the common case: one comparison of a number per row, no table
        table = self._inputs_by_row()
        zero = (rows.abs().amax(dim=1) == 0).tolist() if rows.numel() else [True] * rows.shape[0]
        found = []
        for i, (fp, z) in enumerate(zip(prints.tolist(), zero, strict=True)):
            if z:
                found.append((expected[i][0] if i < len(expected) else self.d, -1))
                continue
            hit = table.get(fp)
            if hit is None:
                return expected
            found.append(hit)
        return found

    def _are_expected_rows(self, prints: torch.Tensor, expected: list[tuple[int, int]]) -> bool:
        """Rows with fingerprints `prints` are this rank's expected tokens of
        its own DP rank (padding rows: zero), by the fingerprints of its own
        layer input (`own_prints`, taken where the input was made)."""
        own = getattr(self, "own_prints", None)
        if own is None or prints.shape[0] != len(expected) or any(d != self.d for d, _t in expected):
            return False
        idx = torch.tensor([t for _d, t in expected], dtype=torch.int64)
        pad = idx < 0
        want = own[idx.clamp(min=0)] if own.shape[0] else torch.zeros_like(idx)
        return torch.equal(prints, want.masked_fill(pad, 0))

    def _inputs_by_row(self) -> dict[int, tuple[int, int]]:
        """Every DP rank's layer input rows by their fingerprint (built once
        per rank; the inputs themselves are not kept)."""
        table = getattr(self, "_row_table", None)
        if table is None:
            s = self.scenario
            table = {}
            for d in range(s.parallel.dp):
                for t, fp in enumerate(fingerprints(layer_input(s, d)).tolist()):
                    table[fp] = (d, t)
            self._row_table = table
        return table

    def _route_of(self, d: int, t: int) -> tuple[tuple[int, ...], tuple[float, ...]]:
        """The workload's (ids, weights) of token t of DP rank d. A padding row
        (t < 0) routes like its DP rank's first token, or, on an idle DP rank
        (no token), like the first token of any: its values are zero, so its
        expert outputs are zero whatever it routes to."""
        if t >= 0:
            return self.route[d][t]
        return self.route[d][0] if self.route[d] else next(r[0] for r in self.route if r)

    def latent_down(self, x: RealTensor, name: str = "latent_down") -> RealTensor:
        if self.weights.down is None:
            raise OpsUsageError(f"{name}: latent_down needs a model with latent_dim")
        w = self.weights.down.to(self.device)
        hidden = self.scenario.model.hidden

        def fn(v: torch.Tensor) -> torch.Tensor:
            if v.shape[-1] != hidden:
                raise OpsShapeError(f"down-projection expects width {hidden}, got {v.shape[-1]}")
            return v @ w.t()

        return self._op("latent_down", name, COMPUTE, (x,), fn, component="routed")

    def latent_up(self, x: RealTensor, name: str = "latent_up", row_parallel: bool = False) -> RealTensor:
        if self.weights.up is None:
            raise OpsUsageError(f"{name}: latent_up needs a model with latent_dim")
        members = self.scenario.group("tp", self.rank) if row_parallel is True else (self.rank,)
        misuse = row_parallel_misuse(self.scenario, row_parallel, len(members))
        if misuse:
            raise OpsUsageError(f"{name}: {misuse}")
        w = self.weights.up.to(self.device)
        nonlinear = self.scenario.model.transform_nonlinear
        lat = w.shape[1]
        # Row-parallel: this TP rank's rows of the projection, on its latent slice.
        per = lat // len(members)
        lo = members.index(self.rank) * per
        w_rows = w[:, lo : lo + per]

        def fn(v: torch.Tensor) -> torch.Tensor:
            if v.shape[-1] != lat:
                raise OpsShapeError(f"up-projection expects width {lat}, got {v.shape[-1]}")
            y = v[:, lo : lo + per] @ w_rows.t()
            return F.silu(y) if nonlinear else y

        return self._op("latent_up", name, COMPUTE, (x,), fn, component="routed",
                        space="up-nonlinear" if nonlinear else "up")

    def _local_weights(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        if self._local is None:
            w13, w2, offset = self.weights.local_experts(self.rank)
            self._local = (w13.to(self.device), w2.to(self.device), offset)
        return self._local

    def experts(
        self, x: RealTensor, routing_h: RealTensor, inplace: bool = False, name: str = "routed_experts",
        fused_shared: float = 0.0, valid_rows: int | None = None,
    ) -> RealTensor:
        if valid_rows is not None and (isinstance(valid_rows, bool) or not isinstance(valid_rows, int) or valid_rows < 0):
            raise OpsUsageError(f"{name}: valid_rows must be a row count, got {valid_rows!r}")
        w13, w2, offset = self._local_weights()
        slot = self._fused_shared_slot(name, fused_shared)
        width = self.scenario.kernel_width
        out_width = self.scenario.expert_output_width
        if self.scenario.model.quantized_input:
            x = self._quantize_input(x)

        def fn(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            if v.shape[-1] != width:
                raise OpsShapeError(f"routed kernel expects width {width}, got {v.shape[-1]}")
            if r.dim() != 3:
                raise OpsUsageError(f"{name}: the routing argument is not a router output")
            ids = r[:, 0, :].to(torch.int64)
            wts = r[:, 1, :].contiguous()
            if ids.shape[0] != v.shape[0]:
                raise OpsShapeError(f"{v.shape[0]} rows but routing for {ids.shape[0]}")
            y = self.kernel(v, ids, wts, w13, w2, offset)
            if out_width != width:  # a kernel that writes its output unpadded
                y = y[..., :out_width].contiguous()
            if slot is not None:
                y = y + slot(v, y.shape[-1])
            if valid_rows is not None and valid_rows > y.shape[0]:
                raise OpsUsageError(f"{name}: valid_rows {valid_rows} is not within the input's {y.shape[0]} rows")
            if valid_rows is not None and valid_rows < y.shape[0]:
                # Rows past the token count: the engine's kernel skips them (zero
                # output); computed and then zeroed here, the same values.
                y = torch.cat([y[:valid_rows], y.new_zeros((y.shape[0] - valid_rows, *y.shape[1:]))])
            if inplace:
                # The fused kernel writes into its input buffer (the leading
                # columns of it when it writes unpadded).
                target = v if out_width == width else v[..., :out_width]
                target.copy_(y)
                return target
            return y

        return self._op("experts", name, COMPUTE, (x, routing_h), fn, component="routed")

    def _fused_shared_slot(self, name: str, weight: Any) -> Callable[[torch.Tensor, int], torch.Tensor] | None:
        """The fused shared-expert slot's contribution, None when not fused.
        Stand-in: the shared MLP's moe_tp shard runs beside the kernel call
        and is added with the slot's weight (the same arithmetic as one more
        expert inside the kernel, which the CPU kernels here do not take)."""
        s = self.scenario
        misuse = fused_shared_misuse(s, weight)
        if misuse is not None:
            raise OpsUsageError(f"{name}: {misuse}")
        if not weight:
            return None
        w13, w2 = self._shared_weights(s.moe_tp > 1, "moe_tp")
        hidden = s.model.hidden
        self.stand_ins.add(FUSED_SLOT)

        def slot(v: torch.Tensor, width: int) -> torch.Tensor:
            out = mlp(v[..., :hidden], w13, w2) * float(weight)
            return F.pad(out, (0, width - hidden)) if width > hidden else out

        return slot

    def _quantize_input(self, x: RealTensor) -> RealTensor:
        # A real fp8 cast would change values and fail the exact judge: the
        # copy into a new buffer is kept, the precision change is not.
        q = self._op("quantize", "quantize_routed_input", COMPUTE, (x,), lambda v: v.clone(), component="routed")
        what = "quantize_routed_input: a copy into a new buffer, no precision change (stands in for the fp8 quantization)"
        self.steps[q.step].detail = what
        self.stand_ins.add(what)
        return q

    def _shared_weights(self, sharded: bool, group: str = "tp") -> tuple[torch.Tensor, torch.Tensor]:
        key = (sharded, group if sharded else "")
        if key not in self._shared:
            members = self._group(group, "shared_experts") if sharded else (self.rank,)
            n = len(members)
            if self.scenario.model.shared_inter % n:
                raise OpsUsageError(f"shared_experts: shared intermediate {self.scenario.model.shared_inter} "
                                    f"is not divisible by the {group} group's {n} ranks")
            w13, w2 = self.weights.shared_shard(members.index(self.rank), n)
            self._shared[key] = (w13.to(self.device), w2.to(self.device))
        return self._shared[key]

    def shared_experts(
        self, x: RealTensor, sharded: bool = True, name: str = "shared_experts", reduce_results: bool = False,
        group: str = "tp",
    ) -> RealTensor:
        w13, w2 = self._shared_weights(sharded, group)
        hidden = self.scenario.model.hidden

        def fn(v: torch.Tensor) -> torch.Tensor:
            if v.shape[-1] != hidden:
                raise OpsShapeError(f"shared MLP expects width {hidden}, got {v.shape[-1]}")
            return mlp(v, w13, w2)

        out = self._op("shared_experts", name, COMPUTE, (x,), fn, component="shared")
        # The shard this rank computed, as the simulator labels it: the judge fits over the same group.
        where = f"{group}{self._group(group, name).index(self.rank)}" if sharded else "full"
        self.steps[out.step].detail = f"shared@{where}"
        if reduce_results and sharded:
            return self.all_reduce(out, group, name=f"{name}_all_reduce")
        return out
