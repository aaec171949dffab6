"""The runner base class: `MoERunner`, whose `forward` is a sequence of small
named decision methods (docs/runner_semantics.md), and the order function
(Order and the modular-kernel stand-in: scenarios/runner_types.py). Presets
and loading live in scenarios/runners.py, which re-exports everything here.
"""

from __future__ import annotations

from typing import Any

from scenarios.backends import backend_info, eplb_overlap_safe
from scenarios.dispatch_layout import DispatchLayout
from scenarios.ops import Ops

# Moved to scenarios/runner_types.py; every name stays importable here.
from scenarios.runner_types import (  # noqa: F401
    OVERLAPPED,
    ModularKernel,
    Order,
    RunnerLoadError,
    RunnerUnsupported,
    engine_refusal,
)
from scenarios.spec import Scenario


def overlap_disabled(s: Scenario) -> bool:
    """Rule 1 of the order function: overlap is unsafe or pointless here."""
    # The engine checks the backend name given in the config, even where no
    # all-to-all kernel ends up in use (runner_semantics.md step 3.1).
    eplb_unsafe = s.parallel.eplb and not eplb_overlap_safe(s.parallel.backend, s.parallel.version)
    return eplb_unsafe or s.use_fi_two_sided


def reference_order(s: Scenario, num_tokens: int) -> Order:
    """The fixed order function (runner_semantics.md step 3). The simulator also
    uses it as the best safe order when judging LOST_OVERLAP."""
    if overlap_disabled(s):
        return Order.NO_OVERLAP
    return overlap_order(s, num_tokens)


def overlap_order(s: Scenario, num_tokens: int) -> Order:
    """Rules 2-4 of the order function: the overlap the platform offers."""
    if s.use_all2all_kernels and backend_info(s.effective_backend).async_shared_overlap:
        return Order.MK_INTERNAL_OVERLAPPED
    rt = s.runtime
    if multi_stream_platform(s) and rt.aux_stream and num_tokens <= rt.token_threshold:
        return Order.MULTI_STREAM_OVERLAPPED
    return Order.NO_OVERLAP


def multi_stream_platform(s: Scenario) -> bool:
    """Rule 3's platform check: the newest engine version treats every
    CUDA-alike platform (CUDA, ROCm) alike; the previous one overlapped on
    CUDA only (moe_block.md section 8)."""
    if s.parallel.version == "newest":
        return s.runtime.platform in ("cuda", "rocm")
    return s.runtime.platform == "cuda"


class EngineRules(DispatchLayout):
    """What the engine itself guarantees about shared-expert overlap: the
    simulator's yardstick for UNSAFE_OVERLAP (overlap the contract forbids)
    and LOST_OVERLAP (the best safe order), never a decision of the runner
    under test (a wrong variant overrides its decisions, not these). Also
    the engine's dispatch layout (DispatchLayout: whether all-to-all kernels
    run, the backend in use, whether tokens are sliced over attention TP),
    which dispatch, combine and the workload helpers follow; vLLM's here."""

    name = "vllm"

    def overlap_forbidden(self, s: Scenario) -> bool:
        return overlap_disabled(s)

    def forbidden_reason(self, s: Scenario) -> str:
        if s.use_fi_two_sided:
            return "FlashInfer NVLink two-sided kernels are in use (overlap must be off: no gain under DP, streams wasted)"
        return f"EPLB is on and {s.parallel.backend} is not EPLB-overlap safe"  # the configured name decides

    def best_safe_order(self, s: Scenario) -> Order:
        """The order the engine's reference logic picks for this scenario."""
        return reference_order(s, s.sp_tokens)

    def async_overlap_possible(self, s: Scenario) -> bool:
        return backend_info(s.effective_backend).async_shared_overlap

    def stream_available(self, s: Scenario, stream: str) -> bool:
        """Whether the modelled platform has this stream. The aux stream
        exists only on a CUDA-alike platform (vLLM's aux_stream() returns None
        elsewhere) and only when the scenario configures one; the main stream
        and the modular kernel's communication stream are the kernel's own."""
        if stream == "aux":
            return s.runtime.platform in ("cuda", "rocm") and s.runtime.aux_stream
        return True

    def missing_stream_consequence(self, stream: str) -> str:
        """What the engine does when work is launched on a stream it lacks."""
        return ("the engine crashes here: vLLM's SharedExperts.maybe_forward_async asserts that its "
                "aux stream exists, and aux_stream() is None off CUDA-alike platforms (or with "
                "VLLM_DISABLE_SHARED_EXPERTS_STREAM); it never silently serialises")


