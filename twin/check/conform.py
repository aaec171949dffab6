"""`conform`: the twin's reference runner against the installed engine's own code.

For each scenario of verify's enumeration (or a seeded sample), the engine
probe (engines/vllm/probe.py, its own long-lived process in the engine venv)
builds the equivalent layer with vLLM's factory and runs its runner's forward
once with recorders; the twin's decisions come from simulating the `fixed`
runner on the same scenario. Each decision field is compared; every distinct
disagreement is a mismatch class with its first (simplest) scenario.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from engines.vllm import (
    NO_REDUCE_RESULTS_KNOB,
    OLD_BACKEND_NAMES,
    PINNED_VERSION,
    TWIN_VERSION,
    EngineMissing,
)
from engines.vllm.client import READY_TIMEOUT_S, REQUEST_TIMEOUT_S, ProbeClient, ProbeError
from engines.vllm.config_map import engine_config, not_evaluable_here, not_expressible
from scenarios import space
from scenarios.runners import FixedRunner, MoERunner
from scenarios.spec import Scenario, ScenarioError

__all__ = ["READY_TIMEOUT_S", "REQUEST_TIMEOUT_S", "ProbeClient", "ProbeError", "conform"]

FIELDS = ("sp", "fused_output_is_reduced", "shared_experts_order", "shared_stream", "reductions",
          "pre_trim", "post_trim", "kernel_width")
# The engine function that issued an all-reduce, as the twin names that reduction.
ENGINE_SITES = {
    "_maybe_reduce_shared_expert_output": "shared_all_reduce",
    "_maybe_reduce_routed_output_before_transform": "pre_transform_all_reduce",
    "_maybe_reduce_final_output": "final_all_reduce",
}
# Model-side collectives around the layer (not the runner's reductions).
MODEL_SIDE = frozenset({"sp_all_gather", "next_layer_fused_all_reduce"})
def engine_decisions(ans: dict[str, Any]) -> dict[str, Any]:
    """The probe's answer as the compared fields."""
    reductions = [f"{ENGINE_SITES.get(e['site'], e['site'])}@{e['group']}"
                  for e in ans.get("events", ()) if e["op"] == "all_reduce"]
    out = {k: ans.get(k) for k in FIELDS if k not in ("reductions", "shared_stream")}
    out["reductions"] = reductions
    # The stream the shared MLP ran on (recorded streams: "aux" inside the
    # engine's `torch.cuda.stream(...)`, else "main"); None without shared experts.
    out["shared_stream"] = next((e["stream"] for e in ans.get("events", ()) if e["op"] == "shared_experts"), None)
    return out


def twin_decisions(s: Scenario, runner_cls: type[MoERunner] = FixedRunner) -> dict[str, Any]:
    """The reference runner's decisions: simulated (rank 0's steps)."""
    from sim import simulate

    trace = simulate(s, runner_cls, what_if=False)
    steps = trace.steps[0]
    tp_group = s.group("tp", 0)
    order = next((st.detail for st in steps if st.op == "decide" and st.name == "shared_experts_order"), None)
    reductions = [f"{st.name}@{'tp' if st.group == tp_group else list(st.group or ())}"
                  for st in steps if st.op == "all_reduce" and st.name not in MODEL_SIDE]
    # A trim counts where it changes the width (as on the engine side).
    width = {st.name: st.out_shape[-1] for st in steps
             if st.op == "trim" and st.out_shape and st.in_shapes and st.out_shape[-1] < st.in_shapes[0][-1]}
    padded = next((st.out_shape[-1] for st in steps if st.op == "pad" and st.out_shape), None)
    shared_stream = next((st.stream for st in steps if st.op == "shared_experts"), None)
    runner = runner_cls(s)
    runner.process_weights(None)  # type: ignore[arg-type]  # the lazy build reads no Ops
    return {
        "sp": runner.is_sequence_parallel(), "fused_output_is_reduced": runner.fused_output_is_reduced(),
        "shared_experts_order": order if s.model.has_shared else "NONE", "shared_stream": shared_stream,
        "reductions": reductions, "pre_trim": width.get("early_trim"), "post_trim": width.get("post_trim"),
        "kernel_width": padded or s.model.routed_width,  # the width the routed experts were handed
    }


@dataclass
class Tally:
    scenarios: int = 0
    skipped: dict[str, int] = field(default_factory=dict)
    invalid: int = 0
    probe_errors: list[dict[str, Any]] = field(default_factory=list)
    both_run: int = 0
    agree: dict[str, int] = field(default_factory=lambda: {f: 0 for f in ("accept", *FIELDS)})
    classes: dict[str, dict[str, Any]] = field(default_factory=dict)
    standins: set[str] = field(default_factory=set)

    def mismatch(self, key: str, example: dict[str, Any], engine: Any, twin: Any) -> None:
        c = self.classes.setdefault(key, {"class": key, "count": 0, "example": example,
                                          "engine": engine, "twin": twin})
        c["count"] += 1


