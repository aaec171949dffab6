"""`--runner vllm`: the installed vLLM's own forward, traced per rank by the
engine probe and replayed as Ops steps (engines/vllm/runner.py).

The replay half runs on synthetic traces (no engine needed). The binding
half and the comparisons with `fixed` run the probe: skipped, with the
reason, when the engine extra is absent (like tests/test_conform.py)."""

from __future__ import annotations

from typing import Any

import pytest
from vllm_answers import runner_answering

from engines.vllm import PINNED_VERSION, installed
from engines.vllm.runner import VllmRunner
from scenarios.loader import load
from scenarios.runners import RunnerLoadError, load_runner, runner_label
from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, Workload
from scenarios.trace import HazardKind
from sim import simulate

needs_engine = pytest.mark.skipif(
    not installed(),
    reason=f"vllm {PINNED_VERSION} not installed: run scripts/install-engine.sh vllm=={PINNED_VERSION}",
)

SITE_RED = "MoERunner._maybe_reduce_final_output"
SITE_MK = "MoERunner._apply_quant_method"


def _st(op: str, ins: list[str | None], outs: list[str], site: str = SITE_MK, **attrs: Any) -> dict[str, Any]:
    return {"op": op, "in": ins, "out": outs, "site": site, "where": "vllm/x.py:1", "stream": "main", **attrs}


def synthetic(steps: list[dict[str, Any]], output: str, **decisions: Any) -> type[VllmRunner]:
    """A VllmRunner whose engine answer is the given trace (for every rank)."""
    return runner_answering({"steps": steps, "input": "x", "logits": "lg", "output": output}, **decisions)


def tp2(**model: Any) -> Scenario:
    return Scenario(model=ModelTraits(hidden=64, num_experts=8, top_k=2, moe_intermediate=32, **model),
                    parallel=ParallelConfig(tp=2), workload=Workload(tokens=4))


TP_PROGRAM = [
    _st("router", ["lg"], ["w", "i"]),
    _st("modular_kernel", ["x", "w", "i"], ["y"], prepare_finalize="MoEPrepareAndFinalizeNoDPEPModular", inside=[]),
    _st("all_reduce", ["y"], ["r"], site=SITE_RED, group="tp"),
]


# ---- replay (synthetic traces) ----


def test_each_bound_entry_point_replays_as_its_ops_step_named_by_the_engine_site() -> None:
    trace = simulate(tp2(), synthetic(TP_PROGRAM, "r"), what_if=False)
    steps = [(st.op, st.name) for st in trace.steps[0] if st.op in ("router", "experts", "all_reduce")]
    assert steps == [("router", f"{SITE_MK} (router)"), ("experts", SITE_MK), ("all_reduce", SITE_RED)]
    assert not trace.hazards
    assert trace.outputs == simulate(tp2(), "fixed", what_if=False).outputs


def test_a_missing_reduction_in_the_engine_is_found_at_the_engine_output() -> None:
    program = TP_PROGRAM[:2]  # the engine forgot _maybe_reduce_final_output's all-reduce
    trace = simulate(tp2(), synthetic(program, "y"), what_if=False)
    assert sorted({h.kind for h in trace.hazards}) == [HazardKind.MISSING_REDUCTION]


def test_an_unsupported_engine_op_is_a_runner_error_naming_the_engine_function() -> None:
    program = [*TP_PROGRAM, _st("unsupported", ["r"], ["z"], site="MoERunner._maybe_add_zero_expert_output",
                                what="torch.sigmoid")]
    trace = simulate(tp2(), synthetic(program, "z"), what_if=False)
    errs = [h for h in trace.hazards if h.kind == HazardKind.RUNNER_ERROR]
    assert errs and all("MoERunner._maybe_add_zero_expert_output" in h.detail and "torch.sigmoid" in h.detail
                        for h in errs)


def test_reading_an_unwritten_engine_buffer_is_a_runner_error() -> None:
    program = [*TP_PROGRAM, _st("buffer", ["r"], ["b"], site="MoERunner.forward", shape=[4, 64], zeros=False),
               _st("add", ["r", "b"], ["z"], site="MoERunner.forward")]
    trace = simulate(tp2(), synthetic(program, "z"), what_if=False)
    assert any(h.kind == HazardKind.RUNNER_ERROR and "reads the buffer allocated at MoERunner.forward" in h.detail
               for h in trace.hazards)


