"""Engine-side code for trace-mode tests: MoE forwards that accumulate into
a zero buffer, in the ways an engine can write it. Each takes the layer input
`x` and stand-ins for the bound entry points (`routed`, `shared`, `reduce`),
which the test records as steps; the torch calls here are the engine's own
(this directory is the traced engine's package)."""

from __future__ import annotations

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
