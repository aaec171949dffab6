"""Trace mode on engine code that accumulates into a zero buffer: the engine
functions in tests/fake_vllm/ run under `EngineOps` with recorded stand-ins
for the bound entry points, and the trace is replayed by `VllmRunner`. A zero
buffer plus x is a copy of x (the first write); a later accumulation is an add."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from fake_vllm import accumulating as eng
from vllm_answers import runner_answering

from engines.vllm.runner import VllmRunner
from engines.vllm.trace_mode import EngineOps, Tracer
from scenarios.spec import ModelTraits, ParallelConfig, Scenario, Workload
from scenarios.trace import HazardKind
from sim import simulate

ENGINE_DIR = Path(eng.__file__).parent
TOKENS, HIDDEN = 4, 64


def scenario(shared: int = 0) -> Scenario:
    return Scenario(model=ModelTraits(hidden=HIDDEN, num_experts=8, top_k=2, moe_intermediate=32,
                                      num_shared_experts=shared),
                    parallel=ParallelConfig(tp=2), workload=Workload(tokens=TOKENS))


def trace_of(forward: Callable[..., Any]) -> dict[str, Any]:
    """`forward` traced as the probe traces the engine's runner: the entry
    points record their steps as the recorders do (from outside the engine)."""
    tr = Tracer(str(ENGINE_DIR))
    x, logits = torch.zeros((TOKENS, HIDDEN)), torch.zeros((TOKENS, 8))
    ids = {"input": tr.new(x, "x"), "logits": tr.new(logits, "lg")}

    def routed(h: Any) -> Any:
        w, i = torch.ones((TOKENS, 2)), torch.zeros((TOKENS, 2), dtype=torch.int64)
        tr.step("router", [logits], [w, i])
        y = h.new_zeros((TOKENS, HIDDEN))
        tr.step("modular_kernel", [h, w, i], [y], prepare_finalize="MoEPrepareAndFinalizeNoDPEPModular", inside=[])
        return y

    def shared(h: Any) -> Any:
        y = h.new_zeros((TOKENS, HIDDEN))
        tr.step("shared_experts", [h], [y])
        return y

    def reduce(h: Any) -> Any:
        r = h.clone()
        tr.step("all_reduce", [h], [r], group="tp")
        return r

    with EngineOps(tr):
        out = forward(x, routed, shared, reduce)
    return {"steps": tr.steps, **ids, "output": tr.tid(out)}


def replayed(trace: dict[str, Any]) -> type[VllmRunner]:
    return runner_answering(trace)


@pytest.mark.parametrize("forward", [eng.zeros_like_iadd, eng.new_zeros_add_, eng.factory_zeros, eng.empty_then_zero_],
                         ids=lambda f: f.__name__)
def test_adding_into_a_zero_buffer_replays_as_the_value_added(forward: Callable[..., Any]) -> None:
    s = scenario()
    trace = simulate(s, replayed(trace_of(forward)), what_if=False)
    assert not trace.hazards, [h.detail for h in trace.hazards]
    assert trace.outputs == simulate(s, "fixed", what_if=False).outputs
    copies = [st for st in trace.steps[0] if st.op == "clone"]
    assert [st.name for st in copies] == [forward.__qualname__]  # the engine line that added into the buffer


def test_a_second_accumulation_into_the_buffer_is_an_add() -> None:
    s = scenario(shared=1)
    trace = simulate(s, replayed(trace_of(eng.shared_then_routed)), what_if=False)
    assert not trace.hazards, [h.detail for h in trace.hazards]
    assert trace.outputs == simulate(s, "fixed", what_if=False).outputs
    ops = [st.op for st in trace.steps[0] if st.op in ("shared_experts", "experts", "clone", "add", "all_reduce")]
    assert ops == ["shared_experts", "clone", "experts", "add", "all_reduce"]


def test_a_factory_zero_buffer_is_traced_at_the_line_that_made_it() -> None:
    steps = trace_of(eng.factory_zeros)["steps"]
    buf = next(st for st in steps if st["op"] == "buffer")
    add = next(st for st in steps if st["op"] == "add")
    assert buf["zeros"] and buf["shape"] == [TOKENS, HIDDEN] and buf["in"] == []
    assert buf["site"] == "factory_zeros" and buf["where"].startswith("fake_vllm/accumulating.py:")
    assert add["in"][0] == buf["out"][0] and add["inplace"]


def test_a_buffer_filled_with_ones_is_not_a_zero_buffer() -> None:
    trace = simulate(scenario(), replayed(trace_of(eng.filled_with_ones)), what_if=False)
    errs = [h.detail for h in trace.hazards if h.kind == HazardKind.RUNNER_ERROR]
    assert errs and all("filled_with_ones" in e and "torch.add_" in e for e in errs)


def test_reading_the_zeros_themselves_is_a_runner_error_naming_the_buffer() -> None:
    trace = simulate(scenario(), replayed(trace_of(eng.returns_the_zeros)), what_if=False)
    errs = [h.detail for h in trace.hazards if h.kind == HazardKind.RUNNER_ERROR]
    assert errs and all("reads the zero-filled buffer allocated at returns_the_zeros" in e for e in errs)


def test_adding_a_tensor_of_another_shape_into_a_zeros_like_buffer_is_the_engines_shape_error() -> None:
    trace = trace_of(eng.zeros_like_iadd)
    steps = trace["steps"]
    k = next(i for i, st in enumerate(steps) if st["op"] == "modular_kernel")
    # The routed output comes back with half the rows (as a wrong combine would).
    kernel = {**steps[k], "out": ["half"]}
    trim = {**kernel, "op": "trim_rows", "in": ["half"], "out": steps[k]["out"], "rows": TOKENS // 2}
    trace = {**trace, "steps": [*steps[:k], kernel, trim, *steps[k + 1:]]}
    sim = simulate(scenario(), replayed(trace), what_if=False)
    assert sorted({h.kind for h in sim.hazards}) == [HazardKind.SHAPE_MISMATCH]
    assert {h.step_name for h in sim.hazards} == {"zeros_like_iadd"}


def runner_errors(forward: Callable[..., Any]) -> list[str]:
    trace = simulate(scenario(shared=1), replayed(trace_of(forward)), what_if=False)
    return [h.detail for h in trace.hazards if h.kind == HazardKind.RUNNER_ERROR]


@pytest.mark.parametrize("forward", [eng.view_write, eng.setitem_write, eng.out_kwarg_write, eng.unknown_op_write,
                                     eng.pointer_write, eng.zeros_like_pointer_write, eng.accumulate_through_a_view],
                         ids=lambda f: f.__name__)
def test_a_buffer_written_other_than_by_the_accumulation_is_not_a_zero_buffer(forward: Callable[..., Any]) -> None:
    # The engine adds into a buffer that no longer holds zeros: replaying the
    # add as a copy would be a silently wrong output; it is a runner error.
    errs = runner_errors(forward)
    assert errs and all(forward.__name__ in e for e in errs), errs


def test_a_non_zero_fill_says_so() -> None:
    errs = runner_errors(eng.filled_with_fives)
    assert errs and all("filled_with_fives" in e and "filled with 5.0" in e for e in errs), errs


def test_zeros_plus_zeros_of_another_shape_is_the_broadcast_error() -> None:
    errs = runner_errors(eng.zeros_plus_broadcast_zeros)
    assert errs and all("a broadcast" in e and "[64]" in e for e in errs), errs
