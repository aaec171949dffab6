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

from dataclasses import fields
from typing import Any

from scenarios.backends import backend_info, rounded_hidden, too_wide_for
from scenarios.spec import Scenario, ScenarioError


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

    # ---- the routed rows' width: the backend's rounding where it runs ----

    def rounds_hidden(self, s: Scenario) -> bool:
        """The engine rounds the layer's hidden size up to a width its
        all-to-all backend's kernels take (vLLM's maybe_roundup_hidden_size).
        An engine that hands the backend the model's own width overrides this."""
        return True

    def a2a_backend(self, s: Scenario) -> str | None:
        """The backend whose kernels carry the routed rows: the one in use,
        only where all-to-all kernels run."""
        return self.dispatch_backend(s) if self.all2all_kernels(s) else None

    def rounding_backend(self, s: Scenario) -> str | None:
        """The backend whose width rule the engine rounds the routed rows to."""
        return self.a2a_backend(s) if self.rounds_hidden(s) else None

    def backend_width(self, s: Scenario) -> int | None:
        """Width the engine's all-to-all rounds the routed rows up to (None: any)."""
        backend = self.rounding_backend(s)
        return None if backend is None else rounded_hidden(backend, s.model.routed_width)

    def library_width_note(self, s: Scenario) -> str | None:
        """One line when the engine hands its all-to-all a width the backend's
        own kernels do not take (the library's constraint, not modelled as a
        refusal: the twin's all-to-all carries any width)."""
        backend = self.a2a_backend(s)
        if backend is None or self.rounds_hidden(s):
            return None
        width = s.model.routed_width
        need = rounded_hidden(backend, width)
        if need is None and too_wide_for(backend, width):
            return (f"{getattr(self, 'name', 'the engine')} hands {backend} the routed width {width}, above its "
                    f"largest compiled size; the engine would fail inside the library")
        if need is None or need == width:
            return None
        return (f"{getattr(self, 'name', 'the engine')} hands {backend} the routed width {width} unrounded; "
                f"the library's kernels take {need} (vLLM rounds up to it); the engine would fail inside the library")

    def kernel_width(self, s: Scenario) -> int:
        return max(s.model.kernel_width, self.backend_width(s) or 0)

    def summary(self, s: Scenario) -> dict[str, Any]:
        """The layout's answers on `s`, under the keys of Scenario.derived()
        (what `show`/`simulate` print as the engine's layout)."""
        kw = self.kernel_width(s)
        return {
            "engine": getattr(self, "name", "vllm"),
            "use_all2all_kernels": self.all2all_kernels(s),
            "effective_backend": self.dispatch_backend(s),
            "sp": self.slices_tokens(s),
            "padded": kw != s.model.routed_width,
            "kernel_width": kw,
            "backend_kernel_width": self.backend_width(s),
            "backend_rounds_hidden": self.rounds_hidden(s),
            "expert_output_width": s.model.routed_width if s.kernel_writes_unpadded else kw,
            "rows_per_rank": self.max_rows(s),
            "rows_per_dp_rank": [self.layer_rows(s, d) for d in range(s.parallel.dp)],
            "library_width_note": self.library_width_note(s),
        }


# vLLM's answers: what a runner of another engine asks when it keeps vLLM's rules.
VLLM_LAYOUT = DispatchLayout()

_DECISIONS = ("all2all_kernels", "dispatch_backend", "slices_tokens", "rounds_hidden")


def keeps_vllm_rules(dl: DispatchLayout) -> bool:
    """`dl` overrides none of vLLM's decisions (the three of the layout and
    the width rounding)."""
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


