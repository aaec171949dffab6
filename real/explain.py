"""Characterise wrong output rows by least squares against an extended basis.

The judge (real/judge.py) calls this for rows that are wrong and are not
simply another token's output or a padding row. Each *hypothesis* is a set
of columns, every column a float64 vector per row in the output space
(width `hidden`):

- the layer's own sources (expected coefficient 1): routed experts per EP
  rank or TP shard (under a row-parallel latent up-projection, per shard
  and per TP rank's share of the projection), shared experts per shard of
  the group the run sharded them over (TP by default, e.g. the world under
  SGLang's DP attention);
- other tokens summed in (expected 0): the routed/shared output of the token
  at the same row position in another SP slice or another DP rank, which is
  what a reduction over rows holding different tokens adds;
- common wrong inputs (expected 0): shared experts on the latent-projected
  input padded to hidden; shared experts on the buffer an in-place routed
  kernel overwrote (this rank's group's routed partials, or the reduced
  routed output); a non-linear routed transform applied to partial (not yet
  reduced) routed outputs, or to a routed output reduced c times.

A hypothesis explains the rows when its relative least-squares residual is
at most FIT_TOL. Among those, the one with the fewest coefficients off their
expected value wins (ties: the order above), so a wrong-input term is never
traded for fractional "reduction" coefficients: those would leave a
residual. When nothing explains the rows the answer says so, with the
residual of the closest hypothesis.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from real.model import up_share
from real.reference import ExactReference
from scenarios import layout
from scenarios.trace import HazardKind

FIT_TOL = 1e-4  # relative residual: fp32 noise is ~1e-6 here
COEF_TOL = 1e-3  # a coefficient this close to its expected value is right

Tok = tuple[int, int]  # (dp rank, token)

# Families of columns, in tie-break order. "source" columns expect 1.
SOURCE, FOREIGN, LATENT, CLOBBER, CLOBBER_TOTAL, NL_PARTIAL, NL_SCALED = (
    "source", "foreign", "latent input", "in-place clobber", "in-place clobber (reduced)",
    "transform of partials", "scaled before transform")

WRONG_INPUT_WORDS = {
    LATENT: "shared experts applied to the latent-projected input (padded to hidden) instead of the layer input",
    CLOBBER: "shared experts applied to the routed output (in-place clobber: the routed kernel wrote into the shared input)",
    CLOBBER_TOTAL: "shared experts applied to the reduced routed output (in-place clobber)",
    NL_PARTIAL: "the non-linear routed transform applied to partial routed outputs (before their reduction)",
}


@dataclass
class Column:
    label: str
    values: torch.Tensor  # [rows, hidden]
    family: str
    expected: float
    scale: float | None = None  # NL_SCALED: the routed output's coefficient before the transform


@dataclass
class Explanation:
    kind: HazardKind | None  # None: not explained
    cause: str
    residual: float
    coefficients: dict[str, float] = field(default_factory=dict)


class Basis:
    """Column builders for the rows `toks` of one rank."""

    def __init__(self, ref: ExactReference, rank: int, toks: list[Tok], shared_group: str | None = None) -> None:
        self.ref = ref
        self.s = ref.s
        self.rank = rank
        self.toks = toks
        # The group the run sharded its shared MLP over ("tp", "world", ...);
        # unsharded or unknown: the TP shards, whose sum is the full MLP too.
        self.shared_kind = shared_group if shared_group not in (None, "full") else "tp"
        self.shared_shards = self._shared_shards()  # (label, shard, n)

    def _shared_shards(self) -> list[tuple[str, int, int]]:
        m, kind = self.s.model, self.shared_kind
        if not m.has_shared:
            return []
        n = len(self.s.group(kind, self.rank))
        if n > 1 and m.shared_inter % n == 0:
            return [(f"{kind}{j}", j, n) for j in range(n)]
        return [("full", 0, 1)]

    def shard_of(self, q: int) -> tuple[str, int, int]:
        """The shared shard world rank q computes (its index in its shard group)."""
        if len(self.shared_shards) == 1:
            return self.shared_shards[0]
        return self.shared_shards[self.s.group(self.shared_kind, q).index(q)]

    # ---- per-row vectors ----

    def _stack(self, fn: Callable[[int, int], torch.Tensor | None]) -> torch.Tensor:
        h = self.s.model.hidden
        rows = [fn(d, t) for d, t in self.toks]
        return torch.stack([r if r is not None else torch.zeros(h, dtype=torch.float64) for r in rows])

    def _x(self, d: int, t: int) -> torch.Tensor:
        return self.ref.x[d][t]

    def routed_out(self, v: torch.Tensor) -> torch.Tensor:
        """A routed kernel output (unscaled, kernel width) in the output space."""
        return self.ref.transform(self.s.model.routed_scaling_factor * v)

    def up_parts(self) -> list[int | None]:
        """A row-parallel up-projection's TP shares (each routed source is then
        tp columns, sim.algebra.row_shard's `+up<j>`), or [None]: the whole one."""
        s = self.s
        if s.model.latent_up_parallel == "row" and s.parallel.tp > 1 and self.ref.weights.up is not None:
            return list(range(s.parallel.tp))
        return [None]

    def routed_share(self, v: torch.Tensor, j: int | None) -> torch.Tensor:
        """routed_out, or TP rank j's share of it under a row-parallel up-projection."""
        if j is None:
            return self.routed_out(v)
        m, up = self.s.model, self.ref.weights.up
        assert up is not None
        return up_share(self.s, up.double(), m.routed_scaling_factor * v[..., : m.routed_width], j)

    # ---- families ----

    def sources(self, with_routed: bool = True) -> list[Column]:
        ref, m = self.ref, self.s.model
        cols: list[Column] = []
        if with_routed and m.transform_nonlinear:
            # Not separable per shard: the whole routed output is one source.
            cols.append(Column("routed", self._stack(lambda d, t: self.routed_out(ref.routed_kernel[d][t])), SOURCE, 1.0))
        elif with_routed:
            for shard in ref.routed_partials(self.toks[0][0]):
                for j in self.up_parts():
                    cols.append(Column(f"routed@{shard}" + ("" if j is None else f"+up{j}"), self._stack(
                        lambda d, t, sh=shard, j=j: self.routed_share(ref.routed_partials(d)[sh][t], j)), SOURCE, 1.0))
        for label, i, n in self.shared_shards:
            cols.append(Column(f"shared@{label}", self._stack(
                lambda d, t, i=i, n=n: ref.shared_mlp(self._x(d, t), i, n)), SOURCE, 1.0))
        return cols

    def _partners(self) -> list[tuple[str, Callable[[int, int], Tok | None]]]:
        """(key, partner): for each other SP slice / DP rank, the token at the
        same row position there (None where there is none)."""
        s = self.s
        out: list[tuple[str, Callable[[int, int], Tok | None]]] = []
        if s.sp:
            for d in sorted({d for d, _ in self.toks}):
                per = s.layer_rows(d)
                for slc in range(s.parallel.tp):
                    out.append((f"d{d}s{slc}", lambda d_, t, slc=slc, d=d, per=per: (
                        None if d_ != d or t // per == slc else (d, slc * per + t % per))))
        own = {d for d, _ in self.toks}
        for other in range(s.parallel.dp):
            if other not in own:
                out.append((f"d{other}", lambda d_, t, other=other: (other, t)))
        return out

    def _at_partner(self, partner: Callable[[int, int], Tok | None],
                    fn: Callable[[int, int], torch.Tensor]) -> Callable[[int, int], torch.Tensor | None]:
        def at(d: int, t: int) -> torch.Tensor | None:
            p = partner(d, t)
            return None if p is None or p[1] >= self.s.dp_tokens(p[0]) else fn(*p)
        return at

    def foreign(self) -> list[Column]:
        """Other tokens at the same row position (SP slice / DP rank): their
        complete routed and shared outputs."""
        ref = self.ref
        cols: list[Column] = []
        for key, partner in self._partners():
            if self.s.model.has_shared:
                cols.append(Column(f"shared@full[tokens {key}]", self._stack(self._at_partner(
                    partner, lambda d, t: ref.shared_mlp(self._x(d, t)))), FOREIGN, 0.0))
            cols.append(Column(f"routed[tokens {key}]", self._stack(self._at_partner(
                partner, lambda d, t: self.routed_out(ref.routed_kernel[d][t]))), FOREIGN, 0.0))
        return cols

    def foreign_shards(self) -> list[Column]:
        """Other tokens' outputs per source shard: what a reduction over rows
        holding different tokens adds when it sums partials, not whole outputs
        (e.g. a fused all-reduce over the world under DP attention)."""
        ref = self.ref
        if self.s.model.transform_nonlinear:
            return []  # routed partials are not separable then
        cols: list[Column] = []
        for key, partner in self._partners():
            for label, i, n in self.shared_shards:
                cols.append(Column(f"shared@{label}[tokens {key}]", self._stack(self._at_partner(
                    partner, lambda d, t, i=i, n=n: ref.shared_mlp(self._x(d, t), i, n))), FOREIGN, 0.0))
            for shard in ref.routed_partials(self.toks[0][0]):
                cols.append(Column(f"routed@{shard}[tokens {key}]", self._stack(self._at_partner(
                    partner, lambda d, t, sh=shard: self.routed_out(ref.routed_partials(d)[sh][t]))), FOREIGN, 0.0))
        return cols

    def latent(self) -> list[Column]:
        ref, m = self.ref, self.s.model
        if ref.weights.down is None or not m.has_shared:
            return []
        down = ref.weights.down.double()

        def xl(d: int, t: int) -> torch.Tensor:
            v = down @ self._x(d, t)
            return F.pad(v, (0, m.hidden - v.shape[0])) if v.shape[0] < m.hidden else v[: m.hidden]

        return [Column(f"shared@{label}(latent input)", self._stack(
            lambda d, t, i=i, n=n: ref.shared_mlp(xl(d, t), i, n)), LATENT, 0.0)
            for label, i, n in self.shared_shards]

    def clobber(self) -> list[Column]:
        """Shared experts of this rank's TP group members on their own routed
        kernel output (what `experts(..., inplace=True)` leaves in the buffer)."""
        s, ref, m = self.s, self.ref, self.s.model
        if not m.has_shared or s.kernel_width != m.hidden:
            return []
        cols = []
        shards = ref.routed_partials(self.toks[0][0])
        for q in s.group("tp", self.rank):
            shard = layout.routed_shard(s, q)
            if shard not in shards:
                continue
            label, i, n = self.shard_of(q)
            cols.append(Column(f"shared@{label}(routed@{shard} buffer)", self._stack(
                lambda d, t, sh=shard, i=i, n=n: ref.shared_mlp(ref.routed_partials(d)[sh][t], i, n)), CLOBBER, 0.0))
        return cols

    def clobber_total(self) -> list[Column]:
        ref, m = self.ref, self.s.model
        if not m.has_shared or self.s.kernel_width != m.hidden:
            return []
        return [Column(f"shared@{label}(routed output)", self._stack(
            lambda d, t, i=i, n=n: ref.shared_mlp(ref.routed_kernel[d][t], i, n)), CLOBBER_TOTAL, 0.0)
            for label, i, n in self.shared_shards]

    def nl_partials(self) -> list[Column]:
        ref = self.ref
        return [Column(f"routed@{shard}(transformed alone)", self._stack(
            lambda d, t, sh=shard: self.routed_out(ref.routed_partials(d)[sh][t])), NL_PARTIAL, 0.0)
            for shard in ref.routed_partials(self.toks[0][0])]

    def nl_scaled(self, c: float) -> list[Column]:
        ref = self.ref
        return [Column(f"routed x{c:g} before the transform", self._stack(
            lambda d, t: self.routed_out(c * ref.routed_kernel[d][t])), NL_SCALED, 0.0, c)]

    def hypotheses(self) -> list[list[Column]]:
        s, m = self.s, self.s.model
        out = [self.sources()]
        if s.sp or s.parallel.dp > 1:
            out.append(self.sources() + self.foreign())
            shards = self.foreign_shards()
            if shards:  # after the whole outputs: the simpler explanation wins a tie
                out.append(self.sources() + shards)
        for fam in (self.latent(), self.clobber(), self.clobber_total()):
            if fam:
                out.append(self.sources() + fam)
        if m.transform_nonlinear:
            out.append(self.sources(with_routed=False) + self.nl_partials())
            for c in sorted({2.0, 3.0, 4.0, 0.5, float(s.parallel.tp), float(s.world), 1.0 / s.world} - {1.0}):
                out.append(self.sources(with_routed=False) + self.nl_scaled(c))
        return out


@dataclass
class Fit:
    columns: list[Column]
    coefficients: list[float]
    residual: float

    def deviations(self) -> list[tuple[Column, float]]:
        return [(c, k) for c, k in zip(self.columns, self.coefficients) if abs(k - c.expected) > COEF_TOL]

    @property
    def complexity(self) -> int:
        return len(self.deviations())


def fit(cols: list[Column], y: torch.Tensor) -> Fit | None:
    """Least squares of y on the observable columns (a column zero on every
    row, e.g. an EP rank owning none of these tokens' experts, is left out);
    None when the rows hold fewer than two numbers per column (any vector
    would "fit")."""
    cols = [c for c in cols if float(c.values.abs().max()) > 1e-12]
    if not cols or cols[0].values.numel() < 2 * len(cols):
        return None  # too few numbers to tell that many sources apart
    a = torch.stack([c.values.flatten() for c in cols], dim=1)
    target = y.flatten()
    sol = torch.linalg.lstsq(a, target.unsqueeze(1)).solution.flatten()
    norm = max(float(torch.linalg.norm(target)), 1e-30)
    resid = float(torch.linalg.norm(a @ sol - target)) / norm
    return Fit(cols, [float(v) for v in sol], resid)


def explain(ref: ExactReference, rank: int, toks: list[Tok], y: torch.Tensor,
            shared_group: str | None = None) -> Explanation:
    """Characterise rows `y` ([rows, hidden], float64) that should be the
    reference outputs of `toks`; `shared_group` is the group the run sharded
    its shared experts over (None: unknown, the TP group's shards)."""
    basis = Basis(ref, rank, toks, shared_group)
    fits = [f for f in (fit(h, y) for h in basis.hypotheses()) if f is not None]
    if not fits:
        return Explanation(None, "not explained by any known source (no observable source on these rows)", 1.0)
    good = [f for f in fits if f.residual <= FIT_TOL]
    if not good:
        best = min(fits, key=lambda f: f.residual)
        return Explanation(None, f"not explained by any known source; residual {best.residual:.2g}", best.residual)
    best = min(good, key=lambda f: f.complexity)  # min() keeps the first of equals: the family order
    coeffs = {c.label: round(k, 6) for c, k in zip(best.columns, best.coefficients)}
    kind, cause = describe(ref, best)
    return Explanation(kind, cause, best.residual, coeffs)


# ---- words ----


def _nice(c: float) -> str:
    for k in (1, 2, 3, 4):
        if abs(c * k - round(c * k)) < COEF_TOL * k:
            v = round(c * k) / k
            return f"{v:g}" if k == 1 else f"{v:.4g}"
    return f"{c:.4g}"


def _shards(shards: list[str]) -> str:
    """ep0, ep1, ep2, ep3 -> ep0..ep3; tp0, tp1 -> tp0,tp1."""
    try:
        prefix = shards[0].rstrip("0123456789")
        nums = [int(x[len(prefix):]) for x in shards]
    except ValueError:
        return ",".join(shards)
    if len(nums) >= 3 and all(x.startswith(prefix) for x in shards) and nums == list(range(nums[0], nums[0] + len(nums))):
        return f"{prefix}{nums[0]}..{prefix}{nums[-1]}"
    return ",".join(shards)


def _grouped(devs: list[tuple[Column, float]]) -> list[str]:
    """"routed@tp0,tp1 coefficient 2 (expected 1)": columns of one component
    with the same coefficient are named together."""
    groups: dict[tuple[str, str, float, float], list[str]] = {}
    for col, k in devs:
        head, sep, rest = col.label.partition("@")
        shard, bracket, tail = rest.partition("(") if sep else ("", "", "")
        if sep and "[" not in rest:
            key = (head, (bracket + tail) if bracket else "", round(k, 3), col.expected)
            groups.setdefault(key, []).append(shard)
        else:
            groups.setdefault((col.label, "", round(k, 3), col.expected), []).append("")
    out = []
    for (head, tail, k, exp), shards in groups.items():
        name = f"{head}@{_shards(shards)}{tail}" if any(shards) else head
        out.append(f"{name} coefficient {_nice(k)} (expected {_nice(exp)})")
    return out


def _shared_replaced(devs: list[tuple[Column, float]]) -> bool:
    """Only the shared output is off, and it is other tokens' in place of
    these tokens' own (own 0, other tokens' summing to 1): the shared MLP
    read the wrong rows. A reduction over rows of different tokens instead
    keeps the own output and adds the others'."""
    if not devs or not all(c.label.startswith("shared@") for c, _ in devs):
        return False
    own = [k for c, k in devs if c.family == SOURCE]
    other = [k for c, k in devs if c.family == FOREIGN]
    return bool(own) and bool(other) and all(abs(k) <= COEF_TOL for k in own) and abs(sum(other) - 1.0) <= COEF_TOL


def describe(ref: ExactReference, f: Fit) -> tuple[HazardKind | None, str]:
    devs = f.deviations()
    if not devs:
        return None, f"not explained by any known source: the sources fit with the right coefficients (residual {f.residual:.2g})"
    families = {c.family for c, _ in devs}
    wrong_input = [fam for fam in (LATENT, CLOBBER, CLOBBER_TOTAL) if fam in families]
    detail = "; ".join(_grouped(devs))
    if wrong_input:
        return HazardKind.WRONG_INPUT, f"{WRONG_INPUT_WORDS[wrong_input[0]]}: {detail}"
    if NL_PARTIAL in families:
        # The sum the transform needed was never taken before it: the same
        # kind the simulator names at the transform.
        return HazardKind.MISSING_REDUCTION, f"{WRONG_INPUT_WORDS[NL_PARTIAL]}: {detail}"
    if NL_SCALED in families:
        c = next(col.scale for col, _ in devs if col.family == NL_SCALED and col.scale is not None)
        kind = HazardKind.DOUBLE_REDUCTION if c > 1 else HazardKind.MISSING_REDUCTION
        return kind, f"routed output reduced with coefficient {_nice(c)} (expected 1) before the non-linear transform: {detail}"
    if _shared_replaced(devs):
        return HazardKind.WRONG_INPUT, ("shared experts computed on other tokens' rows (their input held another "
                                        f"DP rank's or SP slice's tokens instead of these): {detail}")
    if FOREIGN in families:
        return HazardKind.DOUBLE_REDUCTION, f"outputs of other tokens summed in (a reduction over rows that hold different tokens): {detail}"
    doubled = any(k > c.expected for c, k in devs)
    return (HazardKind.DOUBLE_REDUCTION if doubled else HazardKind.MISSING_REDUCTION), detail


__all__ = ["explain", "Explanation", "FIT_TOL", "COEF_TOL"]