def test_engine_tensor_ops_replay_as_pad_trim_scale_add_clone_view() -> None:
    s = tp2(moe_hidden=80, num_shared_experts=1, routed_scaling_factor=2.0)
    program = [
        _st("pad", ["x"], ["p"], site="MoERunner._maybe_pad_hidden_states", width=80),
        _st("shared_experts", ["x"], ["sh"], site="SharedExperts.forward"),
        *[{**st, "in": ["p" if i == "x" else i for i in st["in"]]} for st in TP_PROGRAM[:2]],
        _st("trim", ["y"], ["yt"], site="MoERunner.forward", width=64),
        _st("scale", ["yt"], ["ys"], site="MoERunner._maybe_apply_routed_scale_to_output", factor=2.0, inplace=True),
        _st("clone", ["ys"], ["yc"], site="MoERunner.forward"),
        _st("view", ["yc"], ["yv"], site="MoERunner.forward", shape=[4, 64]),
        _st("add", ["sh", "yv"], ["a"], site="MoERunner.forward"),
        _st("all_reduce", ["a"], ["r"], site=SITE_RED, group="tp"),
    ]
    trace = simulate(s, synthetic(program, "r"), what_if=False)
    ops = [st.op for st in trace.steps[0]]
    for op in ("pad", "shared_experts", "trim", "scale", "clone", "view", "add", "all_reduce"):
        assert op in ops
    assert not trace.hazards
    assert trace.outputs == simulate(s, "fixed", what_if=False).outputs


def test_streams_events_and_wait_stream_replay_on_their_streams() -> None:
    s = tp2(num_shared_experts=1)
    s = Scenario(model=s.model, parallel=s.parallel, workload=s.workload,
                 runtime=Runtime(platform="cuda", aux_stream=True))
    aux = {"stream": "aux"}
    program = [
        _st("record_event", [], [], site="SharedExperts.maybe_forward_async", event=1),
        {**_st("wait_event", [], [], site="SharedExperts.maybe_forward_async", event=1), **aux},
        {**_st("shared_experts", ["x"], ["sh"], site="SharedExperts.maybe_forward_async"), **aux},
        {**_st("record_event", [], [], site="SharedExperts.maybe_forward_async", event=2), **aux},
        *TP_PROGRAM[:2],
        _st("wait_stream", [], [], site="SharedExperts.wait", on="aux"),
        _st("add", ["sh", "y"], ["a"], site="MoERunner.forward"),
        _st("all_reduce", ["a"], ["r"], site=SITE_RED, group="tp"),
    ]
    trace = simulate(s, synthetic(program, "r", shared_experts_order="MULTI_STREAM_OVERLAPPED"), what_if=False)
    shared = next(st for st in trace.steps[0] if st.op == "shared_experts")
    assert shared.stream == "aux"
    waits = [st for st in trace.steps[0] if st.op == "wait_event" and st.name == "SharedExperts.wait"]
    assert waits and waits[0].stream == "main"
    assert not trace.hazards


def test_naive_dispatch_routes_before_the_twin_dispatch() -> None:
    s = Scenario(model=ModelTraits(hidden=64, num_experts=8, top_k=2, moe_intermediate=32),
                 parallel=ParallelConfig(dp=2), workload=Workload(tokens=4))
    program = [
        _st("dispatch", ["x", "lg"], ["xd", "ld"], site="MoERunner._maybe_dispatch", group="ep"),
        _st("router", ["ld"], ["w", "i"]),
        _st("modular_kernel", ["xd", "w", "i"], ["y"], prepare_finalize=None, inside=[]),
        _st("combine", ["y"], ["c"], site="MoERunner._maybe_combine", group="ep"),
    ]
    trace = simulate(s, synthetic(program, "c"), what_if=False)
    ops = [st.op for st in trace.steps[0] if st.op in ("router", "dispatch", "experts", "combine")]
    assert ops == ["router", "dispatch", "experts", "combine"]
    assert trace.outputs == simulate(s, "fixed", what_if=False).outputs


def test_load_runner_resolves_vllm_names_and_labels_them() -> None:
    if installed():
        assert runner_label(load_runner("vllm")) == "vllm"
    with pytest.raises(RunnerLoadError, match=r"vllm 9\.9\.9 is not a supported release"):
        load_runner("vllm@9.9.9")


