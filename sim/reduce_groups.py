"""Which group's reduction is missing, named from the sources a rank lacks.

A rank whose output lacks some partials holds the sum over a set of ranks P
(the shards it has) and misses those of a set M. The reduction it skipped is
the group kind K whose groups, over the members of P, cover exactly P and M:
summing over K would complete the value. An all-reduce over moe_ep alone on
a moe_ep x moe_tp layout leaves the moe_tp partials unsummed, and naming
moe_tp (not just the shards) says which collective is missing.

Several kinds may cover P and M (on one DP rank, tp = moe_tp = world); the
smallest group is named, ties going to the classic kinds (tp, dp, ...) on a
one-axis layout and to moe_tp/moe_ep on a hybrid one, where they are the
groups a runner reduces over.
"""

from __future__ import annotations

from scenarios import layout
from scenarios.spec import Scenario

CLASSIC_FIRST = ("tp", "dp", "ep", "world", "moe_tp", "moe_ep")
MOE_FIRST = ("moe_tp", "moe_ep", "tp", "dp", "ep", "world")


class GroupNamer:
    """Names missing reductions for one scenario (memoised per rank sets)."""

    def __init__(self, s: Scenario) -> None:
        self.s = s
        self.order = MOE_FIRST if layout.hybrid(s) else CLASSIC_FIRST
        self.routed_rank = {sh: r for r, sh in enumerate(layout.routed_shards(s))}
        self._memo: dict[tuple[frozenset[int], frozenset[int]], str | None] = {}

    def source_rank(self, rank: int, label: str) -> int | None:
        """The world rank whose partial `label` ("routed@ep1.tp0", "shared@tp1")
        is, as seen from `rank` (shared shards: the TP rank of its DP group)."""
        comp, _, shard = label.partition("@")
        if comp == "routed" and "+up" in shard:
            # A row-parallel up-projection's share: TP rank j of this DP group made it.
            tag = shard.rpartition("+up")[2]
            return self.s.coords(rank)[0] * self.s.parallel.tp + int(tag) if tag.isdigit() else None
        if comp == "routed":
            return self.routed_rank.get(shard)
        if comp == "shared" and shard.startswith("tp") and shard[2:].isdigit():
            d, _t = self.s.coords(rank)
            return d * self.s.parallel.tp + int(shard[2:])
        return None

    def missing(self, rank: int, present: list[str], short: list[str]) -> str | None:
        """The group kind whose partials `short` are missing from a value
        holding `present`, or None when no group explains it."""
        p = {self.source_rank(rank, lab) for lab in present}
        m = {self.source_rank(rank, lab) for lab in short}
        if not p or not m or None in p or None in m or p & m:
            # p & m: a rank both present and missing (shares of a row-parallel
            # projection of partials): no reduction completes that.
            return None
        key = (frozenset(p), frozenset(m))  # type: ignore[arg-type]
        if key not in self._memo:
            self._memo[key] = self._cover(key[0], key[0] | key[1])
        return self._memo[key]

    def _cover(self, present: frozenset[int], whole: frozenset[int]) -> str | None:
        best: tuple[int, int, str] | None = None
        for i, kind in enumerate(self.order):
            closure: set[int] = set()
            size = 0
            for r in present:
                if r in closure:
                    continue
                g = self.s.group(kind, r)
                size = len(g)
                closure.update(g)
                if not closure <= whole:
                    break
            if closure == whole and (best is None or (size, i) < best[:2]):
                best = (size, i, kind)
        return best[2] if best is not None else None

    def phrase(self, rank: int, coeffs: dict[str, float], short: list[str], wanted: tuple[str, ...]) -> str:
        """": routed partials of moe_tp never summed" (one clause per
        component with a named group), or "" when none can be named."""
        clauses: dict[str, list[str]] = {}
        shorts = set(short)
        for comp in dict.fromkeys(lab.partition("@")[0] for lab in short):
            mine = [lab for lab in wanted if lab.partition("@")[0] == comp]
            present = [lab for lab in mine if lab not in shorts and coeffs.get(lab, 0.0) > 0.0]
            kind = self.missing(rank, present, [lab for lab in mine if lab in shorts])
            if kind is not None:
                clauses.setdefault(kind, []).append(comp)
        if not clauses:
            return ""
        return ": " + "; ".join(f"{' and '.join(comps)} partials of {kind} never summed"
                                for kind, comps in clauses.items())
