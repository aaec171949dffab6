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
from scenarios.backends import (
    BACKENDS,
    backend_info,
    exists_in,
    rounded_hidden,
    sp_backends,
    too_wide_for,
)


class ScenarioError(ValueError):
    """An invalid scenario: the message names the field and the rule."""

    def __init__(self, field_name: str, rule: str) -> None:
        super().__init__(f"{field_name}: {rule}")
        self.field_name = field_name
        self.rule = rule


PLATFORMS = ("cuda", "cpu", "rocm")
KERNEL_CHOICES = ("auto", "torch", "triton", "flashinfer")
LATENT_UP_PARALLEL = ("replicated", "row")  # ModelTraits.latent_up_parallel
PHASES = ("decode", "prefill")
PROFILES = ("h100", "h200", "b200", "mi300x", "mi355x", "cpu")
SP_VERSIONS = ("newest", "previous")
# The cost profile a platform gets unless runtime.profile names one.
DEFAULT_PROFILE = {"cuda": "h100", "rocm": "mi300x", "cpu": "cpu"}
# Size caps: anything within them simulates in seconds on one core (README,
# "Sizes"); beyond them a scenario is refused with one line (exit 2).
MAX_TOKENS = 65536  # per DP rank: routing is generated per token
MAX_TOTAL_TOKENS = 262144  # over all DP ranks
MAX_ROUTED_PAIRS = 2**21  # total tokens x top_k: the routing arrays
MAX_EXPERTS = 4096
MAX_TOP_K = 64
MAX_WORLD = 1024  # ranks (tp x dp)
# Any layer width (hidden, intermediates, padded and latent widths): 16x the
# widest released MoE layer, and with MAX_TOTAL_TOKENS rows a tensor stays
# below the simulator's value cap (scenarios/contain.py MAX_ELEMENTS), so a
# wide scenario is refused as bad input, never blamed on the runner.
MAX_WIDTH = 1 << 20
# The next layer's fused all-reduce + residual + RMSNorm runs for at most this
# many tokens (SGLang's FlashInfer fusion: 0 < T <= 2048, moe_block.md section 5).
FUSION_MAX_TOKENS = 2048


def _positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(name, f"must be an integer, got {value!r}")
    if value <= 0:
        raise ScenarioError(name, f"must be > 0, got {value}")


