"""CPU tests for real.flashinfer_a2a (FlashInfer NVLink all-to-all adapter).

This machine has no GPU, so the library kernels never run here. What is
tested: availability reporting, the error raised on construction, the packing
helpers, the adapter's wrapper logic over a fake engine in the library's
padded layout, and the contract checker itself over gloo, including that it
flags a combine that does not reduce. Rank functions are module-level so
spawned ranks can unpickle them by name. The FlashInfer entry points against
the pin: tests/test_fi_api.py.
"""

from __future__ import annotations

import pytest
import torch

import real.fi_api as api
import real.fi_contract as fc
import real.flashinfer_a2a as fa
from real.fi_contract import StandInA2A, StandInState
from real.fi_engines import Padded
from real.flashinfer_a2a import (
    BACKENDS,
    FALLBACK,
    ONE_SIDED,
    TWO_SIDED,
    A2AUnavailable,
    FlashInferA2A,
)

# ---- availability -----------------------------------------------------------------------


def _api_ok(backend: str | None = None) -> bool:
    return not fa.api_problems(backend)


@pytest.mark.parametrize("backend", [None, *BACKENDS])
def test_available_is_false_here_with_a_clear_reason(backend):
    ok, reason = fa.available(backend)
    assert ok is False
    if _api_ok(backend):
        assert "no CUDA device" in reason
    else:
        assert reason.startswith("API not found")


def test_available_rejects_unknown_backend():
    with pytest.raises(ValueError, match="unknown FlashInfer all-to-all backend"):
        fa.available("deepep")


@pytest.mark.parametrize("backend", BACKENDS)
def test_construction_raises_unavailable_naming_the_fallback(backend):
    with pytest.raises(A2AUnavailable) as info:
        FlashInferA2A(backend, 0, 2, 8, 2, 64, 16, torch.bfloat16)
    exc = info.value
    assert exc.reason == fa.available(backend)[1]
    assert exc.fallback == FALLBACK == "the torch.distributed all_to_all stand-in"
    assert exc.reason in str(exc) and FALLBACK in str(exc) and backend in str(exc)
    assert isinstance(exc, Exception)


def test_construction_rejects_unknown_backend():
    with pytest.raises(ValueError):
        FlashInferA2A("mori", 0, 2, 8, 2, 64, 16, torch.bfloat16)


def test_available_never_raises_when_a_probe_breaks(monkeypatch):
    def boom(_backend):
        raise RuntimeError("probe exploded")

    monkeypatch.setattr(api, "api_problems", boom)
    ok, reason = fa.available()
    assert not ok and "probe exploded" in reason


# ---- configuration ----------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_config_ok(backend):
    assert fa.config_problems(backend, 2, 8, 2, 64, torch.bfloat16, 16) == []
    assert fa.config_problems(backend, 4, 16, 4, 128, torch.float32, 8) == []


@pytest.mark.parametrize(
    "backend, args, needle",
    [
        (ONE_SIDED, (2, 8, 3, 64, torch.bfloat16, 16), "top_k=3 has no one-sided kernel"),
        (ONE_SIDED, (128, 128, 2, 64, torch.bfloat16, 16), "world=128 > 64"),
        (ONE_SIDED, (3, 8, 2, 64, torch.bfloat16, 16), "not divisible by world=3"),
        (TWO_SIDED, (2, 6, 2, 64, torch.bfloat16, 16), "not divisible by 4"),
        (TWO_SIDED, (2, 8, 2, 4, torch.bfloat16, 16), "multiple of 16 bytes"),
        (TWO_SIDED, (2, 64, 33, 64, torch.bfloat16, 16), "top_k=33 > 32"),
        (TWO_SIDED, (2, 8, 2, 64, torch.float64, 16), "not supported"),
        (ONE_SIDED, (2, 8, 10, 64, torch.bfloat16, 16), "top_k=10 > num_experts=8"),
        (ONE_SIDED, (2, 8, 2, 64, torch.bfloat16, 0), "must be positive"),
    ],
)
def test_config_problems(backend, args, needle):
    problems = fa.config_problems(backend, *args)
    assert any(needle in p for p in problems), problems


