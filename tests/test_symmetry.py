"""The timing collapse (sim/symmetry.py) changes nothing a trace says: every
hazard, output coefficient, decision, note-free step field and step time is
the same as when every rank is replayed."""

from __future__ import annotations

import dataclasses
from typing import Any

import families
from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.runners import BEFORE_RUNNERS, MoERunner, RunnerUnsupported
from scenarios.strategies import hybrid_scenarios, moe_scenarios
from scenarios.trace import Trace
from sim import simulate
from sim.cost import load_profile
from sim.engine import Simulation


class CloneOnOddRanks(MoERunner):
    """Branches on the rank: odd ranks clone the shared input first (a longer
    timeline), so the collapse must tell them apart."""

    def shared_input(self, ops: Any, x: Any) -> Any:
        return ops.clone(x, name="odd_clone") if ops.rank % 2 else x


class CloneOnRankZero(MoERunner):
    """Only rank 0 runs longer: its peers wait for it in every collective."""

    def shared_input(self, ops: Any, x: Any) -> Any:
        return ops.clone(x, name="rank0_clone") if ops.rank == 0 else x


RUNNERS = ("fixed", "sglang", "trtllm", *BEFORE_RUNNERS, *(w[0] for w in families.WRONG), CloneOnOddRanks, CloneOnRankZero)


def _facts(trace: Trace) -> dict:
    """Everything a trace claims, the collapse note aside."""
    return {
        "latency": round(trace.latency_us, 9),
        "hazards": [(h.kind, h.rank, h.step, h.step_name, h.detail, h.cost_us) for h in trace.hazards],
        "outputs": trace.outputs,
        "decisions": trace.decisions,
        "steps": {r: [(s.index, s.op, s.name, s.stream, s.out_shape, s.error, round(s.start, 9), round(s.end, 9))
                      for s in steps] for r, steps in trace.steps.items()},
        "notes": [n for n in trace.notes if not n.startswith("timing:")],
    }


def _facts_or_refusal(s: Any, runner: Any) -> dict | str:
    try:
        return _facts(simulate(s, runner))
    except RunnerUnsupported as exc:  # out of the runner's scope: both modes must say so
        return str(exc)


def _both(s: Any, runner: Any) -> tuple[dict | str, dict | str]:
    collapsed = _facts_or_refusal(s, runner)
    Simulation.collapse = False
    try:
        full = _facts_or_refusal(s, runner)
    finally:
        Simulation.collapse = True
    return collapsed, full


@given(moe_scenarios(max_world=8), st.sampled_from(RUNNERS))
@settings(max_examples=150)
def test_collapse_changes_nothing(s, runner):
    a, b = _both(s, runner)
    assert a == b


@given(hybrid_scenarios(), st.sampled_from(("fixed", families.AllReduceOverMoeEpOnly, CloneOnOddRanks)))
@settings(max_examples=40)
def test_collapse_changes_nothing_hybrid(s, runner):
    a, b = _both(s, runner)
    assert a == b


@given(moe_scenarios(max_world=8), st.lists(st.integers(0, 9), min_size=4, max_size=4), st.sampled_from(RUNNERS))
@settings(max_examples=60)
def test_collapse_changes_nothing_uneven_tokens(s, counts, runner):
    counts = tuple(counts[: s.parallel.dp])
    if sum(counts) == 0:
        counts = (1, *counts[1:])
    a, b = _both(s.with_(**{"workload.tokens": counts}), runner)
    assert a == b


def test_rank_branch_splits_classes():
    """A runner that branches on the rank gets its own timing classes, and
    the peers of a slow rank wait for it (seen in the step times)."""
    s = families.TP2.with_(**{"parallel.tp": 4})
    trace = simulate(s, CloneOnRankZero)
    assert any(n == "timing: 4 rank programs simulated as 2 classes" for n in trace.notes), trace.notes
    a, b = _both(s, CloneOnRankZero)
    assert a == b
    fixed = simulate(s, "fixed")
    assert any(n == "timing: 4 identical rank programs simulated once" for n in fixed.notes), fixed.notes


