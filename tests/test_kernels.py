"""Tests for the kernels package: torch reference, Triton kernel, FlashInfer adapter, registry."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import moe_twin_kernels
from moe_twin_kernels import KERNELS, KernelUnavailable, UnknownKernel, default_kernel, get_kernel
from moe_twin_kernels.flashinfer_adapter import fused_moe_flashinfer, pack_fc1_for_flashinfer
from moe_twin_kernels.torch_ref import fused_moe_reference_f64, fused_moe_torch, shard_w13_w2

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Problem:
    x: torch.Tensor
    topk_ids: torch.Tensor
    topk_weights: torch.Tensor
    w13: torch.Tensor  # all E_global experts, [gate; up]
    w2: torch.Tensor

    def args(self, expert_offset: int = 0, e_local: int | None = None) -> tuple:
        """Arguments for the rank holding experts expert_offset .. expert_offset + e_local - 1."""
        end = self.w13.shape[0] if e_local is None else expert_offset + e_local
        return (
            self.x,
            self.topk_ids,
            self.topk_weights,
            self.w13[expert_offset:end],
            self.w2[expert_offset:end],
            expert_offset,
        )


def make_problem(
    seed: int, tokens: int, hidden: int, inter: int, experts: int, top_k: int
) -> Problem:
    """Random MoE problem with distinct top-k experts per token and O(1) outputs."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(experts, hidden, inter, generator=gen) / inter**0.5
    # Distinct experts per token, like a router's top-k.
    topk_ids = torch.rand(tokens, experts, generator=gen).argsort(dim=1)[:, :top_k]
    topk_weights = torch.rand(tokens, top_k, generator=gen) + 0.1
    return Problem(x, topk_ids, topk_weights.float(), w13, w2)


def naive_moe(
    x: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    expert_offset: int = 0,
) -> torch.Tensor:
    """Independent per-token, per-slot float64 loop (no sorting, no index_add)."""
    e_local, two_i, _ = w13.shape
    i = two_i // 2
    out = torch.zeros(x.shape, dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j]) - expert_offset
            if not 0 <= e < e_local:
                continue
            xt = x[t].double()
            gate = w13[e, :i].double() @ xt
            up = w13[e, i:].double() @ xt
            out[t] += float(topk_weights[t, j]) * (w2[e].double() @ (F.silu(gate) * up))
    return out


def assert_rel_close(out: torch.Tensor, ref: torch.Tensor, rel: float) -> None:
    """max |out - ref| <= rel * max |ref| (plus a tiny floor for all-zero outputs)."""
    assert out.shape == ref.shape
    err = (out.double() - ref.double()).abs().max().item()
    scale = ref.double().abs().max().item()
    assert err <= rel * scale + 1e-6, f"max abs err {err:.3e} vs scale {scale:.3e} (rel {rel})"


# --- torch reference --------------------------------------------------------------------------

moe_shapes = st.fixed_dictionaries(
    {
        "seed": st.integers(0, 2**16),
        "tokens": st.integers(1, 12),
        "hidden": st.integers(1, 24),
        "inter": st.integers(1, 24),
        "experts": st.integers(1, 6),
    }
).flatmap(lambda d: st.builds(lambda k: {**d, "top_k": k}, st.integers(1, d["experts"])))


@settings(max_examples=30, deadline=None)
@given(shape=moe_shapes, data=st.data())
def test_torch_ref_matches_f64_and_naive_loop(shape: dict, data: st.DataObject) -> None:
    p = make_problem(**shape)
    e_global = shape["experts"]
    offset = data.draw(st.integers(0, e_global - 1), label="expert_offset")
    e_local = data.draw(st.integers(1, e_global - offset), label="e_local")
    args = p.args(offset, e_local)
    ref64 = fused_moe_reference_f64(*args)
    assert ref64.dtype == torch.float64
    assert_rel_close(ref64, naive_moe(*args), 1e-12)
    out = fused_moe_torch(*args)
    assert out.dtype == torch.float32
    assert_rel_close(out, ref64, 1e-5)


