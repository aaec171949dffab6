"""The engine probe: a long-lived process in the engine venv that builds one
MoE layer per request with the installed vLLM's own code and runs its
runner's forward once on tiny CPU tensors, with recorders in place of the GPU
pieces (engines/vllm/recorders.py). It answers plain JSON decisions.

Protocol: one JSON request per line on stdin (`engine_config` in
engines/vllm/config_map.py), one JSON answer per line on the protocol fd
(the original stdout; anything the engine prints goes to stderr). The first
line written is `{"ready": true, "version": ..., "stubbed": [...]}`.
Run as: <engine python> -m engines.vllm.probe

Trace mode: a request with `"trace": {"tp_rank": t, "dp_rank": d}` runs the
forward as that rank (its DP rank's tokens, the SP slice the model would hand
it, its rank in each recorded group) and answers, besides the decisions,
`"trace": {"steps": [...], "input", "logits", "output"}`: every step of the
engine's code with tensor identity (engines/vllm/trace_mode.py says how the
steps are bound: recorders at the entry points, a live TorchFunctionMode for
the engine's own tensor ops).
"""

from __future__ import annotations

import inspect
import json
import os
import sys
import traceback
from typing import Any

PF_STANDIN = "a kernel view over the engine's own prepare/finalize (expert GEMMs are recorders)"


class _Manager:
    """The all2all manager's handle/size queries (no buffers exist on CPU)."""

    def __init__(self, world: int, dp: int) -> None:
        self.world_size, self.dp_world_size, self.rank = world, dp, 0
        self.max_num_ep_ranks = world  # NIXL sizes its buffers for the largest EP world (no elastic EP here)

    def get_handle(self, args: dict[str, Any]) -> Any:
        from engines.vllm.binding import Inert

        return Inert("all2all_handle")


def _manager_for(backend: str, world: int, dp: int) -> _Manager:
    """FlashInfer's one-sided prepare/finalize checks its manager's class:
    the recorder is then of that class too (its buffers are never made)."""
    if backend != "flashinfer_nvlink_one_sided":
        return _Manager(world, dp)
    from vllm.distributed.device_communicators.all2all import FlashInferNVLinkOneSidedManager

    cls = type("OneSidedManagerRecorder", (_Manager, FlashInferNVLinkOneSidedManager),
               {"initialize": lambda self, **kwargs: None})
    return cls(world, dp)


class _ModelView:
    """The model config's fields prepare/finalize constructors read (the
    engine's defaults), where no model checkpoint is loaded."""

    enforce_eager = False

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"model_config.{name} (no model loaded in the probe)")


class _Communicator:
    """The EP group's device communicator: its all2all manager, and inert
    answers for the library handles prepare/finalize constructors fetch."""

    def __init__(self, manager: _Manager) -> None:
        self.all2all_manager = manager

    def __getattr__(self, name: str) -> Any:
        from engines.vllm.binding import Inert

        return Inert(f"device_communicator.{name}")


class KernelView:
    """What the runner asks the lazily built modular kernel: the answers come
    from the prepare/finalize object the engine's own factory picked."""

    is_monolithic = False

    def __init__(self, pf: Any, holds_shared: bool = False) -> None:
        self.prepare_finalize = pf
        # 0.21.0: the unquantized method hands the layer's shared experts to
        # the kernel it builds, which keeps them only when its prepare/finalize
        # supports async (modular_kernel.py, FusedMoEKernelModularImpl.__init__).
        self.holds_shared = holds_shared and bool(pf.supports_async())

    @property
    def owns_shared_experts(self) -> bool:  # the <= 0.21 question
        return self.holds_shared

    def output_is_reduced(self) -> bool:
        return bool(self.prepare_finalize.output_is_reduced())

    @property
    def can_overlap_shared_experts(self) -> bool:
        return bool(self.prepare_finalize.supports_async())


