"""Judge a rank's real layer output against the exact reference (real/reference.py).

Row by row, by token identity: row i of rank r must equal the reference
output of the i-th token r owns (`scenarios.workload.owned_tokens`). A row is
correct when its relative error is at most REL_TOL:

    rel(i) = max_j |y[i, j] - ref[i, j]| / max_j |ref[i, j]|

REL_TOL = 1e-4, chosen from measurement. The `fixed` runner's real fp32
output against the float64 reference, on the catalog's r1..r4 scenarios
(TP/DP/EP/SP, padding, latent, shared experts, all-to-all stand-ins) and on
generated scenarios, has rel <= 1e-6 with the torch and the Triton kernel
(worst seen 6.5e-7): a margin of over 100x. A 1% error in one source's
coefficient (e.g. the routed output x1.01, or one shared TP shard x1.01)
gives rel of about 1e-3 or more: a margin of 10x or more the other way.

A wrong output is characterised in this order:
1. its shape (width, row count: missing or extra rows, SHAPE_MISMATCH /
   WRONG_TOKENS);
2. each wrong row's identity: another token's reference output (another
   row of this rank, or another DP rank's token), or an all-zero row (a
   padding row), or the right tokens in the wrong order (WRONG_TOKENS);
3. the remaining wrong rows are fitted against the extended basis of
   real/explain.py (DOUBLE/MISSING_REDUCTION, WRONG_INPUT), jointly and,
   under SP, per sequence slice when a joint fit explains nothing.

Nothing that is wrong is ever "not fitted": an output nothing explains is
still wrong, with kind WRONG_OUTPUT (uncharacterised: no verdict may take it
for a predicted cause) and a cause that says "not explained by any known
source" with the residual of the closest hypothesis. A missing output (the
rank raised, hung or died) is wrong with the failure as its cause and the
caller's kind (the failure's own hazard already reports it).
"""

from __future__ import annotations

from bisect import bisect_right

import torch

from real.explain import explain
from real.reference import ExactReference, exact_reference
from scenarios.spec import Scenario
from scenarios.trace import ROUTED_AS_OTHER, HazardKind, OutputCheck, Trace
from scenarios.workload import owned_tokens, token_label, token_offsets

REL_TOL = 1e-4
UNEXPLAINED = HazardKind.WRONG_OUTPUT
MAX_PHRASES = 4  # identity phrases listed before "(+N more)"

Tok = tuple[int, int]
ZERO = (-1, -1)  # identity of an all-zero (padding) row


def judge_output(
    s: Scenario,
    rank: int,
    output: torch.Tensor | None,
    exact: ExactReference | None = None,
    failure: str | None = None,
    failure_kind: HazardKind | str | None = None,
    shared_group: str | None = None,
) -> OutputCheck:
    """Judge what `rank` returned (None: nothing) against the exact reference.

    `failure` names why there is no output (raised/hung/died) and
    `failure_kind` is the kind the OutputCheck carries in that case.
    `shared_group` is the group the run sharded its shared experts over
    (`shared_group_of` its trace): wrong rows are fitted over its shards."""
    ref = exact if exact is not None else exact_reference(s)
    toks = owned_tokens(s, rank)
    n, hidden = len(toks), s.model.hidden
    labels = [token_label(d, t) for d, t in toks]
    if output is None:
        kind = failure_kind.value if isinstance(failure_kind, HazardKind) else failure_kind
        return OutputCheck(rank, False, wrong_rows=n, rows=n, wrong_tokens=labels,
                           cause=f"no output: {failure or 'the rank returned nothing'}", kind=kind)
    y = output.detach().cpu().double()
    shape = tuple(y.shape)
    want = ref.expected(rank)
    if y.dim() != 2 or y.shape[1] != hidden:
        return _wrong_width(rank, y, want, labels, shape)
    if y.shape[0] != n:
        return _wrong_row_count(ref, rank, y, want, toks, shape)
    abs_err, rel_err = row_errors(y, want)
    wrong = [i for i in range(n) if not rel_err[i] <= REL_TOL]  # NaN is wrong
    check = OutputCheck(rank, not wrong, _max(abs_err), _max(rel_err), len(wrong), n,
                        [labels[i] for i in wrong], shape=shape)
    if wrong:
        scales = _scales(want)
        ids = {i: identify(ref, y[i], scales[i]) for i in wrong}
        kind, check.cause = characterise(ref, rank, toks, y, ids, shared_group)
        check.kind = kind.value
        check.zero_tokens = [labels[i] for i, t in ids.items() if t == ZERO]
    return check


