"""A twin scenario as vLLM's configuration (plain data for the probe).

Only what the engine's configuration has a knob for is carried over; the
scenario's derived quantities (SP, kernel width, who reduces) are NOT: those
are the engine's to decide. `not_expressible` says why a scenario has no
engine equivalent (it is then skipped and counted, never compared).
"""

from __future__ import annotations

from typing import Any

from scenarios.spec import Scenario

# The twin's older backend name, kept so old scenarios load (scenarios/backends.py).
BACKEND_NAMES = {"mori": "mori_high_throughput"}


# 0.21.0/0.22.0: the backends their ParallelConfig accepts (config/parallel.py,
# All2AllBackend), under the twin's names; MORI high-throughput was `mori`.
OLD_BACKENDS = {"naive": "naive", "pplx": "pplx", "deepep_high_throughput": "deepep_high_throughput",
                "deepep_low_latency": "deepep_low_latency", "mori": "mori", "mori_high_throughput": "mori",
                "nixl_ep": "nixl_ep", "allgather_reducescatter": "allgather_reducescatter",
                "flashinfer_nvlink_two_sided": "flashinfer_nvlink_two_sided",
                "flashinfer_nvlink_one_sided": "flashinfer_nvlink_one_sided"}


def not_expressible(s: Scenario, twin_version: str, reduce_results_knob: bool = True,
                    renamed_backends: bool = True) -> str | None:
    p, m = s.parallel, s.model
    if p.version != twin_version:
        return f"parallel.version {p.version!r} is not the pinned release's rules ({twin_version!r})"
    if not renamed_backends and p.backend not in OLD_BACKENDS:
        return f"parallel.backend {p.backend}: not a backend of this release"
    if s.next_layer_fuses_reduce and not reduce_results_knob:
        return "next_layer_fuses_reduce: this release's layer has no reduce_results knob"
    if p.ep_size is not None:
        return "parallel.ep_size: vLLM's EP spans every rank of the MoE group (no hybrid EP x TP)"
    if s.kernel_writes_unpadded:
        return "kernel_writes_unpadded: a property of a quantized kernel the unquantized probe does not build"
    if m.quantized_input:
        return "model.quantized_input: an fp8 routed path the unquantized probe does not build"
    if p.max_dispatch_tokens is not None:
        return "parallel.max_dispatch_tokens: a buffer size, not a runner decision"
    if m.latent_up_parallel == "row":
        # The transform is the model's module; the probe hands the layer a replicated one.
        return "model.latent_up_parallel row: the probe's layer gets a replicated up-projection"
    return None


def engine_config(s: Scenario, renamed_backends: bool = True) -> dict[str, Any]:
    """`renamed_backends`: the release uses the newer backend names (0.33;
    0.21/0.22 still call MORI `mori`)."""
    m, p, rt = s.model, s.parallel, s.runtime
    return {
        "tp": p.tp, "dp": p.dp, "ep": p.ep, "eplb": p.eplb,
        "backend": BACKEND_NAMES.get(p.backend, p.backend) if renamed_backends else OLD_BACKENDS[p.backend],
        "platform": rt.platform, "aux_stream": rt.aux_stream, "token_threshold": rt.token_threshold,
        "hidden": m.hidden, "latent_dim": m.latent_dim, "nonlinear": m.transform_nonlinear,
        "moe_hidden": m.moe_hidden, "shared": m.has_shared,
        "num_experts": m.num_experts, "top_k": m.top_k, "intermediate": m.moe_intermediate,
        "token_counts": list(s.token_counts),
        "routed_scaling_factor": m.routed_scaling_factor,
        # The model's choice: it hands the sum to the next layer's fused all-reduce.
        "reduce_results": not s.next_layer_fuses_reduce,
    }


def not_evaluable_here(s: Scenario) -> str | None:
    """Configurations the engine accepts only with a GPU library this machine
    cannot load (so its refusal here would be this machine's, not the rule's)."""
    if s.use_all2all_kernels and s.parallel.backend.startswith("mori") and s.runtime.platform == "rocm":
        return "MORI on ROCm: the engine accepts it only with AITER's fused MoE (a ROCm GPU library)"
    return None
