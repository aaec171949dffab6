"""Fit a real tensor as a linear combination of float64 source partials.

At every step where the simulator predicts an abstract value, the real
tensor is fitted by least squares against the partial outputs of the sources
the prediction names; the fitted coefficients are compared with the
predicted ones, and the relative residual says whether those sources explain
the tensor at all.
"""

from __future__ import annotations

import math

import torch

from real.model import Reference, dp_of, tokens_of
from sim import algebra


def fit_value(ref: Reference, predicted: algebra.Value, real: torch.Tensor, space: str) -> tuple[dict[str, float], float] | None:
    """Return (coefficients by source label, relative residual), or None when
    the tensor cannot be fitted (rows differ from the prediction, a
    non-linear transform was applied)."""
    if space == "up-nonlinear" or real.dim() != 2 or real.shape[0] != predicted.rows or real.numel() == 0:
        return None  # (an idle DP rank's empty tensors have nothing to fit)
    s = ref.s
    y = real.detach().double()
    rows, width = y.shape
    # One column per source and predicted coefficient: rows the prediction
    # gives different coefficients of one source (a rank that doubled only
    # its own rows before a gather) are fitted apart, not blended.
    labels: list[tuple[str, float | str]] = []
    cols: dict[tuple[str, float | str], torch.Tensor] = {}
    pos = 0
    for b in predicted.blocks:
        own = tokens_of(s, b.key)
        d_own = dp_of(b.key)
        for (comp, shard, foreign), coef in b.terms:
            label = (algebra.source_label((comp, shard, foreign)), round(coef, 9) if math.isfinite(coef) else str(coef))
            if label not in cols:
                cols[label] = torch.zeros(rows, width, dtype=torch.float64)
                labels.append(label)
            toks = tokens_of(s, foreign) if foreign is not None else own
            d = dp_of(foreign) if foreign is not None else d_own
            up = space == "up" and comp == "routed"
            toks = toks[: b.rows]
            if toks:
                p = ref.rows(comp, shard, d, toks, up=up)
                n = min(width, p.shape[1])
                cols[label][pos : pos + len(toks), :n] += p[:, :n]
        pos += b.rows
    # A source whose partial is zero on every row here (an EP rank owning none
    # of these tokens' experts) has no observable coefficient: leave it out.
    labels = [lab for lab in labels if float(cols[lab].abs().max()) > 1e-12]
    if not labels:
        return None
    a = torch.stack([cols[lab].flatten() for lab in labels], dim=1)
    target = y.flatten()
    sol = torch.linalg.lstsq(a, target.unsqueeze(1)).solution.flatten()
    resid = torch.linalg.norm(a @ sol - target) / max(float(torch.linalg.norm(target)), 1e-30)
    coeffs: dict[str, float] = {}
    for (lab, _pred), c in zip(labels, sol):
        # Several row groups of one source: folded as the simulator folds its
        # prediction (algebra.coefficients).
        algebra.keep_extreme(coeffs, lab, round(float(c), 6))
    return coeffs, float(resid)