def scenarios_of(space_name: str, sample: int | None, seed: int,
                 restrict: dict[str, tuple[Any, ...]] | None = None,
                 twin_version: str = TWIN_VERSION[PINNED_VERSION]) -> Iterator[tuple[dict[str, Any], Scenario | None]]:
    """(assignment, scenario or None if invalid), simplest first; a seeded
    sample of `sample` assignments keeps the enumeration order."""
    axes = space.space_axes(space_name)
    axes = space.restrict(axes, version=(twin_version,), **(restrict or {}))
    e = space.Enumeration(axes, space.DEFAULT_MAX_WORLD[space_name])
    indices: Any = range(len(e))
    if sample is not None and sample < len(e):
        indices = sorted(random.Random(seed).sample(range(len(e)), sample))
    for i in indices:
        a = e.get(i)
        if a is None:
            continue
        try:
            yield a, space.assignment_scenario(axes, a, "fixed")
        except ScenarioError:
            yield a, None


def conform(space_name: str = "default", sample: int | None = None, seed: int = 0,
            restrict: dict[str, tuple[Any, ...]] | None = None,
            progress: Callable[[int], None] | None = None, client: ProbeClient | None = None,
            runner_cls: type[MoERunner] = FixedRunner, engine_version: str = PINNED_VERSION) -> dict[str, Any]:
    """`runner_cls`: the twin side (the reference `fixed` runner; another
    runner shows what the comparison catches). `engine_version`: a release
    of TWIN_VERSION, compared with that release's twin rules."""
    if engine_version not in TWIN_VERSION:
        raise EngineMissing(f"vllm {engine_version} is not a supported release "
                            f"(supported: {', '.join(sorted(TWIN_VERSION))})")
    t0 = time.monotonic()
    own = client is None
    client = client or ProbeClient(version=engine_version)
    tally = Tally()
    try:
        for a, s in scenarios_of(space_name, sample, seed, restrict, TWIN_VERSION[engine_version]):
            _one(client, tally, a, s, runner_cls, engine_version)
            if progress:
                progress(tally.scenarios)
    finally:
        if own:
            client.close()
    return _report(client.hello, tally, space_name, sample, seed, time.monotonic() - t0,
                   TWIN_VERSION[engine_version])


def _one(client: ProbeClient, tally: Tally, a: dict[str, Any], s: Scenario | None,
         runner_cls: type[MoERunner], engine_version: str = PINNED_VERSION) -> None:
    if s is None:
        tally.invalid += 1
        return
    why = (not_expressible(s, TWIN_VERSION[engine_version], engine_version not in NO_REDUCE_RESULTS_KNOB,
                           engine_version not in OLD_BACKEND_NAMES)
           or not_evaluable_here(s))
    if why:
        tally.skipped[why] = tally.skipped.get(why, 0) + 1
        return
    ans = client.ask(engine_config(s, engine_version not in OLD_BACKEND_NAMES))
    tally.standins.update(ans.get("standins", ()))
    if "error" in ans:
        tally.probe_errors.append({"example": a, "error": ans["error"]})
        return
    tally.scenarios += 1
    refusal = runner_cls(s).engine_refusal()
    if ans["accepted"] != (refusal is None):
        engine = "accepted" if ans["accepted"] else ans["message"]
        twin = refusal or "accepted"
        tally.mismatch(f"accept: engine {engine} / twin {twin}", _example(a, s), engine, twin)
        return
    tally.agree["accept"] += 1
    if not ans["accepted"]:
        return  # both refuse: no forward to compare
    tally.both_run += 1
    eng, twin = engine_decisions(ans), twin_decisions(s, runner_cls)
    for f in FIELDS:
        if eng[f] == twin[f]:
            tally.agree[f] += 1
        else:
            tally.mismatch(f"{f}: engine {eng[f]} / twin {twin[f]}", _example(a, s), eng[f], twin[f])


def _example(a: dict[str, Any], s: Scenario) -> dict[str, Any]:
    """The class's first scenario (simplest first): its assignment and shape."""
    return {**a, "scenario": s.summary_line()}


def _report(hello: dict[str, Any], t: Tally, space_name: str, sample: int | None, seed: int,
            elapsed: float, twin_version: str = TWIN_VERSION[PINNED_VERSION]) -> dict[str, Any]:
    agreement = {"accept": t.agree["accept"] / t.scenarios if t.scenarios else None}
    for f in FIELDS:
        agreement[f] = t.agree[f] / t.both_run if t.both_run else None
    mismatches = sorted(t.classes.values(), key=lambda c: -c["count"])
    return {
        "engine": "vllm", "version": hello.get("version"), "twin_version": twin_version,
        "space": space_name, "sample": sample, "seed": seed,
        "scenarios": t.scenarios, "both_run": t.both_run, "agreement": agreement,
        "mismatches": mismatches, "invalid": t.invalid, "skipped": t.skipped,
        "probe_errors": t.probe_errors[:20], "probe_error_count": len(t.probe_errors),
        "stubbed_modules": hello.get("stubbed", []), "standins": [*hello.get("standins", []), *sorted(t.standins)],
        "elapsed_s": round(elapsed, 1),
    }