def test_one_sided_workspace_bytes_per_token():
    assert api.one_sided_bytes_per_token(8, 4096, torch.bfloat16) == (8 * 4 * 2 + 4096 * 2, 4096 * 2)
    assert api.one_sided_bytes_per_token(2, 64, torch.float32) == (16 + 256, 256)


# ---- packing helpers --------------------------------------------------------------------


def test_to_library_routing_dtypes_and_layout():
    ids = torch.tensor([[3, 1], [0, 7]], dtype=torch.int64).t()  # non-contiguous
    w = torch.tensor([[0.5, 0.25], [0.5, 0.75]], dtype=torch.bfloat16).t()
    ids32, w32 = fa.to_library_routing(ids, w, num_experts=8)
    assert ids32.dtype == torch.int32 and w32.dtype == torch.float32
    assert ids32.is_contiguous() and w32.is_contiguous()
    assert ids32.tolist() == [[3, 0], [1, 7]]
    assert torch.equal(w32, w.float())


def test_to_library_routing_accepts_float_ids_from_the_ops_routing_tensor():
    ids32, _ = fa.to_library_routing(torch.tensor([[2.0, 5.0]]), torch.tensor([[0.5, 0.5]]), 8)
    assert ids32.tolist() == [[2, 5]]


@pytest.mark.parametrize(
    "ids, w, needle",
    [
        (torch.tensor([[0, 8]]), torch.ones(1, 2), r"\[0, 8\)"),
        (torch.tensor([[-1, 2]]), torch.ones(1, 2), r"\[0, 8\)"),
        (torch.tensor([[0.5, 2.0]]), torch.ones(1, 2), "non-integer"),
        (torch.tensor([[0, 2]]), torch.ones(1, 3), r"\[T, k\]"),
        (torch.tensor([0, 2]), torch.ones(2), r"\[T, k\]"),
    ],
)
def test_to_library_routing_refuses_bad_routing(ids, w, needle):
    with pytest.raises(ValueError, match=needle):
        fa.to_library_routing(ids, w, 8)


def test_to_library_routing_empty_batch():
    ids32, w32 = fa.to_library_routing(torch.empty(0, 2, dtype=torch.int64), torch.empty(0, 2), 8)
    assert ids32.shape == (0, 2) and ids32.dtype == torch.int32 and w32.shape == (0, 2)


def test_split_join_routing_roundtrip():
    ids = torch.tensor([[1, 6], [0, 3], [7, 2]])
    w = torch.tensor([[0.7, 0.3], [0.5, 0.5], [0.1, 0.9]])
    r = fa.join_routing(ids, w)
    assert r.shape == (3, 2, 2) and r.dtype == torch.float32  # ops.py's router layout
    ids2, w2 = fa.split_routing(r)
    assert ids2.dtype == torch.int64 and torch.equal(ids2, ids) and torch.equal(w2, w)
    with pytest.raises(ValueError):
        fa.split_routing(torch.zeros(3, 3, 2))


def test_valid_compact_expand_roundtrip():
    ids = torch.tensor([[-1, -1], [4, -1], [-1, -1], [2, 5]], dtype=torch.int32)
    valid = fa.valid_rows(ids, -1)
    assert valid.tolist() == [False, True, False, True]
    x = torch.arange(8.0).reshape(4, 2)
    (xc, idc) = fa.compact_rows(valid, x, ids)
    assert xc.tolist() == [[2.0, 3.0], [6.0, 7.0]] and idc.tolist() == [[4, -1], [2, 5]]
    xc += 100  # a copy, not a view of the (workspace) buffer
    assert x[1, 0] == 2.0
    back = fa.expand_rows(torch.tensor([[1.0, 1.0], [2.0, 2.0]]), valid, 4)
    assert back.tolist() == [[0, 0], [1, 1], [0, 0], [2, 2]]
    with pytest.raises(ValueError, match="dispatch delivered 2"):
        fa.expand_rows(torch.ones(3, 2), valid, 4)
    with pytest.raises(ValueError, match="expected 5"):
        fa.expand_rows(torch.ones(2, 2), valid, 5)


def test_remap_ids():
    ids = torch.tensor([[8, 3], [8, 8]], dtype=torch.int32)
    assert fa.remap_ids(ids, 8, -1).tolist() == [[-1, 3], [-1, -1]]
    assert fa.remap_ids(ids, -1, -1).tolist() == [[-1, 3], [-1, -1]]