def test_non_local_routes_contribute_zero() -> None:
    p = make_problem(0, tokens=6, hidden=8, inter=4, experts=4, top_k=2)
    # Token 0 routes only to experts 0 and 1; the rank holding experts 2..3 gives it zeros.
    p.topk_ids[0] = torch.tensor([0, 1])
    p.topk_ids[1] = torch.tensor([2, 0])
    out = fused_moe_torch(*p.args(expert_offset=2, e_local=2))
    assert torch.all(out[0] == 0)
    assert out[1].abs().max() > 0


def _duplicate_route_problem() -> Problem:
    """Tokens that pick the same expert in two slots (possible with some routers)."""
    p = make_problem(11, tokens=5, hidden=8, inter=4, experts=3, top_k=2)
    p.topk_ids[0] = torch.tensor([1, 1])
    p.topk_ids[3] = torch.tensor([2, 2])
    return p


def test_duplicate_routes_add_both_weights() -> None:
    p = _duplicate_route_problem()
    for args in (p.args(), p.args(expert_offset=1, e_local=2)):
        ref = naive_moe(*args)
        assert_rel_close(fused_moe_reference_f64(*args), ref, 1e-12)
        assert_rel_close(fused_moe_torch(*args), ref, 1e-5)


def test_expert_parallel_ranks_sum_to_full_output() -> None:
    p = make_problem(1, tokens=10, hidden=16, inter=8, experts=6, top_k=3)
    full = fused_moe_torch(*p.args())
    parts = sum(fused_moe_torch(*p.args(offset, 2)) for offset in (0, 2, 4))
    assert_rel_close(parts, full, 1e-5)


def test_torch_ref_returns_input_dtype() -> None:
    p = make_problem(2, tokens=4, hidden=8, inter=4, experts=2, top_k=1)
    out = fused_moe_torch(p.x.bfloat16(), p.topk_ids, p.topk_weights, p.w13, p.w2)
    assert out.dtype == torch.bfloat16
    assert_rel_close(out, fused_moe_reference_f64(*p.args()), 2e-2)


def test_shape_errors_are_reported() -> None:
    p = make_problem(3, tokens=4, hidden=8, inter=4, experts=2, top_k=1)
    with pytest.raises(ValueError, match="w2 must be"):
        fused_moe_torch(p.x, p.topk_ids, p.topk_weights, p.w13, p.w2[:, :, :3])


