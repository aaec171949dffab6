"""Seeded weights and inputs of one MoE layer, and its float64 source partials.

Every rank generates exactly the weights it needs from per-object seeds, so
all ranks agree without communicating. The float64 partials are what the
cross-check fits real tensors against: the output of one source (routed
experts of one EP rank or TP shard, shared experts of one shard) on one token.
"""

from __future__ import annotations

import zlib

import torch
import torch.nn.functional as F

from real.sizes import MAX_REAL_BYTES, ScenarioTooLarge, check_fits, real_bytes_estimate  # noqa: F401 - re-exported
from scenarios import layout
from scenarios.spec import Scenario
from scenarios.workload import dp_of, route_arrays, routing, tokens_of  # noqa: F401 - re-exported


def _gen(scenario: Scenario, *tag: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(zlib.crc32(repr((scenario.workload.seed, *tag)).encode()))
    return g


class LayerWeights:
    """Weights of one layer, generated lazily per expert (fp32)."""

    def __init__(self, s: Scenario) -> None:
        self.s = s
        m = s.model
        self.kw = s.kernel_width
        self.rw = m.routed_width
        self._experts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        g = _gen(s, "gate")
        self.gate = torch.randn(m.num_experts, m.hidden, generator=g) / m.hidden**0.5
        self.shared_w13 = self.shared_w2 = None
        if m.has_shared:
            g = _gen(s, "shared")
            i = m.shared_inter
            self.shared_w13 = torch.randn(2 * i, m.hidden, generator=g) / m.hidden**0.5
            self.shared_w2 = torch.randn(m.hidden, i, generator=g) / i**0.5
        self.down = self.up = None
        if m.latent_dim is not None:
            g = _gen(s, "latent")
            self.down = torch.randn(m.latent_dim, m.hidden, generator=g) / m.hidden**0.5
            self.up = torch.randn(m.hidden, m.latent_dim, generator=g) / m.latent_dim**0.5

    def expert(self, e: int, cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """w13 [2I, Hk] packed [gate; up] and w2 [Hk, I]; padded dims are zero.
        cache=False generates without keeping them (the exact reference walks
        every expert once and must not hold all of them in memory)."""
        if e in self._experts:
            return self._experts[e]
        i = self.s.model.moe_intermediate
        g = _gen(self.s, "expert", e)
        # Drawn in place and scaled in place (no temporaries): a rank without
        # EP generates every expert, hundreds of MB, inside the run's time.
        w13 = torch.randn(2 * i, self.rw, generator=g).div_(self.rw**0.5)
        if self.kw > self.rw:  # padded width: zero columns (drawn contiguous first: the same numbers)
            w13 = F.pad(w13, (0, self.kw - self.rw))
        w2 = torch.randn(self.rw, i, generator=g).div_(i**0.5)
        if self.kw > self.rw:
            w2 = F.pad(w2, (0, 0, 0, self.kw - self.rw))
        if cache:
            self._experts[e] = (w13, w2)
        return w13, w2

    def local_experts(self, rank: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Stacked (w13, w2, expert_offset) this rank's routed kernel uses: the
        experts of its EP index, sliced to its MoE-TP index's intermediate."""
        s = self.s
        e, t = layout.moe_coords(s, rank)
        lo, hi = layout.expert_range(s, e)
        w13_0, w2_0 = self._expert_shard(lo, t)
        # Filled expert by expert, each sharded on its own: no stack of the
        # unsharded experts (a copy of them all) before the shard.
        w13 = torch.empty(hi - lo, *w13_0.shape)
        w2 = torch.empty(hi - lo, *w2_0.shape)
        for j in range(lo, hi):
            w13[j - lo], w2[j - lo] = (w13_0, w2_0) if j == lo else self._expert_shard(j, t)
        return w13, w2, lo

    def _expert_shard(self, e: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Expert e's weights of MoE-TP index t (all of them when moe_tp is 1)."""
        w13, w2 = self.expert(e)
        if self.s.moe_tp == 1:
            return w13, w2
        from moe_twin_kernels.torch_ref import shard_w13_w2

        a, b = shard_w13_w2(w13[None], w2[None], t, self.s.moe_tp)
        return a[0], b[0]

    def shared_shard(self, t: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        assert self.shared_w13 is not None and self.shared_w2 is not None
        i = self.s.model.shared_inter
        if n == 1:
            return self.shared_w13, self.shared_w2
        per = i // n
        rows = torch.cat([torch.arange(t * per, (t + 1) * per), torch.arange(i + t * per, i + (t + 1) * per)])
        return self.shared_w13[rows].contiguous(), self.shared_w2[:, t * per : (t + 1) * per].contiguous()


def layer_input(s: Scenario, d: int) -> torch.Tensor:
    g = _gen(s, "x", d)
    return torch.randn(s.dp_tokens(d), s.model.hidden, generator=g)


def mlp(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    i = w13.shape[0] // 2
    h = x @ w13.t()
    return (F.silu(h[..., :i]) * h[..., i:]) @ w2.t()


class Reference:
    """Float64 partial outputs of each source, computed for all of a DP rank's
    tokens at once and cached per (source, DP rank).

    Batched because the fits run after every collective, inside the run's
    time: per token, converting the dense weights to float64 and running one
    matrix-vector product per routed expert took about a minute per rank on
    a 4096-wide layer with 64 experts; per DP rank it is a few matrix products.
    """

    def __init__(self, s: Scenario, weights: LayerWeights) -> None:
        self.s = s
        self.w = weights
        self.ids, self.wts = route_arrays(s)
        self._x: dict[int, torch.Tensor] = {}
        self._cache: dict[tuple[str, str, int, bool], torch.Tensor] = {}
        self._kernel: dict[tuple[int, int, int], torch.Tensor] = {}  # (ep, moe-tp, d): unscaled routed rows

    def x(self, d: int) -> torch.Tensor:
        if d not in self._x:
            self._x[d] = layer_input(self.s, d).double()
        return self._x[d]

    def routed_inputs(self, d: int) -> torch.Tensor:
        """The routed experts' input rows of DP rank d: [T, kernel_width]."""
        v = self.x(d)
        if self.w.down is not None:
            v = v @ self.w.down.double().t()
        return F.pad(v, (0, self.s.kernel_width - v.shape[-1]))

    def width(self, component: str, up: bool = False) -> int:
        """A source's native width (routed rows after the up-projection: hidden)."""
        if component in ("x", "shared") or (component == "routed" and up):
            return self.s.model.hidden
        return self.s.kernel_width

    def partial(self, component: str, shard: str, d: int, tok: int, up: bool = False) -> torch.Tensor:
        """The source's output on token (d, tok), in its native width (zero for
        a padding row, tok < 0)."""
        if tok < 0:
            return torch.zeros(self.width(component, up), dtype=torch.float64)
        return self.partials(component, shard, d, up)[tok]

    def rows(self, component: str, shard: str, d: int, toks: list[int], up: bool = False) -> torch.Tensor:
        """The source's output on tokens `toks` of DP rank d: [len(toks), width];
        padding rows (tok < 0) are zero."""
        full = self.partials(component, shard, d, up)
        idx = torch.tensor(toks, dtype=torch.int64)
        out = full.new_zeros((len(toks), full.shape[1]))
        real = idx >= 0
        if bool(real.any()):  # an idle DP rank has padding rows only, and no token to index
            out[real] = full[idx[real]]
        return out

    def partials(self, component: str, shard: str, d: int, up: bool = False) -> torch.Tensor:
        """The source's output on every token of DP rank d: [T, width] (cached)."""
        key = (component, shard, d, up)
        if key not in self._cache:
            self._cache[key] = self._compute(component, shard, d, up)
        return self._cache[key]

    def _compute(self, component: str, shard: str, d: int, up: bool) -> torch.Tensor:
        s, m = self.s, self.s.model
        if component == "x":
            return self.x(d)
        if component == "xlat":
            return self.routed_inputs(d)
        if component == "shared":
            w13, w2 = self.w.shared_shard(*shared_shard_index(s, shard))
            return mlp(self.x(d), w13.double(), w2.double())
        if component == "routed":
            base, part = layout.split_row_shard(shard)
            out = self._routed(base, d) * m.routed_scaling_factor
            if up:
                assert self.w.up is not None
                out = up_share(s, self.w.up.double(), out[:, : m.routed_width], part)
            return out
        raise ValueError(f"unknown source component {component!r}")

    def _routed(self, shard: str, d: int) -> torch.Tensor:
        """sum_k w_k E_k(x) (unscaled) over the token's experts this routed
        shard holds; every MoE-TP shard of its EP index comes from one pass."""
        e_idx, t_idx = layout.shard_coords(self.s, shard)
        if (e_idx, t_idx, d) not in self._kernel:
            for t, out in enumerate(self._routed_pass(e_idx, d)):
                self._kernel[(e_idx, t, d)] = out
        return self._kernel[(e_idx, t_idx, d)]

    def _routed_pass(self, e_idx: int, d: int) -> list[torch.Tensor]:
        """One batched MLP per expert of EP index `e_idx`, over the tokens of
        DP rank d routed to it; the result split by MoE-TP intermediate shard."""
        s = self.s
        inter = s.model.moe_intermediate
        v = self.routed_inputs(d)
        outs = [torch.zeros(v.shape[0], s.kernel_width, dtype=torch.float64) for _ in range(s.moe_tp)]
        ids = torch.from_numpy(self.ids[d].copy())
        wts = torch.from_numpy(self.wts[d].copy())
        lo, hi = layout.expert_range(s, e_idx)
        for e in torch.unique(ids).tolist():
            if not lo <= e < hi:
                continue
            tok, k = (ids == e).nonzero(as_tuple=True)
            w13, w2 = self.w.expert(e)
            h = v[tok] @ w13.double().t()
            act = wts[tok, k][:, None] * (F.silu(h[:, :inter]) * h[:, inter:])
            w2 = w2.double()
            for t, out in enumerate(outs):
                a, b = layout.intermediate_range(s, t)
                out.index_add_(0, tok, act[:, a:b] @ w2[:, a:b].t())
        return outs


def up_share(s: Scenario, up: torch.Tensor, v: torch.Tensor, part: int | None) -> torch.Tensor:
    """The up-projection of latent rows v (last dim = latent); `part` j: only
    TP rank j's share of a row-parallel projection (its latent slice through
    its rows, sim.algebra.row_shard's `+up<j>`); None: the whole projection."""
    if part is None:
        return v @ up.t()
    per = up.shape[1] // s.parallel.tp
    return v[..., part * per : (part + 1) * per] @ up[:, part * per : (part + 1) * per].t()


def shared_shard_index(s: Scenario, shard: str) -> tuple[int, int]:
    """(index, count) of a shared-MLP shard label: "full" is (0, 1); "tp1" or
    "world3" is that position in a group of that kind (Ops.shared_experts)."""
    if shard == "full":
        return 0, 1
    kind = shard.rstrip("0123456789")
    return int(shard[len(kind):]), len(s.group(kind, 0))
