"""Verdict rules: a predicted hazard judged against reality.

Reality is the real run judged against the exact reference
(`real/reference.py`): for every rank, is its output, token by token, what
the layer must compute (`Trace.output_checks`)? Only then is the real run
characterised against the prediction (fitted coefficients at the predicted
step, the error class and step, the characterised cause of a wrong output).

- CONFIRMED: the real output is wrong (or the real run fails) *and* the
  failure is the predicted one: for reductions, the coefficients measured at
  the predicted step equal the predicted wrong ones (or, where that step
  cannot be fitted, the wrong output is characterised as the predicted kind);
  for shapes, errors and hangs, the same error class at the same step; for
  WRONG_TOKENS / WRONG_INPUT, the characterised cause is of that kind.
- REFUTED: the real output on that rank equals the reference (then nothing is
  confirmed, whatever any fit says), or the run failed differently, or the
  predicted sources make up the real tensor at the step with other
  coefficients (a fit they do not explain refutes nothing: INCONCLUSIVE).
- INCONCLUSIVE: the real machinery cannot exercise the hazard here, with the
  reason (a race inside a GPU library the CPU stand-in does not have; a wrong
  output that could not be characterised; a launch on a stream the modelled
  platform lacks, MISSING_STREAM, whose consequence is the engine's own; a
  performance hazard on a wrong output).
- UNPREDICTED: a rank's real output is wrong, or its run failed, and the
  simulator predicted nothing for that rank.

A hazard is never CONFIRMED without a real run in which the rank's output is
wrong (UNSAFE_OVERLAP's may be the run with a stream held back).
The performance hazards are the exception by nature, on a correct output,
and their verdicts say so: LOST_OVERLAP is judged by measured overlap;
REDUNDANT_COLLECTIVE by a real run of the runner without the collective,
whose every rank's output must equal the exact reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from scenarios.spec import Scenario
from scenarios.trace import ROUTED_AS_OTHER, Hazard, HazardKind, OutputCheck, Step, Trace, Verdict
from scenarios.workload import dp_of, owned_tokens, token_label, tokens_of

TOL = 1e-3  # fitted vs predicted coefficient
RESIDUAL_OK = 1e-4  # relative least-squares residual of a fit that explains the tensor

REDUCTIONS = (HazardKind.DOUBLE_REDUCTION, HazardKind.MISSING_REDUCTION)
FAILURES = (HazardKind.SHAPE_MISMATCH, HazardKind.RUNNER_ERROR, HazardKind.HANG)
# Real hazards that speak about the values a rank returned (from the reference).
OUTPUT_KINDS = (*REDUCTIONS, HazardKind.WRONG_TOKENS, HazardKind.WRONG_INPUT, HazardKind.WRONG_OUTPUT)
COLLECTIVE_OPS = ("all_reduce", "all_gather", "reduce_scatter", "all_gatherv", "reduce_scatterv", "dispatch", "combine")


@dataclass
class VerdictItem:
    kind: str
    verdict: Verdict
    reason: str
    step: int | None = None
    rank: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "verdict": self.verdict.value, "reason": self.reason,
                "step": self.step, "rank": self.rank}


def close(a: float, b: float) -> bool:
    return abs(a - b) <= TOL * max(1.0, abs(b))


def coeffs_match(pred: dict[str, float], fit: dict[str, float]) -> bool:
    """Every fitted coefficient equals the predicted one (unobservable sources,
    absent from the fit, are not held against the prediction)."""
    return all(close(c, pred.get(label, 0.0)) for label, c in fit.items())


def predicted_coeffs(sim: Trace, rank: int, step: int, routed_scale: float) -> dict[str, float] | None:
    """Predicted coefficients in the unit the real fit measures (partials
    include the intended routed scaling factor)."""
    from sim import algebra

    value = sim.values.get(rank, {}).get(step)
    if value is None:
        return None
    return algebra.coefficients(value, {"routed": routed_scale, "shared": 1.0})


def real_step(real: Trace, rank: int, step: int) -> Step | None:
    steps = real.steps.get(rank, [])
    return steps[step] if step < len(steps) else None


def output_of(real: Trace, rank: int) -> OutputCheck | None:
    return real.output_checks.get(rank)


def describe_correct(out: OutputCheck) -> str:
    err = f" (max relative error {out.max_rel_err:.1e})" if out.max_rel_err is not None else ""
    return f"rank {out.rank}'s output equals the exact reference on all {out.rows} rows{err}"


def describe_wrong(out: OutputCheck | None) -> str:
    if out is None:
        return "the real output was not judged"
    return f"output wrong on {out.wrong_rows}/{out.rows} rows: {out.cause or 'no cause given'}"


def characterised(out: OutputCheck | None) -> str | None:
    """The kind a wrong output was characterised as, None when nothing known
    explains it (WRONG_OUTPUT) or it was not judged."""
    if out is None or out.kind in (None, HazardKind.WRONG_OUTPUT.value):
        return None
    return out.kind


def _item(h: Hazard, verdict: Verdict, reason: str) -> VerdictItem:
    return VerdictItem(h.kind.value, verdict, reason, h.step, h.rank)


def judge_reduction(sim: Trace, real: Trace, h: Hazard, routed_scale: float,
                    scenario: Scenario | None = None) -> VerdictItem:
    out = output_of(real, h.rank)
    if out is None:  # no ground truth: a matching fit alone confirms nothing
        return _item(h, Verdict.INCONCLUSIVE, "the real output was not judged against the reference")
    if out.correct:
        if router_only(h):
            return _router_only_item(h, real, sim, routed_scale)
        if h.kind is HazardKind.MISSING_REDUCTION and _missing_hold_nothing(sim, h, scenario):
            return _item(h, Verdict.INCONCLUSIVE, f"{describe_correct(out)}; the expert shards predicted missing "
                                                  "hold nothing for this rank's tokens (none of them routes to "
                                                  "their experts): this workload cannot show the missing reduction")
        return _item(h, Verdict.REFUTED, describe_correct(out))
    rt = real_step(real, h.rank, h.step)
    wrong = describe_wrong(out)
    empty = predicted_empty_rows(sim, h, scenario)
    if _zero_rows_as_predicted(h, out, rt, empty, scenario):
        # A zero row is a padding row or a row every source is missing from:
        # the same numbers, and the latter is what was predicted for them.
        return _item(h, Verdict.CONFIRMED, f"{wrong}: zero, as predicted (every source that holds anything "
                                           "for them is missing)")
    if rt is None:
        return _item(h, Verdict.REFUTED, f"the real rank never reached this step; {wrong}")
    if rt.value is None:
        if characterised(out) == h.kind.value:
            why = rt.error or "no fit at this step"
            return _item(h, Verdict.CONFIRMED, f"{wrong} ({why})")
        if characterised(out) is None:
            return _item(h, Verdict.INCONCLUSIVE, f"{wrong}; no fit at step {h.step} to compare with")
        return _item(h, Verdict.REFUTED, f"{wrong}, not the predicted {h.kind.value}")
    matches, shown, predicted = _step_fit(sim, rt, h, routed_scale)
    if matches:
        # The fit covers every row: rows predicted to hold no source are
        # measured zero too (the residual says so).
        none = f", and rows {_tokens_words(empty)} holding no source" if empty else ""
        return _item(h, Verdict.CONFIRMED,
                     f"{wrong}; measured {shown}{none} at step {h.step} as predicted "
                     f"(residual {rt.residual or 0.0:.1e})")
    if (rt.residual or 0.0) > RESIDUAL_OK:
        # The predicted sources do not make up the real tensor (another fault
        # upstream, e.g. a wrong input, changed what it holds): its fitted
        # coefficients mean nothing, for or against.
        return _item(h, Verdict.INCONCLUSIVE,
                     f"{wrong}; the real tensor at step {h.step} is not a combination of the predicted sources "
                     f"(fit residual {rt.residual:.2g}): predicted {predicted}, not comparable")
    return _item(h, Verdict.REFUTED, f"{wrong}; but step {h.step} measured {shown}, predicted {predicted}")


def _zero_rows_as_predicted(h: Hazard, out: OutputCheck, rt: Step | None, empty: list[str],
                            scenario: Scenario | None) -> bool:
    """A MISSING_REDUCTION whose rank reached the step, and whose wrong output
    rows are zero exactly on the rank's rows predicted to hold no source."""
    if h.kind is not HazardKind.MISSING_REDUCTION or rt is None or not out.zero_tokens or scenario is None:
        return False
    own = {token_label(d, t) for d, t in owned_tokens(scenario, h.rank)}
    return set(out.wrong_tokens) == set(out.zero_tokens) == set(empty) & own