def row_errors(y: torch.Tensor, want: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: max absolute error, and that relative to the row's largest
    reference value."""
    diff = (y - want).abs().amax(dim=1)
    scale = want.abs().amax(dim=1).clamp_min(1e-30)
    return diff, diff / scale


def _max(v: torch.Tensor) -> float:
    if v.numel() == 0:
        return 0.0
    return float("nan") if bool(v.isnan().any()) else float(v.max())


# ---- identity of rows ----


def identify(ref: ExactReference, row: torch.Tensor, scale: float) -> Tok | None:
    """The token whose reference output this row is (any DP rank), ZERO for
    an all-zero row, None when it is neither."""
    if not bool(torch.isfinite(row).all()):
        return None
    if float(row.abs().max()) <= REL_TOL * scale:
        return ZERO
    every = torch.cat(ref.outputs)
    dist = (every - row).abs().amax(dim=1)
    best = int(dist.argmin())
    if float(dist[best]) <= REL_TOL * scale:
        off = token_offsets(ref.s)
        d = bisect_right(off, best) - 1
        return d, best - off[d]
    return None


def _scales(want: torch.Tensor) -> list[float]:
    return [float(v) for v in want.abs().amax(dim=1)]


def _identity_phrases(rank: int, ids: dict[int, Tok], toks: list[Tok]) -> list[str]:
    """"rank 1 row 0: token d0t1's output instead of d0t0"; runs of padding
    rows are named together."""
    out: list[str] = []
    rows = sorted(ids)
    i = 0
    while i < len(rows):
        r = rows[i]
        if ids[r] == ZERO:
            j = i
            while j + 1 < len(rows) and rows[j + 1] == rows[j] + 1 and ids[rows[j + 1]] == ZERO:
                j += 1
            a, b = toks[r], toks[rows[j]]
            if i == j:
                out.append(f"rank {rank} row {r}: padding row instead of token {token_label(*a)}")
            else:
                out.append(f"rank {rank} rows {r}..{rows[j]}: padding rows instead of tokens "
                           f"{token_label(*a)}..{token_label(*b)}")
            i = j + 1
            continue
        out.append(f"rank {rank} row {r}: token {token_label(*ids[r])}'s output instead of {token_label(*toks[r])}")
        i += 1
    if len(out) > MAX_PHRASES:
        out = out[:MAX_PHRASES] + [f"(+{len(out) - MAX_PHRASES} more)"]
    return out


def shared_group_of(trace: Trace) -> str | None:
    """The group every rank's shared experts were sharded over ("tp", "world";
    "full" unsharded), from the shard labels the real ops put on their steps;
    None when the run has none or mixes groups."""
    kinds = {st.detail.removeprefix("shared@").rstrip("0123456789")
             for steps in trace.steps.values() for st in steps
             if st.op == "shared_experts" and st.detail.startswith("shared@")}
    return kinds.pop() if len(kinds) == 1 else None


def characterise(ref: ExactReference, rank: int, toks: list[Tok], y: torch.Tensor, ids: dict[int, Tok | None],
                 shared_group: str | None = None) -> tuple[HazardKind, str]:
    """Kind and cause of the wrong rows of a correctly shaped output, given
    each one's identity (`identify`, by row index)."""
    wrong = list(ids)
    known = {i: t for i, t in ids.items() if t is not None}
    if len(known) == len(wrong) and ZERO not in known.values():
        held = [known.get(i, toks[i]) for i in range(len(toks))]
        if sorted(held) == sorted(toks):
            moved = ", ".join(f"row {i} holds {token_label(*known[i])}" for i in sorted(known)[:MAX_PHRASES])
            return HazardKind.WRONG_TOKENS, f"rank {rank}: right tokens in the wrong order ({moved})"
    parts = _identity_phrases(rank, known, toks)
    rest = [i for i in wrong if ids[i] is None]
    kind = HazardKind.WRONG_TOKENS if known else None
    if rest:
        rkind, rcause = _explain_rows(ref, rank, toks, y, rest, shared_group)
        if len(rest) < len(toks):
            rcause = f"rank {rank} {_rows_words(rest, toks)}: {rcause}"
        parts.append(rcause)
        kind = kind or rkind
    return kind or UNEXPLAINED, "; ".join(parts)


