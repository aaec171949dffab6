"""The sections of a Scenario (scenarios/spec.py): the model's shape, the
parallel configuration, the runtime and the workload, each a frozen dataclass
validated on its own, and the size caps they are validated against.

Every name here stays importable from scenarios.spec."""

from __future__ import annotations

from dataclasses import dataclass

from scenarios.backends import BACKENDS, backend_info, exists_in


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
