"""Which traced buffers still hold zeros (runs inside the engine venv).

The replay turns an add into a zero buffer into a copy of the value added,
which is only sound while the buffer really holds zeros. A mark is kept per
storage (views, slices and reshapes of a buffer share it), with the storage's
version counter when the mark was last known true. A mark is dropped, and
the replay told (an `overwritten` step: reading the buffer is then a runner
error), whenever the storage may have been written other than by a step the
replay follows:
- the version counter moved (any in-place op or `out=` write the dispatcher
  sees, through any alias);
- the values are no longer all zero (a write no torch call shows);
- its raw memory escaped (`data_ptr`, `numpy`, DLPack: a kernel launch or a
  C++ op may write through it);
- a call other than a known read-only op was given a tensor of it.
When in doubt the mark goes: a runner error is acceptable, a silently wrong
replay is not.
"""

from __future__ import annotations

from typing import Any

import torch

# Calls that hand out the raw memory: anything may write through it unseen.
ESCAPES = frozenset({"data_ptr", "untyped_storage", "storage", "_storage", "__dlpack__", "numpy", "__array__",
                     "__cuda_array_interface__", "set_", "share_memory_"})
# Calls that read their tensor arguments and write none of them (an `out=`
# argument aside, which is always a write).
READ_ONLY = frozenset({
    "shape", "dtype", "device", "size", "dim", "numel", "stride", "is_contiguous", "__len__", "ndim",
    "element_size", "is_cuda", "requires_grad", "layout", "is_floating_point", "get_device", "storage_offset",
    "__format__", "__repr__", "is_quantized", "is_sparse", "is_meta", "names", "_version", "_base", "is_inference",
    "contiguous", "to", "float", "bfloat16", "half", "detach", "type_as",
    "view", "reshape", "view_as", "reshape_as", "__getitem__", "as_strided", "narrow", "select", "expand",
    "expand_as", "flatten", "unflatten", "squeeze", "unsqueeze", "transpose", "permute", "t", "T", "split",
    "chunk", "unbind", "movedim",
    "add", "__add__", "__radd__", "sub", "__sub__", "__rsub__", "mul", "__mul__", "__rmul__", "div",
    "__truediv__", "neg", "__neg__", "sum", "mean", "clone", "cat", "stack", "matmul", "__matmul__", "pad",
    "new_zeros", "new_empty", "new_full", "new_ones", "empty_like", "zeros_like", "full_like", "ones_like",
    "eq", "ne", "__eq__", "__ne__", "all", "any", "abs", "max", "min", "equal", "allclose", "item", "tolist",
    "__bool__",
})

Key = tuple[str, int]


def storage_key(t: Any) -> Key:
    """The storage a tensor's elements live in (shared by every view of it)."""
    ptr = t.untyped_storage().data_ptr()
    if ptr:
        return str(t.device), ptr
    base = t._base if t._base is not None else t  # no memory (meta, empty): the view's root
    return "object", id(base)


def version(t: Any) -> int | None:
    try:
        return int(t._version)
    except RuntimeError:  # an inference tensor keeps no version counter
        return None


def all_zero(t: Any) -> bool:
    if t.device.type == "meta" or t.numel() == 0:
        return True
    return not bool((t != 0).any())


def _foreign_op(func: Any) -> bool:
    """A registered op outside aten (`torch.ops.<ns>.<op>`): its name says nothing of what it writes."""
    ns = getattr(func, "namespace", None)
    if ns is None:
        q = getattr(func, "_qualified_op_name", None)
        ns = q.split("::")[0] if isinstance(q, str) else None
    return ns is not None and ns != "aten"


def written(func: Any, name: str, args: Any, kwargs: dict[str, Any], tensors: list[Any]) -> list[Any]:
    """Those of `tensors` (a call's tensor arguments) the call may write."""
    outs = [kwargs["out"]] if isinstance(kwargs.get("out"), torch.Tensor) else []
    if isinstance(kwargs.get("out"), list | tuple):
        outs = [o for o in kwargs["out"] if isinstance(o, torch.Tensor)]
    if name in ESCAPES or _foreign_op(func):
        return tensors
    if name in READ_ONLY:
        return outs
    inplace = (name.endswith("_") and not name.startswith("__")) or name == "__setitem__" or (
        name.startswith("__i") and name.endswith("__"))
    if inplace and args and isinstance(args[0], torch.Tensor):
        return [args[0], *outs]
    return tensors  # an op of unknown effect: any argument may be written


