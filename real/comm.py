"""Communication ops of the real interpreter: collectives, dispatch, combine.

Collectives run on torch.distributed (gloo on CPU, NCCL on CUDA). The
token-routing all-to-all backends are stand-ins on `all_to_all_single` (see
real/ops.py's module docstring); FlashInfer's own all-to-all is used on CUDA.

Before each collective on CPU, the members exchange (kind, shape) in a small
all-gather, so that ranks disagreeing on the collective or on its shape raise
`OpsShapeError` at that step, as in the simulator, instead of gloo aborting a
process on a size mismatch. The exchange is not counted in the step's time.
On CUDA it is skipped (it would synchronise the host with the device).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from real.errors import CollectiveFailure
from real.streams import RealTensor, StreamThread
from scenarios.backends import backend_info
from scenarios.dispatch_layout import DispatchLayout
from scenarios.ops import OpsShapeError, OpsUsageError
from scenarios.spec import Scenario
from scenarios.trace import COLLECTIVE, PADDING, Step
from scenarios.workload import dp_slot, gathered_tokens

# Collective kinds as the simulator names them (dispatch/combine without token
# routing are an all-gather / a reduce-scatter there too).
_KINDS = ("all_reduce", "all_gather", "reduce_scatter", "dispatch_a2a", "combine_a2a", "all_gatherv", "reduce_scatterv")
_SHAPED = ("all_reduce", "all_gather", "reduce_scatter", "reduce_scatterv")  # a2a rows differ per rank by design
_WIDTH_ONLY = ("all_gatherv",)  # rows may differ per member, the width may not
# gloo (and torch.distributed's equal-size collectives) have no v-variants.
_GATHERV = "pad every member to the largest, all-gather, unpad (gloo has no all_gatherv)"
_SCATTERV = "all-reduce, then keep this member's rows (gloo has no reduce_scatterv)"


class CommOps:
    """The communication half of RealOps (a mixin: RealOps provides `_op`)."""

    scenario: Scenario
    layout: DispatchLayout  # the runner's engine layout (scenarios/dispatch_layout.py)
    rank: int
    groups: dict[tuple[int, ...], Any]
    # (DP rank, token) of the rows the layer routes, once a model-side
    # communicator changed them (None: this rank's own layer tokens).
    layer_tokens: list[tuple[int, int]] | None = None
    tensors: dict[int, RealTensor]
    steps: list[Step]
    stand_ins: set[str]
    cuda: bool
    _fi: Any
    _fi_reason: str | None

    def _op(self, *args: Any, **kwargs: Any) -> RealTensor:
        raise NotImplementedError

    def _stream(self, name: str) -> StreamThread:
        raise NotImplementedError

    @staticmethod
    def _dist(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """A torch.distributed call; its failure (a peer gone, an aborted or
        timed-out collective) is a CollectiveFailure, told apart by type."""
        try:
            return call(*args, **kwargs)
        except RuntimeError as exc:  # DistBackendError, DistNetworkError, gloo's RuntimeError
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CollectiveFailure(f"{call.__name__}: {type(exc).__name__}: {first}") from exc

    def _pg(self, members: tuple[int, ...]) -> Any:
        return self.groups[members]

    def _agreement(self, kind: str, members: tuple[int, ...]) -> Callable[..., None] | None:
        """The members' check that they issue the same collective on the same
        shape (the simulator's rendezvous checks), or None where not done."""
        if self.cuda or len(members) == 1:
            return None

        def agree(v: torch.Tensor, *_rest: torch.Tensor) -> None:
            dims = list(v.shape)[:3]
            mine = torch.tensor([_KINDS.index(kind), len(dims), *dims, *[0] * (3 - len(dims))], dtype=torch.int64)
            parts = [torch.empty_like(mine) for _ in members]
            self._dist(dist.all_gather, parts, mine, group=self._pg(members))
            seen = [p.tolist() for p in parts]
            if len({k for k, *_ in seen}) > 1:
                raise OpsShapeError("ranks disagree on the collective: " + ", ".join(
                    f"rank {m} {_KINDS[k]}" for m, (k, *_) in zip(members, seen)))
            shapes = [d[2 : 2 + d[1]] for d in seen]
            keyed = [tuple(x[1:]) for x in shapes] if kind in _WIDTH_ONLY else [tuple(x) for x in shapes]
            if (kind in _SHAPED or kind in _WIDTH_ONLY) and len(set(keyed)) > 1:
                raise OpsShapeError("ranks disagree on the shape: " + ", ".join(
                    f"rank {m} {x}" for m, x in zip(members, shapes)))

        return agree

    def _group(self, kind: str, name: str) -> tuple[int, ...]:
        try:
            return self.scenario.group(kind, self.rank)
        except ValueError as exc:
            raise OpsUsageError(f"{name}: {exc}") from None

    def _all_gather(self, v: torch.Tensor, members: tuple[int, ...]) -> torch.Tensor:
        if len(members) == 1:
            return v.clone()
        parts = [torch.empty_like(v) for _ in members]
        self._dist(dist.all_gather, parts, v.contiguous(), group=self._pg(members))
        return torch.cat(parts, dim=0)

    def _all_reduce(self, v: torch.Tensor, members: tuple[int, ...]) -> torch.Tensor:
        out = v.contiguous().clone()
        if len(members) > 1:
            self._dist(dist.all_reduce, out, group=self._pg(members))
        return out

    def _reduce_scatter(self, v: torch.Tensor, members: tuple[int, ...]) -> torch.Tensor:
        n = len(members)
        if v.shape[0] % n:
            raise OpsShapeError(f"{v.shape[0]} rows do not split over {n} ranks")
        self.stand_ins.add("reduce-scatter on gloo: all-reduce then this rank's chunk")
        total = self._all_reduce(v, members)
        i = members.index(self.rank)
        chunk = v.shape[0] // n
        return total[i * chunk : (i + 1) * chunk].clone()

    def _all_gatherv(self, v: torch.Tensor, members: tuple[int, ...], rows_out: list[int] | None = None) -> torch.Tensor:
        """Stand-in for all_gatherv (gloo has none): exchange the row counts,
        pad every member to the largest, all-gather, drop the padding rows.
        `rows_out` receives every member's row count."""
        if len(members) == 1:
            if rows_out is not None:
                rows_out[:] = [v.shape[0]]
            return v.clone()
        pg = self._pg(members)
        mine = torch.tensor([v.shape[0]], dtype=torch.int64)
        counts = [torch.empty_like(mine) for _ in members]
        self._dist(dist.all_gather, counts, mine, group=pg)
        rows = [int(c) for c in counts]
        if rows_out is not None:
            rows_out[:] = rows
        if len(set(rows)) == 1:
            return self._all_gather(v, members)
        self.stand_ins.add(f"all_gatherv: {_GATHERV}")
        top = max(rows)
        padded = torch.zeros((top, *v.shape[1:]), dtype=v.dtype, device=v.device)
        padded[: v.shape[0]] = v
        parts = [torch.empty_like(padded) for _ in members]
        self._dist(dist.all_gather, parts, padded, group=pg)
        return torch.cat([p[:n] for p, n in zip(parts, rows, strict=True)], dim=0)

    def _reduce_scatterv(self, v: torch.Tensor, sizes: tuple[int, ...], members: tuple[int, ...]) -> torch.Tensor:
        """Stand-in for reduce_scatterv (gloo has none): all-reduce, then keep
        this member's rows. The members' sizes are exchanged and must agree."""
        n = len(members)
        if len(sizes) != n or any(k < 0 for k in sizes) or sum(sizes) != v.shape[0]:
            raise OpsShapeError(f"reduce_scatterv sizes {list(sizes)} do not split {v.shape[0]} rows over {n} ranks")
        if len(set(sizes)) == 1:
            return self._reduce_scatter(v, members)
        if n > 1:
            mine = torch.tensor(sizes, dtype=torch.int64)
            seen = [torch.empty_like(mine) for _ in members]
            self._dist(dist.all_gather, seen, mine, group=self._pg(members))
            if len({tuple(x.tolist()) for x in seen}) > 1:
                raise OpsShapeError("ranks disagree on reduce_scatterv sizes: " + ", ".join(
                    f"rank {m} {x.tolist()}" for m, x in zip(members, seen)))
        self.stand_ins.add(f"reduce_scatterv: {_SCATTERV}")
        total = self._all_reduce(v, members)
        i = members.index(self.rank)
        start = sum(sizes[:i])
        return total[start : start + sizes[i]].clone()

    def _stand_in_detail(self, out: RealTensor, what: str) -> RealTensor:
        """Name the stand-in in the step's detail (timeline, export)."""
        self.steps[out.step].detail = f"stand-in: {what}"
        return out

    def all_gatherv(self, x: RealTensor, group: str = "dp", name: str = "all_gatherv") -> RealTensor:
        g = self._group(group, name)
        out = self._op("all_gatherv", name, COLLECTIVE, (x,), lambda v: self._all_gatherv(v, g), group=g,
                       agree=self._agreement("all_gatherv", g))
        return self._stand_in_detail(out, _GATHERV)

    def reduce_scatterv(self, x: RealTensor, sizes: Sequence[int], group: str = "dp", name: str = "reduce_scatterv") -> RealTensor:
        g = self._group(group, name)
        if not isinstance(sizes, Sequence) or isinstance(sizes, str) or not all(
                isinstance(k, int) and not isinstance(k, bool) for k in sizes):
            raise OpsUsageError(f"{name}: argument sizes must be a sequence of ints, got {sizes!r}")
        sz = tuple(sizes)
        out = self._op("reduce_scatterv", name, COLLECTIVE, (x,), lambda v: self._reduce_scatterv(v, sz, g), group=g,
                       agree=self._agreement("reduce_scatterv", g))
        return self._stand_in_detail(out, _SCATTERV)

    def dp_gather(self, x: RealTensor, name: str = "dp_gather", padded: bool = False) -> RealTensor:
        s = self.scenario
        d = s.coords(self.rank)[0]
        mine = s.dp_tokens(d)
        g = self._group("dp", name)

        def check(v: torch.Tensor) -> None:
            if v.shape[0] != mine:
                raise OpsShapeError(f"gathers {v.shape[0]} rows but DP rank {d} holds {mine} tokens")

        if padded:
            out = self.all_gather(self._pad_rows_to_max(x, name, check), "dp", name=name)
        else:
            def fn(v: torch.Tensor) -> torch.Tensor:
                check(v)
                return self._all_gatherv(v, g)

            out = self._op("all_gatherv", name, COLLECTIVE, (x,), fn, group=g, agree=self._agreement("all_gatherv", g))
            out = self._stand_in_detail(out, _GATHERV)
        self.layer_tokens = gathered_tokens(s, padded)
        return out

    def _pad_rows_to_max(self, x: RealTensor, name: str, check: Callable[[torch.Tensor], None]) -> RealTensor:
        """MAX_LEN: this DP rank's rows, zero-padded to the largest DP count."""
        most = max(self.scenario.token_counts)

        def fn(v: torch.Tensor) -> torch.Tensor:
            check(v)
            return torch.cat([v, v.new_zeros((most - v.shape[0], *v.shape[1:]))])

        return self._op("pad_rows", f"{name}_pad_rows", PADDING, (x,), fn)

    def dp_scatter(self, x: RealTensor, name: str = "dp_scatter", padded: bool = False) -> RealTensor:
        s = self.scenario
        d = s.coords(self.rank)[0]
        lo, n = dp_slot(s, d, padded)

        def fn(v: torch.Tensor) -> torch.Tensor:
            if v.shape[0] < lo + n:
                raise OpsShapeError(f"{v.shape[0]} rows, but DP rank {d}'s slot is rows {lo}..{lo + n - 1}")
            return v[lo : lo + n]

        self.layer_tokens = [(d, t) for t in range(n)]
        return self._op("dp_scatter", name, "model", (x,), fn)

    def all_reduce(self, x: RealTensor, group: str = "tp", name: str = "all_reduce") -> RealTensor:
        g = self._group(group, name)
        return self._op("all_reduce", name, COLLECTIVE, (x,), lambda v: self._all_reduce(v, g), group=g,
                        agree=self._agreement("all_reduce", g))

    def all_gather(self, x: RealTensor, group: str = "tp", name: str = "all_gather") -> RealTensor:
        g = self._group(group, name)
        return self._op("all_gather", name, COLLECTIVE, (x,), lambda v: self._all_gather(v, g), group=g,
                        agree=self._agreement("all_gather", g))

    def reduce_scatter(self, x: RealTensor, group: str = "tp", name: str = "reduce_scatter") -> RealTensor:
        g = self._group(group, name)
        return self._op("reduce_scatter", name, COLLECTIVE, (x,), lambda v: self._reduce_scatter(v, g), group=g,
                        agree=self._agreement("reduce_scatter", g))

    def _flashinfer(self, members: tuple[int, ...]) -> Any:
        """FlashInfer's NVLink all-to-all on CUDA for the flashinfer backends
        (construction is collective: every rank reaches it at the same step);
        None where it cannot run, with the reason kept for the run's notes."""
        s = self.scenario
        backend = self.layout.dispatch_backend(s)
        if not (self.cuda and backend.startswith("flashinfer_nvlink")):
            return None
        if self._fi is None and self._fi_reason is None:
            from real.flashinfer_a2a import A2AUnavailable, FlashInferA2A

            try:
                self._fi = FlashInferA2A(
                    backend, self.rank, s.world, s.model.num_experts, s.model.top_k,
                    # Capacity: the static one if set, else the most rows any rank sends
                    # (DP ranks may hold different counts).
                    s.kernel_width, s.parallel.max_dispatch_tokens or self.layout.max_rows(s), torch.float32,
                    group=self._pg(members),
                )
                self.stand_ins.add(f"{backend}: FlashInfer library (not a stand-in)")
            except A2AUnavailable as exc:
                self._fi_reason = exc.reason
        return self._fi

    def dispatch(self, x: RealTensor, routing_h: RealTensor, name: str = "dispatch") -> tuple[RealTensor, RealTensor]:
        s = self.scenario
        backend = self.layout.dispatch_backend(s)
        if backend == "none":
            raise OpsUsageError(f"{name}: no all-to-all or DP gather in this scenario (backend none)")
        members, token_routing = self.layout.dispatch_group(s, self.rank)
        state: dict[str, Any] = {}

        library = self._flashinfer(members) if token_routing else None

        def fn(v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
            if not token_routing:  # the naive gather: every member's own rows
                sent: list[int] = []
                xd = self._all_gatherv(v, members, sent)
                state["sizes"] = tuple(sent)  # what the combine hands back (a chunk's, not the layer's)
                state["routing"] = self._all_gatherv(r, members)
                return xd
            if library is not None:
                from real.flashinfer_a2a import join_routing, split_routing

                ids, w = split_routing(r)
                xr, idr, wr, fi_state = library.dispatch(v, ids, w)
                state["fi"] = fi_state
                state["routing"] = join_routing(idr, wr)
                return xr
            return self._a2a_dispatch(v, r, members, state)

        if token_routing and library is None:
            info = backend_info(backend)
            why = f"; FlashInfer not used: {self._fi_reason}" if self._fi_reason else ""
            self.stand_ins.add(
                f"{backend}: stand-in for {info.gpu_library} (torch.distributed all_to_all; "
                f"combine sums one row per contributing rank in fp32){why}"
            )
        out = self._op("dispatch", name, COLLECTIVE, (x, routing_h), fn, component="routed", group=members,
                       agree=self._agreement("dispatch_a2a" if token_routing else "all_gatherv", members))
        out.extra["state"] = state
        if not token_routing:
            self._stand_in_detail(out, f"all_gatherv: {_GATHERV}")
        rh = RealTensor((), out.step, out.stream)
        rh.extra["routing"] = True  # reports [rows, top_k] like the simulator's, also when sliced or joined

        # The dispatched routing is produced by the same step.
        def fill() -> None:
            out.ready.wait()
            if out.error is not None:
                rh.error = out.error
                rh.ready.set()
            else:
                r = state["routing"]
                rh.set(r, (r.shape[0], r.shape[2]))

        if out.stream == "main":
            fill()
        else:
            self._stream(out.stream).submit(fill)
        return out, rh

    def _a2a_dispatch(self, v: torch.Tensor, r: torch.Tensor, members: tuple[int, ...], state: dict[str, Any]) -> torch.Tensor:
        per = self.scenario.local_experts
        ids = r[:, 0, :].to(torch.int64)
        owners = ids // per
        send_rows: list[torch.Tensor] = []
        for o in members:
            send_rows.append(torch.nonzero((owners == o).any(dim=1)).flatten())
        counts = torch.tensor([len(rows) for rows in send_rows], dtype=torch.int64, device=v.device)
        recv_counts = torch.empty_like(counts)
        pg = self._pg(members)
        self._dist(dist.all_to_all_single, recv_counts, counts, group=pg)
        order = torch.cat(send_rows) if send_rows else torch.empty(0, dtype=torch.int64, device=v.device)
        # Explicit width: an idle rank sends zero rows (reshape cannot infer -1 then).
        payload = torch.cat([v[order], r[order].reshape(len(order), r.shape[1] * r.shape[2])], dim=1)
        recv = torch.empty(int(recv_counts.sum()), payload.shape[1], device=v.device)
        self._dist(dist.all_to_all_single, recv, payload.contiguous(), recv_counts.tolist(), counts.tolist(), group=pg)
        h = v.shape[1]
        state.update(order=order, send=counts.tolist(), recv=recv_counts.tolist(), rows=v.shape[0], members=members)
        state["routing"] = recv[:, h:].reshape(-1, 2, r.shape[2]).contiguous()
        return recv[:, :h].contiguous()

    def combine(self, y: RealTensor, name: str = "combine") -> RealTensor:
        members, token_routing = self.layout.dispatch_group(self.scenario, self.rank)
        source = self.tensors.get(y.step)
        # Find the dispatch whose layout this combine reverses (the latest one).
        state = None
        for t in reversed(list(self.tensors.values())):
            if "state" in t.extra:
                state = t.extra["state"]
                break
        del source

        # Each member gets back the rows it dispatched (the DP metadata's
        # counts for a whole layer's rows; a chunk's own).
        sizes = tuple(self.layout.rank_rows(self.scenario, m) for m in members)

        def fn(v: torch.Tensor) -> torch.Tensor:
            if not token_routing:
                return self._reduce_scatterv(v, (state or {}).get("sizes", sizes), members)
            if state is not None and "fi" in state and self._fi is not None:
                return self._fi.combine(v, state["fi"])
            if state is None or "order" not in state:
                raise OpsUsageError(f"{name}: combine without a token-routing dispatch before it")
            back = torch.empty(sum(state["send"]), v.shape[1], device=v.device)
            self._dist(dist.all_to_all_single, back, v.contiguous(), state["send"], state["recv"], group=self._pg(members))
            out = torch.zeros(state["rows"], v.shape[1], dtype=torch.float32, device=v.device)
            out.index_add_(0, state["order"], back.float())  # one row per contributing rank, fp32
            return out.to(v.dtype)

        out = self._op("combine", name, COLLECTIVE, (y,), fn, component="routed", group=members,
                       agree=self._agreement("combine_a2a" if token_routing else "reduce_scatterv", members))
        return out if token_routing else self._stand_in_detail(out, f"reduce_scatterv: {_SCATTERV}")
