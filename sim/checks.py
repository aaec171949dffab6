"""The per-op detectors: reductions, input identity, token identity.

Rules (the algebra's docstring explains the coefficients and the ceiling):

- Every value a step computes: a non-finite coefficient is a RUNNER_ERROR
  (the runner computed a non-number; no count of reductions describes it,
  and torch would not raise); rows of different tokens summed together are a
  DOUBLE_REDUCTION where they arise (regression R1), whatever the scaling; a
  coefficient above the ceiling is remembered as a *candidate* (the first step
  per rank and component that crossed it).
- A candidate becomes a DOUBLE_REDUCTION, reported at that first step, when a
  consumer that cannot undo it sees the over-count: the layer output, a
  non-linear op, or the end of a rank's program without any output.
- Consumers declare what they must consume (`consume`): the router and the
  latent down-projection the untransformed input `x`; the routed experts `x`,
  or `xlat` for a latent MoE, on whatever rows dispatch delivered; the shared
  experts `x` of rows containing this rank's own tokens at that point (its
  layer input, or what sp_slice / dp_gather / dp_scatter made of it); the latent
  up-projection the routed output and nothing else. Another component, other
  rows, or a buffer clobbered by an in-place write is WRONG_INPUT; the right
  component with the wrong coefficient is DOUBLE/MISSING_REDUCTION.
- The layer output (`output`): the rank must return exactly its own tokens in
  order (`scenarios.workload.owned_tokens`), else WRONG_TOKENS; every expected
  source of every component must have its expected coefficient; one
  MISSING_REDUCTION names every short source, one DOUBLE_REDUCTION per
  crossing step names every over-counted one.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from scenarios import layout
from scenarios.trace import HazardKind, Step
from scenarios.workload import dp_of, owned_tokens, token_label, tokens_of
from sim import algebra
from sim.reduce_groups import GroupNamer
from sim.simtypes import Labels

if TYPE_CHECKING:
    from sim.engine import Simulation
    from sim.simops import SimOps, SimTensor

SHOW_ROWS = 6  # token labels shown in a WRONG_TOKENS detail before eliding
WANT = {"x": "the layer input x", "xlat": "the latent projection xlat of the layer input"}
# The tail of a WRONG_INPUT that names rows which are not the rank's own (the
# real judge confirms it by other tokens' outputs in the rank's rows).
WRONG_ROWS = "or rows containing them (this rank's own tokens at that point of its program)"


@dataclass(slots=True)
class Crossing:
    """The first step of a rank where one component went above its ceiling."""

    step: Step
    detail: str
    reported: bool = False
    consumers: list[str] = field(default_factory=list)  # ops fed the over-counted value, in order


class Checks:
    def __init__(self, sim: Simulation) -> None:
        self.sim = sim
        s = sim.scenario
        self.scenario = s
        self.rsf = s.model.routed_scaling_factor
        self.expected_scale = {"routed": self.rsf, "shared": 1.0}
        self.crossings: dict[int, dict[str, Crossing]] = {}
        self.groups = GroupNamer(s)  # names the group of a missing reduction
        self.reported: set[tuple] = set()
        self.checked_output: set[int] = set()
        self._tokens: dict[str, list[int]] = {}
        self._rows_ok: set[tuple[int, tuple[str, ...], tuple[int, ...]]] = set()  # (DP rank, keys, starts)
        self._labels: dict[tuple, tuple[str, ...]] = {}
        self._memo: dict[tuple, tuple[algebra.Value, tuple]] = {}
        # Terms tuples and values with every coefficient 1 on own rows (nothing
        # to check), by id; the object is kept so its id cannot be reused.
        self._clean_terms: dict[int, tuple] = {}
        self._clean_values: dict[int, algebra.Value] = {}
        self._pure_memo: dict[tuple, tuple[algebra.Value, bool]] = {}
        # Output analyses by the ids of the blocks' terms (what they depend on).
        self._by_terms: dict[tuple, tuple[list[tuple], tuple]] = {}

    def _once(self, key: tuple) -> bool:
        if key in self.reported:
            return False
        self.reported.add(key)
        return True

    # ---- every computed value ----

    def value(self, ops: SimOps, st: Step, v: algebra.Value) -> None:
        if self._clean_values.get(id(v)) is v:
            return  # a value every member of a collective received: checked once
        over = False
        routed_ceiling = None  # computed once, only if a routed coefficient exceeds 1
        clean = self._clean_terms
        all_clean = True
        for b in v.blocks:
            terms = b.terms
            if clean.get(id(terms)) is terms or not b.rows:  # (no rows: nothing observable)
                continue
            for (_c, _s, f), coef in terms:  # a loop, not all(genexpr): no generator per block
                if coef != 1.0 or f is not None:
                    break
            else:
                clean[id(terms)] = terms  # kept alive here, so the id stays its own
                continue
            all_clean = False
            for (c, _s, f), coef in terms:
                if coef == 1.0 and f is None:
                    continue
                if f is not None:
                    self._foreign(ops, st, b)
                elif not math.isfinite(coef):
                    self.non_finite(ops, st, f"{algebra.source_label((c, _s, f))} coefficient {coef}")
                elif coef > 1.0 and not over:
                    if c == "routed":
                        if routed_ceiling is None:
                            routed_ceiling = algebra.ceiling(v, "routed", self.rsf)
                        over = algebra.above(coef, routed_ceiling)
                    else:
                        over = algebra.above(coef, 1.0)
        if over:
            self._crossing(ops, st, v)
        elif all_clean:
            self._clean_values[id(v)] = v

    def _foreign(self, ops: SimOps, st: Step, b: algebra.Block) -> None:
        if not self._once((ops.rank, "foreign")):
            return
        src = next(s for s, _ in b.terms if s[2] is not None)
        n_foreign = sum(1 for (c, s, f), _ in b.terms if f is not None and (c, s) == src[:2])
        # Every source that took other tokens' rows, by component (not only the first).
        mixed: dict[str, list[str]] = {}
        for (c, s, f), _ in b.terms:
            if f is not None and s not in mixed.setdefault(c, []):
                mixed[c].append(s)
        named = " and ".join(algebra.group_label(c, shards) for c, shards in mixed.items())
        self.sim.add_hazard(
            HazardKind.DOUBLE_REDUCTION, ops.rank, st,
            f"{named} of {1 + n_foreign} different token sets summed into each row "
            f"(coefficient {1 + n_foreign} per row, expected 1: own tokens only)",
        )

    def _crossing(self, ops: SimOps, st: Step, v: algebra.Value) -> None:
        mine = self.crossings.setdefault(ops.rank, {})
        for comp, (b, coef, bound) in algebra.over_ceiling(v, self.rsf).items():
            if comp in mine:
                continue
            shards = [s for (c, s, f), k in b.terms if c == comp and f is None and abs(k - coef) <= algebra.EPS * coef]
            label = algebra.group_label(comp, shards)
            mine[comp] = Crossing(st, f"{label} coefficient {_coef(algebra.snap(coef / bound))}")

    def _reduction(self, kind: HazardKind, ops: SimOps, st: Step, detail: str, opaque_from: int | None = None,
                   consumers: list[str] | None = None) -> None:
        """A DOUBLE/MISSING_REDUCTION; its detail also names the routed scaling
        factor when a wrong coefficient is a power of it (a scale applied twice
        or never over-counts exactly like a reduction)."""
        self.sim.add_hazard(kind, ops.rank, st, detail + scale_hint(detail, self.rsf), opaque_from=opaque_from,
                            consumers=consumers)

    def non_finite(self, ops: SimOps, st: Step, what: str) -> None:
        # No st.error: nothing raises here (torch computes NaN and goes on), so
        # the step must still align with a real run that did not fail.
        if self._once((ops.rank, "non-finite")):
            self.sim.add_hazard(HazardKind.RUNNER_ERROR, ops.rank, st, f"non-finite coefficient: {what}")

    def non_finite_factor(self, ops: SimOps, st: Step, factor: float) -> None:
        self.non_finite(ops, st, f"{st.name} scales by {factor}")

    def _report_crossings(self, ops: SimOps, comps: list[str], where: Step, fallback: str, note: str = "",
                          consumed: bool = False) -> None:
        """One DOUBLE_REDUCTION per crossing step, naming every component crossed
        there; `fallback` describes the over-count when no step crossed before
        `where` (the consumer), `note` says who consumed it; `consumed`: `where`
        is a non-linear consumer, whose output is no combination of sources."""
        mine = self.crossings.setdefault(ops.rank, {})
        by_step: dict[int, tuple[Step, list[str]]] = {}
        for comp in comps:
            cr = mine.get(comp)
            if cr is not None and cr.reported:
                continue
            if cr is None:  # over-counted without a recorded crossing: blame the consumer
                cr = mine[comp] = Crossing(where, fallback)
            cr.reported = True
            by_step.setdefault(cr.step.index, (cr.step, []))[1].append(cr)
        for _i, (st, crossed) in sorted(by_step.items()):
            # One component: its consumers list, shared, so later consumers show too.
            consumers = crossed[0].consumers if len(crossed) == 1 else None
            self._reduction(HazardKind.DOUBLE_REDUCTION, ops, st,
                            " and ".join(dict.fromkeys(cr.detail for cr in crossed)) + ", expected 1" + note,
                            where.index if consumed else None, consumers)

    # ---- consumers ----

    def consume(self, ops: SimOps, st: Step, x: SimTensor, consumer: str, want: str,
                rows: tuple[str, ...] | None = None) -> None:
        v = x.value
        if not x.clobber_partial and self._pure(v, want) and (rows is None or v.keys() == rows):
            return  # the common case, decided without building sets
        if v.rows == 0:
            return  # an idle DP rank's empty input: nothing to be wrong
        clobber = self._clobber_note(ops, x)
        others = {c for c in v.components() if c != want}
        expected = WANT[want] + (f" of rows {','.join(rows)}" if rows else "")
        if others or x.clobber_partial:
            self.wrong_input(ops, st, f"{consumer} input is {algebra.summarize(v) or 'zero'}{clobber}; expected {expected}",
                             consumer)
            return
        if any(src[2] is not None for b in v.blocks for src, _ in b.terms):
            return  # reported as a DOUBLE_REDUCTION where the tokens were mixed
        coefs = [coef for b in v.blocks for _src, coef in b.terms]
        if any(algebra.above(c, 1.0) for c in coefs):
            self._report_crossings(ops, [want], st, f"{consumer} input {want} coefficient {_coef(max(coefs))}",
                                   f" (fed to {consumer} at step {st.index})", consumed=True)
            self.crossings[ops.rank][want].consumers.append(consumer)
        elif any(algebra.below(c, 1.0) for c in coefs) or any(not b.terms for b in v.blocks):
            if self._once((ops.rank, "missing", st.index)):
                self._reduction(HazardKind.MISSING_REDUCTION, ops, st,
                                f"{consumer} input is {algebra.summarize(v) or 'zero'}, expected {expected} x1", st.index,
                                [consumer])
        elif rows is not None and v.keys() != rows and not self._covers(ops, x, rows):
            self.wrong_input(ops, st, f"{consumer} input is {want} of rows {','.join(v.keys())}{clobber}; "
                                      f"expected {expected} {WRONG_ROWS}", consumer)

    def _covers(self, ops: SimOps, x: SimTensor, want: tuple[str, ...]) -> bool:
        """Every token of the row blocks `want` is among x's rows. A row-wise
        consumer (the shared MLP) may run on more rows than the rank owns,
        e.g. before an SP slice or on DP-gathered rows, as long as the rows
        are narrowed afterwards: where its output joins the routed output,
        shapes and foreign-row sums judge that. Not rows an all-to-all
        dispatched: the value names the group's tokens, the rows are only
        those routed here, in expert order. A chunk (take_rows) covers its
        own rows: they need only be among the rank's."""
        if ops.all_to_all_rows(x):
            return False
        src = ops.rows_source(x)
        s = self.scenario
        got = {(dp_of(k), t) for k in x.value.keys() for t in tokens_of(s, k) if t >= 0}
        wanted = {(dp_of(k), t) for k in want for t in tokens_of(s, k) if t >= 0}
        if src is not None and src.op == "take_rows":
            return got <= wanted  # a chunk of a chunked forward: some of the rank's rows (the output judges the rest)
        return wanted <= got

    def _pure(self, v: algebra.Value, want: str) -> bool:
        """_pure, once per value (members of a gather consume one value)."""
        key = (id(v), want)
        hit = self._pure_memo.get(key)
        if hit is None or hit[0] is not v:
            hit = self._pure_memo[key] = (v, _pure(v, want))
        return hit[1]

    def _clobber_note(self, ops: SimOps, x: SimTensor) -> str:
        if x.clobbered_by is None:
            return ""
        w = ops.steps[x.clobbered_by]
        part = "partly " if x.clobber_partial else ""
        return f" (its buffer was {part}overwritten in place by step {w.index} {w.name})"

    def wrong_input(self, ops: SimOps, st: Step, detail: str, consumer: str | None = None) -> None:
        if self._once((ops.rank, "wrong-input", st.index)):
            self.sim.add_hazard(HazardKind.WRONG_INPUT, ops.rank, st, detail,
                                consumers=[consumer] if consumer is not None else None)

    def latent_up(self, ops: SimOps, st: Step, x: SimTensor, row_parallel: bool = False) -> None:
        v = x.value
        if v.rows == 0:
            return  # an idle DP rank's empty rows
        others = {c for c in v.components() if c != "routed"}
        if others or x.clobber_partial:
            self.wrong_input(ops, st, f"latent_up input is {algebra.summarize(v)}{self._clobber_note(ops, x)}; "
                                      "expected the routed output only")
            return
        if not (self.scenario.model.transform_nonlinear or row_parallel):
            return
        # A non-linear transform must see every routed partial, counted once
        # (with or without the routed scaling factor applied); so must a
        # row-parallel one: its latent slice of a partial misses, for good,
        # the other ranks' partials through its rows.
        bound = algebra.ceiling(v, "routed", self.rsf)
        low = min(1.0, bound)
        coeffs = algebra.coefficients(v, {}, self.expected_labels(ops, "routed"))
        if any(algebra.above(c, bound) for c in coeffs.values() if math.isfinite(c)):
            self._report_crossings(ops, ["routed"], st, f"routed coefficient {_coef(max(coeffs.values()))}",
                                   f" (fed to {st.name} at step {st.index})",
                                   consumed=self.scenario.model.transform_nonlinear)
        short = sorted((lab for lab, c in coeffs.items() if algebra.below(c, low)), key=_label_key)
        if short and self._once((ops.rank, "missing", st.index)):
            self._reduction(
                HazardKind.MISSING_REDUCTION, ops, st,
                f"{'row-parallel' if row_parallel else 'non-linear'} routed-output transform applied to partial sums: "
                f"{_describe(coeffs, short, low)}, "
                f"expected 1{self.groups.phrase(ops.rank, coeffs, short, tuple(coeffs))}",
                st.index if self.scenario.model.transform_nonlinear else None,
            )

    # ---- the layer output ----

    def expected_labels(self, ops: SimOps, component: str) -> tuple[str, ...]:
        s = self.scenario
        if component == "routed":
            key: tuple = ("routed", ops.latent_up_tags)
        else:
            shards_run = ops.shared_shards
            if shards_run is None:  # sliced tokens: the shared MLP is replicated
                sliced = self.sim.layout.slices_tokens(s)
                shards_run = self.sim.shard_labels("tp", s.parallel.tp) if not sliced else ("full",)
            key = ("shared", shards_run)
        labels = self._labels.get(key)
        if labels is None:
            if component == "routed":
                shards = list(layout.routed_shards(s))
                if ops.latent_up_tags is not None:  # row-parallel up-projection: every share of every shard
                    shards = [f"{sh}+{tag}" for sh in shards for tag in ops.latent_up_tags]
            else:
                shards = list(key[1])
            labels = self._labels[key] = Labels([algebra.source_label((component, sh, None)) for sh in shards])
        return labels

    def output_labels(self, ops: SimOps) -> tuple[str, ...]:
        key = ("output", ops.shared_shards, ops.latent_up_tags)
        labels = self._labels.get(key)
        if labels is None:
            routed = self.expected_labels(ops, "routed")
            labels = Labels(routed + self.expected_labels(ops, "shared")) if self.scenario.model.has_shared else routed
            self._labels[key] = labels
        return labels

    def output_coefficients(self, v: algebra.Value, want: tuple[str, ...]) -> dict[str, float]:
        """Coefficients of an output value with every expected source (0 if
        missing); ranks that share one value (after an all-reduce) share this."""
        return self._analyse(v, want)[0]

    def _analyse(self, v: algebra.Value, want: tuple[str, ...]
                 ) -> tuple[dict[str, float], list[str], list[str], list[str], dict[str, float]]:
        """(folded coefficients, short sources, over-counted sources, stray
        sources, each expected source's lowest coefficient over the rows)."""
        key = (id(v), want)
        hit = self._memo.get(key)
        if hit is not None and hit[0] is v:
            return hit[1]
        # Coefficients depend only on the blocks' terms: members whose outputs
        # hold the same terms objects (a shared sum) share one analysis.
        terms = [b.terms for b in v.blocks]
        tkey = (tuple(map(id, terms)), want)
        thit = self._by_terms.get(tkey)
        if thit is not None and all([a is b for a, b in zip(thit[0], terms, strict=True)]):
            self._memo[key] = (v, thit[1])
            return thit[1]
        coeffs = algebra.coefficients(v, self.expected_scale, want)
        wanted = set(want)
        # Rows short of a source are looked for apart: other rows over-counting
        # it would hide them in the folded coefficients.
        low = coeffs if v.n_blocks <= 1 or v.uniform is not None else algebra.lowest_coefficients(
            v, self.expected_scale, want)
        short = [lab for lab in want if math.isfinite(low[lab]) and algebra.below(low[lab], 1.0)]
        over = [lab for lab in want if math.isfinite(coeffs[lab]) and algebra.above(coeffs[lab], 1.0)]
        stray = sorted(lab for lab in coeffs if lab not in wanted and "[tokens" not in lab)
        result = (coeffs, short, over, stray, low)
        self._memo[key] = (v, result)
        self._by_terms[tkey] = (terms, result)
        return result

    def output(self, ops: SimOps, st: Step, x: SimTensor) -> None:
        self.checked_output.add(ops.rank)
        self._tokens_check(ops, st, x)
        if x.value.rows == 0:
            return  # an idle DP rank's output: no row to hold a wrong sum
        coeffs, short, over, stray, low = self._analyse(x.value, self.output_labels(ops))
        if short and self._once((ops.rank, "missing", st.index)):
            rows = self._rows_lacking(x.value, short)
            which = rows or self.groups.phrase(ops.rank, low, short, self.output_labels(ops))
            self._reduction(HazardKind.MISSING_REDUCTION, ops, st,
                            f"output holds {_describe(low, short)}, expected 1{which}")
        if over:
            comps = list(dict.fromkeys(lab.split("@")[0] for lab in over))
            self._report_crossings(ops, comps, st, f"output holds {_describe(coeffs, over)}")
        if stray:
            self.wrong_input(ops, st, f"the layer output holds {', '.join(stray)}, which the MoE layer "
                                      "does not return (expected routed and shared outputs only)")

    def _rows_lacking(self, v: algebra.Value, short: list[str]) -> str:
        """" in rows [d0t3]" when only some rows lack a short source (e.g. rows
        a kernel was told were not tokens), else "" (then every row lacks it,
        and the group that never summed it is named instead)."""
        if v.uniform is not None:
            return ""
        lacking: list[tuple[int, int]] = []
        scale = self.expected_scale
        for b in v.blocks:
            here = {algebra.source_label(src) for src, coef in b.terms
                    if not algebra.below(coef / scale.get(src[0], 1.0), 1.0)}
            if any(lab not in here for lab in short):
                toks = tokens_of(self.scenario, b.key)[: b.rows]
                lacking.extend((dp_of(b.key), t) for t in toks)
        if not lacking or len(lacking) == v.rows:
            return ""
        return f" in rows {_rows(lacking)}"

    def _tokens_check(self, ops: SimOps, st: Step, x: SimTensor) -> None:
        s = self.scenario
        blocks = x.value.blocks
        if len(blocks) == 1 and blocks[0].key == f"d{ops.d}" and blocks[0].rows == s.dp_tokens(ops.d):
            return  # all of this DP rank's tokens, in order (the common case)
        # The rows a rank must return depend on its DP rank only: a row layout
        # found right for one member (the SP slices gathered back) is right for all.
        layout = (ops.d, x.value.keys(), tuple(x.value.starts()))
        if layout in self._rows_ok:
            return
        got: list[tuple[int, int]] = []
        for b in x.value.blocks:
            toks = self._tokens.get(b.key)
            if toks is None:
                toks = self._tokens[b.key] = tokens_of(s, b.key)
            d = dp_of(b.key)
            got.extend([(d, t) for t in toks[: b.rows]])
        want = owned_tokens(s, ops.rank)
        if got == want:
            self._rows_ok.add(layout)
            return
        first = next((i for i, (g, w) in enumerate(zip(got, want)) if g != w), min(len(got), len(want)))
        last = max(i for i in range(max(len(got), len(want)))
                   if i >= len(got) or i >= len(want) or got[i] != want[i])
        where = "" if (first == 0 and last >= len(want) - 1) else f" in rows {first}..{last}"
        src = ops.rows_source(x)
        since = f" (rows as set by step {src.index} {src.name})" if src is not None else ""
        self.sim.add_hazard(
            HazardKind.WRONG_TOKENS, ops.rank, st,
            f"rank {ops.rank} returns {_rows(got[first:last + 1])} instead of {_rows(want[first:last + 1])}{where}{since}",
        )

    def finish(self) -> None:
        """Ranks that ended without an output: their pending over-counts are reported."""
        for ops in self.sim.rank_ops:
            if ops.rank in self.checked_output:
                continue
            pending = [c for c, cr in self.crossings.get(ops.rank, {}).items() if not cr.reported]
            if pending:
                self._report_crossings(ops, pending, ops.steps[-1], "", " (the rank ended without an output)")