@given(st.one_of(moe_scenarios(max_world=8), hybrid_scenarios()))
@settings(max_examples=100)
def test_groups_of_a_kind_partition_the_ranks(s):
    """The simulator shares one group object among its members
    (Simulation.group): sound only if every member's group is that group."""
    for kind in ("tp", "dp", "ep", "world", "moe_ep", "moe_tp"):
        for r in range(s.world):
            g = s.group(kind, r)
            assert r in g
            assert all(s.group(kind, m) == g for m in g), (kind, r, g)
    for r in range(s.world):
        g, routing = s.dispatch_group(r)
        assert all(s.dispatch_group(m) == (g, routing) for m in g)


def test_shared_groups_are_the_scenarios():
    s = families.TP2.with_(**{"parallel.tp": 2, "parallel.dp": 2})
    sim = Simulation(s, MoERunner, load_profile("cpu"), "fixed")
    for kind in ("tp", "dp", "ep", "world"):
        for r in range(s.world):
            assert sim.group(kind, r) == s.group(kind, r)
            assert hash(sim.group(kind, r)) == hash(s.group(kind, r))
    assert [sim.dispatch_group(r) for r in range(4)] == [s.dispatch_group(r) for r in range(4)]


def test_collapse_changes_nothing_on_sglang_layouts():
    """SGLang's block (attention DP, dp_gather/dp_scatter) and its wrong variants."""
    import families_sglang as fs

    from scenarios.sglang import SGLangRunner

    cases = [(SGLangRunner, s) for s in fs.CLEAN] + [(w[0], w[1]) for w in fs.WRONG]
    for runner, s in cases:
        a, b = _both(s, runner)
        assert a == b, (runner, s.name)


# ---- the timing pass against the SimPy model (sim/timing.py, sim/timing_simpy.py) ----

def _timing_facts(trace: Trace) -> dict:
    """Every time a trace holds, with its type (0 and 0.0 print differently in JSON)."""
    return {
        "latency": repr(trace.latency_us),
        "hazards": [(h.kind, h.rank, h.step, h.detail, repr(h.cost_us)) for h in trace.hazards],
        "times": {r: [(repr(s.start), repr(s.end)) for s in steps] for r, steps in trace.steps.items()},
        "overlap": {r: repr(v) for r, v in trace.overlap_us.items()},
    }


def _gap_profile(gap: float) -> Any:
    """The CPU profile with a host gap between ops (the shipped ones have none)."""
    return dataclasses.replace(load_profile("cpu"), host_gap_us=gap)


def _both_timings(s: Any, runner: Any, collapse: bool = True, gap: float = 0.0) -> tuple[Any, Any]:
    profile = _gap_profile(gap) if gap else None

    def run() -> Any:
        try:
            return _timing_facts(simulate(s, runner, profile=profile))
        except RunnerUnsupported as exc:
            return str(exc)

    Simulation.collapse = collapse
    try:
        fast = run()
        Simulation.simpy_timing = True
        try:
            ref = run()
        finally:
            Simulation.simpy_timing = False
    finally:
        Simulation.collapse = True
    return fast, ref


GAPS = st.sampled_from((0.0, 0.7, 3.25))


@given(moe_scenarios(max_world=8), st.sampled_from(RUNNERS), st.booleans(), GAPS)
@settings(max_examples=120)
def test_timing_pass_is_the_simpy_model(s, runner, collapse, gap):
    fast, ref = _both_timings(s, runner, collapse, gap)
    assert fast == ref


@given(moe_scenarios(max_world=8), st.lists(st.integers(0, 9), min_size=4, max_size=4),
       st.sampled_from(RUNNERS), GAPS)
@settings(max_examples=40)
def test_timing_pass_is_the_simpy_model_uneven(s, counts, runner, gap):
    counts = tuple(counts[: s.parallel.dp])
    if sum(counts) == 0:
        counts = (1, *counts[1:])
    fast, ref = _both_timings(s.with_(**{"workload.tokens": counts}), runner, gap=gap)
    assert fast == ref


