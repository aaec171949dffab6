"""Adapter from the common kernel signature to FlashInfer's cutlass fused MoE.

`flashinfer.fused_moe.cutlass_fused_moe` (0.7.2.post1) differs from our layout
in three ways handled here:
  * fc1 halves are ordered [up; gate] (ours: [gate; up]) -> pack_fc1_for_flashinfer;
  * expert parallelism is given as (ep_size, ep_rank) with rank r holding
    global experts r*E_local .. (r+1)*E_local - 1, not as an expert offset;
  * it returns a list [output, ...]; we pass output= and return that tensor.
Like ours, its output is weighted by the routing scales, summed over the
token's local experts, and not reduced across ranks. Its default fused
finalize uses atomics, so results are not bitwise deterministic.

It needs a CUDA device of SM89 or newer (SM80 is rejected); everywhere else
this module raises KernelUnavailable naming the alternatives. flashinfer is
imported only at call time (it takes seconds to import).
"""

from __future__ import annotations

import torch

from moe_twin_kernels.errors import KernelUnavailable
from moe_twin_kernels.torch_ref import _check_shapes

__all__ = ["MIN_SM", "fused_moe_flashinfer", "pack_fc1_for_flashinfer"]

MIN_SM = 89

_UNAVAILABLE = (
    "the FlashInfer cutlass MoE kernel needs a CUDA device of SM{sm}+ ({why}); "
    "use kernel 'torch' or 'triton' instead"
)


def pack_fc1_for_flashinfer(w13: torch.Tensor) -> torch.Tensor:
    """Reorder our [gate; up] w13 [E, 2I, H] into FlashInfer's [up; gate] fc1.

    Works on TP shards from moe_twin_kernels.torch_ref.shard_w13_w2 too (each shard is
    [gate_shard; up_shard]). Returns a new contiguous tensor: pack once at
    weight-load time and pass it as `fc1=` on hot paths.
    """
    if w13.dim() != 3 or w13.shape[1] % 2 != 0:
        raise ValueError(f"w13 must be [E, 2*I, H], got {tuple(w13.shape)}")
    i = w13.shape[1] // 2
    return torch.cat([w13[:, i:], w13[:, :i]], dim=1).contiguous()


def _require_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda":
        raise KernelUnavailable(
            _UNAVAILABLE.format(sm=MIN_SM, why=f"got tensors on {x.device.type!r}")
        )
    major, minor = torch.cuda.get_device_capability(x.device)
    if major * 10 + minor < MIN_SM:
        raise KernelUnavailable(_UNAVAILABLE.format(sm=MIN_SM, why=f"found SM{major}{minor}"))


def fused_moe_flashinfer(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_offset: int = 0,
    *,
    num_experts: int | None = None,
    tp_size: int = 1,
    tp_rank: int = 0,
    fc1: torch.Tensor | None = None,
) -> torch.Tensor:
    """FlashInfer cutlass fused MoE with the common kernel signature.

    num_experts: global expert count, giving ep_size = num_experts / E_local. If
      omitted it is inferred from topk_ids (a device-to-host sync).
    tp_size, tp_rank: passed through; w13/w2 must already be this rank's TP
      shard (moe_twin_kernels.torch_ref.shard_w13_w2).
    fc1: w13 already packed by pack_fc1_for_flashinfer (saves a copy per call).
    """
    e_local, _ = _check_shapes(x, topk_ids, topk_weights, w13, w2)
    _require_device(x)
    try:
        from moe_twin_kernels import set_triton_mode

        set_triton_mode()  # flashinfer imports triton
        from flashinfer.fused_moe import cutlass_fused_moe
    except ImportError as exc:
        raise KernelUnavailable(
            _UNAVAILABLE.format(sm=MIN_SM, why=f"flashinfer is not importable: {exc}")
        ) from exc

    if expert_offset % e_local != 0:
        raise ValueError(
            f"FlashInfer places EP rank r's experts at r*E_local; expert_offset={expert_offset} "
            f"is not a multiple of E_local={e_local}"
        )
    ep_rank = expert_offset // e_local
    if num_experts is None:
        num_experts = max(expert_offset + e_local, int(topk_ids.max().item()) + 1)
    if num_experts % e_local != 0:
        raise ValueError(f"num_experts={num_experts} is not a multiple of E_local={e_local}")
    ep_size = num_experts // e_local
    if ep_rank >= ep_size:
        raise ValueError(f"expert_offset={expert_offset} is beyond num_experts={num_experts}")

    fc1_packed = fc1 if fc1 is not None else pack_fc1_for_flashinfer(w13)
    output = torch.empty_like(x)
    result = cutlass_fused_moe(
        input=x.contiguous(),
        token_selected_experts=topk_ids.to(torch.int32).contiguous(),
        token_final_scales=topk_weights.to(torch.float32).contiguous(),
        fc1_expert_weights=fc1_packed,
        fc2_expert_weights=w2.contiguous(),
        output_dtype=x.dtype,
        quant_scales=[],  # unquantized: no scales
        tp_size=tp_size,
        tp_rank=tp_rank,
        ep_size=ep_size,
        ep_rank=ep_rank,
        output=output,
    )
    # Normal mode returns [output, ...]; keep working if a version returns the tensor.
    if isinstance(result, (list, tuple)):
        return result[0]
    return result if isinstance(result, torch.Tensor) else output
