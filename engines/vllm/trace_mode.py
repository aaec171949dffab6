"""Trace mode of the engine probe (runs inside the engine venv): one rank's
forward of vLLM's own MoE runner as an ordered list of steps with tensor
identity, for the twin's `--runner vllm` to replay as Ops calls.

Two sources of steps:
- the recorders (engines/vllm/recorders.py) at the bound entry points
  (collectives, streams/events, shared MLP, latent transforms, router,
  expert GEMMs): each reports its input and output tensors to `Tracer.step`;
- `EngineOps`, a live `torch.overrides.TorchFunctionMode` over the forward:
  every torch call of the engine's own code on a tracked tensor is mapped to
  an Ops step (trim, trim_rows, pad, add, scale, clone, view, copy, buffer)
  or recorded as `unsupported`. A zero-filled buffer (`zeros_like`,
  `new_zeros`, `torch.zeros`, `empty` then `zero_`) is a `buffer` step with
  `zeros`: the replay turns a first accumulation into it into the value added.
  One made without a tracked tensor (`torch.zeros(shape)`) becomes tracked
  only when a tracked call uses it. Any write the replay does not follow
  (through a view, by an unknown op, through a raw pointer) drops the zero
  status (engines/vllm/zero_marks.py): an `overwritten` step;
- the custom op's return (`boundary`): each output with the shape the op's
  fake implementation declares (the probe calls the engine's fake impl).

Binding choice: a live TorchFunctionMode, not a torch.fx / dynamo trace. The
runner's forward branches in Python on configuration and shapes (that is
what the twin checks), and the recorders return placeholder tensors, so
running the code once per rank with a mode that sees each call as issued
keeps the engine's control flow exactly as written; a graph capture would
need the custom op and the recorders to be traceable and would hide the
Python branches. Each step's `site` is the nearest engine frame (qualified
name, and file:line under the vllm package).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from engines.vllm.zero_marks import ZeroMarks

_HERE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep

# Calls that read only shape/dtype/device: no step (an output tensor keeps the id).
SHAPE_ONLY = frozenset({
    "shape", "dtype", "device", "size", "dim", "numel", "stride", "is_contiguous", "data_ptr", "__len__",
    "ndim", "element_size", "is_cuda", "requires_grad", "layout", "is_floating_point", "get_device",
    "storage_offset", "__format__", "__repr__", "is_quantized", "is_sparse", "is_meta", "names",
})
# Same values, maybe another layout or dtype: the output is the input's value.
ALIASES = frozenset({"contiguous", "to", "float", "bfloat16", "half", "detach", "requires_grad_"})
BUFFERS = frozenset({"new_zeros", "new_empty", "empty_like", "zeros_like", "new_full", "full_like"})
# Buffers with their input's shape (the replay takes the shape of the replayed input).
LIKE = frozenset({"empty_like", "zeros_like", "full_like"})
# Factories of a tensor from a shape alone, and in-place fills.
FACTORIES = frozenset({"zeros", "full", "empty"})
FILLS = frozenset({"zero_", "fill_"})
ADDS = frozenset({"add", "__add__", "__radd__", "add_", "__iadd__"})
MULS = frozenset({"mul", "__mul__", "__rmul__", "mul_", "__imul__"})
DIVS = frozenset({"div", "__truediv__", "div_", "__itruediv__"})
INPLACE = frozenset({"add_", "__iadd__", "mul_", "__imul__", "div_", "__itruediv__", "copy_"})


def func_name(func: Any) -> str:
    """`Tensor.shape.__get__` is named `shape`; otherwise the function's name."""
    name = getattr(func, "__name__", str(func))
    if name == "__get__":
        return getattr(getattr(func, "__self__", None), "__name__", name)
    return name


