"""The layout dispatch and combine follow: an engine's decisions, not the
scenario's alone.

Whether all-to-all kernels run, which prepare/finalize backend is in use,
whether each rank's tokens are sliced over attention TP before the dispatch,
and so which ranks a dispatch spans and how many rows each member hands it.
`DispatchLayout` gives vLLM's answers, exactly the Scenario's derived
properties (`use_all2all_kernels`, `effective_backend`, `sp`,
`dispatch_group`, `layer_rows`: tests/test_dispatch_layout.py checks they
agree on generated scenarios); an engine whose rules differ overrides the
three decisions (`EngineRules` in scenarios/runner_base.py is a layout, and
each runner's `engine_rules` is the one both interpreters and the workload
helpers ask).
"""

from __future__ import annotations

from scenarios.backends import backend_info
from scenarios.spec import Scenario


class DispatchLayout:
    """vLLM's dispatch layout: all-to-all kernels only with EP and DP > 1 (or
    sequence-parallel MoE), tokens sliced over TP only for the backends of
    vLLM's sequence-parallel list."""

    # ---- the three decisions an engine may answer differently ----

    def all2all_kernels(self, s: Scenario) -> bool:
        """All-to-all kernels (a token-routing or naive prepare/finalize) run."""
        return s.use_all2all_kernels

    def dispatch_backend(self, s: Scenario) -> str:
        """The prepare/finalize in use: 'none' without a dispatch, the naive
        gather ('allgather_reducescatter') for DP without all-to-all kernels."""
        return s.effective_backend

    def slices_tokens(self, s: Scenario) -> bool:
        """Each rank takes its 1/tp slice of its DP rank's tokens before the
        dispatch (and the model all-gathers them after)."""
        return s.sp

    # ---- what follows from them ----

    def token_routing(self, s: Scenario) -> bool:
        return backend_info(self.dispatch_backend(s)).token_routing

    def dispatch_group(self, s: Scenario, rank: int) -> tuple[tuple[int, ...], bool]:
        """(members, token_routing) of `rank`'s dispatch/combine: token-routing
        backends and sliced tokens span the EP group; the naive gather the DP group."""
        token_routing = self.token_routing(s)
        if token_routing or self.slices_tokens(s):
            return s.group("ep", rank), token_routing
        return s.group("dp", rank), False

    def layer_rows(self, s: Scenario, d: int) -> int:
        """Token rows each rank of DP rank d hands the dispatch: its slice,
        ceil(T_d / tp), or all T_d tokens."""
        t = s.dp_tokens(d)
        return -(-t // s.parallel.tp) if self.slices_tokens(s) else t

    def rank_rows(self, s: Scenario, rank: int) -> int:
        return self.layer_rows(s, s.coords(rank)[0])

    def max_rows(self, s: Scenario) -> int:
        """The most rows any rank hands the dispatch (a static buffer's need)."""
        return max(self.layer_rows(s, d) for d in range(s.parallel.dp))


# vLLM's answers: what a runner of another engine asks when it keeps vLLM's rules.
VLLM_LAYOUT = DispatchLayout()

_DECISIONS = ("all2all_kernels", "dispatch_backend", "slices_tokens")


def keeps_vllm_rules(dl: DispatchLayout) -> bool:
    """`dl` answers none of the three decisions differently from vLLM."""
    return all(getattr(type(dl), m) is getattr(DispatchLayout, m) for m in _DECISIONS)


def layout_note(dl: DispatchLayout, s: Scenario, engine: str) -> str | None:
    """One line when the engine's layout differs from vLLM's on `s` (what the
    scenario's derived quantities, vLLM's, do not say), else None."""
    if keeps_vllm_rules(dl):
        return None
    mine = (dl.all2all_kernels(s), dl.dispatch_backend(s), dl.slices_tokens(s))
    vllm = (VLLM_LAYOUT.all2all_kernels(s), VLLM_LAYOUT.dispatch_backend(s), VLLM_LAYOUT.slices_tokens(s))
    if mine == vllm:
        return None

    def words(v: tuple[bool, str, bool]) -> str:
        return f"all-to-all kernels {'on' if v[0] else 'off'}, backend {v[1]}, tokens {'sliced' if v[2] else 'not sliced'}"

    return f"dispatch layout ({engine}'s rules): {words(mine)}; the derived quantities are vLLM's: {words(vllm)}"