VLLM_RULES = EngineRules()


class MoERunner:
    """Base class of runner programs. Subclass and override decision points."""

    # The engine whose overlap contract judges this runner (EngineRules).
    engine_rules: EngineRules = VLLM_RULES

    name = "fixed"
    description = "reference logic (docs/runner_semantics.md)"

    def __init__(self, scenario: Scenario) -> None:
        # Construction: the modular kernel does not exist yet (it is built
        # lazily in process_weights), exactly as in production runners.
        self.scenario = scenario
        self.kernel: ModularKernel | None = None

    # ---- lifecycle ----

    @classmethod
    def prepare_program(cls, scenario: Scenario) -> None:
        """Before the program runs (the simulator's ranks, or rank processes
        of a real run): work done once, in the launching process and outside
        the runner's wall-clock budget (e.g. an engine trace the ranks read
        but cannot produce). Nothing by default."""
        return None

    def engine_refusal(self) -> str | None:
        """Why the engine would refuse this configuration at start-up (None: accepted)."""
        return engine_refusal(self.scenario)

    def unsupported(self) -> str | None:
        """Why this runner does not model the scenario, or None. A reference
        runner of another engine declares what it leaves out here, so a
        scenario outside it is refused in one line instead of judged."""
        return None

    def process_weights(self, ops: Ops) -> None:
        """Lazy kernel build: only now does `output_is_reduced` have an answer."""
        s = self.scenario
        if s.use_all2all_kernels:
            backend = s.effective_backend
            self.kernel = ModularKernel(backend, self.backend_output_is_reduced(backend))

    # ---- decision points ----

    def backend_output_is_reduced(self, backend: str) -> bool:
        """What this runner's prepare/finalize class declares."""
        return backend_info(backend).output_is_reduced

    def is_sequence_parallel(self) -> bool:
        return self.scenario.sp

    def fused_output_is_reduced(self) -> bool:
        return self.kernel is not None and self.kernel.output_is_reduced()

    def shared_experts_order(self, num_tokens: int) -> Order:
        return reference_order(self.scenario, num_tokens)

    def shared_experts_sharded(self) -> bool:
        # Under SP the model builds the shared MLP unsharded.
        return not self.is_sequence_parallel()

    def routed_inplace(self, order: Order) -> bool:
        # In-place only when no shared expert reads the same input: none
        # exist, or the routed kernel writes its own quantized copy.
        m = self.scenario.model
        return not m.has_shared or m.quantized_input

    def should_pad(self) -> bool:
        # Padded by the model's kernel or by the all-to-all backend's rounding.
        return self.scenario.padded

    def routed_output_padded(self) -> bool:
        """The routed output still carries the padding (the kernel did not drop it)."""
        s = self.scenario
        return s.padded and not s.kernel_writes_unpadded

    def declared_output_width(self) -> int:
        """What the custom op's fake implementation promises: the padded width
        only when the padding is still there and trimmed after the op."""
        s, m = self.scenario, self.scenario.model
        if self.routed_output_padded() and not (m.has_shared or m.has_transform):
            return s.kernel_width
        return m.hidden

    def pre_trim_width(self) -> int | None:
        m = self.scenario.model
        if self.routed_output_padded() and (m.has_shared or m.has_transform):
            return m.routed_width
        return None

    def post_trim_width(self) -> int | None:
        # runner_semantics.md: shared_width if (transform and shared) else
        # routed_width if padded. For a latent MoE without shared experts that
        # would cut the up-projected output to the latent width, so we trim to
        # the layer's hidden width, which equals the spec in every other case.
        m = self.scenario.model
        if self.routed_output_padded() or (m.has_transform and m.has_shared):
            return m.hidden
        return None

    def shared_input(self, ops: Ops, x: Any) -> Any:
        return x

    def shared_after_routed(self, order: Order) -> bool:
        """Without overlap, the shared MLP runs on the main stream before the
        routed experts (so an in-place routed kernel cannot clobber its input)."""
        return False

    def launch_shared_on_aux(self, ops: Ops, x: Any, sharded: bool) -> tuple[Any, Any]:
        """MULTI_STREAM: the aux stream waits for the main stream's work so far,
        runs the shared MLP and records an event the main stream joins on."""
        fork = ops.record_event("fork_to_aux")
        with ops.stream("aux"):
            ops.wait_event(fork, name="aux_waits_fork")
            shared = self.run_shared(ops, x, sharded)
            done = ops.record_event("shared_done")
        return shared, done

    def maybe_reduce_shared(self, ops: Ops, shared: Any, routed_reduced: bool) -> Any:
        if shared is not None and not self.is_sequence_parallel() and routed_reduced:
            return ops.all_reduce(shared, "tp", name="shared_all_reduce")
        return shared

    def needs_pre_transform_reduce(self, reduced: bool) -> bool:
        """Step 6: a non-linear routed-output transform must see the reduced
        routed output, so reduce before it (newest version only; the previous
        one applies the transform first and reduces the result)."""
        s, m = self.scenario, self.scenario.model
        return (
            m.has_transform
            and m.transform_nonlinear
            and s.parallel.version == "newest"
            and not self.is_sequence_parallel()
            and (s.moe_tp > 1 or s.moe_ep > 1)
            and not reduced
        )

    def needs_pre_projection_reduce(self, reduced: bool) -> bool:
        """A row-parallel up-projection slices the complete routed output, so
        the routed output is reduced before it (in every version) unless the
        combine already did."""
        s = self.scenario
        return (self.up_projection_splits() and not self.is_sequence_parallel()
                and (s.moe_tp > 1 or s.moe_ep > 1) and not reduced)

    def latent_up_row_parallel(self) -> bool:
        """The latent up-projection is row-parallel over the TP group (TP rank t
        holds the rows of latent slice t): the model's weight layout decides
        (model.latent_up_parallel); replicated by default."""
        return self.scenario.model.latent_up_parallel == "row"

    def up_projection_splits(self) -> bool:
        """The up-projection emits a TP partial: row-parallel over more than one
        TP rank (over one rank it is the replicated projection)."""
        s = self.scenario
        return s.model.has_transform and self.latent_up_row_parallel() and s.parallel.tp > 1

    def reduced_after_transform(self, reduced: bool) -> bool:
        """Whether the routed output is still complete after the up-projection:
        a row-parallel one makes it a TP partial again, so the shared output is
        not reduced apart and the final all-reduce sums both."""
        return reduced and not self.up_projection_splits()

    def needs_final_reduce(self, routed_reduced: bool) -> bool:
        s = self.scenario
        return (
            not self.is_sequence_parallel()
            and (s.moe_tp > 1 or s.moe_ep > 1)
            and not routed_reduced
            and not self.defer_post_experts_reduce()
        )

    def defer_post_experts_reduce(self) -> bool:
        """Skip the post-experts reduction because someone downstream performs
        it: the next layer's fused all-reduce + residual + RMSNorm."""
        return self.scenario.next_layer_fuses_reduce

    def final_reduce(self, ops: Ops, result: Any, routed_reduced: bool) -> Any:
        if self.needs_final_reduce(routed_reduced):
            return ops.all_reduce(result, "tp", name="final_all_reduce")
        return result

    # ---- the program ----

    def model_forward(self, ops: Ops) -> Any:
        """Model side around the layer: SP slicing before, all-gather after."""
        x = ops.layer_input()
        tokens = x.shape[0]
        sp = self.scenario.sp  # the model's choice, not the runner's
        if sp:
            x = ops.sp_slice(x)
        out = self.forward(ops, x)
        if sp:
            out = ops.all_gather(out, "tp", name="sp_all_gather")
            out = ops.trim_rows(out, tokens, name="sp_drop_pad_rows")
        if self.scenario.next_layer_fuses_reduce:  # the model's choice too
            out = self.next_layer_fused_reduce(ops, out)
        return ops.layer_output(out)

    def next_layer_fused_reduce(self, ops: Ops, out: Any) -> Any:
        """The next layer's fused all-reduce over tp, where the deferred sum is
        completed (the layer output is judged after it: the values the next
        layer's residual add and RMSNorm consume; those two are not modelled)."""
        return ops.all_reduce(out, "tp", name="next_layer_fused_all_reduce")

    def forward(self, ops: Ops, x: Any) -> Any:
        """The layer: each decision is one of the small methods it calls, so a
        wrong variant is an override of one method, never a copy of this body."""
        rows = x.shape[0]
        routing = ops.router(x)
        routed_in = self.routed_input(ops, x)
        order = self.decide_order(ops, rows)
        sharded = self.shared_experts_sharded()
        shared, shared_done = self.shared_before_routed(ops, x, order, sharded)
        routed, inner_shared = self.routed_path(
            ops, routed_in, routing, order, self.shared_inside_routed(ops, x, order, sharded)
        )
        if inner_shared is not None:
            shared = inner_shared
        shared = self.shared_after_routed_path(ops, x, order, sharded, shared, shared_done)
        routed, reduced = self.finish_routed(ops, routed)
        shared = self.maybe_reduce_shared(ops, shared, reduced)
        after = shared is not None and self.shared_joins_after_reduce()
        result = self.join_outputs(ops, None if after else shared, routed)
        result = ops.boundary(result, (rows, self.declared_output_width()))
        result = self.final_reduce(ops, result, reduced)
        result = self.trim_output(ops, result)
        if after:
            result = ops.add(result, shared, name="shared_add_after_reduce")
        return result

    # ---- the steps forward() is made of ----

    def routed_input(self, ops: Ops, x: Any) -> Any:
        """The routed experts' input: latent-projected, then padded to the kernel width."""
        m = self.scenario.model
        routed_in = ops.latent_down(x) if m.has_transform else x
        if self.should_pad():
            routed_in = ops.pad(routed_in, self.scenario.kernel_width, name="pad_routed_input")
        return routed_in

    def decide_order(self, ops: Ops, rows: int) -> Order:
        order = self.shared_experts_order(rows) if self.scenario.model.has_shared else Order.NO_OVERLAP
        ops.decide("shared_experts_order", order.value)
        return order

    def runs_serially(self, order: Order) -> bool:
        """The shared experts run on the main stream, outside the routed path."""
        return self.scenario.model.has_shared and order in (Order.NO_OVERLAP, Order.EXTERNAL)

    def shared_before_routed(self, ops: Ops, x: Any, order: Order, sharded: bool) -> tuple[Any, Any]:
        """(shared output or None, event the main stream must join or None) for
        the shared experts launched before the routed path."""
        if self.runs_serially(order) and not self.shared_after_routed(order):
            return self.run_shared(ops, x, sharded), None
        if self.scenario.model.has_shared and order == Order.MULTI_STREAM_OVERLAPPED:
            return self.launch_shared_on_aux(ops, self.before_aux_fork(ops, x), sharded)
        return None, None

    def shared_inside_routed(self, ops: Ops, x: Any, order: Order, sharded: bool) -> Any:
        """MK_INTERNAL overlap: a callable the routed path runs between dispatch
        and combine; None otherwise."""
        if not (self.scenario.model.has_shared and order == Order.MK_INTERNAL_OVERLAPPED):
            return None
        return lambda: self.run_shared(ops, x, sharded)

    def shared_after_routed_path(
        self, ops: Ops, x: Any, order: Order, sharded: bool, shared: Any, shared_done: Any
    ) -> Any:
        """Serial shared experts placed after the routed path, and the join on
        the aux stream's event."""
        if self.runs_serially(order) and self.shared_after_routed(order):
            shared = self.run_shared(ops, x, sharded)
        if shared_done is not None:
            ops.wait_event(shared_done, name="join_shared")
        return shared

    def run_shared(self, ops: Ops, x: Any, sharded: bool) -> Any:
        return ops.shared_experts(
            self.shared_input(ops, x), sharded=sharded, reduce_results=self.shared_reduce_results(),
            group=self.shared_experts_group(),
        )

    def shared_experts_group(self) -> str:
        """The group a sharded shared MLP is split over (its TP size is that
        group's size): the attention-TP group in vLLM."""
        return "tp"

    def shared_reduce_results(self) -> bool:
        """The shared MLP reduces its own output (reduce_results=True). vLLM
        builds it with False: the runner's reductions complete it."""
        return False

    def shared_joins_after_reduce(self) -> bool:
        """Where the shared output joins the routed one: before the
        post-experts reduction (inside the fused op, vLLM) or after it, on
        the complete sum (SGLang's replicated shared experts)."""
        return False

    def before_aux_fork(self, ops: Ops, x: Any) -> Any:
        """Hook before the aux-stream fork (e.g. clone the input or record it):
        the tensor the aux stream's shared experts will read."""
        return x

    def finish_routed(self, ops: Ops, routed: Any) -> tuple[Any, bool]:
        """Early trim and the early (pre-transform) reduction: (routed, reduced)."""
        pre_trim = self.pre_trim_width()
        if pre_trim is not None:
            routed = ops.trim(routed, pre_trim, name="early_trim")
        reduced = self.fused_output_is_reduced()
        if self.needs_pre_transform_reduce(reduced) or self.needs_pre_projection_reduce(reduced):
            routed = ops.all_reduce(routed, "tp", name="pre_transform_all_reduce")
            reduced = True
        return routed, self.reduced_after_transform(reduced)

    def join_outputs(self, ops: Ops, shared: Any, routed: Any) -> Any:
        """Routed scaling, the latent up-projection, then the shared add."""
        m = self.scenario.model
        if m.routed_scaling_factor != 1.0:
            routed = ops.scale(routed, m.routed_scaling_factor, name="routed_scaling")
        if m.has_transform:
            routed = self.up_project(ops, routed)
        return ops.add(shared, routed, name="shared_add") if shared is not None else routed

    def up_project(self, ops: Ops, routed: Any) -> Any:
        """The latent up-projection, replicated or row-parallel (latent_up_row_parallel)."""
        if self.latent_up_row_parallel():
            return ops.latent_up(routed, row_parallel=True)
        return ops.latent_up(routed)

    def trim_output(self, ops: Ops, result: Any) -> Any:
        post_trim = self.post_trim_width()
        if post_trim is not None:
            result = ops.trim(result, post_trim, name="post_trim")
        return result

    def routed_path(
        self, ops: Ops, x: Any, routing: Any, order: Order, shared_inside: Any
    ) -> tuple[Any, Any]:
        """Dispatch, experts, combine: (routed output, shared output if the
        shared experts ran inside, else None)."""
        if self.scenario.effective_backend == "none":
            return ops.experts(x, routing, inplace=self.routed_inplace(order)), None
        if shared_inside is not None:
            return self.overlapped_routed_path(ops, x, routing, shared_inside)
        xd, rd = ops.dispatch(x, routing)
        y = ops.experts(xd, rd, inplace=False)
        return ops.combine(y), None

    def shared_before_dispatch(self) -> bool:
        """MK_INTERNAL overlap: run the shared experts before the dispatch is
        launched (no overlap) instead of while it is in flight."""
        return False

    def overlapped_routed_path(
        self, ops: Ops, x: Any, routing: Any, shared_inside: Any
    ) -> tuple[Any, Any]:
        """MK_INTERNAL overlap: the shared experts run on the main stream while
        dispatch and combine are in flight on the communication stream."""
        shared = shared_inside() if self.shared_before_dispatch() else None
        go = ops.record_event("fork_to_comm")
        with ops.stream("comm"):
            ops.wait_event(go, name="comm_waits_fork")
            xd, rd = ops.dispatch(x, routing)
            dispatched = ops.record_event("dispatch_done")
        if shared is None:
            shared = shared_inside()
        ops.wait_event(dispatched, name="wait_dispatch")
        y = ops.experts(xd, rd, inplace=False)
        computed = ops.record_event("experts_done")
        with ops.stream("comm"):
            ops.wait_event(computed, name="comm_waits_experts")
            out = ops.combine(y)
            combined = ops.record_event("combine_done")
        ops.wait_event(combined, name="wait_combine")
        return out, shared