# ---- the adapter over a fake engine (one rank) ------------------------------------------


class _FakeEngine:
    """The library's padded layout on CPU for one rank: the T tokens land in
    shuffled slots of a [max_tokens] buffer whose padding holds NaN garbage."""

    def __init__(self, max_tokens: int, invalid_id: int = -1) -> None:
        self.padded_rows = max_tokens
        self.device = torch.device("cpu")
        self.invalid_id = invalid_id
        self.g = torch.Generator().manual_seed(1)

    def dispatch(self, x, ids32, w32):
        assert ids32.dtype == torch.int32 and w32.dtype == torch.float32 and x.is_contiguous()
        t, r = x.shape[0], self.padded_rows
        slot = torch.randperm(t, generator=self.g)  # slot j holds token slot[j]
        xp = torch.full((r, x.shape[1]), float("nan"), dtype=x.dtype)
        ids = torch.full((r, ids32.shape[1]), self.invalid_id, dtype=torch.int32)
        wp = torch.full((r, ids32.shape[1]), float("nan"))
        xp[:t], ids[:t], wp[:t] = x[slot], ids32[slot], w32[slot]
        return Padded(xp, ids, wp, torch.tensor([t]), slot)

    def combine(self, y_pad, slot, local_tokens):
        assert y_pad.shape[0] == self.padded_rows
        assert not bool(y_pad[len(slot):].any()), "padding rows must reach combine as zeros"
        out = torch.zeros(local_tokens, y_pad.shape[1])
        out.index_add_(0, slot, y_pad[: len(slot)].float())
        return out.to(y_pad.dtype)


def _adapter(max_tokens=8, hidden=16, dtype=torch.float32, num_experts=4, top_k=2, invalid=-1):
    return FlashInferA2A._from_engine(_FakeEngine(max_tokens, invalid), ONE_SIDED, 0, 1, num_experts,
                                      top_k, hidden, max_tokens, dtype, invalid)


def _batch(t=5, hidden=16, dtype=torch.float32, num_experts=4, top_k=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, hidden, generator=g).to(dtype)
    ids = torch.empty(t, top_k, dtype=torch.int64)
    for i in range(t):
        ids[i] = torch.randperm(num_experts, generator=g)[:top_k]
    w = torch.softmax(torch.randn(t, top_k, generator=g), dim=1)
    return x, ids, w


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_adapter_roundtrip_over_padded_layout(dtype):
    a = _adapter(dtype=dtype)
    x, ids, w = _batch(dtype=dtype)
    xr, ir, wr, st = a.dispatch(x, ids, w)
    assert xr.shape == (5, 16) and ir.dtype == torch.int64 and wr.dtype == torch.float32
    assert not torch.isnan(xr.float()).any() and not torch.isnan(wr).any()  # padding dropped
    assert st.recv_counts == [5] and st.padded_rows == 8 and st.local_tokens == 5
    y = fc.reference_experts(xr, ir, wr, rank=0, local_experts=4, num_experts=4)
    out = a.combine(y, st)
    atol, rtol = fc._TOLERANCE[dtype]
    assert out.dtype == dtype and out.shape == (5, 16)
    torch.testing.assert_close(out.float(), fc.expected_combine(x, ids, w, 4), atol=atol, rtol=rtol)


def test_adapter_accepts_the_ops_routing_tensor_parts():
    a = _adapter()
    x, ids, w = _batch()
    r_ids, r_w = fa.split_routing(fa.join_routing(ids, w))
    xr, ir, wr, st = a.dispatch(x, r_ids.float(), r_w)  # ids as floats, as ops.py carries them
    assert sorted(ir.tolist()) == sorted(ids.tolist())
    a.combine(torch.zeros_like(xr), st)


def test_adapter_empty_batch():
    a = _adapter()
    x, ids, w = _batch(t=0)
    xr, ir, wr, st = a.dispatch(x, ids, w)
    assert xr.shape == (0, 16) and st.recv_counts == [0]
    assert a.combine(xr, st).shape == (0, 16)


