"""The stand-in behind FlashInferA2A's interface, and the contract check.

`StandInA2A` is ops.py's stand-in semantics (torch.distributed
all_to_all_single) behind the adapter's dispatch/combine interface.
`contract_check` runs FlashInfer's dispatch/combine and the stand-in on the
same inputs and compares; it needs a GPU with NVLink, so this project only
checks the checker itself (over gloo, with fake adapters).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from real.fi_api import available, check_backend, config_problems, flashinfer_version
from real.flashinfer_a2a import FlashInferA2A

# Per-dtype (atol, rtol) for comparing combined outputs. Partials are rounded
# to the payload dtype before the fp32 sum; the sum is rounded once more.
_TOLERANCE: dict[torch.dtype, tuple[float, float]] = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


# ---- the stand-in semantics, same interface ---------------------------------------------


@dataclass(eq=False)
class StandInState:
    order: torch.Tensor  # local token index of every row sent, grouped by destination
    send: list[int]
    recv: list[int]
    rows: int

    @property
    def recv_counts(self) -> list[int]:
        return self.recv


class StandInA2A:
    """ops.py's stand-in semantics (torch.distributed all_to_all_single) behind
    FlashInferA2A's interface; runs on gloo (CPU) and NCCL (CUDA)."""

    def __init__(self, rank: int, world: int, num_experts: int, top_k: int, *, group: Any = None) -> None:
        if num_experts % world:
            raise ValueError(f"num_experts={num_experts} not divisible by world={world}")
        self.rank, self.world, self.num_experts, self.top_k = rank, world, num_experts, top_k
        self.local_experts = num_experts // world
        self.group = group

    def _a2a(self, t: torch.Tensor, out_rows: int, out_split: list[int], in_split: list[int]) -> torch.Tensor:
        out = t.new_empty((out_rows, *t.shape[1:]))
        dist.all_to_all_single(out, t.contiguous(), out_split, in_split, group=self.group)
        return out

    def dispatch(
        self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, StandInState]:
        ids = topk_ids.to(torch.int64)
        owners = ids // self.local_experts
        per_dest = [torch.nonzero((owners == o).any(dim=1)).flatten() for o in range(self.world)]
        counts = torch.tensor([len(r) for r in per_dest], dtype=torch.int64, device=x.device)
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        order = torch.cat(per_dest)
        send, recv = counts.tolist(), recv_counts.tolist()
        n = sum(recv)
        # Separate exchanges keep ids exact and x in its own dtype.
        x_recv = self._a2a(x[order], n, recv, send)
        ids_recv = self._a2a(ids[order], n, recv, send)
        w_recv = self._a2a(topk_weights.to(torch.float32)[order], n, recv, send)
        return x_recv, ids_recv, w_recv, StandInState(order, send, recv, x.shape[0])

    def combine(self, y: torch.Tensor, state: StandInState) -> torch.Tensor:
        back = self._a2a(y, sum(state.send), state.send, state.recv)
        out = torch.zeros((state.rows, y.shape[1]), dtype=torch.float32, device=y.device)
        out.index_add_(0, state.order, back.float())  # one row per contributing rank, fp32
        return out.to(y.dtype)


# ---- the contract check ------------------------------------------------------------------


def _expert_scale(ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    # A distinct positive factor per expert: a misrouted or dropped row changes the sum.
    return 1.0 + (ids.clamp(min=0).to(torch.float32) + 1.0) / num_experts


def reference_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, rank: int, local_experts: int, num_experts: int
) -> torch.Tensor:
    """A cheap deterministic "expert layer": expert e scales a row by 1 + (e+1)/E.
    Only this rank's experts count; weights are applied; output in x's dtype."""
    ids64 = ids.to(torch.int64)
    lo = rank * local_experts
    local = (ids64 >= lo) & (ids64 < lo + local_experts)
    coef = (weights.to(torch.float32) * _expert_scale(ids64, num_experts) * local).sum(dim=1)
    return (x.to(torch.float32) * coef[:, None]).to(x.dtype)


