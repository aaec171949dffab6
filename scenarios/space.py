"""The discrete decision space `verify` enumerates: one table of axes.

An axis is a name, its values (simplest first) and how a value changes the
representative scenario (a dict of dotted `Scenario.with_` changes, or a
callable of the assignment for values that depend on other axes). A new axis
(a backend, a platform, a per-rank token list) is one row here.

Each assignment (one value per axis) becomes one small concrete scenario
whose sizes still exercise the corner cases: token counts that do not divide
by tp (SP padding rows), a padded kernel width, expert counts that are
multiples of every layout's moe_ep, an intermediate width divisible by every
moe_tp. Assignments that make an invalid scenario (ScenarioError) are skipped
and counted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from scenarios.backends import BACKENDS
from scenarios.spec import PHASES, PLATFORMS, SP_VERSIONS, Scenario, ScenarioError

Changes = dict[str, Any]


@dataclass(frozen=True)
class Axis:
    name: str
    values: tuple[Any, ...]
    # value, whole assignment -> Scenario.with_ changes (applied in table order)
    apply: Callable[[Any, dict[str, Any]], Changes]


def _field(path: str) -> Callable[[Any, dict[str, Any]], Changes]:
    return lambda v, _a: {path: v}


# Sizes of the representative scenario: small, but every corner case stays
# reachable (see the module docstring).
HIDDEN = 32
LATENT = 16
PAD = 8
THRESHOLD = 4  # runtime.token_threshold: "small" batches are at or below it
TOKENS = {"small": 3, "large": 5}  # both odd: an uneven SP split over tp = 2


def _latent(v: str, a: dict[str, Any]) -> Changes:
    if v == "none":
        return {"model.latent_dim": None, "model.transform_nonlinear": False}
    if v == "linear-row":
        # The up-projection row-parallel over TP (LATENT divides by every tp
        # here; SP refuses it, counted invalid).
        return {"model.latent_dim": LATENT, "model.transform_nonlinear": False, "model.latent_up_parallel": "row"}
    if v == "nonlinear" and a.get("version") == "previous":
        # The previous engine version applies a non-linear transform to partial
        # sums (runner_semantics.md step 6): a known defect of that version,
        # which the reference runner reproduces, not a class to verify.
        raise ScenarioError("model.transform_nonlinear",
                            "the previous version's known defect (transform of partial sums): outside the space")
    return {"model.latent_dim": LATENT, "model.transform_nonlinear": v == "nonlinear"}


def _shared_fusion(v: bool, a: dict[str, Any]) -> Changes:
    if v and not a.get("shared"):
        raise ScenarioError("runtime.shared_experts_fusion", "fusing the shared experts needs one")
    return {"runtime.shared_experts_fusion": v}


def _weight_block(v: str, a: dict[str, Any]) -> Changes:
    # "whole": one quantization block of the whole shared intermediate (the
    # base scenario's 8 x world), so TensorRT-LLM's shared MLP TP size is 1.
    if v == "none":
        return {"model.weight_block_size": None}
    if not a.get("shared"):
        raise ScenarioError("model.weight_block_size", "the block caps the shared MLP's TP size: needs one")
    return {"model.weight_block_size": 8 * a["tp"] * a["dp"]}


def _padded(v: bool, a: dict[str, Any]) -> Changes:
    width = LATENT if a.get("latent", "none") != "none" else HIDDEN
    return {"model.moe_hidden": width + PAD if v else None}


def _shared(v: int, a: dict[str, Any]) -> Changes:
    return {"model.num_shared_experts": v}


def _ep_size(v: str, a: dict[str, Any]) -> Changes:
    # "half": a hybrid layout, moe_ep = world / 2 and moe_tp = 2.
    world = a["tp"] * a["dp"]
    if v == "all":
        return {"parallel.ep_size": None}
    if world < 4:
        raise ScenarioError("parallel.ep_size", "a hybrid layout needs at least 4 ranks")
    return {"parallel.ep_size": world // 2}


def _tokens(v: str, a: dict[str, Any]) -> Changes:
    return {"workload.tokens": TOKENS[v], "runtime.token_threshold": THRESHOLD}


def _uneven_tokens_supported() -> bool:
    """A per-DP-rank token list (workload.tokens = [..]) is a newer spec feature."""
    from scenarios.spec import ParallelConfig, Workload

    try:
        Scenario(parallel=ParallelConfig(dp=2), workload=Workload(tokens=[3, 5]))  # type: ignore[arg-type]
    except (ScenarioError, TypeError, ValueError):
        return False
    return True


def _uneven(v: bool, a: dict[str, Any]) -> Changes:
    # DP ranks with different batches, every count odd and on the class's side
    # of the token threshold (the largest decides it): a small batch
    # alternates 3 and 1 tokens, a large one grows by 2 per rank.
    if not v:
        return {}
    if a.get("dp", 1) < 2:
        raise ScenarioError("workload.tokens", "uneven batches need at least 2 DP ranks")
    size = a.get("tokens", "small")
    base = TOKENS[size]
    if size == "small":
        return {"workload.tokens": [base - 2 * (d % 2) for d in range(a.get("dp", 1))]}
    return {"workload.tokens": [base + 2 * d for d in range(a.get("dp", 1))]}


def _idle(v: bool, a: dict[str, Any]) -> Changes:
    # The last DP rank gets no tokens (a DP rank with an empty batch still
    # takes part in every collective: a recurring class of engine bugs).
    if not v:
        return {}
    dp = a.get("dp", 1)
    if dp < 2:
        raise ScenarioError("workload.tokens", "an idle DP rank needs at least 2 DP ranks")
    base = TOKENS[a.get("tokens", "small")]
    counts = _uneven(True, a)["workload.tokens"] if a.get("uneven_tokens") else [base] * dp
    return {"workload.tokens": [*counts[:-1], 0]}


def _top_k(v: str, a: dict[str, Any]) -> Changes:
    # "above_moe_ep": more experts per token than EP ranks (moe_ep = world
    # here), where TensorRT-LLM's all-to-all falls back to the all-gather.
    if v == "2":
        return {}
    world = a["tp"] * a["dp"]
    if world == 1:
        raise ScenarioError("model.top_k", "one rank: top_k 2 is already above moe_ep")
    return {"model.top_k": world + 1}


def _axes(wide: bool) -> tuple[Axis, ...]:
    backends = ("allgather_reducescatter", *[b for b in BACKENDS if b != "allgather_reducescatter"])
    axes = [
        Axis("tp", (1, 2), _field("parallel.tp")),
        Axis("dp", (1, 2), _field("parallel.dp")),
        Axis("ep", (False, True), _field("parallel.ep")),
        Axis("backend", backends, _field("parallel.backend")),
        Axis("version", SP_VERSIONS, _field("parallel.version")),
        Axis("eplb", (False, True), _field("parallel.eplb")),
        Axis("platform", ("cpu", "cuda", "rocm"), _field("runtime.platform")),
        Axis("aux_stream", (False, True), _field("runtime.aux_stream")),
        Axis("shared", (0, 1), _shared),
        Axis("weight_block", ("none", "whole"), _weight_block),
        Axis("latent", ("none", "linear", "linear-row", "nonlinear"), _latent),
        Axis("padded", (False, True), _padded),
        Axis("allreduce_fusion", (False, True), _field("runtime.allreduce_fusion")),
    ]
    if wide:
        # Each of these doubles the classes the simulator must see (it reads
        # them on every path), so the default space leaves them to `wide`:
        # more ranks, hybrid layouts, a batch over the multi-stream token
        # threshold, a quantized routed input, routed scaling.
        axes[0] = Axis("tp", (1, 2, 4), _field("parallel.tp"))
        axes[1] = Axis("dp", (1, 2, 4), _field("parallel.dp"))
        axes.insert(3, Axis("ep_size", ("all", "half"), _ep_size))
        axes.insert(9, Axis("tokens", ("small", "large"), _tokens))
        axes.append(Axis("quantized_input", (False, True), _field("model.quantized_input")))
        if _uneven_tokens_supported():
            axes.insert(10, Axis("uneven_tokens", (False, True), _uneven))
        axes.append(Axis("routed_scaling_factor", (1.0, 2.5), _field("model.routed_scaling_factor")))
        axes.append(Axis("phase", PHASES, _field("workload.phase")))
        axes.insert([a.name for a in axes].index("shared") + 1,
                    Axis("shared_fusion", (False, True), _shared_fusion))
    # Last: its token counts override the batch axes' (it reads them).
    axes.append(Axis("idle_dp_rank", (False, True), _idle))
    assert {a.values[0] for a in axes if a.name == "platform"} <= set(PLATFORMS)
    return tuple(axes)


def _a2a_axes() -> tuple[Axis, ...]:
    """`default` plus top_k above moe_ep: every engine's all-to-all layout
    (SGLang's SCATTERED ones are in `default` already; TensorRT-LLM's
    all-gather fallback needs moe_ep < top_k)."""
    return (*_axes(False), Axis("top_k", ("2", "above_moe_ep"), _top_k))


SPACES: dict[str, tuple[Axis, ...]] = {"default": _axes(False), "wide": _axes(True), "a2a": _a2a_axes()}
DEFAULT_MAX_WORLD = {"default": 4, "wide": 8, "a2a": 4, "reduced": 4, "ci": 4}


def held_fixed(names: Iterable[str]) -> dict[str, Any]:
    """The knobs a space with axes `names` does not vary, with the one value
    its classes all have (every other space's axis, at its first value): what
    a proof over that space does not cover."""
    have = set(names)
    held: dict[str, Any] = {}
    for axes in SPACES.values():
        for a in axes:
            if a.name not in have and a.name not in held:
                held[a.name] = a.values[0]
    return held


def restrict(axes: tuple[Axis, ...], **values: tuple[Any, ...]) -> tuple[Axis, ...]:
    """The same axes with some limited to the given values (a smaller space)."""
    unknown = set(values) - {a.name for a in axes}
    if unknown:
        raise ScenarioError("space", f"unknown axes {sorted(unknown)} (known: {', '.join(a.name for a in axes)})")
    out = []
    for a in axes:
        if a.name in values:
            vs = tuple(v for v in a.values if v in values[a.name])
            if not vs:
                raise ScenarioError(f"space.{a.name}", f"none of {values[a.name]!r} is a value of the axis")
            a = Axis(a.name, vs, a.apply)
        out.append(a)
    return tuple(out)


# Smaller tables for mutation analysis, where every mutant walks the space
# beside its reference. reduced: one backend per behaviour the decisions tell
# apart (naive non-reducing; SP with byte rounding; SP with size-list
# rounding; EPLB-overlap safe; the disable rule's two-sided kernels), half
# the default's classes. ci: those less two, padded kernels only, no fusion,
# no linear latent (a CI-sized table; what it cannot reach is measured on
# the larger ones).
_BACKEND_GROUPS = ("allgather_reducescatter", "deepep_high_throughput", "deepep_low_latency",
                   "flashinfer_nvlink_one_sided", "flashinfer_nvlink_two_sided")
# Neither holds the weight block: no mutated runner (fixed, sglang) reads it.
# Neither holds an idle DP rank either: their mutation figures were measured without it.
SPACES["reduced"] = restrict(SPACES["default"], backend=_BACKEND_GROUPS, weight_block=("none",),
                             idle_dp_rank=(False,))
SPACES["ci"] = restrict(SPACES["default"], backend=("allgather_reducescatter", "deepep_low_latency",
                                                     "flashinfer_nvlink_two_sided"),
                        latent=("none", "nonlinear"), padded=(True,), allreduce_fusion=(False,),
                        weight_block=("none",), idle_dp_rank=(False,))


def space_axes(space: str | tuple[Axis, ...]) -> tuple[Axis, ...]:
    if isinstance(space, tuple):
        return space
    if space not in SPACES:
        raise ScenarioError("--space", f"unknown space {space!r} (known: {', '.join(SPACES)})")
    return SPACES[space]


def base_scenario(runner: str, world: int) -> Scenario:
    """The sizes every assignment starts from (world = tp x dp of the assignment)."""
    from scenarios.spec import ModelTraits, Runtime, Workload

    return Scenario(
        name="verify",
        model=ModelTraits(hidden=HIDDEN, moe_intermediate=8 * world, num_experts=2 * world, top_k=2),
        runtime=Runtime(token_threshold=THRESHOLD),
        workload=Workload(tokens=TOKENS["small"]),
        runner=runner,
    )


def assignment_scenario(axes: tuple[Axis, ...], assignment: dict[str, Any], runner: str) -> Scenario:
    """The representative scenario of one assignment (raises ScenarioError if invalid)."""
    world = assignment.get("tp", 1) * assignment.get("dp", 1)
    changes: Changes = {}
    for axis in axes:
        changes.update(axis.apply(assignment[axis.name], assignment))
    name = "verify-" + "-".join(f"{k}={v}" for k, v in assignment.items())
    return base_scenario(runner, world).with_(name=name, **changes)


def classify(s: Scenario, axes: tuple[Axis, ...]) -> dict[str, Any] | None:
    """The assignment of `axes` whose class `s` belongs to (its decisions'
    inputs, whatever its sizes), or None if `s` is outside the space."""
    m, p, rt = s.model, s.parallel, s.runtime
    latent = "none" if m.latent_dim is None else ("nonlinear" if m.transform_nonlinear else "linear")
    if latent == "linear" and m.latent_up_parallel == "row":
        latent = "linear-row"
    block = "none" if m.weight_block_size is None else (
        "whole" if m.has_shared and m.weight_block_size == m.shared_inter else None)
    full = {
        "tp": p.tp, "dp": p.dp, "ep": p.ep, "backend": p.backend, "version": p.version, "eplb": p.eplb,
        "ep_size": "all" if p.ep_size is None else ("half" if 2 * p.ep_size == s.world else None),
        "platform": rt.platform, "aux_stream": rt.aux_stream,
        "tokens": "small" if max(s.token_counts) <= rt.token_threshold else "large",
        "shared": int(m.has_shared), "latent": latent, "padded": m.padded,
        "allreduce_fusion": rt.allreduce_fusion, "quantized_input": m.quantized_input,
        "routed_scaling_factor": m.routed_scaling_factor,
        "uneven_tokens": len({c for c in s.token_counts if c}) > 1, "idle_dp_rank": 0 in s.token_counts,
        "phase": s.workload.phase, "shared_fusion": rt.shared_experts_fusion, "weight_block": block,
        "top_k": "2" if m.top_k == 2 else ("above_moe_ep" if m.top_k > s.moe_ep else None),
    }
    out = {}
    for a in axes:
        if full.get(a.name) not in a.values:
            return None
        out[a.name] = full[a.name]
    return out


class Enumeration:
    """The assignments of `axes` by index in product order (the last axis
    varies fastest), without listing them (the wide space has over a million);
    an index whose tp x dp exceeds max_world holds no assignment."""

    def __init__(self, axes: tuple[Axis, ...], max_world: int) -> None:
        # tp or dp values above max_world hold no assignment at all: leave them
        # out of the product (the wide space at --max-world 2 would otherwise
        # walk tens of millions of empty indices).
        axes = world_axes(axes, max_world)
        self.axes, self.max_world = axes, max_world
        self.names = [a.name for a in axes]
        self.sizes = [len(a.values) for a in axes]
        self._pos = [{v: k for k, v in enumerate(a.values)} for a in axes]
        self.total = 1
        for n in self.sizes:
            self.total *= n

    def __len__(self) -> int:
        return self.total

    def _in_world(self, a: dict[str, Any]) -> bool:
        return a.get("tp", 1) * a.get("dp", 1) <= self.max_world

    def get(self, i: int) -> dict[str, Any] | None:
        values = []
        for axis, n in zip(reversed(self.axes), reversed(self.sizes)):
            i, k = divmod(i, n)
            values.append(axis.values[k])
        a = dict(zip(self.names, reversed(values)))
        return a if self._in_world(a) else None

    def index(self, values: tuple[Any, ...]) -> int | None:
        i = 0
        for pos, n, v in zip(self._pos, self.sizes, values):
            k = pos.get(v)
            if k is None:
                return None
            i = i * n + k
        return i if self._in_world(dict(zip(self.names, values))) else None


def assignments(axes: tuple[Axis, ...], max_world: int) -> Iterator[dict[str, Any]]:
    """Every assignment, simplest first (the product of the axes' value lists),
    with tp x dp <= max_world."""
    e = Enumeration(axes, max_world)
    for i in range(len(e)):
        a = e.get(i)
        if a is not None:
            yield a


def world_axes(axes: tuple[Axis, ...], max_world: int) -> tuple[Axis, ...]:
    """The axes with tp and dp limited to values <= max_world."""
    return tuple(Axis(a.name, tuple(v for v in a.values if v <= max_world), a.apply)
                 if a.name in ("tp", "dp") else a for a in axes)


def axes_dict(axes: tuple[Axis, ...], max_world: int) -> dict[str, list[Any]]:
    """The axes and their values, as reported (tp/dp limited by max_world)."""
    return {a.name: list(a.values) for a in world_axes(axes, max_world)}


__all__ = ["Axis", "DEFAULT_MAX_WORLD", "Enumeration", "SPACES", "assignment_scenario", "assignments", "axes_dict", "world_axes",
           "base_scenario", "classify", "restrict", "space_axes"]