# ---- the binding (the probe runs the engine) ----


@pytest.fixture(scope="module")
def answer() -> Any:
    from engines.vllm.traces import rank_answer

    return lambda name, d=0: rank_answer(PINNED_VERSION, load(name), d)


def _ops(ans: dict[str, Any]) -> list[tuple[str, str]]:
    return [(st["op"], st["site"]) for st in ans["trace"]["steps"]]


@needs_engine
def test_trace_records_each_entry_point_with_the_engine_site(answer: Any) -> None:
    latent = answer("latent-moe")
    ops = _ops(latent)
    assert ops[0] == ("latent_down", "MoERunner.apply_routed_input_transform")
    assert ("shared_experts", "SharedExperts.maybe_forward_async") in ops
    assert ("all_reduce", SITE_RED) in ops
    shared = next(st for st in latent["trace"]["steps"] if st["op"] == "shared_experts")
    assert shared["stream"] == "aux" and shared["in"] == [latent["trace"]["input"]]
    records = {st["event"]: st["stream"] for st in latent["trace"]["steps"] if st["op"] == "record_event"}
    waits = [(st["event"], st["stream"]) for st in latent["trace"]["steps"] if st["op"] == "wait_event"]
    assert all(ev in records for ev, _ in waits) and ("main" in records.values() and "aux" in records.values())


@needs_engine
def test_trace_maps_the_engine_tensor_ops(answer: Any) -> None:
    padded = answer("r4-gpt-oss-padded")["trace"]["steps"]
    assert [(st["op"], st.get("width")) for st in padded if st["op"] in ("pad", "trim")] == [("pad", 192), ("trim", 180)]
    ds = answer("deepseek-v3")["trace"]["steps"]
    scale = next(st for st in ds if st["op"] == "scale")
    assert scale["factor"] == 2.5 and scale["site"] == "MoERunner._maybe_apply_routed_scale_to_output"
    mk = next(st for st in ds if st["op"] == "modular_kernel")
    assert mk["prepare_finalize"] == "DeepEPLLPrepareAndFinalize"
    assert [st["op"] for st in mk["inside"]] == ["shared_experts"]  # the shared experts inside the kernel
    # The custom op returns both outputs with the shapes its fake implementation declares.
    declared = [st for st in ds if st["op"] == "boundary"]
    assert [st["in"] for st in declared] == [mk["inside"][0]["out"], mk["out"]]
    assert all(st["shape"] == [32, 7168] and st["site"] == "MoERunner.forward" for st in declared)
    red = next(st for st in ds if st["op"] == "all_reduce")
    assert red["site"] == "MoERunner._maybe_reduce_shared_expert_output" and red["in"] == declared[0]["out"]


@needs_engine
def test_trace_runs_as_the_requested_dp_rank(answer: Any) -> None:
    a0, a1 = answer("dp-uneven-tokens", 0), answer("dp-uneven-tokens", 1)
    assert a0["rows"] != a1["rows"] and a1["accepted"]


@needs_engine
def test_the_engines_refusal_is_the_runners_unsupported_with_the_engines_message() -> None:
    from scenarios.runners import RunnerUnsupported

    s = Scenario(model=ModelTraits(hidden=64, num_experts=8, top_k=2, moe_intermediate=32),
                 parallel=ParallelConfig(dp=2, ep=True, eplb=True), workload=Workload(tokens=4))
    runner = load_runner("vllm")(s)
    assert "load balancing is only supported on CUDA" in (runner.engine_refusal() or "")
    assert "vllm 0.33.0 refuses this configuration" in (runner.unsupported() or "")
    with pytest.raises(RunnerUnsupported, match="load balancing"):
        simulate(s, "vllm")


@needs_engine
@pytest.mark.parametrize("name", ["latent-moe", "deepseek-v3", "r1-sp-deepep", "r4-nemotron-padded",
                                  "dp-uneven-tokens", "r2-fi-two-sided"])
def test_vllm_and_fixed_agree_on_catalog_scenarios(name: str) -> None:
    s = load(name)
    v, f = simulate(s, "vllm"), simulate(s, "fixed")
    assert sorted(h.kind for h in v.hazards) == sorted(h.kind for h in f.hazards) == []
    assert v.outputs == f.outputs


