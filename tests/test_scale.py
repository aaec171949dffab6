"""Wide worlds: vectorised routing and loads agree with their per-token
definitions; the routing is deterministic per seed and a valid top-k."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scenarios.strategies import moe_scenarios
from scenarios.workload import expert_loads, rank_token_ids, routing, routing_arrays
from sim.engine import _received_rows


def _loads_by_definition(s):
    """expert_loads written token by token (the definition)."""
    route = routing(s)
    token_routing = s.use_all2all_kernels and s.effective_backend != "allgather_reducescatter"
    dup = s.parallel.tp if (token_routing and not s.sp) else 1
    out = []
    for r in range(s.world):
        d, _t = s.coords(r)
        sources = [d] if s.effective_backend == "none" else range(s.parallel.dp)
        per = s.local_experts
        lo, hi = (r * per, r * per + per) if s.parallel.ep else (0, s.model.num_experts)
        pairs, active = 0, set()
        for sd in sources:
            for tok in range(s.dp_tokens(sd)):
                for e in route[sd][tok][0]:
                    if lo <= e < hi:
                        pairs += dup
                        active.add(e)
        out.append((pairs, len(active)))
    return tuple(out)


def _received_by_definition(s, group):
    route = routing(s)
    out = [0] * s.world
    for m in group:
        d, _ = s.coords(m)
        for tok in rank_token_ids(s, m):
            for o in {e // s.local_experts for e in route[d][max(tok, 0)][0]}:
                out[o] += 1
    return tuple(out)


@given(moe_scenarios())
@settings(max_examples=60, deadline=None)
def test_vectorised_loads_match_their_definition(s):
    assert expert_loads(s) == _loads_by_definition(s)
    if s.effective_backend != "none":
        group, _ = s.dispatch_group(0)
        assert _received_rows(s, group) == _received_by_definition(s, group)


@given(
    st.integers(-(2**40), 2**40), st.sampled_from([0.0, 0.3, 0.9]),
    st.sampled_from([(8, 2), (16, 16), (256, 8), (1024, 1)]), st.integers(1, 40), st.integers(1, 3),
)
@settings(max_examples=40, deadline=None)
def test_routing_is_a_deterministic_valid_top_k(seed, skew, ek, tokens, dp):
    experts, k = ek
    routing_arrays.cache_clear()
    ids, w = routing_arrays(seed, skew, experts, k, tokens, dp)
    routing_arrays.cache_clear()
    ids2, w2 = routing_arrays(seed, skew, experts, k, tokens, dp)
    assert (ids == ids2).all() and (w == w2).all()
    assert ids.shape == (dp * tokens, k) and ids.min() >= 0 and ids.max() < experts
    for row in ids.tolist():
        assert len(set(row)) == k
    assert abs(w.sum(axis=1) - 1.0).max() < 1e-12 and (w > 0).all()
    # The same counts given per DP rank route identically.
    ids3, w3 = routing_arrays(seed, skew, experts, k, (tokens,) * dp, dp)
    assert (ids3 == ids).all() and (w3 == w).all()


# ---- size caps: one line, exit 2, before anything is simulated ----

ROOT = Path(__file__).resolve().parent.parent

_EP = """name = "wide"
[model]
num_experts = {experts}
top_k = {top_k}
[parallel]
tp = {tp}
dp = {dp}
ep = true
backend = "deepep_low_latency"
[workload]
tokens = {tokens}
"""


def _cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "import sys, cli; sys.exit(cli.main())", *argv], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("verb", ["simulate", "show"])
@pytest.mark.parametrize(("fields", "needle"), [
    ({"experts": 8192, "top_k": 2, "tp": 1, "dp": 2, "tokens": 4}, "model.num_experts"),
    ({"experts": 256, "top_k": 65, "tp": 1, "dp": 2, "tokens": 4}, "model.top_k"),
    ({"experts": 2048, "top_k": 2, "tp": 2, "dp": 1024, "tokens": 4}, "at most 1024 ranks"),
    ({"experts": 8, "top_k": 2, "tp": 1, "dp": 8, "tokens": 65536}, "over all DP ranks"),
    ({"experts": 64, "top_k": 64, "tp": 1, "dp": 2, "tokens": 32768}, "token-expert pairs"),
])
def test_caps_are_one_line_exit_2(tmp_path, verb, fields, needle):
    f = tmp_path / "wide.toml"
    f.write_text(_EP.format(**fields))
    p = _cli(verb, str(f))
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], p.stderr


_TORCH_PROBE = ("import sys, cli\n"
                "code = cli.main(sys.argv[1:])\n"
                "print('TORCH_IMPORTED' if 'torch' in sys.modules else 'NO_TORCH', file=sys.stderr)\n"
                "sys.exit(code)\n")


@pytest.mark.parametrize("verb", ["simulate", "run", "check"])
@pytest.mark.parametrize(("toml", "needle"), [
    ("[model]\nnum_experts = 1000000\ntop_k = 8\n[parallel]\ndp = 4096\nep = true\n",
     "model.num_experts: at most 4096 experts, got 1000000"),
    ("[parallel]\ntp = 2\ndp = 2048\n", "at most 1024 ranks (tp x dp), got 2 x 2048 = 4096"),
    ("[model]\nhidden = 99999999999999999999999\n", "model.hidden: at most 1,048,576 wide"),
    ("[model]\nnum_shared_experts = 100000\n", "model.num_shared_experts (shared width): at most 1,048,576"),
])
def test_absurd_sizes_are_a_prompt_exit_2(tmp_path, verb, toml, needle):
    # 10^6 experts or 4096 ranks: refused before routing or rank processes, torch-free.
    f = tmp_path / "huge.toml"
    f.write_text('name = "huge"\n' + toml)
    p = subprocess.run([sys.executable, "-c", _TORCH_PROBE, verb, str(f)], cwd=ROOT, capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert lines[-1] == "NO_TORCH" and len(lines) == 2 and needle in lines[0], p.stderr


def test_real_run_refuses_a_world_the_machine_cannot_hold(tmp_path):
    from real.sizes import max_real_ranks

    if (max_real_ranks() or 0) >= 32:
        pytest.skip("this machine holds 32 real ranks")
    f = tmp_path / "wide.toml"
    f.write_text(_EP.format(experts=64, top_k=2, tp=2, dp=16, tokens=4))
    p = _cli("run", str(f), "--runner", "fixed")
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "world size 32 is larger than this machine can hold" in lines[0], p.stderr


# ---- simulate --json folds equivalent ranks ----


def _unfold(folded: dict, rank: int) -> tuple[list[dict], dict | None]:
    """A rank's steps and outputs rebuilt from the folded document."""
    cls = next(c for c in folded["rank_classes"] if rank in c["ranks"])
    rep = str(cls["representative"])
    steps = []
    for i, step in enumerate(folded["steps"][rep]):
        step = dict(step, rank=rank)
        if rank != cls["representative"]:
            step["start"], step["end"] = folded["step_times"][str(rank)][i]
            step.update(folded["step_shapes"].get(str(rank), {}).get(str(step["index"]), {}))
        steps.append(step)
    return steps, folded["outputs"].get(rep)