def predicted_empty_rows(sim: Trace, h: Hazard, scenario: Scenario | None) -> list[str]:
    """Tokens of the rows the simulator's value at the hazard's step holds no
    source on, or only expert shards none of whose experts the token routes
    to (zero for it) ([] when unknown: rows that name no token, no scenario)."""
    value = sim.values.get(h.rank, {}).get(h.step)
    if value is None or scenario is None:
        return []
    out = []
    ids = None
    for b in value.blocks:
        structural = bool(b.terms) and _only_expert_shards(b.terms)
        if b.terms and not structural:
            continue
        try:
            d, toks = dp_of(b.key), tokens_of(scenario, b.key)
        except ValueError:
            return []
        if structural and ids is None:
            from scenarios.workload import route_arrays

            ids = route_arrays(scenario)[0]
        out.extend(token_label(d, t) for t in toks
                   if t >= 0 and (not structural or not _routes_into(scenario, ids[d][t], b.terms)))
    return out


def _missing_hold_nothing(sim: Trace, h: Hazard, scenario: Scenario | None) -> bool:
    """Every row of the value at the hazard's step sums expert-parallel shards
    once each, and each shard it lacks has none of that row's token's experts:
    the missing reduction leaves these rows exact under this routing."""
    value = sim.values.get(h.rank, {}).get(h.step)
    if value is None or scenario is None or not value.blocks:
        return False
    from scenarios.layout import routed_shards
    from scenarios.workload import route_arrays

    every = set(routed_shards(scenario))
    if not all(sh.startswith("ep") for sh in every):
        return False
    ids = route_arrays(scenario)[0]
    for b in value.blocks:
        if not b.terms or not _only_expert_shards(b.terms) or any(abs(k - 1.0) > 1e-9 for _src, k in b.terms):
            return False
        lacking = tuple(((c, sh, f), 1.0) for c, sh, f in
                        {("routed", sh, None) for sh in every} - {src for src, _k in b.terms})
        try:
            d, toks = dp_of(b.key), tokens_of(scenario, b.key)
        except ValueError:
            return False
        if lacking and any(t >= 0 and _routes_into(scenario, ids[d][t], lacking) for t in toks):
            return False
    return True


