"""The oracle of `explore`: what a finding is (its signature) and how severe a
simulated run is (the graded signals `hypothesis.target` climbs)."""

from __future__ import annotations

from scenarios.runners import MoERunner
from scenarios.spec import Scenario
from scenarios.trace import Hazard, HazardKind, Trace

# The decision that causes an overlap hazard is the shared-experts order, so it
# is part of the identity of such a finding (two different wrong orders are two
# bugs). For reduction and shape hazards the step already names the decision
# (final_all_reduce <-> needs_final_reduce, shared_all_reduce <->
# maybe_reduce_shared, custom_op_boundary <-> pre_trim_width); splitting those by
# an unrelated order would report one bug several times.
ORDER_DECISION = "shared_experts_order"
OVERLAP_KINDS = (HazardKind.LOST_OVERLAP, HazardKind.UNSAFE_OVERLAP)
FATAL_KINDS = (HazardKind.SHAPE_MISMATCH, HazardKind.RUNNER_ERROR, HazardKind.HANG, HazardKind.MISSING_STREAM)



def finding_signature(h: Hazard, trace: Trace) -> str:
    """Identity of a finding: kind@step, plus the order decision for overlap hazards."""
    sig = h.signature
    if h.kind in OVERLAP_KINDS:
        order = trace.decisions.get(ORDER_DECISION)
        if order:
            sig += f"[{ORDER_DECISION}={order}]"
    return sig


def trace_findings(trace: Trace) -> dict[str, Hazard]:
    """The first hazard of each signature, rank 0 first (the one shown to users)."""
    out: dict[str, Hazard] = {}
    for h in sorted(trace.hazards, key=lambda h: (h.rank, h.step)):
        out.setdefault(finding_signature(h, trace), h)
    return out


def target_signals(trace: Trace) -> dict[str, float]:
    """Graded observations for `hypothesis.target`: how deep into a hazard a run is.

    Output coefficients far from 1 (a reduction applied twice, or missing),
    the predicted LOST_OVERLAP cost relative to the layer, how much shapes
    disagree where a rank failed, and how many distinct hazards occur at once.
    All are 0 on a clean run."""
    coef_err = 0.0
    for coeffs in trace.outputs.values():
        for c in coeffs.values():
            coef_err = max(coef_err, min(abs(c - 1.0), 16.0))
    if not trace.hazards:
        return {"coefficient_error": coef_err, "lost_overlap_cost": 0.0,
                "shape_disagreement": 0.0, "hazard_signatures": 0.0}
    latency = max(trace.latency_us, 1e-9)
    lost = sum(h.cost_us or 0.0 for h in trace.hazards if h.kind == HazardKind.LOST_OVERLAP)
    failed_ranks = {h.rank for h in trace.hazards if h.kind in FATAL_KINDS}
    shape = len(failed_ranks) / max(trace.world, 1)
    for steps in trace.steps.values():
        for st in steps:
            if st.error and st.in_shapes and st.out_shape:
                widths = [s[-1] for s in st.in_shapes if s] + [st.out_shape[-1]]
                shape += (max(widths) - min(widths)) / max(max(widths), 1)
    return {
        "coefficient_error": coef_err,
        "lost_overlap_cost": lost / latency,
        "shape_disagreement": shape,
        "hazard_signatures": float(len(trace_findings(trace))),
    }


def simulate_safe(scenario: Scenario, runner_cls: type[MoERunner]) -> Trace:
    """simulate(); a simulator crash on this scenario becomes a finding, not a lost search."""
    from scenarios.runners import RunnerUnsupported
    from sim import simulate

    try:
        return simulate(scenario, runner_cls)
    except RunnerUnsupported as exc:  # outside what the runner models: no finding either way
        trace = Trace(source="sim", scenario=scenario.name, runner=runner_cls.__name__, world=scenario.world)
        trace.notes.append(f"skipped: {exc}")
        return trace
    except Exception as exc:  # noqa: BLE001 - reported as a RUNNER_ERROR finding
        trace = Trace(source="sim", scenario=scenario.name, runner=runner_cls.__name__,
                      world=scenario.world)
        trace.hazards.append(Hazard(HazardKind.RUNNER_ERROR, 0, "simulate", 0, _crash_detail(exc)))
        return trace


def _crash_detail(exc: Exception) -> str:
    """A misuse of Ops is the runner's bug, said as such (`check` on the
    finding's scenario refuses the runner with this line, exit 2); anything
    else the simulator raised is named as the simulator's."""
    from scenarios.ops import OpsUsageError

    if isinstance(exc, OpsUsageError):
        return f"{exc} (`check` refuses this runner on the scenario: exit 2)"
    return f"the simulator raised {type(exc).__name__}: {exc}"



__all__ = ["FATAL_KINDS", "ORDER_DECISION", "OVERLAP_KINDS", "finding_signature", "simulate_safe",
           "target_signals", "trace_findings"]