class Tracer:
    """Tensor identity (id of the live object -> step-level id) and the steps."""

    def __init__(self, engine_dir: str) -> None:
        self.engine_dir = os.path.abspath(engine_dir) + os.sep
        self.ids: dict[int, str] = {}
        self.keep: list[Any] = []  # tracked tensors stay alive: ids are never reused
        self.steps: list[dict[str, Any]] = []
        self.count = 0
        self.stream = "main"
        self.pause = 0  # > 0: torch calls are not steps (the probe's own bookkeeping)
        self.marks = ZeroMarks(self)  # the buffers that still hold zeros
        self.in_call = False  # inside EngineOps' handling of one torch call

    @contextmanager
    def paused(self) -> Iterator[None]:
        self.pause += 1
        try:
            yield
        finally:
            self.pause -= 1

    # ---- identity ----

    def new(self, t: Any, label: str = "t") -> str:
        tid = f"{label}{self.count}"
        self.count += 1
        self.marks.forget(self.ids.get(id(t)))
        self.ids[id(t)] = tid
        self.keep.append(t)
        return tid

    def tid(self, t: Any) -> str | None:
        return self.ids.get(id(t)) if isinstance(t, torch.Tensor) else None

    def tracked(self, *values: Any) -> bool:
        return any(self.tid(v) is not None for v in _flat(values))

    def materialize(self, values: list[Any]) -> None:
        """Loose zero tensors among `values` become tracked, as a zero
        `buffer` step at the engine line that filled them."""
        for v in values:
            made = self.marks.take_loose(v) if self.tid(v) is None else None
            if made is not None:
                self.step("buffer", [], [v], shape=[int(d) for d in v.shape], zeros=True, like=False,
                          site=made[0], where=made[1])

    # ---- steps ----

    def step(self, op: str, ins: list[Any], outs: list[Any], **attrs: Any) -> dict[str, Any]:
        """One step: input ids (None for an untracked tensor), fresh output ids;
        `site`/`where` in attrs name another engine line than the caller's."""
        if self.marks and not self.in_call:  # a recorder's step: were its inputs written unseen?
            with self.paused():
                self.marks.audit(self.marks.touched(ins))
        site, where = self.site()
        zero = self.zero_result(op, ins, attrs)
        st = {"op": op, "in": [self.tid(t) for t in ins], "out": [self.new(t) for t in outs],
              "site": site, "where": where, "stream": self.stream, **attrs}
        self.steps.append(st)
        if zero:
            with self.paused():
                for t, tid in zip(outs, st["out"], strict=True):
                    self.marks.mark(t, tid, in_place=bool(ins))
        return st

    def zero_result(self, op: str, ins: list[Any], attrs: dict[str, Any]) -> bool:
        """Whether the replay holds the step's outputs as zeros (as runner.Replay decides)."""
        z = self.marks.is_zero
        if op == "buffer":
            return bool(attrs.get("zeros"))
        if op in ("view", "scale", "clone", "copy"):
            return z(ins[0])
        return op == "add" and z(ins[0]) and z(ins[1])

    def site(self) -> tuple[str, str]:
        """The nearest engine frame: its qualified name and file:line."""
        f = sys._getframe(1)
        while f is not None:
            path = os.path.abspath(f.f_code.co_filename)
            if path.startswith(self.engine_dir):
                rel = os.path.relpath(path, os.path.dirname(self.engine_dir.rstrip(os.sep)))
                return getattr(f.f_code, "co_qualname", f.f_code.co_name), f"{rel}:{f.f_lineno}"
            f = f.f_back
        return "?", "?"

    def engine_caller(self) -> bool:
        """Whether the torch call was issued by the engine's own code (not by a
        recorder or the probe, whose internals are not steps)."""
        f = sys._getframe(2)
        while f is not None:
            path = os.path.abspath(f.f_code.co_filename)
            if path != _HERE and not path.startswith(_TORCH_DIR):
                return path.startswith(self.engine_dir)
            f = f.f_back
        return False


def _flat(values: Any) -> list[Any]:
    out: list[Any] = []
    for v in values:
        if isinstance(v, list | tuple):
            out.extend(_flat(v))
        elif isinstance(v, dict):
            out.extend(_flat(list(v.values())))
        else:
            out.append(v)
    return out


