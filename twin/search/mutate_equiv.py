"""Equivalence of a surviving mutant with its reference runner: what a run
observably does (`behaviour`), where two differ, and the scenario pool of the
search-based analysis (generated scenarios, the catalog, the corner grid)."""

from __future__ import annotations

from typing import Any

from scenarios.runners import MoERunner


def behaviour(trace: Any) -> tuple[Any, ...]:
    """What a run observably does: decisions, the steps that change something
    (op, name, stream, shapes), output coefficients, hazards. Zero-effect steps
    (lifecycle marks, a pad or trim that keeps the shape, a collective over one
    rank) are left out, so a mutant differing only by those counts as equivalent."""
    from scenarios.trace import DECISION, LIFECYCLE

    def effective(st: Any) -> bool:
        if st.category in (LIFECYCLE, DECISION):
            return False
        if st.op in ("pad", "trim", "trim_rows", "view") and st.in_shapes and st.out_shape is not None:
            return tuple(st.in_shapes[0]) != tuple(st.out_shape)
        if st.group is not None and len(st.group) == 1:
            return False
        return True

    steps = tuple(
        (r, tuple((st.op, st.name, st.stream, tuple(map(tuple, st.in_shapes)),
                   tuple(st.out_shape or ())) for st in trace.steps[r] if effective(st)))
        for r in sorted(trace.steps)
    )
    outputs = tuple((r, tuple(sorted((k, round(v, 9)) for k, v in c.items())))
                    for r, c in sorted(trace.outputs.items()))
    hazards = tuple(sorted(h.signature for h in trace.hazards))
    return (tuple(sorted(trace.decisions.items())), steps, outputs, hazards)


def first_difference(a: tuple[Any, ...], b: tuple[Any, ...]) -> str:
    """Where behaviour a (the mutant) first differs from b (fixed), in words."""
    if a[0] != b[0]:
        da, db = dict(a[0]), dict(b[0])
        k = next(k for k in sorted(set(da) | set(db)) if da.get(k) != db.get(k))
        return f"{k} {da.get(k)} instead of {db.get(k)}"
    if a[1] != b[1]:
        for (r, sa), (_r, sb) in zip(a[1], b[1]):
            if sa != sb:
                i = next((i for i, (x, y) in enumerate(zip(sa, sb)) if x != y), min(len(sa), len(sb)))
                mine = f"{sa[i][1]} on {sa[i][2]} {list(sa[i][4])}" if i < len(sa) else "nothing"
                ref = f"{sb[i][1]} on {sb[i][2]} {list(sb[i][4])}" if i < len(sb) else "nothing"
                return f"rank {r}: step {mine} where the reference has {ref}"
    if a[2] != b[2]:
        return f"output coefficients {dict(a[2][0][1]) if a[2] else {}} vs {dict(b[2][0][1]) if b[2] else {}}"
    return "hazards differ"


def corner_grid() -> list[Any]:
    """Every combination of the features the control logic branches on, at the
    smallest sizes: (tp, dp) in {1, 2}^2; no EP, or EP with each backend, with
    and without EPLB (both engine versions where SP depends on it); no/one
    shared expert x plain / padded / latent (linear, non-linear) / latent
    padded; CPU with and without an aux stream, CUDA with an aux stream under
    and over the token threshold.
    Odd token counts exercise the SP padding rows. ~3000 scenarios, ~1 ms each."""
    from scenarios.backends import BACKENDS
    from scenarios.spec import (
        ModelTraits,
        ParallelConfig,
        Runtime,
        Scenario,
        ScenarioError,
        Workload,
    )

    parallel: list[dict[str, Any]] = []
    for tp, dp in ((1, 1), (2, 1), (1, 2), (2, 2)):
        parallel.append({"tp": tp, "dp": dp})
        for backend in BACKENDS:
            for eplb in (False, True):
                parallel.append({"tp": tp, "dp": dp, "ep": True, "backend": backend, "eplb": eplb})
                if tp == 2 and dp == 2:
                    parallel.append({"tp": tp, "dp": dp, "ep": True, "backend": backend,
                                     "eplb": eplb, "version": "previous"})
    models = []
    for shared in (0, 1):
        for latent, nonlinear, pad in ((None, False, 0), (None, False, 8), (16, False, 0),
                                       (16, True, 0), (16, False, 8), (16, True, 8)):
            models.append({"hidden": 32, "moe_intermediate": 32, "num_experts": 4, "top_k": 2,
                           "num_shared_experts": shared, "latent_dim": latent,
                           "transform_nonlinear": nonlinear,
                           "moe_hidden": (latent or 32) + pad if pad else None})
    # The order function reads the platform, aux stream and token threshold only
    # when there are shared experts: the other models get two runtimes, not four.
    runtimes = (({"platform": "cpu"}, 3), ({"platform": "cuda", "aux_stream": True,
                                            "token_threshold": 4}, 8))
    shared_runtimes = (*runtimes, ({"platform": "cpu", "aux_stream": True}, 3),
                       ({"platform": "cuda", "aux_stream": True}, 3))
    out = []
    for p in parallel:
        for m in models:
            for rt, tokens in (shared_runtimes if m["num_shared_experts"] else runtimes):
                try:
                    out.append(Scenario(name="corner", model=ModelTraits(**m),
                                        parallel=ParallelConfig(**p), runtime=Runtime(**rt),
                                        workload=Workload(tokens=tokens)))
                except ScenarioError:
                    continue
    return out


def equivalence_pool(n: int, seed: int = 0) -> list[Any]:
    """Scenarios to compare a surviving mutant with fixed on: n generated ones
    (seeded), the catalog (real model shapes) and the corner grid."""
    from hypothesis import HealthCheck, Phase, Verbosity, given, settings
    from hypothesis import seed as hseed

    from scenarios.loader import catalog, load_file
    from scenarios.strategies import moe_scenarios

    pool: list[Any] = []

    @hseed(seed)
    @settings(settings.get_profile("default"), max_examples=max(n, 1), database=None,
              deadline=None, phases=(Phase.generate,),
              suppress_health_check=list(HealthCheck), verbosity=Verbosity.quiet)
    @given(moe_scenarios())
    def collect(s: Any) -> None:
        pool.append(s)

    if n > 0:
        collect()
    pool.extend(load_file(e.file) for e in catalog())
    pool.extend(corner_grid())
    return pool


def check_equivalence(cls: type[MoERunner], pool: list[Any],
                      fixed: list[tuple[Any, ...]]) -> tuple[str, str]:
    """("equivalent", "") or ("missed" | "blind_spot", where and how it differs).

    missed: on some pool scenario the twin predicts a hazard for the mutant (the
    search did not get there); blind_spot: it behaves differently from fixed
    but the twin predicts nothing anywhere in the pool."""
    from twin.search.explore import simulate_safe, trace_findings

    first_diff = ""
    outputs_differ = False
    for s, ref in zip(pool, fixed):
        trace = simulate_safe(s, cls)
        if trace.hazards:
            h = next(iter(trace_findings(trace).values()))
            return "missed", f"on {s.summary_line()}: {h}"
        mine = behaviour(trace)
        if mine != ref:
            first_diff = first_diff or f"on {s.summary_line()}: {first_difference(mine, ref)}"
            outputs_differ = outputs_differ or mine[2] != ref[2]
    if first_diff:
        what = ("the output coefficients differ somewhere" if outputs_differ else
                "the output coefficients are the same everywhere (a different schedule)")
        return "blind_spot", f"{first_diff}; {what}"
    return "equivalent", ""


__all__ = ["behaviour", "check_equivalence", "corner_grid", "equivalence_pool", "first_difference"]