def _shape_of(group):
    return None if group is None else [g - group[0] for g in group]


@given(moe_scenarios())
@settings(max_examples=25, deadline=None)
def test_folded_json_rebuilds_every_rank(s):
    from sim import simulate

    trace = simulate(s, "fixed")
    full, folded = trace.to_dict(with_steps=True), trace.to_folded_dict()
    members = sorted(r for c in folded["rank_classes"] for r in c["ranks"])
    assert members == list(range(s.world))
    for r in range(s.world):
        steps, outputs = _unfold(folded, r)
        assert outputs == full["outputs"].get(str(r))
        mine = full["steps"][str(r)]
        assert len(steps) == len(mine)
        for a, b in zip(steps, mine, strict=True):
            ga, gb = a.pop("group"), b.pop("group")
            a.pop("waits"), b.pop("waits"), a.pop("records"), b.pop("records")  # numbered over all ranks
            assert _shape_of(ga) == _shape_of(gb) and (gb is None or r in gb)
            assert a == b


def test_simulate_json_folds_wide_worlds_and_all_ranks_unfolds(tmp_path):
    f = tmp_path / "wide.toml"
    f.write_text(_EP.format(experts=64, top_k=2, tp=2, dp=32, tokens=4))
    folded = json.loads(_cli("simulate", str(f), "--runner", "fixed", "--json").stdout)
    full = json.loads(_cli("simulate", str(f), "--runner", "fixed", "--json", "--all-ranks").stdout)
    assert folded["folded"] is True and "folded" not in full
    assert len(folded["steps"]) == len(folded["rank_classes"]) < 64 == len(full["steps"])
    assert folded["hazards"] == full["hazards"] and folded["latency_us"] == full["latency_us"]


# ---- the shared-work paths of the algebra agree with the plain ones ----


def _plain(v):
    """The same value with its blocks built (no uniform layout to share)."""
    from sim import algebra

    return algebra.Value(tuple(v.blocks), v.scale)


@given(st.integers(1, 12), st.integers(1, 5), st.lists(st.sampled_from(["routed", "shared"]), min_size=1, max_size=12),
       st.booleans(), st.sampled_from([1.0, 0.5, 2.0]))
@settings(max_examples=60, deadline=None)
def test_shared_reduce_scatter_equals_per_member(n, rows, comps, scaled, factor):
    from sim import algebra

    gathered = algebra.concat([algebra.leaf(f"d{i}", rows, "x", "") for i in range(n)])
    values = [algebra.relabel(gathered, comps[i % len(comps)], f"ep{i % 3}") for i in range(n)]
    if scaled:
        values = [algebra.scale(v, factor) for v in values]
    shared = algebra.reduce_scatter_all(values)
    plain = [algebra.reduce_scatter([_plain(v) for v in values], i) for i in range(n)]
    assert shared == plain
    # Sums memoised by the identities of their terms (memo forced on for any
    # size, used twice) give what a fresh sum gives.
    fresh = [algebra.add([_plain(p), _plain(algebra.relabel(p, "shared", "tp0"))]) for p in plain]
    keep = algebra._SUM_MEMO_MIN_TERMS
    algebra._SUM_MEMO_MIN_TERMS = 0
    try:
        for _ in range(2):
            assert [algebra.add([s, algebra.relabel(s, "shared", "tp0")]) for s in shared] == fresh
    finally:
        algebra._SUM_MEMO_MIN_TERMS = keep