def test_adapter_phases():
    a = _adapter()
    x, ids, w = _batch()
    _, _, _, st = a.dispatch(x, ids, w)
    with pytest.raises(RuntimeError, match="dispatch called twice"):
        a.dispatch(x, ids, w)
    stale = fa.A2AState(ONE_SIDED, 5, 8, st.valid.clone(), [5])
    with pytest.raises(RuntimeError, match="outstanding dispatch"):
        a.combine(torch.zeros(5, 16), stale)
    a.combine(torch.zeros(5, 16), st)
    with pytest.raises(RuntimeError, match="outstanding dispatch"):
        a.combine(torch.zeros(5, 16), st)  # already combined
    a.combine(torch.zeros(5, 16), a.dispatch(x, ids, w)[3])  # usable again


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda x, i, w: (x[:, :8], i, w), r"x must be \[T, 16\]"),
        (lambda x, i, w: (x.double(), i, w), "sized for torch.float32"),
        (lambda x, i, w: (torch.cat([x, x]), torch.cat([i, i]), torch.cat([w, w])), "max_tokens_per_rank=8"),
        (lambda x, i, w: (x, i[:, :1], w[:, :1]), r"topk_ids must be \[5, 2\]"),
        (lambda x, i, w: (x, i + 4, w), r"\[0, 4\)"),
    ],
)
def test_adapter_refuses_bad_inputs(mutate, needle):
    a = _adapter()
    with pytest.raises(ValueError, match=needle):
        a.dispatch(*mutate(*_batch()))
    assert a._pending is None  # a refused dispatch leaves nothing outstanding


def test_adapter_refuses_bad_combine_input():
    a = _adapter()
    _, _, _, st = a.dispatch(*_batch())
    with pytest.raises(ValueError, match="sized for torch.float32"):
        a.combine(torch.zeros(5, 16, dtype=torch.bfloat16), st)
    with pytest.raises(ValueError, match="dispatch delivered 5"):
        a.combine(torch.zeros(4, 16), st)


def test_adapter_refuses_a_real_expert_id_as_invalid_id():
    with pytest.raises(ValueError, match="is a real expert id"):
        _adapter(invalid=2)


# ---- the contract check -----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_contract_check_does_not_run_on_cpu(backend):
    report = fc.contract_check(backend, 0, 2, 8, 2, 64, 16, torch.bfloat16)
    assert report["ran"] is False and report["backend"] == backend
    assert report["reason"] == fa.available(backend)[1]


def test_expected_combine_is_the_sum_of_reference_experts_over_ranks():
    x, ids, w = _batch(t=6, num_experts=8, top_k=4)
    parts = sum(fc.reference_experts(x, ids, w, r, 2, 8).float() for r in range(4))
    torch.testing.assert_close(parts, fc.expected_combine(x, ids, w, 8))


def test_diagnose_names_the_failure():
    exp = torch.ones(3, 2) * 4
    contrib = torch.tensor([2, 2, 1])
    assert "contract holds" in fc._diagnose(exp.clone(), exp, contrib, 1e-5, 1e-5)
    assert "mean" in fc._diagnose(exp / contrib[:, None], exp, contrib, 1e-5, 1e-5)
    assert "zeros" in fc._diagnose(torch.zeros(3, 2), exp, contrib, 1e-5, 1e-5)
    assert "unexplained" in fc._diagnose(exp * 3, exp, contrib, 1e-5, 1e-5)