def _only_expert_shards(terms: tuple) -> bool:
    """Every source is an expert-parallel routed shard ("ep1", "ep1.tp0", "ep1+up0")."""
    return all(c == "routed" and f is None and sh.startswith("ep") for (c, sh, f), _k in terms)


def _routes_into(scenario: Scenario, token_ids: Any, terms: tuple) -> bool:
    """Whether a token (its expert ids) has an expert on any of the shards:
    a shard whose experts the token does not route to holds zero for it, as
    the workload's routing (both legs use it) says."""
    from scenarios.layout import shard_coords, split_row_shard

    per = scenario.local_experts
    owners = {int(e) // per for e in token_ids}
    return any(shard_coords(scenario, split_row_shard(sh)[0])[0] in owners for (_c, sh, _f), _k in terms)


def _tokens_words(labels: list[str]) -> str:
    return ", ".join(labels[:6]) + (f" (+{len(labels) - 6})" if len(labels) > 6 else "")


def _step_fit(sim: Trace, rt: Step, h: Hazard, routed_scale: float) -> tuple[bool, str, str]:
    """Whether the real fit at the hazard's step is the predicted one (within
    the residual tolerance), and both as text ("routed@tp0=2, ...")."""
    pred = predicted_coeffs(sim, h.rank, h.step, routed_scale) or {}
    fit = rt.value or {}
    matches = coeffs_match(pred, fit) and (rt.residual or 0.0) <= RESIDUAL_OK
    return (matches, ", ".join(f"{k}={v:g}" for k, v in sorted(fit.items())),
            ", ".join(f"{k}={v:g}" for k, v in sorted(pred.items())))


ROUTER_ONLY = ("the wrong value reaches only the router, whose top-k both the simulator and the real ranks take "
               "from the workload (the real router runs its gate GEMM for timing only): the routing an engine "
               "would compute from it cannot show here")


def router_only(h: Hazard) -> bool:
    """The hazard's wrong value was fed to the router and to nothing else."""
    return bool(h.consumers) and all(c == "router" for c in h.consumers)


def _router_only_item(h: Hazard, real: Trace, sim: Trace, routed_scale: float) -> VerdictItem:
    """A correct output after a wrong router input: INCONCLUSIVE when the
    step measured what was predicted (the wrong value was there), else REFUTED."""
    rt = real_step(real, h.rank, h.step)
    if rt is None or rt.value is None:
        return _item(h, Verdict.INCONCLUSIVE, ROUTER_ONLY)
    matches, shown, predicted = _step_fit(sim, rt, h, routed_scale)
    if not matches:
        return _item(h, Verdict.REFUTED, f"step {h.step} measured {shown}, predicted {predicted}")
    return _item(h, Verdict.INCONCLUSIVE, f"measured {shown} at step {h.step} as predicted; {ROUTER_ONLY}")


def _accepted_error_kinds(h: Hazard, sim_step: Step | None) -> tuple[HazardKind, ...]:
    """Error classes that count as 'the same failure'. A shape disagreement
    inside a collective is a backend error (gloo/NCCL raise their own, or hang),
    so there a runner error or a hang at the same step also counts."""
    if h.kind == HazardKind.SHAPE_MISMATCH and sim_step is not None and sim_step.op in COLLECTIVE_OPS:
        return FAILURES
    return (h.kind,)


def judge_failure(sim: Trace, real: Trace, h: Hazard) -> VerdictItem:
    sim_steps = sim.steps.get(h.rank, [])
    sim_step = sim_steps[h.step] if h.step < len(sim_steps) else None
    kinds = _accepted_error_kinds(h, sim_step)
    # A consequence of another rank's failure counts when it is what was
    # predicted (the simulator also foresees a peer hanging on a dead rank).
    obs = [o for o in real.hazards if o.rank == h.rank and o.kind in FAILURES]
    same = [o for o in obs if o.kind in kinds and o.step == h.step]
    if same:
        o = same[0]
        return _item(h, Verdict.CONFIRMED, f"real {o.kind.value} at step {o.step} {o.step_name}: {o.detail}")
    out = output_of(real, h.rank)
    if obs:
        o = obs[0]
        return _item(h, Verdict.REFUTED, f"real failed differently: {o.kind.value} at step {o.step} {o.step_name}: {o.detail}")
    if out is not None and out.correct:
        return _item(h, Verdict.REFUTED, f"the real run did not fail; {describe_correct(out)}")
    return _item(h, Verdict.REFUTED, f"the real run did not fail here; {describe_wrong(out)}")


def judge_characterised(real: Trace, h: Hazard) -> VerdictItem:
    """WRONG_TOKENS / WRONG_INPUT: judged by the characterised wrong output."""
    out = output_of(real, h.rank)
    if out is None:
        return _item(h, Verdict.INCONCLUSIVE, "the real output was not judged")
    if out.correct:
        if router_only(h):
            return _item(h, Verdict.INCONCLUSIVE, ROUTER_ONLY)
        return _item(h, Verdict.REFUTED, describe_correct(out))
    if characterised(out) == h.kind.value:
        if _routing_cause(out) != _routing_hazard(h):  # both wrong inputs, of different tensors
            return _item(h, Verdict.INCONCLUSIVE, f"{describe_wrong(out)}: a wrong input, but not the one predicted")
        return _item(h, Verdict.CONFIRMED, describe_wrong(out))
    if read_other_rows(h, out):
        return _item(h, Verdict.INCONCLUSIVE, f"{describe_wrong(out)}: other tokens' outputs, as rows read from "
                                              "other tokens give, here or on a peer whose rows this rank gathers "
                                              "(the output does not say whose read it was)")
    if characterised(out) is None:
        return _item(h, Verdict.INCONCLUSIVE, f"{describe_wrong(out)}: the cause could not be characterised")
    return _item(h, Verdict.REFUTED, f"{describe_wrong(out)}, characterised as {out.kind}, not {h.kind.value}")


def _routing_cause(out: OutputCheck) -> bool:
    return ROUTED_AS_OTHER in out.cause


def _routing_hazard(h: Hazard) -> bool:
    from sim.simcompute import ROUTING_OF_ROWS

    return h.kind is HazardKind.WRONG_INPUT and ROUTING_OF_ROWS in h.detail


def read_other_rows(h: Hazard, out: OutputCheck) -> bool:
    """A WRONG_INPUT naming rows that are not the rank's own, and a real
    output holding other tokens' outputs in its rows: consistent with the
    prediction, but not proof of it (the output's rows may come from a peer,
    e.g. an SP slice gathered from another TP rank), nor against it."""
    from sim.checks import WRONG_ROWS

    return (h.kind is HazardKind.WRONG_INPUT and WRONG_ROWS in h.detail
            and characterised(out) == HazardKind.WRONG_TOKENS.value)


def lost_overlap_on_wrong_output(real: Trace, h: Hazard) -> VerdictItem | None:
    """A lost overlap on a rank whose output is wrong: INCONCLUSIVE, with no
    overlap measured (None when the output is right). Lost speed on a wrong
    output is no finding: the correctness fault comes first, and fixing it
    may change the schedule."""
    out = output_of(real, h.rank)
    if out is None or out.correct:
        return None
    return _item(h, Verdict.INCONCLUSIVE, f"performance hazard on a wrong output ({describe_wrong(out)}): "
                                          "a performance hazard is judged on a correct output only")


def judge_lost_overlap(real: Trace, h: Hazard, fixed_overlap: dict[int, float], fixed_latency: float, tries: int,
                       reference: str = "fixed") -> VerdictItem:
    """`reference`: the correct runner of the runner's engine whose measured
    overlap is the bar (fixed for vLLM, sglang, trtllm)."""
    on_wrong = lost_overlap_on_wrong_output(real, h)
    if on_wrong is not None:
        return on_wrong
    mine = real.overlap_us.get(h.rank, 0.0)
    ref = fixed_overlap.get(h.rank, 0.0)
    detail = (f"performance hazard, judged by measured overlap (the output is correct by definition): "
              f"overlap {mine:.0f} us vs {reference} {ref:.0f} us (best of up to {tries} runs); "
              f"layer {real.latency_us:.0f} us vs {reference} {fixed_latency:.0f} us")
    if mine == 0.0 and ref > 0.0:
        return _item(h, Verdict.CONFIRMED, detail)
    if mine > 0.0:
        return _item(h, Verdict.REFUTED, detail)
    return _item(h, Verdict.INCONCLUSIVE, detail + f": the {reference} runner did not overlap here either")


def judge_missing_stream(sim: Trace, real: Trace, h: Hazard) -> VerdictItem:
    """The claim: the program launches work on a stream the modelled platform
    lacks, and the engine crashes there (vLLM, SGLang) or serialises it
    (TensorRT-LLM). The CPU runner stands every stream
    in with a worker thread, whatever the modelled platform, and runs none of
    the engine's own code, so the crash cannot be provoked here: at best the
    launch is observed (INCONCLUSIVE, with the reason); a real run that issues
    nothing on that stream contradicts the prediction (REFUTED)."""
    sim_steps = sim.steps.get(h.rank, [])
    stream = sim_steps[h.step].stream if h.step < len(sim_steps) else "aux"
    issued = [st for st in real.steps.get(h.rank, []) if st.stream == stream]
    if not issued:
        return _item(h, Verdict.REFUTED, f"the real run issued nothing on the {stream} stream on rank {h.rank}")
    first = issued[0]
    return _item(h, Verdict.INCONCLUSIVE,
                 f"the real run issued {len(issued)} op(s) on the {stream} stream as predicted (first: step "
                 f"{first.index} {first.name}), but what the engine does there (the prediction says: a crash, "
                 "or running both halves serially) comes from its own stream objects on the modelled "
                 "platform, and this CPU runner stands every stream in with a worker thread, so it cannot "
                 "be confirmed here")


def judge_redundant_collective(real: Trace, h: Hazard, without: Trace) -> VerdictItem:
    """The claim: the collective can be removed and every rank's output stays
    correct. Evidence: `without`, the real run with it removed on every rank,
    judged against the exact reference. CPU timings are reported, not judged
    (the latency saved is the simulator's figure on the scenario's profile)."""
    detail = ("performance hazard, judged by a real run without the collective against the exact "
              f"reference: layer {real.latency_us:.0f} us with it, {without.latency_us:.0f} us without "
              "(CPU timings, reported only)")
    base, out = output_of(real, h.rank), output_of(without, h.rank)
    if base is None or out is None or len(without.output_checks) < len(real.output_checks):
        return _item(h, Verdict.INCONCLUSIVE, detail + "; an output was not judged")
    if not base.correct:
        return _item(h, Verdict.INCONCLUSIVE, detail + f"; the run with it is already wrong: {describe_wrong(base)}")
    failed = [o for o in without.hazards if o.kind in FAILURES]
    if failed:
        o = failed[0]
        return _item(h, Verdict.REFUTED, detail + f"; without it rank {o.rank} failed: {o.kind.value} at step "
                     f"{o.step} {o.step_name}: {o.detail}")
    bad = wrong_ranks(without)
    if bad:
        worst = without.output_checks[bad[0]]
        return _item(h, Verdict.REFUTED, detail + f"; without it ranks {','.join(map(str, bad))} are wrong "
                     f"(rank {worst.rank}: {describe_wrong(worst)})")
    return _item(h, Verdict.CONFIRMED, detail + f"; without it {describe_correct(out)}, and every other rank's too")


def unpredicted(sim: Trace, real: Trace) -> list[VerdictItem]:
    """Real failures and wrong outputs on ranks the simulator said nothing
    about (of that kind). A consequence of another rank's failure is never a
    finding of its own; a wrong output on a rank with a predicted output
    hazard is judged by that hazard's verdict."""
    from sim.hazards import COLLECTIVE_ORDER

    predicted = {(h.kind, h.rank) for h in sim.hazards}
    # Collectives the ranks may run in different orders: a hang or a mismatch there is what was predicted.
    crossed = {(h.rank, st) for h in sim.hazards if COLLECTIVE_ORDER in h.detail for st in (h.step, h.opaque_from)}
    output_predicted = {h.rank for h in sim.hazards if h.kind in (*OUTPUT_KINDS, *FAILURES, HazardKind.UNSAFE_OVERLAP)}
    out: list[VerdictItem] = []
    seen: set[tuple[str, int]] = set()
    for o in real.hazards:
        if o.caused_by is not None or (o.kind, o.rank) in predicted:
            continue
        if o.kind in (HazardKind.HANG, HazardKind.SHAPE_MISMATCH) and (o.rank, o.step) in crossed:
            continue
        if o.kind in OUTPUT_KINDS and o.rank in output_predicted:
            continue
        seen.add((o.kind.value, o.rank))
        out.append(VerdictItem(o.kind.value, Verdict.UNPREDICTED, o.detail, o.step, o.rank))
    # A wrong output with no real hazard naming it (belt and braces).
    for r, chk in sorted(real.output_checks.items()):
        if chk.correct or r in output_predicted or any(k_r[1] == r for k_r in seen):
            continue
        if any(o.rank == r for o in real.hazards):
            continue  # named by a real hazard above, or a consequence of another rank's failure
        out.append(VerdictItem(chk.kind or HazardKind.WRONG_OUTPUT.value, Verdict.UNPREDICTED, describe_wrong(chk), None, r))
    return out


def wrong_ranks(real: Trace) -> list[int]:
    return sorted(r for r, chk in real.output_checks.items() if not chk.correct)


def output_summary(real: Trace) -> str:
    """How the ranks' outputs compare with the exact reference, in one line."""
    checks = real.output_checks
    if not checks:
        return "output not judged"
    bad = wrong_ranks(real)
    if not bad:
        worst = max((c.max_rel_err or 0.0) for c in checks.values())
        return f"output equals the exact reference on all {len(checks)} ranks (max rel err {worst:.1e})"
    first = checks[bad[0]]
    return f"output WRONG on ranks {','.join(map(str, bad))} (rank {first.rank}: {first.cause})"


__all__ = [
    "VerdictItem",
    "judge_characterised",
    "judge_failure",
    "judge_lost_overlap",
    "judge_missing_stream",
    "judge_redundant_collective",
    "judge_reduction",
    "output_summary",
    "unpredicted",
    "wrong_ranks",
]