class EngineOps(TorchFunctionMode):
    """The engine's own tensor ops on tracked tensors, as steps."""

    def __init__(self, tracer: Tracer) -> None:
        super().__init__()
        self.tr = tracer

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        name = func_name(func)
        tr = self.tr
        if tr.pause:
            return func(*args, **kwargs)
        # Tensors of buffers that hold zeros: checked before and after any call (by anyone).
        touched = tr.marks.touched(_flat((args, kwargs))) if tr.marks else []  # (no marks: no flattening)
        tr.marks.kept.clear()  # only this call's own steps may vouch for its writes
        if touched:
            with tr.paused():
                tr.marks.audit(touched)
        out = func(*args, **kwargs)
        tr.in_call = True
        try:
            if name in SHAPE_ONLY:
                pass
            elif not tr.tracked(args, kwargs):
                self.untracked(name, args, kwargs, out)
            elif tr.engine_caller():
                tr.materialize(_flat((args, kwargs)))
                self.map(name, args, kwargs, out)
        finally:
            tr.in_call = False
        if touched:
            with tr.paused():
                tr.marks.settle(func, name, args, kwargs, touched)
        return out

    def untracked(self, name: str, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        """Zero tensors the engine makes without a tracked tensor (loose until a step uses them)."""
        tr = self.tr
        x = args[0] if args else None
        if not isinstance(out, torch.Tensor):
            return
        if (name in FACTORIES or name in FILLS) and _zero_fill(name, args, kwargs) and tr.engine_caller():
            with tr.paused():
                tr.marks.mark(out, None, in_place=name in FILLS)
        elif name in ALIASES and isinstance(x, torch.Tensor) and id(x) in tr.marks.loose and out is not x:
            with tr.paused():
                tr.marks.mark(out, None, in_place=True, site=tr.marks.loose[id(x)][1:])

    def map(self, name: str, args: Any, kwargs: dict[str, Any], out: Any) -> None:
        tr = self.tr
        x = args[0] if args else None
        if name in ALIASES:
            if isinstance(out, torch.Tensor) and out is not x and tr.tid(x) is not None:
                tr.ids[id(out)] = tr.ids[id(x)]
                tr.keep.append(out)
            return
        handler = self._handler(name)
        if handler is None or not handler(name, args, kwargs, out):
            tr.step("unsupported", [a for a in _flat(args) if isinstance(a, torch.Tensor)],
                    [out] if isinstance(out, torch.Tensor) else [], what=f"torch.{name}")

    def _handler(self, name: str) -> Any:
        if name == "__getitem__":
            return self._getitem
        if name == "pad":
            return self._pad
        if name in ADDS:
            return self._add
        if name in MULS or name in DIVS:
            return self._scale
        if name == "clone":
            return self._clone
        if name in ("view", "reshape"):
            return self._view
        if name == "copy_":
            return self._copy
        if name in BUFFERS:
            return self._buffer
        if name in FILLS:
            return self._fill
        return None

    # Each handler returns False when the call is outside what it maps.

    def _getitem(self, name: str, args: Any, kwargs: Any, out: Any) -> bool:
        x, idx = args[0], args[1]
        parts = idx if isinstance(idx, tuple) else (idx,)
        if len(parts) == 2 and parts[0] is Ellipsis and _prefix(parts[1]) is not None:
            self.tr.step("trim", [x], [out], width=_prefix(parts[1]))
            return True
        if parts and _prefix(parts[0]) is not None and all(_full(p) for p in parts[1:]):
            self.tr.step("trim_rows", [x], [out], rows=_prefix(parts[0]))
            return True
        return False

    def _pad(self, name: str, args: Any, kwargs: Any, out: Any) -> bool:
        x = args[0]
        spec = args[1] if len(args) > 1 else kwargs.get("pad")
        mode = args[2] if len(args) > 2 else kwargs.get("mode", "constant")
        value = args[3] if len(args) > 3 else kwargs.get("value", 0.0)
        if mode != "constant" or value not in (0, 0.0, None) or len(spec) != 2 or spec[0] != 0:
            return False
        self.tr.step("pad", [x], [out], width=int(x.shape[-1]) + int(spec[1]))
        return True

    def _add(self, name: str, args: Any, kwargs: Any, out: Any) -> bool:
        if len(args) != 2 or kwargs.get("alpha", 1) != 1:
            return False
        a, b = args
        if self.tr.tid(a) is None or self.tr.tid(b) is None:
            return False  # a constant or an untracked tensor changes values unseen
        self.tr.step("add", [a, b], [out], inplace=name in INPLACE)
        return True

    def _scale(self, name: str, args: Any, kwargs: Any, out: Any) -> bool:
        if len(args) != 2:
            return False
        x, f = args
        if isinstance(x, int | float):  # __rmul__ order
            x, f = f, x
        if isinstance(f, bool) or not isinstance(f, int | float) or self.tr.tid(x) is None:
            return False
        factor = 1.0 / f if name in DIVS else float(f)
        self.tr.step("scale", [x], [out], factor=factor, inplace=name in INPLACE)
        return True

    def _clone(self, name: str, args: Any, kwargs: Any, out: Any) -> bool:
        self.tr.step("clone", [args[0]], [out])
        return True

    def _view(self, name: str, args: Any, kwargs: Any, out: Any) -> bool:
        self.tr.step("view", [args[0]], [out], shape=[int(d) for d in out.shape], op_name=name)
        return True

    def _copy(self, name: str, args: Any, kwargs: Any, out: Any) -> bool:
        dst, src = args[0], args[1]
        if tuple(dst.shape) != tuple(src.shape) or self.tr.tid(src) is None:
            return False
        self.tr.step("copy", [src, dst], [out])
        return True

    def _buffer(self, name: str, args: Any, kwargs: Any, out: Any) -> bool:
        zero = name in ("new_zeros", "zeros_like") or _zero_fill(name, args, kwargs)
        fill = _fill_value(name, args, kwargs)
        attrs = {"fill": fill} if not zero and isinstance(fill, int | float) and not isinstance(fill, bool) else {}
        self.tr.step("buffer", [args[0]], [out], shape=[int(d) for d in out.shape], zeros=zero, like=name in LIKE,
                     **attrs)
        return True

    def _fill(self, name: str, args: Any, kwargs: Any, out: Any) -> bool:
        """`x.zero_()` / `x.fill_(0)`: x is a zero buffer of its own shape from here on."""
        if not _zero_fill(name, args, kwargs):
            return False
        self.tr.step("buffer", [args[0]], [out], shape=[int(d) for d in out.shape], zeros=True, like=True)
        return True


def _fill_value(name: str, args: Any, kwargs: dict[str, Any]) -> Any:
    """The value a full/new_full/full_like/fill_ call fills with (None: not found)."""
    if name in ("full", "new_full", "full_like", "fill_"):
        at = 2 if name == "new_full" else 1  # Tensor.new_full(self, size, fill_value)
        v = args[at] if len(args) > at else kwargs.get("fill_value", kwargs.get("value"))
        return v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
    return None


def _zero_fill(name: str, args: Any, kwargs: dict[str, Any]) -> bool:
    """Whether the call's result is all zeros (an `empty` is not, until zero_)."""
    if name in ("zeros", "zero_"):
        return True
    v = _fill_value(name, args, kwargs)
    return not isinstance(v, bool) and isinstance(v, int | float) and v == 0


def _prefix(s: Any) -> int | None:
    """`:n` as n (a slice from 0 with step 1 and a stop), else None."""
    if isinstance(s, slice) and s.start in (None, 0) and s.step in (None, 1) and isinstance(s.stop, int):
        return int(s.stop)
    return None


def _full(s: Any) -> bool:
    return s is Ellipsis or (isinstance(s, slice) and s == slice(None))


def traced_forward(tracer: Tracer, runner: Any, x: Any, logits: Any, decisions: dict[str, Any]) -> Any:
    """The engine runner's forward under `EngineOps`; the steps go into
    `decisions["trace"]` with the ids of the input, the logits and the output."""
    ids = {"input": tracer.new(x, "x"), "logits": tracer.new(logits, "logits")}
    with EngineOps(tracer):
        out = runner.forward(x, logits)
    decisions["trace"] = {"steps": tracer.steps, **ids, "output": tracer.tid(out)}
    return out


def declaring(tracer: Tracer, entry: Any, fake: Any, plain: bool) -> Any:
    """The custom op's entry, followed by a `boundary` step per output with
    the shape the op's fake implementation `fake` declares (what
    torch.compile holds the eager output to)."""

    def declared(*args: Any) -> Any:
        result = entry(*args)
        with tracer.paused():
            shapes = fake(*args)
        outs = (result,) if plain else tuple(result)
        shapes = (shapes,) if plain else tuple(shapes)
        for out, shape in zip(outs, shapes, strict=True):
            if tracer.tid(out) is not None:
                tracer.step("boundary", [out], [out], shape=[int(d) for d in shape.shape])
        return result

    return declared