def _rows_words(rows: list[int], toks: list[Tok]) -> str:
    names = [token_label(*toks[i]) for i in rows]
    shown = ", ".join(names[:MAX_PHRASES]) + (f" (+{len(names) - MAX_PHRASES})" if len(names) > MAX_PHRASES else "")
    return f"row{'s' if len(rows) > 1 else ''} {shown}"


def _explain_rows(ref: ExactReference, rank: int, toks: list[Tok], y: torch.Tensor, rows: list[int],
                  shared_group: str | None = None) -> tuple[HazardKind | None, str]:
    """Fit the rows jointly; under SP, per sequence slice when the joint fit
    explains nothing (a slice may have gone wrong on its own); then row by
    row (rows may have gone wrong in different ways)."""
    if not bool(torch.isfinite(y[rows]).all()):
        bad = [i for i in rows if not bool(torch.isfinite(y[i]).all())]
        return None, f"non-finite values (nan/inf) in {_rows_words(bad, toks)}"
    ex = explain(ref, rank, [toks[i] for i in rows], y[rows], shared_group)
    if ex.kind is not None:
        return ex.kind, ex.cause
    found = _explain_per_slice(ref, rank, toks, y, rows, shared_group) if ref.s.sp else None
    return (found or _explain_per_row(ref, rank, toks, y, rows, shared_group)
            or _routed_as_other_tokens(ref, toks, y, rows) or (ex.kind, ex.cause))


ROUTED_AS_MAX = 512  # (row, other token) pairs tried at most: each one runs top_k experts on a row


def _routed_as_other_tokens(ref: ExactReference, toks: list[Tok], y: torch.Tensor,
                            rows: list[int]) -> tuple[HazardKind, str] | None:
    """Every row is its own token's output with the routed experts run under
    another token's routing (its DP rank's tokens tried): a routing handle
    of other rows, e.g. another chunk's. None unless every row is."""
    s = ref.s
    if any(toks[i][1] < 0 for i in rows) or sum(s.dp_tokens(toks[i][0]) for i in rows) > ROUTED_AS_MAX:
        return None
    pairs = [(i, (toks[i][0], u)) for i in rows for u in range(s.dp_tokens(toks[i][0])) if u != toks[i][1]]
    if not pairs:
        return None
    outs = ref.outputs_routed_as([(toks[i], other) for i, other in pairs])
    tol = {i: REL_TOL * float(ref.row(*toks[i]).abs().max()) for i in rows}
    found: dict[int, Tok] = {}
    for (i, other), out in zip(pairs, outs, strict=True):
        if i not in found and float((out - y[i]).abs().max()) <= tol[i]:
            found[i] = other
    if len(found) < len(rows):
        return None
    phrases = [f"{token_label(*toks[i])} as {token_label(*u)}" for i, u in sorted(found.items())]
    shown = ", ".join(phrases[:MAX_PHRASES]) + (f" (+{len(phrases) - MAX_PHRASES})" if len(phrases) > MAX_PHRASES else "")
    return HazardKind.WRONG_INPUT, f"{ROUTED_AS_OTHER}: {shown}"