class Probe:
    def __init__(self) -> None:
        from engines.vllm import binding

        self.binding = binding
        self.m = binding.bind_engine()
        # <= 0.22 has no FusedMoEFactory: the FusedMoE layer class builds the
        # layer and its runner, and the runner holds the quant method itself.
        self.layer_layout = not hasattr(self.m["layer"], "FusedMoEFactory")
        from engines.vllm.recorders import bind_record_stream

        bind_record_stream()

    # ---- one request ----

    def run(self, cfg: dict[str, Any]) -> dict[str, Any]:
        from engines.vllm.recorders import Recorders

        rec = Recorders()
        if cfg.get("trace") is not None:
            from engines.vllm.trace_mode import Tracer

            rec.tracer = Tracer(os.path.dirname(self.m["vllm"].__file__))
        try:
            built = self.build(cfg, rec)
            out = self.forward(cfg, rec, built)
        except (ValueError, NotImplementedError, AssertionError) as exc:
            if _machine_limit(exc):
                raise
            # The engine's refusal (its validation or an assertion on the
            # configuration), with its own message.
            return {"accepted": False, "message": _message(exc)}
        out["accepted"] = True
        out["events"] = rec.events
        return out

    def build(self, cfg: dict[str, Any], rec: Any) -> dict[str, Any]:
        import torch

        from engines.vllm.recorders import RecTorch, SharedMLP, Transform

        m = self.m
        self.binding.set_platform(cfg["platform"])
        os.environ["VLLM_SHARED_EXPERTS_STREAM_TOKEN_THRESHOLD"] = str(cfg["token_threshold"])
        # No auxiliary stream in the scenario: the engine's own switch for it.
        os.environ["VLLM_DISABLE_SHARED_EXPERTS_STREAM"] = "0" if cfg["aux_stream"] else "1"
        pc = m["config"].ParallelConfig(
            tensor_parallel_size=cfg["tp"], data_parallel_size=cfg["dp"], data_parallel_rank=_rank(cfg)[1],
            enable_expert_parallel=cfg["ep"], enable_eplb=cfg["eplb"], all2all_backend=cfg["backend"])
        vc = m["config"].VllmConfig(parallel_config=pc)
        # Streams and events the shared-experts code creates are recorders.
        m["shared"].torch = RecTorch(rec)
        from vllm.utils import torch_utils

        torch_utils._aux_stream = None
        torch_utils.torch = RecTorch(rec)
        m["shared"].current_stream = lambda: rec_stream(rec, "main")
        m["runner"].tensor_model_parallel_all_reduce = rec.tp_all_reduce
        hidden, routed = cfg["hidden"], cfg["latent_dim"] or cfg["hidden"]
        kwargs: dict[str, Any] = {}
        if cfg["latent_dim"]:
            linear = not cfg["nonlinear"]
            kwargs["routed_input_transform"] = Transform(rec, "latent_down", routed, linear)
            kwargs["routed_output_transform"] = Transform(rec, "latent_up", hidden, linear)
        if cfg["shared"]:
            kwargs["shared_experts"] = SharedMLP(rec, hidden)
        if cfg["routed_scaling_factor"] != 1.0:
            kwargs["routed_scaling_factor"] = cfg["routed_scaling_factor"]
            kwargs["apply_routed_scale_to_output"] = True
        with m["config"].set_current_vllm_config(vc):
            self._bind_groups(cfg, rec)
            common = dict(
                num_experts=cfg["num_experts"], top_k=cfg["top_k"], hidden_size=routed,
                intermediate_size=cfg["intermediate"], params_dtype=torch.bfloat16,
                tp_size=cfg["tp"], dp_size=cfg["dp"], pcp_size=1,
                is_sequence_parallel=pc.use_sequence_parallel_moe, enable_eplb=cfg["eplb"],
                prefix=f"model.layers.{next(_LAYER)}.mlp.experts", **kwargs)
            if self.layer_layout:
                # 0.20-0.22: the FusedMoE layer class builds the runner (no
                # reduce_results knob: config_map skips scenarios that need one).
                runner = m["layer"].FusedMoE(**common).runner
            else:
                runner = m["layer"].FusedMoEFactory(reduce_results=cfg["reduce_results"], **common)
            self._build_kernel(cfg, runner)
        return {"runner": runner, "vllm_config": vc, "parallel_config": pc}

    def _bind_groups(self, cfg: dict[str, Any], rec: Any) -> None:
        from engines.vllm.recorders import RecGroup

        counts = cfg["token_counts"]
        tp, dp = cfg["tp"], cfg["dp"]
        t, d = _rank(cfg)
        # The naive dispatch gathers over the EP group (all tp x dp ranks).
        ep = RecGroup(rec, "ep", tp * dp, [c for c in counts for _ in range(tp)])
        ep.device_communicator = _Communicator(_manager_for(cfg["backend"], tp * dp, dp))
        groups = {
            "get_tp_group": RecGroup(rec, "tp", tp, [counts[d]] * tp),
            "get_dp_group": RecGroup(rec, "dp", dp, list(counts)),
            "get_ep_group": ep,
            "get_pcp_group": RecGroup(rec, "pcp", 1, [counts[0]]),
            "get_dcp_group": RecGroup(rec, "dcp", 1, [counts[0]]),
        }
        for g, r in ((groups["get_tp_group"], t), (groups["get_dp_group"], d), (ep, d * tp + t)):
            g.rank_in_group = g.rank = r
        binds: dict[str, Any] = {name: (lambda g=g: g) for name, g in groups.items()}
        binds["get_tensor_model_parallel_world_size"] = lambda: tp
        binds["get_tensor_model_parallel_rank"] = lambda: t
        binds["tensor_model_parallel_all_reduce"] = rec.tp_all_reduce
        binds["tensor_model_parallel_all_gather"] = rec.tp_all_gather
        # Imported by name into each using module: bound in every vllm module.
        for mod in list(sys.modules.values()):
            if getattr(mod, "__name__", "").startswith("vllm"):
                for name, fn in binds.items():
                    if name in getattr(mod, "__dict__", {}):
                        setattr(mod, name, fn)

    def _build_kernel(self, cfg: dict[str, Any], runner: Any) -> None:
        """The lazy kernel build (process_weights_after_loading): the engine's
        own prepare/finalize choice for this configuration."""
        m = self.m
        moe = runner.moe_config
        if cfg["moe_hidden"] and cfg["moe_hidden"] > moe.hidden_dim:
            # A quantization method's own rounding (e.g. MXFP4), as the model's
            # `moe_hidden` states it: applied where the engine applies it.
            moe.hidden_dim = cfg["moe_hidden"]
        quant = m["fmconfig"].FUSED_MOE_UNQUANTIZED_CONFIG
        vc = m["config"].get_current_vllm_config()
        if vc.model_config is None:
            # No checkpoint here: the one model setting the PF constructors read.
            object.__setattr__(vc, "model_config", _ModelView())
        if self.layer_layout and quant_method(runner).is_monolithic:
            # <= 0.22 on the CPU platform: the CPU backend stays monolithic and
            # builds no modular kernel (the engine's own choice).
            self._pf_name = None
            return
        make = m["a2a"].maybe_make_prepare_finalize
        extra: dict[str, Any] = {}
        if "all2all_manager" in inspect.signature(make).parameters:
            extra["all2all_manager"] = _Manager(cfg["tp"] * cfg["dp"], cfg["dp"])
        # (<= 0.22 reads the manager from the EP group's communicator, bound above.)
        pf = make(moe=moe, quant_config=quant, allow_new_interface=True, **extra)
        view = KernelView(pf, holds_shared=runner.shared_experts is not None) if pf is not None else None
        quant_method(runner).moe_kernel = view
        self._pf_name = type(pf).__name__ if pf is not None else None

    def forward(self, cfg: dict[str, Any], rec: Any, built: dict[str, Any]) -> dict[str, Any]:
        import torch

        m = self.m
        runner, pc = built["runner"], built["parallel_config"]
        moe = runner.moe_config
        sp = bool(moe.is_sequence_parallel)
        tokens = cfg["token_counts"][_rank(cfg)[1]]
        rows = -(-tokens // cfg["tp"]) if sp else tokens  # the model's SP slice
        decisions: dict[str, Any] = {"sp": sp, "sp_config": bool(pc.use_sequence_parallel_moe),
                                     "prepare_finalize": self._pf_name,
                                     "kernel_width": int(moe.hidden_dim), "rows": rows}
        self._wrap(runner, rec, decisions)
        entry = m["runner"]._moe_forward if runner.shared_experts is None else m["runner"]._moe_forward_shared
        if rec.tracer is not None:
            from engines.vllm.trace_mode import declaring

            plain = runner.shared_experts is None
            fake = m["runner"]._moe_forward_fake if plain else m["runner"]._moe_forward_shared_fake
            entry = declaring(rec.tracer, entry, fake, plain)
        runner._forward_entry = entry  # the custom op's real implementation (no CUDA op dispatch)
        x = torch.zeros((rows, cfg["hidden"]), dtype=torch.bfloat16)
        logits = torch.zeros((rows, cfg["num_experts"]), dtype=torch.float32)
        across = torch.tensor(cfg["token_counts"], dtype=torch.int32)
        with m["config"].set_current_vllm_config(built["vllm_config"]), \
                m["fctx"].set_forward_context(None, built["vllm_config"], num_tokens=tokens,
                                              num_tokens_across_dp=across):
            if rec.tracer is None:
                out = runner.forward(x, logits)
            else:
                from engines.vllm.trace_mode import traced_forward

                out = traced_forward(rec.tracer, runner, x, logits, decisions)
        decisions["fused_output_is_reduced"] = bool(runner._fused_output_is_reduced)
        # A trim is a decision only where it changes the width (a slice to the
        # full width is the identity).
        decisions["pre_trim"] = _effective(decisions.get("pre_trim"), int(moe.hidden_dim))
        decisions["post_trim"] = _effective(decisions.get("post_trim"), decisions.get("post_trim_from"))
        decisions["output_shape"] = list(out.shape)
        decisions.setdefault("shared_experts_order", "NONE")
        return decisions

    def _wrap(self, runner: Any, rec: Any, decisions: dict[str, Any]) -> None:
        import torch

        shared = runner.shared_experts
        if shared is not None:
            determine = shared._determine_shared_experts_order

            def order(h: torch.Tensor) -> Any:
                o = determine(h)
                decisions.setdefault("shared_experts_order", o.name)
                return o

            shared._determine_shared_experts_order = order
        if self.layer_layout:
            self._wrap_trims_layer_layout(runner, decisions)
        else:
            pad = runner._maybe_pad_hidden_states

            def padded(shared_in: Any, h: torch.Tensor) -> Any:
                out, pre, post = pad(shared_in, h)
                decisions.update(padded=out.shape[-1] != h.shape[-1], pre_trim=pre, post_trim=post)
                return out, pre, post

            runner._maybe_pad_hidden_states = padded
        final = runner._maybe_reduce_final_output

        def final_reduce(states: torch.Tensor, trunc_size: Any, *a: Any, **k: Any) -> torch.Tensor:
            decisions["post_trim_from"] = int(states.shape[-1])
            if self.layer_layout:  # <= 0.22 slices to trunc_size here
                decisions["post_trim"] = int(trunc_size)
            return final(states, trunc_size, *a, **k)

        runner._maybe_reduce_final_output = final_reduce

        def select(hidden_states: torch.Tensor, router_logits: torch.Tensor, **k: Any) -> Any:
            n = hidden_states.shape[0]
            rec.event("router", rows=int(n))
            out = torch.ones((n, 1)), torch.zeros((n, 1), dtype=torch.int64)
            rec.trace("router", [router_logits], list(out))
            return out

        runner.router.select_experts = select
        order_mk = self.m["shared"].SharedExpertsOrder.MK_INTERNAL_OVERLAPPED

        def experts(x: torch.Tensor, topk_weights: Any, topk_ids: Any, shared_experts: Any,
                    shared_experts_input: Any) -> torch.Tensor:
            # The modular kernel's call: shared experts inside (its finalize) when
            # the order says so; the expert GEMMs themselves are a recorder.
            rec.event("routed_experts", rows=int(x.shape[0]), width=int(x.shape[-1]))
            start = len(rec.tracer.steps) if rec.tracer is not None else 0
            if shared_experts is not None:
                shared_experts(shared_experts_input, order_mk)
            width = runner.moe_config.hidden_dim
            out = rec.tag(x.new_zeros((x.shape[0], width)), "routed")
            self._trace_kernel(rec, start, [x, topk_weights, topk_ids], out)
            return out

        if not self.layer_layout:
            runner.routed_experts.forward_modular = experts
            return
        qm = quant_method(runner)

        def apply(layer: Any, x: torch.Tensor, topk_weights: Any, topk_ids: Any,
                  shared_experts_input: Any = None, shared_experts: Any = None) -> torch.Tensor:
            # <= 0.22: the quant method's apply is the kernel call; 0.21 does
            # not pass the shared experts (its kernel holds them, KernelView).
            held = shared_experts if shared_experts is not None else (
                runner.shared_experts if qm.moe_kernel is not None and qm.moe_kernel.owns_shared_experts else None)
            rec.event("routed_experts", rows=int(x.shape[0]), width=int(x.shape[-1]))
            start = len(rec.tracer.steps) if rec.tracer is not None else 0
            if held is not None:
                held.apply(shared_experts_input, order_mk)  # the engine's gate: runs only on that order
            out = rec.tag(x.new_zeros((x.shape[0], runner.moe_config.hidden_dim)), "routed")
            self._trace_kernel(rec, start, [x, topk_weights, topk_ids], out)
            return out

        qm.apply = apply

        def monolithic(layer: Any, x: torch.Tensor, router_logits: Any, input_ids: Any = None) -> torch.Tensor:
            rec.event("routed_experts", rows=int(x.shape[0]), width=int(x.shape[-1]))
            out = rec.tag(x.new_zeros((x.shape[0], runner.moe_config.hidden_dim)), "routed")
            rec.trace("monolithic_experts", [x, router_logits], [out])
            return out

        qm.apply_monolithic = monolithic

    def _trace_kernel(self, rec: Any, start: int, ins: list[Any], out: Any) -> None:
        """The kernel call as one step; the steps the shared experts issued
        inside it (its finalize) are nested under it, in their order."""
        if rec.tracer is None:
            return
        inside = rec.tracer.steps[start:]
        del rec.tracer.steps[start:]
        rec.trace("modular_kernel", ins, [out], prepare_finalize=self._pf_name, inside=inside)

    def _wrap_trims_layer_layout(self, runner: Any, decisions: dict[str, Any]) -> None:
        """<= 0.22 trims inside forward: the early trim is seen as the routed
        output's width when it reaches the routed scale step."""
        import torch

        pad = runner._maybe_pad_hidden_states

        def padded(shared_in: Any, h: torch.Tensor) -> Any:
            out, og = pad(shared_in, h)
            decisions["padded"] = out.shape[-1] != h.shape[-1]
            decisions["padded_width"] = int(out.shape[-1])
            return out, og

        runner._maybe_pad_hidden_states = padded
        scale = runner._maybe_apply_routed_scale_to_output

        def scaled(shared_output: Any, fused_output: torch.Tensor) -> Any:
            width = int(fused_output.shape[-1])
            decisions["pre_trim"] = width if width < decisions.get("padded_width", width) else None
            return scale(shared_output, fused_output)

        runner._maybe_apply_routed_scale_to_output = scaled


def _rank(cfg: dict[str, Any]) -> tuple[int, int]:
    """(tp rank, dp rank) the forward runs as: the trace request's, else (0, 0)."""
    tr = cfg.get("trace") or {}
    return int(tr.get("tp_rank", 0)), int(tr.get("dp_rank", 0))


def quant_method(runner: Any) -> Any:
    """The quant method the runner asks (0.33: its routed experts' own; 0.20:
    a public attribute)."""
    routed = getattr(runner, "routed_experts", None)
    if routed is not None:
        return routed.quant_method
    return runner._quant_method if hasattr(runner, "_quant_method") else runner.quant_method


def _effective(trim: Any, width: Any) -> Any:
    return trim if trim is not None and width is not None and trim < width else None


def rec_stream(rec: Any, name: str) -> Any:
    from engines.vllm.recorders import RecStream

    return RecStream(rec, name)


def _counter() -> Any:
    i = 0
    while True:
        yield i
        i += 1


_LAYER = _counter()


# Failures that are this CPU machine's limits, not the engine's answer.
MACHINE_LIMITS = ("not compiled with CUDA", "group is not initialized", "CUDA driver", "libcuda")


def _machine_limit(exc: BaseException) -> bool:
    return any(marker in str(exc) for marker in MACHINE_LIMITS)


def _message(exc: BaseException) -> str:
    """The exception's type and its first lines (a pydantic error's first
    line only counts the errors; the rule is on the next ones)."""
    text = str(exc)
    if "Value error, " in text:  # pydantic: the validator's own message
        text = text.split("Value error, ", 1)[1].split(" [type=", 1)[0]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()][:2]
    return f"{type(exc).__name__}: {' | '.join(lines)}"[:240]


def main() -> int:
    # The protocol keeps the original stdout; everything else prints to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    probe = Probe()
    proto.write(json.dumps({"ready": True, "version": probe.m["version"],
                            "stubbed": probe.binding.STUBBED, "standins": [PF_STANDIN]}) + "\n")
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        try:
            ans = probe.run(req)
        except Exception as exc:  # a probe defect, not an engine answer
            ans = {"error": _message(exc), "trace": traceback.format_exc(limit=-6)}
        ans["standins"] = sorted(probe.binding.STANDINS)
        proto.write(json.dumps(ans, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