class ZeroMarks:
    """Zero marks of one traced forward: tracked tensors (by step-level id)
    and zero tensors no step has seen yet (`loose`, made from a shape alone)."""

    def __init__(self, tracer: Any) -> None:
        self.tr = tracer
        self.tids: dict[str, Any] = {}  # id the replay holds as zeros -> its tensor
        self.loose: dict[int, tuple[Any, str, str]] = {}  # id(tensor) -> (tensor, site, where)
        self.pristine: dict[Key, int | None] = {}  # storage -> version while its marks hold
        self.kept: set[Key] = set()  # storages a zero-preserving in-place step wrote in this call

    def __bool__(self) -> bool:
        return bool(self.pristine)

    def touched(self, values: list[Any]) -> list[Any]:
        """The tensors among `values` that share a storage with a mark."""
        if not self.pristine:
            return []
        return [v for v in values if isinstance(v, torch.Tensor) and storage_key(v) in self.pristine]

    # ---- marking ----

    def mark(self, t: Any, tid: str | None, in_place: bool, site: tuple[str, str] | None = None) -> None:
        """`t` (step id `tid`, or None: a loose tensor) holds zeros."""
        key = storage_key(t)
        if key in self.pristine:
            if in_place:
                self.kept.add(key)  # this call's own write: settle() takes the new version
        else:
            self.pristine[key] = version(t)
        if tid is None:
            self.loose[id(t)] = (t, *(site or self.tr.site()))
        else:
            self.tids[tid] = t
        self.tr.keep.append(t)

    def forget(self, tid: str | None) -> None:
        """The tensor bound to `tid` gets a new id: the old one is never read again."""
        if tid is not None:
            self.tids.pop(tid, None)

    def is_zero(self, t: Any) -> bool:
        tid = self.tr.tid(t)
        return tid in self.tids if tid is not None else False

    def take_loose(self, t: Any) -> tuple[str, str] | None:
        """A loose zero tensor's allocation site, now that a step uses it (None: not a loose zero)."""
        entry = self.loose.pop(id(t), None) if isinstance(t, torch.Tensor) else None
        return None if entry is None else (entry[1], entry[2])

    # ---- checking ----

    def audit(self, tensors: list[Any]) -> None:
        """Before a call: drop the marks of any storage written since it was last seen."""
        for key in {storage_key(t) for t in tensors}:
            if key in self.pristine and self._dirty(key):
                self.drop(key)

    def settle(self, func: Any, name: str, args: Any, kwargs: dict[str, Any], tensors: list[Any]) -> None:
        """After a call given `tensors` (marked storages): drop what it may have written."""
        hit = {storage_key(t) for t in written(func, name, args, kwargs, tensors)}
        for key in {storage_key(t) for t in tensors}:
            if key not in self.pristine:
                continue
            if key in self.kept:  # a write the replay follows, that leaves zeros
                self.pristine[key] = self._version(key)
            elif key in hit or self._version(key) != self.pristine[key]:
                self.drop(key)
        self.kept.clear()

    def drop(self, key: Key) -> None:
        """The storage may hold anything: the replay forgets its zeros."""
        self.pristine.pop(key, None)
        for i, (t, _site, _where) in list(self.loose.items()):
            if storage_key(t) == key:
                del self.loose[i]
        for tid, t in list(self.tids.items()):
            if storage_key(t) == key:
                del self.tids[tid]
                site, where = self.tr.site()
                self.tr.steps.append({"op": "overwritten", "in": [tid], "out": [tid], "site": site,
                                      "where": where, "stream": self.tr.stream})

    def _marked(self, key: Key) -> list[Any]:
        return [t for t, _s, _w in self.loose.values() if storage_key(t) == key] + [
            t for t in self.tids.values() if storage_key(t) == key]

    def _version(self, key: Key) -> int | None:
        ts = self._marked(key)
        return version(ts[0]) if ts else None

    def _dirty(self, key: Key) -> bool:
        ts = self._marked(key)
        if not ts:
            return True
        return version(ts[0]) != self.pristine[key] or not all(all_zero(t) for t in ts)
