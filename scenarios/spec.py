"""The Scenario spec: what one MoE layer execution looks like.

Frozen dataclasses, validated on construction. Every derived quantity the
runner programs and both interpreters depend on (sequence parallelism,
moe_tp/moe_ep, all-to-all kernel use, padding widths) is computed here and
only here, following docs/runner_semantics.md.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any

from scenarios import layout
from scenarios.backends import backend_info, rounded_hidden, sp_backends, too_wide_for

# The sections and their caps live in scenarios/spec_sections.py; every name stays importable here.
from scenarios.spec_sections import (  # noqa: F401
    DEFAULT_PROFILE,
    FUSION_MAX_TOKENS,
    KERNEL_CHOICES,
    LATENT_UP_PARALLEL,
    MAX_EXPERTS,
    MAX_ROUTED_PAIRS,
    MAX_TOKENS,
    MAX_TOP_K,
    MAX_TOTAL_TOKENS,
    MAX_WIDTH,
    MAX_WORLD,
    PHASES,
    PLATFORMS,
    PROFILES,
    SP_VERSIONS,
    ModelTraits,
    ParallelConfig,
    Runtime,
    ScenarioError,
    Workload,
    _non_negative,
    _positive,
)


@dataclass(frozen=True)
class Scenario:
    name: str = "scenario"
    summary: str = ""
    model: ModelTraits = field(default_factory=ModelTraits)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    runtime: Runtime = field(default_factory=Runtime)
    workload: Workload = field(default_factory=Workload)
    kernel: str = "auto"
    runner: str = "fixed"
    # The routed kernel writes its output unpadded (routed width) from a padded input.
    kernel_writes_unpadded: bool = False

    def __post_init__(self) -> None:
        self.validate()

    # A frozen scenario's derived quantities are computed once (cached_property
    # keeps them in the instance dict, beside the fields) and so is its hash:
    # the simulator asks them per op and keys its caches by the scenario.
    def __hash__(self) -> int:
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in fields(self)))
            object.__setattr__(self, "_hash", h)
        return h

    def __getstate__(self) -> dict[str, Any]:
        # Pickled and copied as its fields: the cached hash is this process's
        # (string hashes are salted per process), the derived ones are redone.
        return self.field_values()

    def field_values(self) -> dict[str, Any]:
        """The fields only (not the cached derived quantities): what a copy
        of the scenario under another class is built from."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def validate(self) -> None:
        self.model.validate()
        self.parallel.validate()
        self.runtime.validate()
        self.workload.validate()
        if self.kernel not in KERNEL_CHOICES:
            raise ScenarioError(
                "kernel", f"unknown kernel {self.kernel!r} (known: {', '.join(KERNEL_CHOICES)})"
            )
        if not isinstance(self.runner, str) or not self.runner:
            raise ScenarioError("runner", "must be a non-empty runner name or module:Class")
        if not isinstance(self.kernel_writes_unpadded, bool):
            raise ScenarioError("kernel_writes_unpadded", f"must be true or false, got {self.kernel_writes_unpadded!r}")
        self._validate_backend_width()
        m, p = self.model, self.parallel
        tokens = self.workload.tokens
        if isinstance(tokens, tuple) and len(tokens) != p.dp:
            raise ScenarioError(
                "workload.tokens", f"a list needs one count per DP rank: {len(tokens)} counts for dp={p.dp}"
            )
        total = self.total_tokens
        if total > MAX_TOTAL_TOKENS:
            how = f"{tokens} x {p.dp}" if isinstance(tokens, int) else "+".join(map(str, tokens))
            raise ScenarioError(
                "workload.tokens", f"at most {MAX_TOTAL_TOKENS} tokens over all DP ranks, got {how} = {total}"
            )
        if total * m.top_k > MAX_ROUTED_PAIRS:
            raise ScenarioError(
                "workload.tokens",
                f"at most {MAX_ROUTED_PAIRS} routed token-expert pairs (tokens x dp x top_k), got {total * m.top_k}",
            )
        self._check_dispatch_capacity()
        size_field = "parallel.ep_size" if p.ep_size is not None else None
        if m.moe_intermediate % self.moe_tp:
            raise ScenarioError(
                size_field or "parallel.tp",
                f"moe intermediate {m.moe_intermediate} is not divisible by moe_tp={self.moe_tp}",
            )
        if m.num_experts % self.moe_ep:
            raise ScenarioError(
                size_field or "parallel.ep",
                f"{m.num_experts} experts are not divisible by moe_ep={self.moe_ep}",
            )
        self._validate_row_parallel_up()
        if m.has_shared and not self.sp and m.shared_inter % p.tp:
            raise ScenarioError(
                "parallel.tp",
                f"shared intermediate {m.shared_inter} is not divisible by tp={p.tp}",
            )

    def _validate_row_parallel_up(self) -> None:
        m, tp = self.model, self.parallel.tp
        if m.latent_up_parallel != "row":
            return
        if m.latent_dim is not None and m.latent_dim % tp:
            raise ScenarioError("model.latent_up_parallel",
                                f"row needs latent_dim {m.latent_dim} divisible by tp={tp}")
        if self.sp:
            raise ScenarioError("model.latent_up_parallel",
                                "row needs every TP rank to hold the same tokens; sequence-parallel MoE slices them")

    def _validate_backend_width(self) -> None:
        m, backend = self.model, self.parallel.backend
        if self.use_all2all_kernels and too_wide_for(backend, m.routed_width):
            field_name = "model.latent_dim" if m.has_transform else "model.hidden"
            raise ScenarioError(
                field_name, f"width {m.routed_width} exceeds the largest size {backend} is compiled for (8192)"
            )

    def _check_dispatch_capacity(self) -> None:
        """A rank dispatching more rows than the static capacity is the
        engine's error (its buffers cannot hold the batch), not a runner
        decision: refused here, as neither interpreter could run it."""
        cap = self.parallel.max_dispatch_tokens
        if cap is None or self.effective_backend == "none":
            return
        d = max(range(self.parallel.dp), key=self.layer_rows)
        if self.layer_rows(d) > cap:
            raise ScenarioError(
                "parallel.max_dispatch_tokens",
                f"DP rank {d} dispatches {self.layer_rows(d)} rows per rank, more than the static capacity "
                f"{cap} (the engine's dispatch buffers cannot hold them)",
            )

    # ---- derived quantities (runner_semantics.md, "Parallel configuration") ----

    @cached_property
    def backend_width(self) -> int | None:
        """Width the all-to-all backend rounds the routed rows up to (None: any)."""
        if not self.use_all2all_kernels:
            return None
        return rounded_hidden(self.parallel.backend, self.model.routed_width)

    @cached_property
    def kernel_width(self) -> int:
        """Width the routed kernel works in: the model's own padding or the
        backend's rounding, whichever is wider."""
        return max(self.model.kernel_width, self.backend_width or 0)

    @cached_property
    def padded(self) -> bool:
        return self.kernel_width != self.model.routed_width

    @cached_property
    def expert_output_width(self) -> int:
        """Width of the routed experts' output (unpadded if the kernel says so)."""
        return self.model.routed_width if self.kernel_writes_unpadded else self.kernel_width

    @cached_property
    def world(self) -> int:
        return self.parallel.world

    @cached_property
    def moe_tp(self) -> int:
        return self.parallel.world // self.moe_ep

    @cached_property
    def moe_ep(self) -> int:
        p = self.parallel
        if p.ep_size is not None:
            return p.ep_size
        return p.world if p.ep else 1

    @cached_property
    def sp(self) -> bool:
        p = self.parallel
        return (
            p.ep and p.tp > 1 and p.dp > 1 and p.backend in sp_backends(p.version)
        )

    @cached_property
    def next_layer_fuses_reduce(self) -> bool:
        """The model hands the layer output to the next layer's fused all-reduce
        (+ residual + RMSNorm) over tp instead of expecting it reduced: fusion
        on, tp > 1, one DP rank (no DP attention, so no all-to-all kernels and
        the MoE output is a TP partial) and 0 < T <= FUSION_MAX_TOKENS.
        A non-linear routed-output transform needs the complete routed sum, so
        the layer reduces before it and its output is no partial to hand on
        (the next layer's all-reduce would sum tp complete copies)."""
        p = self.parallel
        return (
            self.runtime.allreduce_fusion
            and p.tp > 1
            and p.dp == 1
            and 0 < self.total_tokens <= FUSION_MAX_TOKENS
            and not self.model.transform_nonlinear
        )

    @cached_property
    def use_all2all_kernels(self) -> bool:
        return self.parallel.ep and (self.parallel.dp > 1 or self.sp)

    @cached_property
    def use_fi_two_sided(self) -> bool:
        return self.use_all2all_kernels and self.parallel.backend == "flashinfer_nvlink_two_sided"

    @cached_property
    def effective_backend(self) -> str:
        """The prepare/finalize actually in use ('none' without all-to-all kernels).

        Without EP, DP > 1 still gathers tokens naively over the DP group.
        """
        if self.use_all2all_kernels:
            return self.parallel.backend
        if self.parallel.dp > 1:
            return "allgather_reducescatter"
        return "none"

    # ---- tokens per DP rank (every consumer asks these, never workload.tokens) ----

    @cached_property
    def token_counts(self) -> tuple[int, ...]:
        """Tokens of each DP rank (workload.tokens as one count per DP rank)."""
        t = self.workload.tokens
        return t if isinstance(t, tuple) else (t,) * self.parallel.dp

    def dp_tokens(self, d: int) -> int:
        """Tokens the model hands DP rank d's layer."""
        return self.token_counts[d]

    @cached_property
    def total_tokens(self) -> int:
        return sum(self.token_counts)

    @cached_property
    def uneven_tokens(self) -> bool:
        return len(set(self.token_counts)) > 1

    def layer_rows(self, d: int) -> int:
        """Token rows each rank of DP rank d holds inside the layer (its SP
        slice, ceil(T_d / tp), or all T_d tokens without SP)."""
        t = self.dp_tokens(d)
        return -(-t // self.parallel.tp) if self.sp else t

    def rank_rows(self, rank: int) -> int:
        """layer_rows of a world rank's DP rank."""
        return self.layer_rows(self.coords(rank)[0])

    def group_rows(self, kind: str, rank: int) -> tuple[int, ...]:
        """Layer rows of each member of `rank`'s group, in group order: the
        `sizes` a runner passes to Ops.reduce_scatterv to undo an all_gatherv
        of the members' layer tokens."""
        return tuple(self.rank_rows(m) for m in self.group(kind, rank))

    @cached_property
    def sp_tokens(self) -> int:
        """Token rows a rank holds inside the layer (SP slices, padded to tp);
        with uneven DP tokens the most any rank holds (see layer_rows)."""
        return max(self.layer_rows(d) for d in range(self.parallel.dp))

    @cached_property
    def local_experts(self) -> int:
        return self.model.num_experts // self.moe_ep

    @property
    def kernel_choice(self) -> str:
        """The kernel named by the scenario; "auto" is resolved by the real runner
        for its device (torch on CPU, triton on CUDA)."""
        return self.kernel

    @property
    def cost_profile(self) -> str:
        return self.runtime.cost_profile

    def coords(self, rank: int) -> tuple[int, int]:
        """(dp_rank, tp_rank) of a world rank; rank = dp_rank * tp + tp_rank."""
        tp = self.parallel.tp
        return rank // tp, rank % tp

    def group(self, kind: str, rank: int) -> tuple[int, ...]:
        """World ranks of `rank`'s group of the given kind (tp, dp, ep, world,
        moe_ep, moe_tp). `ep` is the whole MoE group under EP (what dispatch
        and combine span), whatever ep_size; moe_ep/moe_tp are its two axes."""
        tp, dp = self.parallel.tp, self.parallel.dp
        d, t = self.coords(rank)
        if kind in layout.MOE_GROUPS:
            return layout.moe_group(self, kind, rank)
        if kind == "tp":
            return tuple(d * tp + i for i in range(tp))
        if kind == "dp":
            return tuple(i * tp + t for i in range(dp))
        if kind in ("ep", "world"):
            if kind == "ep" and not self.parallel.ep:
                return (rank,)
            return tuple(range(tp * dp))
        raise ValueError(f"unknown group kind {kind!r} (known: tp, dp, ep, world, moe_ep, moe_tp)")

    def dispatch_group(self, rank: int) -> tuple[tuple[int, ...], bool]:
        """(members, token_routing) of `rank`'s dispatch/combine: token-routing
        backends and SP use the EP group; the naive gather otherwise uses DP."""
        token_routing = backend_info(self.effective_backend).token_routing
        if token_routing or self.sp:
            return self.group("ep", rank), token_routing
        return self.group("dp", rank), False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_(self, **changes: Any) -> Scenario:
        """A copy with top-level or dotted changes, e.g. with_(**{"parallel.tp": 4})."""
        top: dict[str, Any] = {}
        nested: dict[str, dict[str, Any]] = {}
        for key, value in changes.items():
            if "." in key:
                section, attr = key.split(".", 1)
                nested.setdefault(section, {})[attr] = value
            else:
                top[key] = value
        for section, attrs in nested.items():
            top[section] = replace(getattr(self, section), **attrs)
        return replace(self, **top)

    def derived(self) -> dict[str, Any]:
        return {
            "world": self.world,
            "sp": self.sp,
            "moe_tp": self.moe_tp,
            "moe_ep": self.moe_ep,
            "ep_size": self.parallel.ep_size,
            "use_all2all_kernels": self.use_all2all_kernels,
            "next_layer_fuses_reduce": self.next_layer_fuses_reduce,
            "use_fi_two_sided": self.use_fi_two_sided,
            "effective_backend": self.effective_backend,
            "padded": self.padded,
            "kernel_width": self.kernel_width,
            "backend_kernel_width": self.backend_width,
            "expert_output_width": self.expert_output_width,
            "backend_ignored": self.parallel.backend_ignored,
            "rows_per_rank": self.sp_tokens,
            "rows_per_dp_rank": [self.layer_rows(d) for d in range(self.parallel.dp)],
            "local_experts": self.local_experts,
            "kernel": self.kernel_choice,
            "profile": self.cost_profile,
        }

    def summary_line(self) -> str:
        m, p = self.model, self.parallel
        bits = [f"tp={p.tp}", f"dp={p.dp}"]
        if p.ep:
            bits.append("ep" if p.ep_size is None else f"ep_size={p.ep_size} (moe_ep={self.moe_ep} x moe_tp={self.moe_tp})")
        if p.eplb:
            bits.append("eplb")
        if self.use_all2all_kernels or p.dp > 1:
            bits.append(self.effective_backend)
        if self.sp:
            bits.append("SP")
        if self.next_layer_fuses_reduce:
            bits.append("fused-AR-next")
        shape = f"H={m.hidden}"
        if self.padded:
            shape += f"->{self.kernel_width}"
        if m.latent_dim:
            shape += f" latent={m.latent_dim}" + (" nonlinear" if m.transform_nonlinear else "")
            if m.latent_up_parallel == "row":
                shape += " up=row"
        shape += f" E={m.num_experts} k={m.top_k} I={m.moe_intermediate}"
        if m.has_shared:
            shape += f" shared={m.num_shared_experts}"
        if m.quantized_input:
            shape += " quantized-input"
        if m.weight_block_size is not None:
            shape += f" block={m.weight_block_size}"
        if m.routed_scaling_factor != 1.0:
            shape += f" rsf={m.routed_scaling_factor:g}"
        rt = self.runtime
        # Knobs a finding may hinge on: a minimal scenario's one line names them.
        plat = rt.platform + ("+aux" if rt.aux_stream else "") + ("+ar-fusion" if rt.allreduce_fusion else "") + (
            "+shared-fusion" if rt.shared_experts_fusion else "")
        phase = "" if self.workload.phase == "decode" else f" {self.workload.phase}"
        return f"{shape}; {' '.join(bits)}; {plat}; T={self._tokens_label()}{phase}"

    def _tokens_label(self) -> str:
        t = self.workload.tokens
        return str(t) if isinstance(t, int) else "[" + ",".join(map(str, t)) + "]"


# Reading and writing scenarios lives in scenarios/spec_io.py; these names stay importable from here.
from scenarios.spec_io import (  # noqa: E402
    SECTIONS,
    TOP_LEVEL,
    TOP_LEVEL_FLAGS,
    scenario_from_dict,
    scenario_to_toml,
)

__all__ = [
    "SECTIONS",
    "TOP_LEVEL",
    "TOP_LEVEL_FLAGS",
    "ModelTraits",
    "ParallelConfig",
    "Runtime",
    "Scenario",
    "ScenarioError",
    "Workload",
    "scenario_from_dict",
    "scenario_to_toml",
]
