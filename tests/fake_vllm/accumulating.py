"""Engine-side code for trace-mode tests: MoE forwards that accumulate into
a zero buffer, in the ways an engine can write it. Each takes the layer input
`x` and stand-ins for the bound entry points (`routed`, `shared`, `reduce`),
which the test records as steps; the torch calls here are the engine's own
(this directory is the traced engine's package)."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from typing import Any

import torch

Entry = Callable[[Any], Any]


def zeros_like_iadd(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = torch.zeros_like(x)
    out += routed(x)
    return reduce(out)


def new_zeros_add_(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = x.new_zeros((x.shape[0], x.shape[1]))
    out.add_(routed(x))
    return reduce(out)


def factory_zeros(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = torch.zeros((x.shape[0], x.shape[1]), dtype=x.dtype)
    out += routed(x)
    return reduce(out)


def empty_then_zero_(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = torch.empty((x.shape[0], x.shape[1]), dtype=x.dtype).zero_()
    out = out + routed(x)  # not in place: the sum is a new tensor
    return reduce(out)


def shared_then_routed(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = torch.empty_like(x)
    out.zero_()
    out += shared(x)  # the first write
    out += routed(x)  # an add
    return reduce(out)


def filled_with_ones(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = torch.zeros((x.shape[0], x.shape[1]), dtype=x.dtype)
    out.fill_(1.0)  # no longer zeros: adding into it is not the value added
    out += routed(x)
    return reduce(out)


def returns_the_zeros(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = torch.zeros_like(x)
    routed(x)  # computed, never added in
    return reduce(out)


# Writes into a zero buffer other than the accumulation: the buffer is no
# longer zeros, so adding into it is not the value added.


def _zeros(x: Any) -> Any:
    return torch.zeros((x.shape[0], x.shape[1]), dtype=x.dtype)


@torch.library.custom_op("fake_vllm::write_fives", mutates_args=("out",))
def write_fives(out: torch.Tensor) -> None:
    """A compiled op writing its argument (its name says nothing of it)."""
    out.fill_(5.0)


def view_write(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = _zeros(x)
    out.view(-1)[:] = 5.0
    out += routed(x)
    return reduce(out)


def setitem_write(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = _zeros(x)
    rows = out[1:]
    rows[0] = 5.0  # through a slice of the buffer
    out += routed(x)
    return reduce(out)


def out_kwarg_write(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = _zeros(x)
    torch.mul(torch.ones((out.numel(),)), 5.0, out=out.view(-1))
    out += routed(x)
    return reduce(out)


def unknown_op_write(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = _zeros(x)
    torch.ops.fake_vllm.write_fives(out)
    out += routed(x)
    return reduce(out)


def pointer_write(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = _zeros(x)
    # A kernel launch writes through the raw pointer: no torch call sees it.
    ctypes.memset(out.data_ptr(), 1, out.numel() * out.element_size())
    out += routed(x)
    return reduce(out)


def zeros_like_pointer_write(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = torch.zeros_like(x)
    ctypes.memset(out.data_ptr(), 1, out.numel() * out.element_size())
    out += routed(x)
    return reduce(out)


def accumulate_through_a_view(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = torch.zeros_like(x)
    out.reshape(x.shape[0], x.shape[1]).add_(routed(x))  # through an alias: out holds the routed output
    out += shared(x)
    return reduce(out)


def filled_with_fives(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = torch.full_like(x, 5.0)
    out += routed(x)
    return reduce(out)


def zeros_plus_broadcast_zeros(x: Any, routed: Entry, shared: Entry, reduce: Entry) -> Any:
    out = torch.zeros_like(x)
    out = out + x.new_zeros((x.shape[1],))  # a row of zeros broadcast over the tokens
    out += routed(x)
    return reduce(out)