@pytest.mark.parametrize("tp_size", [1, 2, 4])
def test_tp_shards_sum_to_full_output(tp_size: int) -> None:
    p = make_problem(4, tokens=7, hidden=12, inter=8, experts=3, top_k=2)
    full = fused_moe_torch(*p.args())
    total = torch.zeros_like(full)
    for rank in range(tp_size):
        w13_s, w2_s = shard_w13_w2(p.w13, p.w2, rank, tp_size)
        assert w13_s.shape == (3, 2 * 8 // tp_size, 12)
        assert w2_s.shape == (3, 12, 8 // tp_size)
        total += fused_moe_torch(p.x, p.topk_ids, p.topk_weights, w13_s, w2_s)
    assert_rel_close(total, full, 1e-5)


def test_naive_contiguous_w13_slice_is_wrong() -> None:
    """Why shard_w13_w2 exists: slicing packed rows contiguously pairs gate with gate."""
    p = make_problem(5, tokens=7, hidden=12, inter=8, experts=3, top_k=2)
    full = fused_moe_torch(*p.args())
    total = torch.zeros_like(full)
    for rank in range(2):
        w13_bad = p.w13[:, rank * 8 : (rank + 1) * 8]
        w2_s = p.w2[:, :, rank * 4 : (rank + 1) * 4]
        total += fused_moe_torch(p.x, p.topk_ids, p.topk_weights, w13_bad, w2_s)
    assert (total - full).abs().max() > 1e-2


def test_shard_rejects_uneven_split() -> None:
    p = make_problem(6, tokens=2, hidden=4, inter=6, experts=1, top_k=1)
    with pytest.raises(ValueError, match="not divisible"):
        shard_w13_w2(p.w13, p.w2, 0, 4)


# --- Triton kernel (CPU interpreter) ---------------------------------------------------------


@pytest.mark.slow
@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    seed=st.integers(0, 2**16),
    tokens=st.integers(1, 9),
    hidden=st.integers(1, 40),
    inter_shard=st.integers(1, 20),
    tp_size=st.sampled_from([1, 2]),
    experts=st.integers(1, 5),
    data=st.data(),
)
def test_triton_matches_torch(
    seed: int,
    tokens: int,
    hidden: int,
    inter_shard: int,
    tp_size: int,
    experts: int,
    data: st.DataObject,
) -> None:
    from moe_twin_kernels.triton_moe import TileConfig, fused_moe_triton

    top_k = data.draw(st.integers(1, min(3, experts)), label="top_k")
    p = make_problem(seed, tokens, hidden, inter_shard * tp_size, experts, top_k)
    offset = data.draw(st.integers(0, experts - 1), label="expert_offset")
    e_local = data.draw(st.integers(1, experts - offset), label="e_local")
    tp_rank = data.draw(st.integers(0, tp_size - 1), label="tp_rank")
    w13_s, w2_s = shard_w13_w2(p.w13, p.w2, tp_rank, tp_size)
    args = (
        p.x,
        p.topk_ids,
        p.topk_weights,
        w13_s[offset : offset + e_local],
        w2_s[offset : offset + e_local],
        offset,
    )
    # Small tiles exercise multi-block experts, K loops and N tiles; None = CPU default.
    tiles = data.draw(st.sampled_from([None, TileConfig(16, 16, 16)]), label="tiles")
    out = fused_moe_triton(*args, tiles=tiles)
    assert out.dtype == torch.float32
    assert_rel_close(out, fused_moe_torch(*args), 1e-4)


@pytest.mark.slow
def test_triton_ep_slice_with_non_local_routes() -> None:
    from moe_twin_kernels.triton_moe import fused_moe_triton

    p = make_problem(7, tokens=20, hidden=24, inter=12, experts=6, top_k=2)
    args = p.args(expert_offset=3, e_local=2)  # experts 3, 4 local; 0-2 and 5 remote
    out = fused_moe_triton(*args)
    ref = fused_moe_torch(*args)
    assert ref.abs().max() > 0
    assert_rel_close(out, ref, 1e-4)
    remote_only = ~((p.topk_ids >= 3) & (p.topk_ids < 5)).any(dim=1)
    assert remote_only.any()
    assert torch.all(out[remote_only] == 0)


@pytest.mark.slow
def test_triton_duplicate_routes() -> None:
    from moe_twin_kernels.triton_moe import TileConfig, fused_moe_triton

    p = _duplicate_route_problem()
    args = p.args(expert_offset=1, e_local=2)
    assert_rel_close(fused_moe_triton(*args, tiles=TileConfig(16, 16, 16)), naive_moe(*args), 1e-4)


@pytest.mark.slow
def test_triton_bf16_is_upcast_under_interpreter() -> None:
    from moe_twin_kernels.triton_moe import fused_moe_triton

    p = make_problem(8, tokens=8, hidden=32, inter=16, experts=3, top_k=2)
    args = (p.x.bfloat16(), p.topk_ids, p.topk_weights, p.w13.bfloat16(), p.w2.bfloat16())
    out = fused_moe_triton(*args)
    assert out.dtype == torch.bfloat16
    assert_rel_close(out, fused_moe_torch(*args), 2e-2)


@pytest.mark.slow
def test_align_routes_layout() -> None:
    from moe_twin_kernels.triton_moe import align_routes

    topk_ids = torch.tensor([[0, 5], [2, 0], [9, 2], [0, 3]])  # local experts 2..4 at offset 2
    sorted_pairs, block_expert = align_routes(topk_ids, 2, 3, block_m=2)
    num_pairs = topk_ids.numel()
    assert sorted_pairs.numel() == block_expert.numel() * 2
    # Each pair appears exactly once; everything else is the sentinel.
    real = sorted_pairs[sorted_pairs < num_pairs]
    assert sorted(real.tolist()) == list(range(num_pairs))
    assert torch.all(sorted_pairs[sorted_pairs >= num_pairs] == num_pairs)
    # Local expert 0 (global 2): pairs 2, 5; local 1 (global 3): pair 7; local 2: none;
    # non-local (global 0, 5, 9): pairs 0, 1, 3, 4, 6, in stable order.
    assert block_expert.tolist() == [0, 1, -1, -1, -1]
    assert sorted_pairs.view(-1, 2).tolist() == [[2, 5], [7, 8], [0, 1], [3, 4], [6, 8]]


@pytest.mark.slow
def test_triton_kernels_compile_for_gpu() -> None:
    """The compiled (non-interpreter) path builds to a cubin for SM90 without a GPU."""
    try:
        from triton.backends import backends
    except ImportError as exc:
        pytest.skip(f"triton backends not importable: {exc}")
    if "nvidia" not in backends:
        pytest.skip("triton has no nvidia backend")
    script = textwrap.dedent(
        """
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
        from moe_twin_kernels import triton_moe as m
        assert not m._INTERPRETED
        tiles = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=32)
        ints = lambda names: {n: "i32" for n in names}
        for dt, upcast in (("fp32", True), ("bf16", False)):
            sig1 = {"x_ptr": f"*{dt}", "w13_ptr": f"*{dt}", "inter_ptr": "*fp32",
                    "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32",
                    **ints(["num_pairs", "hidden", "inter", "top_k", "stride_xt", "stride_xh",
                            "stride_we", "stride_wn", "stride_wk", "stride_im", "stride_in"])}
            sig2 = {"inter_ptr": "*fp32", "w2_ptr": f"*{dt}", "out_ptr": "*fp32",
                    "topk_w_ptr": "*fp32", "sorted_pairs_ptr": "*i32", "block_expert_ptr": "*i32",
                    **ints(["num_pairs", "hidden", "inter", "stride_im", "stride_in", "stride_we",
                            "stride_wn", "stride_wk", "stride_om", "stride_on"])}
            consts = {**tiles, "UPCAST": upcast}
            for fn, sig in ((m._gemm1_act_kernel, sig1), (m._gemm2_weighted_kernel, sig2)):
                sig = {**sig, **{k: "constexpr" for k in consts}}
                k = triton.compile(ASTSource(fn, sig, consts), target=GPUTarget("cuda", 90, 32))
                assert "cubin" in k.asm, list(k.asm)
        print("ok")
        """
    )
    env = {**os.environ, "TRITON_INTERPRET": "0", "PYTHONPATH": str(REPO)}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


# --- FlashInfer adapter -----------------------------------------------------------------------


def test_flashinfer_adapter_unavailable_on_cpu() -> None:
    p = make_problem(9, tokens=4, hidden=8, inter=4, experts=2, top_k=1)
    for fn in (fused_moe_flashinfer, get_kernel("flashinfer")):
        with pytest.raises(KernelUnavailable) as info:
            fn(*p.args())
        msg = str(info.value)
        assert "SM89" in msg and "CUDA" in msg
        assert "'torch'" in msg and "'triton'" in msg


def test_pack_fc1_swaps_halves() -> None:
    w13 = torch.arange(2 * 6 * 3, dtype=torch.float32).view(2, 6, 3)
    fc1 = pack_fc1_for_flashinfer(w13)
    assert torch.equal(fc1[:, :3], w13[:, 3:])  # up first
    assert torch.equal(fc1[:, 3:], w13[:, :3])  # then gate
    assert torch.equal(pack_fc1_for_flashinfer(fc1), w13)


def _flashinfer_reference():
    try:
        from flashinfer.trace.templates.moe import _cutlass_fused_moe_reference
    except Exception as exc:  # private API: any import failure means it moved
        pytest.skip(f"flashinfer's private cutlass MoE reference is unavailable: {exc!r}")
    return _cutlass_fused_moe_reference


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # noise from flashinfer's imports
@pytest.mark.parametrize(
    ("offset", "e_local", "tp_size"), [(0, 4, 1), (2, 2, 1), (0, 4, 2), (1, 3, 2)]
)
def test_flashinfer_packing_matches_its_reference(offset: int, e_local: int, tp_size: int) -> None:
    ref_fn = _flashinfer_reference()
    p = make_problem(10, tokens=12, hidden=16, inter=8, experts=4, top_k=2)
    w13_s, w2_s = shard_w13_w2(p.w13, p.w2, tp_size - 1, tp_size)
    w13_l, w2_l = w13_s[offset : offset + e_local], w2_s[offset : offset + e_local]
    ours = fused_moe_torch(p.x, p.topk_ids, p.topk_weights, w13_l, w2_l, offset)
    # The reference has no EP notion (local offset 0, E_global = E_local), so
    # pass rank-local ids; ids outside [0, E_local) match no expert there.
    local_ids = (p.topk_ids - offset).to(torch.int32)

    def run(fc1: torch.Tensor) -> torch.Tensor:
        return ref_fn(
            input=p.x,
            token_selected_experts=local_ids,
            token_final_scales=p.topk_weights,
            fc1_expert_weights=fc1,
            fc2_expert_weights=w2_l,
        )

    theirs = run(pack_fc1_for_flashinfer(w13_l))
    assert theirs.shape == ours.shape
    assert ours.abs().max() > 0
    # The reference rounds its output to bf16.
    assert_rel_close(theirs.float(), ours, 1e-2)
    # Unpacked [gate; up] must disagree, or this check could not catch a bad packing.
    wrong = run(w13_l.contiguous()).float()
    assert (wrong - ours).abs().max() > 5e-2 * ours.abs().max()


# --- registry ---------------------------------------------------------------------------------


def test_registry_names_and_lookup() -> None:
    assert KERNELS == ("torch", "triton", "flashinfer")
    assert get_kernel("torch") is fused_moe_torch
    assert get_kernel("flashinfer") is fused_moe_flashinfer
    assert default_kernel("cpu") == "torch"


def test_unknown_kernel_lists_valid_names() -> None:
    with pytest.raises(UnknownKernel) as info:
        get_kernel("cuda-magic")
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert "cuda-magic" in msg
    for name in KERNELS:
        assert name in msg


def test_importing_kernels_is_lazy() -> None:
    script = (
        "import sys, moe_twin_kernels, moe_twin_kernels.torch_ref, moe_twin_kernels.flashinfer_adapter, moe_twin_kernels.bench; "
        "heavy = [m for m in ('triton', 'flashinfer') if m in sys.modules]; "
        "assert not heavy, heavy; print('ok')"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-2000:]
    assert Path(moe_twin_kernels.__file__).resolve().parent == REPO / "moe_twin_kernels"


@pytest.mark.slow
def test_get_triton_kernel_and_bench_figures() -> None:
    from moe_twin_kernels.bench import bench_kernels
    from moe_twin_kernels.triton_moe import fused_moe_triton

    assert get_kernel("triton") is fused_moe_triton
    figures = bench_kernels(repeats=1)
    assert set(figures) == {
        "kernel_torch_ms",
        "kernel_triton_interp_ms",
        "kernel_triton_over_torch",
        "kernel_triton_max_abs_diff",
        "kernel_torch_median_ms",
        "kernel_triton_interp_median_ms",
    }
    assert figures["kernel_torch_ms"] > 0 and figures["kernel_triton_interp_ms"] > 0
    assert figures["kernel_triton_max_abs_diff"] < 1e-3