def _non_negative(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(name, f"must be an integer, got {value!r}")
    if value < 0:
        raise ScenarioError(name, f"must be >= 0, got {value}")


@dataclass(frozen=True)
class ModelTraits:
    """Shape of one MoE layer."""

    hidden: int = 128
    moe_intermediate: int = 64
    num_experts: int = 8
    top_k: int = 2
    num_shared_experts: int = 0
    # Intermediate width of the shared-expert MLP; defaults to
    # moe_intermediate * num_shared_experts (one fused MLP, as engines build it).
    shared_intermediate: int | None = None
    # Width the routed kernel needs (e.g. 2880 -> 3072 for an MXFP4 path).
    # None: no padding.
    moe_hidden: int | None = None
    # Latent MoE: routed experts work in this width; a down-projection feeds
    # them and an up-projection (the routed output transform) maps back.
    latent_dim: int | None = None
    # A non-linear routed-output transform must see the reduced routed output.
    transform_nonlinear: bool = False
    # How the latent up-projection's weights are laid out over the TP group:
    # "replicated" (every rank holds all of it) or "row" (row-parallel: TP
    # rank t holds the rows of latent slice t and emits a TP partial).
    latent_up_parallel: str = "replicated"
    routed_scaling_factor: float = 1.0
    # The routed experts quantize their input into a new buffer (an fp8 path):
    # the routed kernel then never reads, nor writes in place, the buffer the
    # shared experts read.
    quantized_input: bool = False
    # The weights' quantization scale block along the intermediate dimension
    # (FP8 block scales 128, NVFP4 16); None: unquantized. TensorRT-LLM caps
    # the shared MLP's TP size by it (scenarios/trtllm.py); the other runners
    # do not read it.
    weight_block_size: int | None = None

    def validate(self) -> None:
        for name in ("hidden", "moe_intermediate", "num_experts", "top_k"):
            _positive(f"model.{name}", getattr(self, name))
        if self.num_shared_experts < 0:
            raise ScenarioError("model.num_shared_experts", f"must be >= 0, got {self.num_shared_experts}")
        if self.num_experts > MAX_EXPERTS:
            raise ScenarioError("model.num_experts", f"at most {MAX_EXPERTS} experts, got {self.num_experts}")
        if self.top_k > MAX_TOP_K:
            raise ScenarioError("model.top_k", f"at most {MAX_TOP_K}, got {self.top_k}")
        self._validate_widths()
        if self.top_k > self.num_experts:
            raise ScenarioError(
                "model.top_k", f"top_k {self.top_k} > num_experts {self.num_experts}"
            )
        if self.shared_intermediate is not None:
            _positive("model.shared_intermediate", self.shared_intermediate)
            if self.num_shared_experts == 0:
                raise ScenarioError(
                    "model.shared_intermediate", "set but num_shared_experts is 0"
                )
        if self.latent_dim is not None:
            _positive("model.latent_dim", self.latent_dim)
            if self.latent_dim >= self.hidden:
                raise ScenarioError(
                    "model.latent_dim",
                    f"latent {self.latent_dim} must be smaller than hidden {self.hidden}",
                )
        elif self.transform_nonlinear:
            raise ScenarioError("model.transform_nonlinear", "needs model.latent_dim")
        self._validate_latent_up_parallel()
        if self.moe_hidden is not None:
            _positive("model.moe_hidden", self.moe_hidden)
            if self.moe_hidden < self.routed_width:
                raise ScenarioError(
                    "model.moe_hidden",
                    f"padded width {self.moe_hidden} < routed input width {self.routed_width}",
                )
        if not isinstance(self.quantized_input, bool):
            raise ScenarioError("model.quantized_input", f"must be bool, got {self.quantized_input!r}")
        if self.weight_block_size is not None:
            _positive("model.weight_block_size", self.weight_block_size)
            if self.has_shared and self.shared_inter % self.weight_block_size:
                raise ScenarioError(
                    "model.weight_block_size",
                    f"shared intermediate {self.shared_inter} is not a multiple of the block {self.weight_block_size}",
                )
        if not (0 < self.routed_scaling_factor < float("inf")):
            raise ScenarioError(
                "model.routed_scaling_factor", f"must be finite and > 0, got {self.routed_scaling_factor}"
            )

    def _validate_widths(self) -> None:
        widths = {"model.hidden": self.hidden, "model.moe_intermediate": self.moe_intermediate,
                  # unset: moe_intermediate x num_shared_experts (one fused MLP)
                  ("model.shared_intermediate" if self.shared_intermediate is not None
                   else "model.num_shared_experts (shared width)"): self.shared_inter if self.has_shared else 0,
                  "model.moe_hidden": self.moe_hidden or 0, "model.latent_dim": self.latent_dim or 0}
        for name, width in widths.items():
            if isinstance(width, int) and width > MAX_WIDTH:
                raise ScenarioError(name, f"at most {MAX_WIDTH:,} wide, got {width:,}")

    def _validate_latent_up_parallel(self) -> None:
        name, value = "model.latent_up_parallel", self.latent_up_parallel
        if value not in LATENT_UP_PARALLEL:
            raise ScenarioError(name, f"unknown layout {value!r} (known: {', '.join(LATENT_UP_PARALLEL)})")
        if value == "row" and self.latent_dim is None:
            raise ScenarioError(name, "row needs model.latent_dim (there is no up-projection to split)")
        if value == "row" and self.transform_nonlinear:
            raise ScenarioError(name, "row emits partial sums, which a non-linear transform cannot be applied to")

    @property
    def has_shared(self) -> bool:
        return self.num_shared_experts > 0

    @property
    def has_transform(self) -> bool:
        return self.latent_dim is not None

    @property
    def routed_width(self) -> int:
        """Width of the routed experts' input before padding."""
        return self.latent_dim if self.latent_dim is not None else self.hidden

    @property
    def kernel_width(self) -> int:
        """Width the routed kernel works in (padded if the kernel needs it)."""
        return self.moe_hidden if self.moe_hidden is not None else self.routed_width

    @property
    def padded(self) -> bool:
        return self.kernel_width != self.routed_width

    @property
    def shared_width(self) -> int:
        return self.hidden

    @property
    def shared_inter(self) -> int:
        if self.shared_intermediate is not None:
            return self.shared_intermediate
        return self.moe_intermediate * self.num_shared_experts


@dataclass(frozen=True)
class ParallelConfig:
    tp: int = 1
    dp: int = 1
    ep: bool = False
    eplb: bool = False
    backend: str = "allgather_reducescatter"
    # Which engine version's SP backend list applies (runner_semantics.md):
    # deepep_v2 and flashinfer_nvlink_one_sided are SP only in the newest.
    version: str = "newest"
    # Expert-parallel size inside the MoE group (world = tp x dp): None = EP
    # over every rank when `ep`, else none. Set: moe_ep = ep_size and
    # moe_tp = world / ep_size (scenarios/layout.py).
    ep_size: int | None = None
    # Static per-rank dispatch capacity (e.g. DeepEP low-latency's max dispatch
    # tokens per rank, 128 in engines by default), fixed when the buffers are
    # built. None: sized at run time from the gathered counts.
    max_dispatch_tokens: int | None = None

    def validate(self) -> None:
        _positive("parallel.tp", self.tp)
        _positive("parallel.dp", self.dp)
        if self.backend not in BACKENDS:
            raise ScenarioError(
                "parallel.backend",
                f"unknown backend {self.backend!r} (known: {', '.join(BACKENDS)})",
            )
        if self.version not in SP_VERSIONS:
            raise ScenarioError(
                "parallel.version", f"unknown version {self.version!r} (known: {', '.join(SP_VERSIONS)})"
            )
        if self.tp * self.dp > MAX_WORLD:
            raise ScenarioError(
                "parallel", f"at most {MAX_WORLD} ranks (tp x dp), got {self.tp} x {self.dp} = {self.tp * self.dp}"
            )
        if not exists_in(self.backend, self.version):
            raise ScenarioError(
                "parallel.backend", f"{self.backend} exists in the newest version only (parallel.version = {self.version!r})"
            )
        if self.max_dispatch_tokens is not None:
            _positive("parallel.max_dispatch_tokens", self.max_dispatch_tokens)
        if self.eplb and not self.ep:
            raise ScenarioError("parallel.eplb", "EPLB needs expert parallelism (parallel.ep = true)")
        if self.eplb and self.world == 1:
            raise ScenarioError("parallel.eplb", "EPLB needs more than one rank (tp x dp > 1)")
        # A token-routing backend without EP is not rejected: the engine ignores
        # it and uses what it uses without EP (Scenario.backend_ignored).
        if self.ep_size is not None:
            self._validate_ep_size()

    def _validate_ep_size(self) -> None:
        _positive("parallel.ep_size", self.ep_size)  # type: ignore[arg-type]
        world = self.world
        if not self.ep:
            raise ScenarioError("parallel.ep_size", "needs expert parallelism (parallel.ep = true)")
        if world % self.ep_size:  # type: ignore[operator]
            raise ScenarioError("parallel.ep_size", f"must divide the world tp x dp = {world}, got {self.ep_size}")
        if backend_info(self.backend).token_routing and self.ep_size != world:
            raise ScenarioError(
                "parallel.ep_size",
                f"{self.backend} routes tokens over every rank and needs ep_size = tp x dp = {world}, got {self.ep_size}",
            )

    @property
    def backend_ignored(self) -> bool:
        """The configured all-to-all backend is ignored for want of EP."""
        return not self.ep and backend_info(self.backend).token_routing

    @property
    def world(self) -> int:
        return self.tp * self.dp


@dataclass(frozen=True)
class Runtime:
    """Platform being modeled (not necessarily the one executing)."""

    platform: str = "cpu"
    aux_stream: bool = False
    token_threshold: int = 256
    profile: str | None = None  # cost profile; default by platform
    # The engine fuses the next layer's input all-reduce with its residual add
    # and RMSNorm (one kernel), so the MoE layer may leave its sum to it.
    allreduce_fusion: bool = False
    # The engine may fuse the shared experts into the routed kernel as one more
    # expert slot (SGLang's shared-experts fusion); its rules decide when.
    shared_experts_fusion: bool = False

    def validate(self) -> None:
        if self.platform not in PLATFORMS:
            raise ScenarioError(
                "runtime.platform", f"unknown platform {self.platform!r} (known: {', '.join(PLATFORMS)})"
            )
        if self.token_threshold < 0:
            raise ScenarioError("runtime.token_threshold", f"must be >= 0, got {self.token_threshold}")
        if self.profile is not None and self.profile not in PROFILES:
            raise ScenarioError(
                "runtime.profile", f"unknown profile {self.profile!r} (known: {', '.join(PROFILES)})"
            )

    @property
    def cost_profile(self) -> str:
        if self.profile is not None:
            return self.profile
        return DEFAULT_PROFILE[self.platform]


@dataclass(frozen=True)
class Workload:
    # Tokens per DP rank (decode batch or prefill chunk): one int for every DP
    # rank, or one count per DP rank (a list in TOML, kept as a tuple).
    tokens: int | tuple[int, ...] = 8
    seed: int = 0
    skew: float = 0.0  # 0 = uniform routing; towards 1 = a few hot experts
    # "decode" or "prefill" (an extend batch): engines pick the DP gather's
    # padding by it (SGLang: SUM_LEN for prefill under DP attention).
    phase: str = "decode"

    def __post_init__(self) -> None:
        if isinstance(self.tokens, list):  # TOML arrays; a tuple keeps the scenario hashable
            object.__setattr__(self, "tokens", tuple(self.tokens))

    def validate(self) -> None:
        listed = isinstance(self.tokens, tuple)
        counts = self.tokens if listed else (self.tokens,)
        if not counts:
            raise ScenarioError("workload.tokens", "a list needs one count per DP rank, got []")
        for i, t in enumerate(counts):
            where = f"workload.tokens[{i}]" if listed else "workload.tokens"
            # A 0 in a list is an idle DP rank (a real case); one count for every rank must be > 0.
            (_non_negative if listed else _positive)(where, t)
            if t > MAX_TOKENS:
                raise ScenarioError(
                    where, f"at most {MAX_TOKENS} tokens per rank (a large prefill chunk), got {t}"
                )
        if sum(counts) == 0:
            raise ScenarioError("workload.tokens", "every DP rank is idle: at least one token is needed")
        if not 0.0 <= self.skew < 1.0:
            raise ScenarioError("workload.skew", f"must be in [0, 1), got {self.skew}")
        if self.phase not in PHASES:
            raise ScenarioError("workload.phase", f"unknown phase {self.phase!r} (known: {', '.join(PHASES)})")


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
            shape += f" latent={m.latent_dim}"
            if m.latent_up_parallel == "row":
                shape += " up=row"
        shape += f" E={m.num_experts} k={m.top_k} I={m.moe_intermediate}"
        if m.has_shared:
            shape += f" shared={m.num_shared_experts}"
        if m.quantized_input:
            shape += " quantized-input"
        if m.weight_block_size is not None:
            shape += f" block={m.weight_block_size}"
        rt = self.runtime
        plat = rt.platform + ("+aux" if rt.aux_stream else "")
        return f"{shape}; {' '.join(bits)}; {plat}; T={self._tokens_label()}"

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
