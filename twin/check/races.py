"""UNSAFE_OVERLAP on real ranks: provoke the race, judge by the reference.

A predicted race is two streams touching one buffer with no event between
them. On real ranks it shows only if the schedule puts the accesses in the
bad order, so the verdict perturbs the schedule: it delays one stream at a
time by more than the other streams' work took in the same (unperturbed) run,
measured, so the other side surely finishes first. Each perturbation is
repeated a small fixed number of times. CONFIRMED when some run's output is
wrong against the exact reference; a race the stand-ins cannot have (inside
a GPU all-to-all library) is INCONCLUSIVE at once, without reruns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from scenarios.backends import backend_info
from scenarios.spec import Scenario
from scenarios.trace import Hazard, OutputCheck, Trace, Verdict
from twin.check.verdicts import VerdictItem, describe_wrong, wrong_ranks

RACE_REPEATS = 2  # runs per delayed stream (stops at the first wrong output)
MARGIN_S = 0.02  # added to the measured duration of the other streams' work
MAX_DELAY_S = 5.0


def contract_only(scenario: Scenario, h: Hazard) -> str | None:
    """The reason a predicted overlap cannot race on CPU stand-ins, or None.
    An overlap the backend contract forbids races inside the GPU library
    (e.g. DeepEP's buffers under EPLB); the stand-in shares no such buffer."""
    info = backend_info(scenario.effective_backend)
    if "buffer" in h.detail or not info.gpu_library:
        return None
    return (f"needs real {info.gpu_library}: the race is inside the library, which the CPU stand-in of "
            f"{scenario.effective_backend} does not reproduce (no run can provoke it here)")


def stream_work_s(trace: Trace, rank: int) -> dict[str, float]:
    """Measured busy time per stream of one rank, in seconds."""
    out: dict[str, float] = {}
    for st in trace.steps.get(rank, []):
        out[st.stream] = out.get(st.stream, 0.0) + max(0.0, st.end - st.start) / 1e6
    return out


def delay_for(trace: Trace, rank: int, stream: str) -> float:
    """How long to hold `stream` back so every other stream's work on this rank
    (as measured in this run) is done first."""
    work = stream_work_s(trace, rank)
    others = sum(v for s, v in work.items() if s != stream)
    return min(MAX_DELAY_S, 2.0 * others + MARGIN_S)


@dataclass
class Provocation:
    """What holding streams back did to the outputs: the first perturbed run
    with a wrong output (stream, delay, the wrong ranks' checks), or none."""

    tried: list[str] = field(default_factory=list)
    stream: str | None = None
    delay_s: float = 0.0
    wrong: dict[int, OutputCheck] = field(default_factory=dict)


def provoke(scenario: Scenario, runner: str | None, sim: Trace, base: Any, rank: int,
            timeout_s: float, say: Callable[[str], None]) -> Provocation:
    """Hold back each stream of `rank`'s program in turn (on every rank), by
    more than the other streams' measured work, RACE_REPEATS times each, until
    a run's output is wrong against the reference."""
    from real.runner import run_real

    out = Provocation()
    streams = sorted({st.stream for st in sim.steps.get(rank, [])})
    for stream in streams:
        delay = delay_for(base.trace, rank, stream)
        # Every op on the delayed stream waits `delay`: stretch the run's timeout by as much.
        n_ops = sum(1 for st in sim.steps.get(rank, []) if st.stream == stream)
        out.tried.append(f"'{stream}' by {delay * 1e3:.0f} ms")
        for attempt in range(RACE_REPEATS):
            say(f"{scenario.name}: rerun with stream '{stream}' delayed {delay * 1e3:.0f} ms ({attempt + 1}/{RACE_REPEATS})")
            pert = run_real(scenario, runner, prediction=sim, timeout_s=timeout_s + delay * n_ops, delay={stream: delay})
            bad = wrong_ranks(pert.trace)
            if bad:
                out.stream, out.delay_s = stream, delay
                out.wrong = {r: pert.trace.output_checks[r] for r in bad}
                return out
    return out


def judge_race(
    scenario: Scenario,
    runner: str | None,
    sim: Trace,
    base: Any,
    h: Hazard,
    timeout_s: float,
    say: Callable[[str], None],
    cache: dict[str, Provocation] | None = None,
) -> VerdictItem:
    """The verdict of one predicted race; the perturbed runs are shared by all
    race hazards of one check through `cache`."""
    reason = contract_only(scenario, h)
    if reason is not None:
        return VerdictItem(h.kind.value, Verdict.INCONCLUSIVE, reason, h.step, h.rank)
    chk = base.trace.output_checks.get(h.rank)
    if chk is not None and not chk.correct:
        return VerdictItem(h.kind.value, Verdict.CONFIRMED,
                           f"the unperturbed run already gave a wrong output: {describe_wrong(chk)}", h.step, h.rank)
    cache = cache if cache is not None else {}
    if "campaign" not in cache:
        cache["campaign"] = provoke(scenario, runner, sim, base, h.rank, timeout_s, say)
    camp = cache["campaign"]
    if h.rank in camp.wrong:
        return VerdictItem(h.kind.value, Verdict.CONFIRMED,
                           f"delaying '{camp.stream}' by {camp.delay_s * 1e3:.0f} ms made the output wrong: "
                           f"{describe_wrong(camp.wrong[h.rank])}", h.step, h.rank)
    if camp.wrong:
        return VerdictItem(h.kind.value, Verdict.INCONCLUSIVE,
                           f"delaying '{camp.stream}' made ranks {sorted(camp.wrong)} wrong, not this one", h.step, h.rank)
    tried = f"every output equalled the reference with {', '.join(camp.tried)} delayed ({RACE_REPEATS} runs each)"
    seen = observed_race(base.trace, h)
    if seen is not None:
        return VerdictItem(h.kind.value, Verdict.INCONCLUSIVE, f"{OBSERVED_PREFIX}{seen.detail}; {HELD_READS}; {tried}",
                           h.step, h.rank)
    return VerdictItem(h.kind.value, Verdict.INCONCLUSIVE, f"{tried}: the race was not provoked", h.step, h.rank)


OBSERVED_PREFIX = "the real run observed the race: "
# Why an observed early read cannot give a wrong output on the stand-in.
HELD_READS = ("the CPU stream stand-in holds a read until its value exists, so no output can come out wrong "
              "here (on a GPU stream that read sees the buffer's earlier contents)")


def observed_race(real: Trace, h: Hazard) -> Hazard | None:
    """The real run's record of a read that came before its value existed, at
    either access of the predicted race `h` on its rank, or None."""
    steps = {h.step} if h.opaque_from is None else {h.step, h.opaque_from}
    return next((o for o in real.hazards
                 if o.kind == h.kind and o.rank == h.rank and o.step in steps and o.caused_by is None), None)