def _pure(v: algebra.Value, want: str) -> bool:
    """Every row holds exactly `want` on its own rows, coefficient 1."""
    for b in v.blocks:
        terms = b.terms
        if len(terms) != 1:
            return False
        (c, _s, f), coef = terms[0]
        if c != want or f is not None or coef != 1.0:
            return False
    return True


def _rows(rows: list[tuple[int, int]]) -> str:
    labels = [token_label(d, t) for d, t in rows[:SHOW_ROWS]]
    if len(rows) > SHOW_ROWS:
        labels.append(f"... {len(rows) - SHOW_ROWS} more")
    return "[" + ", ".join(labels) + "]"


# "<component>@<shards> coefficient <number>" or "... input x coefficient 2"
_COEFFICIENT = re.compile(r"(?:(\w+)@\S*|input (\w+)) coefficient (-?[0-9.]+(?:e[-+]?[0-9]+)?)")


def scale_hint(detail: str, rsf: float) -> str:
    """" (2.5 = routed_scaling_factor: the routed scaling applied twice?)" when
    a coefficient the detail names is the routed scaling factor or its
    inverse, else "". Only routed sources take that factor: on any other
    (the shared output, the input) it is the routed scaling applied to it."""
    if rsf == 1.0 or not math.isfinite(rsf) or rsf <= 0:
        return ""
    for comp_at, comp_in, text in _COEFFICIENT.findall(detail):
        comp, c = comp_at or comp_in, float(text)
        if abs(c - rsf) <= 1e-6 * rsf:
            what = "applied twice" if comp == "routed" else f"applied to {comp} too"
            return f" ({text} = routed_scaling_factor: the routed scaling {what}?)"
        if abs(c - 1.0 / rsf) <= 1e-6 / rsf:
            what = "never applied" if comp == "routed" else f"divided out of {comp}"
            return f" ({text} = 1/routed_scaling_factor {rsf:g}: the routed scaling {what}?)"
    return ""


def _label_key(label: str) -> tuple[str, tuple[str | int, ...]]:
    comp, _, shard = label.partition("@")
    return (comp, algebra.shard_sort_key(shard))


def _describe(coeffs: dict[str, float], labels: list[str], unit: float = 1.0) -> str:
    """routed@tp0,tp1 coefficient 0 and shared@tp1 coefficient 0: grouped by
    component and coefficient, every component named."""
    groups: dict[tuple[str, float], list[str]] = {}
    for lab in sorted(labels, key=_label_key):
        comp, _, shard = lab.partition("@")
        c = coeffs.get(lab, 0.0) / unit
        groups.setdefault((comp, round(c, 9) if math.isfinite(c) else c), []).append(shard)
    return " and ".join(f"{algebra.group_label(comp, shards)} coefficient {_coef(c)}" for (comp, c), shards in groups.items())


def _coef(c: float) -> str:
    """Short, but never rounded onto a different number: a scale by 1.0000001
    reads "1.0000001", not "1" beside "expected 1"."""
    short = f"{c:g}"
    return short if not math.isfinite(c) or float(short) == c else f"{c:.10g}"