def _explain_per_slice(ref: ExactReference, rank: int, toks: list[Tok], y: torch.Tensor, rows: list[int],
                       shared_group: str | None) -> tuple[HazardKind, str] | None:
    """Each SP slice's rows fitted apart; None unless every slice is explained."""
    per = ref.s.rank_rows(rank)
    slices: dict[int, list[int]] = {}
    for i in rows:
        slices.setdefault(toks[i][1] // per, []).append(i)
    if len(slices) < 2:
        return None
    parts, kinds = [], []
    for slc, idx in sorted(slices.items()):
        sub = explain(ref, rank, [toks[i] for i in idx], y[idx], shared_group)
        if sub.kind is None:
            return None
        kinds.append(sub.kind)
        parts.append(f"rows of slice d{toks[idx[0]][0]}s{slc}: {sub.cause}")
    return kinds[0], "; ".join(parts)


PER_ROW_MAX = 32  # rows fitted one by one when no joint fit explains them


def _explain_per_row(ref: ExactReference, rank: int, toks: list[Tok], y: torch.Tensor, rows: list[int],
                     shared_group: str | None) -> tuple[HazardKind, str] | None:
    """Rows that went wrong in different ways (some rows lost a source that
    the others over-count) explain no joint fit: fit each row alone and name
    each cause with its rows; None unless every row is explained. The kind
    is the first rows' (rows in order)."""
    if len(rows) < 2 or len(rows) > PER_ROW_MAX:
        return None
    causes: dict[str, list[int]] = {}
    kinds: list[HazardKind] = []
    for i in rows:
        ex = explain(ref, rank, [toks[i]], y[[i]], shared_group)
        if ex.kind is None:
            return None
        if ex.cause not in causes:
            kinds.append(ex.kind)
        causes.setdefault(ex.cause, []).append(i)
    if len(causes) < 2:
        return None  # one cause for every row would have fitted jointly
    return kinds[0], "; ".join(f"{_rows_words(idx, toks)}: {cause}" for cause, idx in causes.items())


# ---- wrong shapes ----


def _wrong_width(rank: int, y: torch.Tensor, want: torch.Tensor, labels: list[str], shape: tuple[int, ...]) -> OutputCheck:
    n, hidden = want.shape
    cause = f"rank {rank} returned shape {list(shape)}; the layer must return [{n}, {hidden}]"
    if y.dim() == 2 and y.shape[0] == n and y.shape[1] > hidden:
        _a, rel = row_errors(y[:, :hidden], want)
        if bool((rel <= REL_TOL).all()):
            cause += f": the right values, but not trimmed from width {y.shape[1]} to {hidden}"
    return OutputCheck(rank, False, None, None, n, n, labels, cause, HazardKind.SHAPE_MISMATCH.value, shape)


def _wrong_row_count(ref: ExactReference, rank: int, y: torch.Tensor, want: torch.Tensor, toks: list[Tok], shape: tuple[int, ...]) -> OutputCheck:
    n, m = len(toks), y.shape[0]
    both = min(n, m)
    abs_err, rel_err = row_errors(y[:both], want[:both])
    top = max(_scales(want) or [1.0])
    ids = {i: identify(ref, y[i], top) for i in range(m)}
    present = {t for t in ids.values() if t is not None}
    missing = [t for t in toks if t not in present]
    wrong = [i for i in range(n) if i >= m or not rel_err[i] <= REL_TOL]
    parts = [f"rank {rank} returned {m} row{'s' if m != 1 else ''} for {n} token{'s' if n != 1 else ''}"]
    if missing:
        names = [token_label(*t) for t in missing]
        parts.append("missing " + ", ".join(names[:MAX_PHRASES]) + (f" (+{len(names) - MAX_PHRASES})" if len(names) > MAX_PHRASES else ""))
    foreign = {i: t for i, t in ids.items() if t is not None and (t == ZERO or t not in toks)}
    parts += _extra_phrases(foreign)
    unknown = sum(1 for t in ids.values() if t is None)
    if unknown:
        parts.append(f"{unknown} row{'s' if unknown != 1 else ''} matching no token's output")
    labels = [token_label(*toks[i]) for i in wrong]
    return OutputCheck(rank, False, _max(abs_err), _max(rel_err), len(wrong), n, labels, "; ".join(parts),
                       HazardKind.WRONG_TOKENS.value, shape)


def _extra_phrases(rows: dict[int, Tok]) -> list[str]:
    out = [f"row {i} is a padding row" if t == ZERO else f"row {i} is token {token_label(*t)}'s output (another rank's)"
           for i, t in sorted(rows.items())]
    return out[:MAX_PHRASES] + ([f"(+{len(out) - MAX_PHRASES} more)"] if len(out) > MAX_PHRASES else [])


__all__ = ["judge_output", "REL_TOL", "row_errors", "identify", "characterise", "shared_group_of"]