def expected_combine(x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> torch.Tensor:
    """What dispatch -> reference_experts -> combine must give, in fp32 (closed form)."""
    coef = (weights.to(torch.float32) * _expert_scale(ids.to(torch.int64), num_experts)).sum(dim=1)
    return x.to(torch.float32) * coef[:, None]


def _inputs(rank: int, tokens: int, hidden: int, num_experts: int, top_k: int, dtype: torch.dtype,
            device: torch.device, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed * 100_003 + rank)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    # Distinct experts per token, as a router's top-k gives.
    ids = torch.empty(tokens, top_k, dtype=torch.int64)
    for t in range(tokens):
        ids[t] = torch.randperm(num_experts, generator=g)[:top_k]
    w = torch.softmax(torch.randn(tokens, top_k, generator=g), dim=1)
    return x.to(device), ids.to(device), w.to(device)


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def _diagnose(out: torch.Tensor, expected: torch.Tensor, contributors: torch.Tensor, atol: float,
              rtol: float) -> str:
    """Name what the library's combine did when it is not the sum."""
    o = out.float()
    if torch.allclose(o, expected, atol=atol, rtol=rtol):
        return "sum over contributing ranks (contract holds)"
    if bool((contributors > 1).any()) and torch.allclose(
            o * contributors[:, None].float(), expected, atol=atol, rtol=rtol):
        return "mean over contributing ranks, not the sum"
    if not bool(o.abs().gt(0).any()):
        return "all zeros: nothing came back"
    return f"unexplained: differs from the sum by up to {_diff(o, expected):.3g}"


def contract_check(
    backend: str,
    rank: int,
    world: int,
    num_experts: int,
    top_k: int,
    hidden: int,
    max_tokens_per_rank: int,
    dtype: torch.dtype,
    *,
    tokens: int | None = None,
    seed: int = 0,
    group: Any = None,
    device: str | torch.device | None = None,
    adapter_factory: Callable[[], Any] | None = None,
) -> dict[str, Any]:
    """Run FlashInfer's dispatch/combine and the stand-in on the same inputs and
    compare (call on every rank of the group, on a GPU machine). Re-run after
    every flashinfer upgrade: whether combine reduces is a library behaviour.

    Returns {"ran": False, "reason": ...} where the library cannot run, else a
    report with "ok" (agreed over all ranks), the max differences against the
    stand-in and against the closed-form sum, per-source received row counts
    and a diagnosis of what combine did. `adapter_factory` replaces the
    library adapter (tests use it to check this checker on CPU over gloo).
    """
    check_backend(backend)
    if adapter_factory is None:
        ok, reason = available(backend)
        if not ok:
            return {"ran": False, "backend": backend, "reason": reason}
        problems = config_problems(backend, world, num_experts, top_k, hidden, dtype, max_tokens_per_rank)
        if problems:
            return {"ran": False, "backend": backend, "reason": "unsupported configuration: " + "; ".join(problems)}

        def adapter_factory() -> Any:
            return FlashInferA2A(backend, rank, world, num_experts, top_k, hidden, max_tokens_per_rank,
                                 dtype, group=group)

        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not dist.is_initialized():
        return {"ran": False, "backend": backend, "reason": "torch.distributed is not initialised "
                "(call contract_check on every rank of the EP group)"}
    if (dist.get_rank(group), dist.get_world_size(group)) != (rank, world):
        raise ValueError(f"rank/world {rank}/{world} do not match the group's "
                         f"{dist.get_rank(group)}/{dist.get_world_size(group)}")
    if tokens is None:
        # Uneven token counts across ranks, as in real batches.
        tokens = max(1, max_tokens_per_rank - rank % 2)
    local_experts = num_experts // world
    x, ids, w = _inputs(rank, tokens, hidden, num_experts, top_k, dtype, dev, seed)

    lib = adapter_factory()
    xr, ir, wr, st = lib.dispatch(x, ids, w)
    out_lib = lib.combine(reference_experts(xr, ir, wr, rank, local_experts, num_experts), st)

    ref = StandInA2A(rank, world, num_experts, top_k, group=group)
    xs, is_, ws, sst = ref.dispatch(x, ids, w)
    out_ref = ref.combine(reference_experts(xs, is_, ws, rank, local_experts, num_experts), sst)

    expected = expected_combine(x, ids, w, num_experts)
    atol, rtol = _TOLERANCE.get(dtype, (1.6e-2, 1.6e-2))
    owners = torch.sort(ids.to(torch.int64) // local_experts, dim=1).values
    contributors = (owners.diff(dim=1) != 0).sum(dim=1) + 1
    shape_ok = tuple(out_lib.shape) == tuple(out_ref.shape) == (tokens, hidden)
    vs_ref = shape_ok and torch.allclose(out_lib.float(), out_ref.float(), atol=atol, rtol=rtol)
    reduces = shape_ok and torch.allclose(out_lib.float(), expected, atol=atol, rtol=rtol)
    counts_match = list(st.recv_counts) == list(sst.recv_counts)
    ok_here = bool(vs_ref and reduces and counts_match)

    flag = torch.tensor([1 if ok_here else 0], dtype=torch.int32, device=dev)
    dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
    return {
        "ran": True,
        "ok": bool(flag.item()),
        "ok_this_rank": ok_here,
        "backend": backend,
        "flashinfer": flashinfer_version(),
        "rank": rank,
        "world": world,
        "dtype": str(dtype).removeprefix("torch."),
        "tokens": tokens,
        "rows_received": int(xr.shape[0]),
        "recv_counts": list(st.recv_counts),
        "recv_counts_standin": list(sst.recv_counts),
        "recv_counts_match": counts_match,
        "shape": list(out_lib.shape),
        "max_abs_diff_vs_standin": _diff(out_lib, out_ref) if shape_ok else None,
        "max_abs_diff_vs_sum": _diff(out_lib, expected) if shape_ok else None,
        "atol": atol,
        "rtol": rtol,
        "combine_reduces": bool(reduces),
        "diagnosis": _diagnose(out_lib, expected, contributors, atol, rtol) if shape_ok
        else f"combine returned shape {list(out_lib.shape)}, expected {[tokens, hidden]}",
    }