class EngineScenario:
    """Mixin of a scenario as an engine with its own layout sees it (built by
    `engine_scenario`, one class per scenario class and layout): the routed
    rows' width follows the engine's all-to-all (rounded only where the engine
    rounds for a backend whose kernels it runs), and the dispatch capacity and
    the backend's largest width are checked against the engine's rows and
    backend. Its fields, `to_dict` and every other derived quantity are the
    scenario's. A subclass of the scenario's own class, so a scenario that
    logs its reads (verify) keeps logging them; the layout is a class
    attribute, so views of different engines never compare equal."""

    _layout: DispatchLayout
    _base: type[Scenario]

    @property
    def backend_width(self) -> int | None:
        return self._layout.backend_width(self)  # type: ignore[arg-type]

    def _validate_backend_width(self) -> None:
        if not self._layout.rounds_hidden(self):  # type: ignore[arg-type]
            return  # the engine hands the library the model's width: see library_width_note
        s: Scenario = self  # type: ignore[assignment]
        backend = self._layout.rounding_backend(s)
        width = s.model.routed_width
        if backend is not None and too_wide_for(backend, width):
            field_name = "model.latent_dim" if s.model.has_transform else "model.hidden"
            raise ScenarioError(field_name, f"width {width} exceeds the largest size {backend} is compiled for "
                                            f"(8192; {_engine(self._layout)}'s all-to-all runs it)")

    def _check_dispatch_capacity(self) -> None:
        s: Scenario = self  # type: ignore[assignment]
        cap = s.parallel.max_dispatch_tokens
        if cap is None or self._layout.dispatch_backend(s) == "none":
            return
        d = max(range(s.parallel.dp), key=lambda i: self._layout.layer_rows(s, i))
        rows = self._layout.layer_rows(s, d)
        if rows > cap:
            raise ScenarioError(
                "parallel.max_dispatch_tokens",
                f"DP rank {d} dispatches {rows} rows per rank under {_engine(self._layout)}'s layout, more than "
                f"the static capacity {cap} (the engine's dispatch buffers cannot hold them)",
            )

    def _validate_engine(self) -> None:
        self._validate_backend_width()
        self._check_dispatch_capacity()

    def __reduce__(self) -> tuple[Any, ...]:
        # The view's class is built at run time: pickle (the real ranks' payload)
        # and copy rebuild it from the scenario and the layout.
        return engine_scenario, (_as_base(self), self._layout)


def _engine(dl: DispatchLayout) -> str:
    return getattr(dl, "name", "the engine")


def _as_base(view: EngineScenario) -> Scenario:
    s = object.__new__(view._base)
    for k, v in _field_items(view):  # not the view's cached derived quantities
        object.__setattr__(s, k, v)
    return s


def _field_items(s: Scenario) -> list[tuple[str, Any]]:
    """The scenario's fields, each read as an attribute: a recording scenario
    (verify's read log) logs each plain field read, where one call returning
    the whole dict would make every run unprunable."""
    return [(f.name, getattr(s, f.name)) for f in fields(s)]


_VIEWS: dict[tuple[type, int], type] = {}


def _view_class(base: type[Scenario], dl: DispatchLayout) -> type:
    key = (base, id(dl))
    if key not in _VIEWS:
        _VIEWS[key] = type(f"{base.__name__}@{_engine(dl)}", (EngineScenario, base),
                           {"_layout": dl, "_base": base, "__module__": __name__})
    return _VIEWS[key]


def engine_scenario(s: Scenario, dl: DispatchLayout) -> Scenario:
    """`s` as the engine of layout `dl` sees it: `s` itself under vLLM's rules
    (nothing changes for vLLM runners), else a view of `s` (EngineScenario;
    raises ScenarioError when the engine's layout cannot run it). The fields
    are shared, not re-read: nothing is validated again but the engine's checks."""
    if keeps_vllm_rules(dl):
        return s
    if isinstance(s, EngineScenario):
        if s._layout is dl:
            return s
        s = _as_base(s)
    view = object.__new__(_view_class(type(s), dl))
    for k, v in _field_items(s):  # the view derives its own quantities
        object.__setattr__(view, k, v)
    view._validate_engine()
    return view
