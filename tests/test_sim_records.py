"""The simulator's cheaper per-op records find what a full scan finds.

Races are looked for only among the buffers the engine saw touched on a side
stream as the accesses were made (Simulation.side_buffers). The reference
here is the plain definition: group every access of a rank that used more
than one stream by buffer, keep the buffers touched on two streams, report
every write/other pair no event orders.
"""

from collections import defaultdict

from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.loader import load
from scenarios.runners import BEFORE_RUNNERS, MoERunner, load_runner, runner_label
from scenarios.strategies import moe_scenarios
from sim import hazards as hz
from sim.cost import for_world, load_profile
from sim.engine import Simulation
from sim.errors import RunnerUsageError


def _reference_races(sim: Simulation) -> list[tuple[int, int, int]]:
    """(rank, first step, second step) of every unordered conflicting pair, by full scan."""
    by_buf: dict[tuple[int, int], list] = defaultdict(list)
    for acc in sim.accesses:
        by_buf[(acc.rank, acc.buf)].append(acc)
    found: set[tuple[int, int, int]] = set()
    for (rank, _buf), accs in by_buf.items():
        plans = sim.rank_ops[rank].plans
        if plans[0].vc is None:  # one stream: everything ordered
            continue
        for i, a in enumerate(accs):
            for b in accs[i + 1:]:
                pa, pb = plans[a.step], plans[b.step]
                if a.step == b.step or not (a.write or b.write):
                    continue
                if hz.concurrent(pa.step.stream, pa.vc or {}, pb.step.stream, pb.vc or {}):
                    found.add((rank, min(a.step, b.step), max(a.step, b.step)))
    return sorted(found)


def _program(s, runner: str) -> Simulation | None:
    cls = load_runner(runner)
    sim = Simulation(s, cls, for_world(load_profile(s.cost_profile), s.world), runner_label(cls))
    try:
        sim.run()
    except RunnerUsageError:
        return None
    return sim


@given(moe_scenarios(), st.sampled_from(("fixed",) + BEFORE_RUNNERS))
@settings(max_examples=60, deadline=None)
def test_races_from_side_buffers_match_a_full_scan(s, runner):
    sim = _program(s, runner)
    if sim is None:
        return
    got = sorted({(h.rank, *sorted((h.step, int(h.detail.split("step ")[1].split()[0]))))
                  for h in hz.detect_races(sim)})
    assert got == _reference_races(sim)
    # Every buffer touched on a non-main stream was collected as it was touched.
    side = {(a.rank, a.buf) for a in sim.accesses if sim.rank_ops[a.rank].plans[a.step].step.stream != "main"}
    assert side == sim.side_buffers


class _AuxWithoutForkWait(MoERunner):
    """Launches the shared experts on the aux stream without waiting for the
    main stream's fork event: the in-place routed kernel races with them."""

    def routed_inplace(self, order):
        return True

    def launch_shared_on_aux(self, ops, x, sharded):
        with ops.stream("aux"):
            shared = ops.shared_experts(self.shared_input(ops, x), sharded=sharded)
            done = ops.record_event("shared_done")
        return shared, done


def test_a_race_is_found_as_by_a_full_scan():
    """The property above is not vacuous: a racing program's races, both ways."""
    s = load("r3-tp-decode")
    sim = Simulation(s, _AuxWithoutForkWait, for_world(load_profile(s.cost_profile), s.world), "aux-race")
    sim.run()
    races = hz.detect_races(sim)
    assert races and {h.kind.value for h in races} == {"UNSAFE_OVERLAP"}
    got = sorted({(h.rank, *sorted((h.step, int(h.detail.split("step ")[1].split()[0])))) for h in races})
    assert got == _reference_races(sim)


@given(st.lists(st.integers(0, 8), min_size=1, max_size=12), st.integers(-1, 9))
def test_rank_group_index_is_tuple_index(ranks, value):
    from sim.engine import RankGroup

    g, t = RankGroup(tuple(ranks)), tuple(ranks)
    assert hash(g) == hash(t) and g == t
    if value in t:
        assert g.index(value) == t.index(value)
        if value in t[1:]:
            assert g.index(value, 1) == t.index(value, 1)
    else:
        try:
            g.index(value)
        except ValueError:
            pass
        else:
            raise AssertionError("a non-member has no position")
