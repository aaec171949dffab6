"""Shrinking a finding of `explore` to a minimal scenario: `hypothesis.find`
over the search's strategy, then a greedy field-by-field `polish`."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from random import Random
from typing import Any

from scenarios.runners import MoERunner
from scenarios.spec import Scenario, ScenarioError
from twin.search.explore_oracle import simulate_safe, trace_findings
from twin.search.explore_store import slug as _slug


def _candidates(s: Scenario) -> Iterator[dict[str, Any]]:
    """Simpler variants of s, biggest simplifications first (invalid ones are skipped)."""
    p, m, rt, w = s.parallel, s.model, s.runtime, s.workload
    for tp in (1, 2, 4):
        if tp < p.tp:
            yield {"parallel.tp": tp}
    for dp in (1, 2):
        if dp < p.dp:
            yield {"parallel.dp": dp}
    if p.ep:
        yield {"parallel.ep": False, "parallel.eplb": False, "parallel.backend": "allgather_reducescatter",
               "parallel.ep_size": None}
    if p.ep_size is not None:
        yield {"parallel.ep_size": None}
    if p.eplb:
        yield {"parallel.eplb": False}
    if p.backend != "allgather_reducescatter":
        yield {"parallel.backend": "allgather_reducescatter"}
    if p.version != "newest":
        yield {"parallel.version": "newest"}
    if m.num_shared_experts > 1:
        yield {"model.num_shared_experts": 1}
    if m.num_shared_experts:
        yield {"model.num_shared_experts": 0, "model.shared_intermediate": None}
    if m.latent_dim is not None:
        pad = (m.moe_hidden - m.latent_dim) if m.moe_hidden else 0
        yield {"model.latent_dim": None, "model.transform_nonlinear": False,
               "model.moe_hidden": (m.hidden + pad) if pad else None}
    if m.transform_nonlinear:
        yield {"model.transform_nonlinear": False}
    if s.kernel_writes_unpadded:
        yield {"kernel_writes_unpadded": False}
    if m.moe_hidden is not None:
        yield {"model.moe_hidden": None}
        if m.moe_hidden > m.routed_width + 8:
            yield {"model.moe_hidden": m.routed_width + 8}
    # Floors are the strategy's own small end (hidden 32, 2 experts, 8 x world
    # intermediate): a minimal scenario is one the strategy could have drawn.
    for hidden in (32, 8 * (m.hidden // 16), m.hidden - 8):
        if 32 <= hidden < m.hidden:
            change: dict[str, Any] = {"model.hidden": hidden}
            if m.latent_dim is None and m.moe_hidden is not None:
                change["model.moe_hidden"] = hidden + (m.moe_hidden - m.hidden)
            yield change
    if m.latent_dim is not None and m.latent_dim > 8:
        change = {"model.latent_dim": 8}
        if m.moe_hidden is not None:
            change["model.moe_hidden"] = 8 + (m.moe_hidden - m.latent_dim)
        yield change
    for e in sorted({2, s.moe_ep, 2 * s.moe_ep, m.num_experts // 2}):
        if 2 <= max(e, m.top_k) < m.num_experts:
            yield {"model.num_experts": max(e, m.top_k)}
    if m.top_k > 1:
        yield {"model.top_k": 1}
    if 8 * s.world < m.moe_intermediate:
        yield {"model.moe_intermediate": 8 * s.world}
    if m.shared_intermediate is not None:
        yield {"model.shared_intermediate": None}
    if m.routed_scaling_factor != 1.0:
        yield {"model.routed_scaling_factor": 1.0}
    yield from _simpler_knobs(s)
    if rt.platform != "cpu":
        yield {"runtime.platform": "cpu", "runtime.aux_stream": False}
    if rt.aux_stream:
        yield {"runtime.aux_stream": False}
    if rt.token_threshold != 256:
        yield {"runtime.token_threshold": 256}
    for t in _fewer_tokens(w.tokens):
        yield {"workload.tokens": t}
    if w.seed:
        yield {"workload.seed": 0}
    if w.skew:
        yield {"workload.skew": 0.0}


def _simpler_knobs(s: Scenario) -> Iterator[dict[str, Any]]:
    """Each optional knob back to its default: a minimal scenario keeps only
    those its finding needs."""
    m, rt, w = s.model, s.runtime, s.workload
    if s.parallel.max_dispatch_tokens is not None:
        yield {"parallel.max_dispatch_tokens": None}
    if m.quantized_input:
        yield {"model.quantized_input": False}
    if m.weight_block_size is not None:
        yield {"model.weight_block_size": None}
    if m.latent_up_parallel != "replicated":
        yield {"model.latent_up_parallel": "replicated"}
    if rt.allreduce_fusion:
        yield {"runtime.allreduce_fusion": False}
    if rt.shared_experts_fusion:
        yield {"runtime.shared_experts_fusion": False}
    if w.phase != "decode":
        yield {"workload.phase": "decode"}


def _fewer_tokens(tokens: int | tuple[int, ...]) -> Iterator[int | tuple[int, ...]]:
    """Smaller token counts: one count for every DP rank first, then one DP
    rank's count at a time."""
    if isinstance(tokens, int):
        yield from (t for t in (1, 2, tokens // 2, tokens - 1) if 1 <= t < tokens)
        return
    yield min(tokens)
    for i, n in enumerate(tokens):
        for t in dict.fromkeys((1, n // 2, n - 1)):
            if 1 <= t < n:
                yield (*tokens[:i], t, *tokens[i + 1 :])


def polish(s: Scenario, keep: Callable[[Scenario], bool], max_tries: int = 400) -> Scenario:
    """Greedy field-by-field simplification while `keep` holds (to a fixpoint).

    Hypothesis shrinks within the strategy's draw order; this pass also tries
    cross-field simplifications (fewer ranks with the experts still dividing,
    no latent with the padding kept) that the draw order cannot express."""
    tries = 0
    changed = True
    while changed and tries < max_tries:
        changed = False
        for change in _candidates(s):
            tries += 1
            try:
                cand = s.with_(**change)
            except (ScenarioError, ValueError, TypeError):
                continue
            if keep(cand):
                s, changed = cand, True
                break
            if tries >= max_tries:
                break
    return s


def shrink(
    runner_cls: type[MoERunner],
    signature: str,
    start: Scenario,
    strategy_kwargs: dict[str, Any],
    seed: int | None = None,
    max_examples: int = 300,
) -> Scenario:
    """A minimal scenario on which `signature` occurs: `hypothesis.find` over the
    same strategy, then `polish`; `start` (the scenario the search found) is the
    fallback when find does not meet the signature within its budget."""
    from hypothesis import HealthCheck, Phase, Verbosity, find, settings
    from hypothesis.errors import NoSuchExample

    from scenarios.strategies import moe_scenarios

    def occurs(s: Scenario) -> bool:
        return signature in trace_findings(simulate_safe(s, runner_cls))

    best = start
    try:
        best = find(
            moe_scenarios(**strategy_kwargs),
            occurs,
            settings=settings(
                settings.get_profile("default"),
                max_examples=max_examples, database=None, deadline=None,
                phases=(Phase.generate, Phase.shrink), verbosity=Verbosity.quiet,
                suppress_health_check=list(HealthCheck),
            ),
            random=Random(seed if seed is not None else 0),
        )
    except NoSuchExample:
        pass
    best = polish(best, occurs)
    return best.with_(name=f"explore-{_slug(signature)}", runner=start.runner)


__all__ = ["polish", "shrink"]