def test_timing_pass_is_the_simpy_model_on_failing_programs():
    """Hangs, shape errors and raising ranks leave steps that never run: they
    keep time 0 in both, and the latency is where the SimPy clock stopped."""
    import error_runners as er

    runners = [er.Rank1Raises, er.Rank1FewerRows, er.Rank1GathersInstead, er.OddReduceScatter, er.AddUnequal]
    # One DP rank: the hanging rank's host gap is the last tick of the clock.
    for s in (families.TP2, families.TP2.with_(**{"parallel.tp": 2, "parallel.dp": 2})):
        for runner in runners:
            for collapse in (True, False):
                for gap in (0.0, 0.7):
                    fast, ref = _both_timings(s, runner, collapse, gap)
                    assert fast == ref, (runner.__name__, s.name, collapse, gap)


def test_timing_pass_on_families():
    import families_sglang as fs
    import families_trtllm as ft
    import families_uneven as fu

    from scenarios.sglang import SGLangRunner
    from scenarios.trtllm import TRTLLMRunner

    cases = ([(SGLangRunner, s) for s in fs.CLEAN] + [(w[0], w[1]) for w in fs.WRONG]
             + [(TRTLLMRunner, s) for s in ft.CLEAN] + [(w[0], w[1]) for w in ft.WRONG]
             + [(w[0], w[1]) for w in fu.WRONG] + [(w[0], w[1]) for w in families.WRONG])
    for runner, s in cases:
        for gap in (0.0, 0.7):
            fast, ref = _both_timings(s, runner, gap=gap)
            assert fast == ref, (runner, s.name, gap)


def test_bench_counts_the_replayed_timelines():
    """`bench sim` reports how many rank timelines were replayed: one for a
    symmetric TP world, every rank for token routing with per-rank loads."""
    from twin.bench import ep_scenario, timeline_replays

    assert timeline_replays(simulate(families.TP2.with_(**{"parallel.tp": 4}), "fixed")) == 1
    assert timeline_replays(simulate(ep_scenario(8), "fixed")) == 8
    assert timeline_replays(simulate(families.TP2.with_(**{"parallel.tp": 4}), CloneOnRankZero)) == 2


def _classes_with_and_without_bound(s: Any, runner: Any) -> tuple[Any, Any, int, list[int]] | None:
    from scenarios.runners import load_runner, runner_label
    from sim import symmetry

    cls = load_runner(runner)
    cls.prepare_program(s)
    sim = Simulation(s, cls, load_profile("h100"), runner_label(cls))
    try:
        sim.run()
    except RunnerUnsupported:
        return None
    with_bound = symmetry.classes(sim)
    real_bound = symmetry._partner_bound
    symmetry._partner_bound = lambda ops_all, by_dur: 0
    try:
        without = symmetry.classes(sim)
    finally:
        symmetry._partner_bound = real_bound
    by_dur = symmetry._numbered([tuple([pl.dur for pl in ops.plans]) for ops in sim.rank_ops])
    return with_bound, without, real_bound(sim.rank_ops, by_dur), by_dur


@given(st.one_of(moe_scenarios(max_world=8), hybrid_scenarios()), st.sampled_from(RUNNERS))
@settings(max_examples=80)
def test_partner_bound_declines_only_what_the_refinement_would(s, runner):
    """The cheap pre-check is a lower bound on the stable classes: where the
    classes are found, it never exceeds their count, and with it classes()
    returns what it returns without it."""
    got = _classes_with_and_without_bound(s, runner)
    if got is None:
        return
    with_bound, without, bound, by_dur = got
    if without is not None:
        assert bound <= without.count
        assert with_bound is not None and (with_bound.of, with_bound.reps) == (without.of, without.reps)
    else:
        assert with_bound is None
    assert bound >= max(by_dur) + 1  # the key starts with the duration class


def test_partner_bound_declines_wide_ep_before_signatures():
    """Wide EP under token routing: the refinement would end with 214 classes
    of 256 ranks; the pre-check sees more than half of that already."""
    from twin.bench import ep_scenario

    got = _classes_with_and_without_bound(ep_scenario(256), "fixed")
    assert got is not None
    with_bound, without, bound, by_dur = got
    assert with_bound is None and without is None
    assert 2 * (max(by_dur) + 1) <= 256 < 2 * bound