@needs_engine
def test_vllm_and_fixed_agree_where_conform_agrees_on_a_sample() -> None:
    from engines.vllm.config_map import engine_config, not_evaluable_here, not_expressible
    from engines.vllm.traces import client
    from twin.check.conform import engine_decisions, scenarios_of, twin_decisions

    compared = 0
    for _a, s in scenarios_of("default", sample=40, seed=3):
        if s is None or not_expressible(s, "newest") or not_evaluable_here(s):
            continue
        ans = client(PINNED_VERSION).ask(engine_config(s))
        if not ans.get("accepted") or engine_decisions(ans) != twin_decisions(s):
            continue
        v, f = simulate(s, "vllm"), simulate(s, "fixed")
        assert sorted(h.kind for h in v.hazards) == sorted(h.kind for h in f.hazards), s.summary_line()
        assert v.outputs == f.outputs, s.summary_line()
        compared += 1
    assert compared >= 5


@needs_engine
@pytest.mark.slow
@pytest.mark.parametrize("name", ["r4-gpt-oss-padded", "latent-moe", "r1-sp-deepep"])
def test_real_ranks_running_the_engine_trace_equal_the_exact_reference(name: str) -> None:
    from real.runner import run_real

    s = load(name)
    trace = run_real(s, "vllm", timeout_s=180).trace
    assert len(trace.output_checks) == s.world
    assert all(c.correct for c in trace.output_checks.values())
    assert not trace.hazards


def _release(version: str) -> Any:
    return pytest.mark.skipif(not installed(version),
                              reason=f"vllm {version} not installed: run scripts/install-engine.sh vllm=={version}")


@_release("0.21.0")
@_release("0.22.0")
@pytest.mark.slow
def test_r2_in_the_released_engine_is_predicted_and_confirmed_on_real_ranks() -> None:
    """vllm 0.21.0's FlashInfer two-sided finalize declares an unreduced
    output: the engine's final all-reduce sums it again (coefficient = TP
    size); 0.22.0 is clean. Predicted from the engine's trace, confirmed on
    real ranks running that trace."""
    from real.runner import run_real

    s = load("r2-fi-two-sided")
    old = simulate(s, "vllm@0.21.0")
    found = [h for h in old.hazards if h.kind == HazardKind.DOUBLE_REDUCTION]
    assert sorted(h.rank for h in found) == list(range(s.world))
    assert all(h.step_name == SITE_RED and f"coefficient {s.parallel.tp}" in h.detail for h in found)
    real_old = run_real(s, "vllm@0.21.0", prediction=old, timeout_s=180).trace
    assert all(c.kind == "DOUBLE_REDUCTION" and not c.correct for c in real_old.output_checks.values())
    new = simulate(s, "vllm@0.22.0")
    assert not new.hazards
    real_new = run_real(s, "vllm@0.22.0", timeout_s=180).trace
    assert all(c.correct for c in real_new.output_checks.values()) and not real_new.hazards


def test_trace_cache_key_follows_the_engine_source(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A patched engine checkout (a .py file changed) is traced again: its
    fingerprint, part of the cache key, changes."""
    import os

    from engines.vllm import traces

    pkg = tmp_path / "vllm"
    (pkg / "model_executor").mkdir(parents=True)
    src = pkg / "model_executor" / "moe_runner.py"
    src.write_text("x = 1\n")
    monkeypatch.setattr(traces, "_vllm_dir", lambda python: str(pkg))
    monkeypatch.setattr(traces, "_FINGERPRINTS", {})
    cfg = {"tp": 2, "trace": {"tp_rank": 0, "dp_rank": 0}}
    before = traces._key("0.33.0", "/some/python", cfg)
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    monkeypatch.setattr(traces, "_FINGERPRINTS", {})
    assert traces._key("0.33.0", "/some/python", cfg) != before
    assert traces._key("0.33.0", "/some/python", {**cfg, "trace": {"tp_rank": 0, "dp_rank": 1}}) != before


def test_ranks_with_the_same_tokens_share_one_trace() -> None:
    from engines.vllm.traces import trace_rank

    s = Scenario(parallel=ParallelConfig(tp=1, dp=4), workload=Workload(tokens=(4, 2, 4, 2)))
    assert [trace_rank(s, d) for d in range(4)] == [(0, 0), (0, 1), (0, 0), (0, 1)]