class _PaddedStandInEngine:
    """The library's padded layout over the stand-in, for several ranks on gloo:
    source s's rows land in shuffled slots of block s of a [world * max_tokens]
    buffer, other ranks' picks are invalid ids (as two-sided gives them) and
    the padding is NaN garbage."""

    def __init__(self, rank, world, num_experts, top_k, max_tokens, invalid_id=-1):
        self.inner = StandInA2A(rank, world, num_experts, top_k)
        self.rank, self.world, self.max_tokens, self.invalid_id = rank, world, max_tokens, invalid_id
        self.local_experts = num_experts // world
        self.padded_rows = world * max_tokens
        self.device = torch.device("cpu")
        self.g = torch.Generator().manual_seed(100 + rank)

    def dispatch(self, x, ids32, w32):
        xr, ir, wr, st = self.inner.dispatch(x, ids32, w32)
        pos = torch.cat([s * self.max_tokens + torch.randperm(c, generator=self.g)
                         for s, c in enumerate(st.recv)]).long()
        local = (ir // self.local_experts) == self.rank
        xp = torch.full((self.padded_rows, x.shape[1]), float("nan"), dtype=x.dtype)
        ids = torch.full((self.padded_rows, ir.shape[1]), self.invalid_id, dtype=torch.int32)
        wp = torch.full((self.padded_rows, ir.shape[1]), float("nan"))
        xp[pos] = xr
        ids[pos] = torch.where(local, ir, torch.full_like(ir, self.invalid_id)).to(torch.int32)
        wp[pos] = wr
        return Padded(xp, ids, wp, torch.tensor(st.recv), (pos, st))

    def combine(self, y_pad, handle, local_tokens):
        pos, st = handle
        keep = torch.zeros(self.padded_rows, dtype=torch.bool)
        keep[pos] = True
        assert not bool(y_pad[~keep].any()), "padding rows must reach combine as zeros"
        return self.inner.combine(y_pad[pos], st)


class _MeanStandIn(StandInA2A):
    """A combine that averages the contributing ranks' rows instead of adding them."""

    def combine(self, y: torch.Tensor, state: StandInState) -> torch.Tensor:
        out = super().combine(y, state).float()
        n = torch.bincount(state.order, minlength=state.rows).clamp(min=1)
        return (out / n[:, None]).to(y.dtype)


class _NoReduceStandIn(StandInA2A):
    """A combine that keeps one contributing rank's row (last write wins)."""

    def combine(self, y: torch.Tensor, state: StandInState) -> torch.Tensor:
        back = self._a2a(y, sum(state.send), state.send, state.recv)
        out = torch.zeros((state.rows, y.shape[1]), dtype=y.dtype)
        out.index_copy_(0, state.order, back)
        return out


_E, _K, _H, _T = 8, 2, 32, 6


def _rank_contracts(rank: int, world: int) -> dict[str, dict]:
    reports = {}
    for dtype in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        variants = {
            "standin": lambda: StandInA2A(rank, world, _E, _K),
            "padded": lambda dtype=dtype: FlashInferA2A._from_engine(
                _PaddedStandInEngine(rank, world, _E, _K, _T), TWO_SIDED, rank, world, _E, _K, _H,
                _T, dtype),
            "mean": lambda: _MeanStandIn(rank, world, _E, _K),
            "no_reduce": lambda: _NoReduceStandIn(rank, world, _E, _K),
        }
        for variant, factory in variants.items():
            reports[f"{variant}-{name}"] = fc.contract_check(
                TWO_SIDED, rank, world, _E, _K, _H, _T, dtype, adapter_factory=factory, device="cpu")
    return reports


@pytest.fixture(scope="module")
def contracts():
    from real.pool import fresh_run

    return fresh_run(2, _rank_contracts, timeout_s=120.0)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["standin", "padded"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_contract_holds_for_a_reducing_combine(contracts, variant, dtype):
    for rank, reports in enumerate(contracts):
        r = reports[f"{variant}-{dtype}"]
        assert r["ran"] and r["ok"] and r["ok_this_rank"], r
        assert r["combine_reduces"] and r["recv_counts_match"]
        assert "contract holds" in r["diagnosis"]
        assert r["rank"] == rank and r["world"] == 2 and r["shape"] == [r["tokens"], _H]
    # Uneven batches: rank 1 sends one token fewer.
    assert [c[f"{variant}-{dtype}"]["tokens"] for c in contracts] == [_T, _T - 1]
    # What rank 0 received from rank 1 is what rank 1 sent to rank 0.
    total = sum(sum(c[f"{variant}-{dtype}"]["recv_counts"]) for c in contracts)
    assert total == sum(c[f"{variant}-{dtype}"]["rows_received"] for c in contracts)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_contract_check_flags_a_mean_combine(contracts, dtype):
    for reports in contracts:
        r = reports[f"mean-{dtype}"]
        assert r["ran"] and not r["ok"] and not r["combine_reduces"], r
    assert any("mean over contributing ranks" in c[f"mean-{dtype}"]["diagnosis"] for c in contracts)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_contract_check_flags_a_combine_that_does_not_reduce(contracts, dtype):
    for reports in contracts:
        r = reports[f"no_reduce-{dtype}"]
        assert r["ran"] and not r["ok"], r  # ok is agreed over all ranks
    assert any(not c[f"no_reduce-{dtype}"]["combine_reduces"] for c in contracts)
