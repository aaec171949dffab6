"""The value types of the reduction algebra (sim/algebra.py): a simulated
tensor (Value) is a sequence of row blocks (Block), each holding a linear
combination of sources with their coefficients."""

from __future__ import annotations

import math
from typing import NamedTuple

Source = tuple[str, str, "str | None"]  # (component, shard, foreign token key)

INPUT_COMPONENTS = ("x", "xlat")
EPS = 1e-9


class Block(NamedTuple):
    """Rows of one token set and their linear combination of sources. A named
    tuple: wide worlds build one per member block, and this is the cheapest
    immutable record to build."""

    key: str
    rows: int
    terms: tuple[tuple[Source, float], ...]  # sorted, coefficient != 0

    def coeffs(self) -> dict[Source, float]:
        return dict(self.terms)


class Value:
    """A simulated tensor's row blocks and, per component, the product of the
    scale ops applied to it (already part of the coefficients; kept to know
    whether routed's scaling has happened). Immutable.

    A value whose blocks all hold one terms tuple (what a non-linear op makes)
    may be built `uniform`: its row layout (offsets and keys, shared with the
    value it was made from) plus that terms tuple, its blocks built only if
    asked for. A wide world's expert outputs are such values: building world
    blocks per rank would be world^2 work."""

    # n_blocks is a plain slot, set once: the op budget reads it for every
    # input of every op (scenarios/contain.py), a property would be a call.
    __slots__ = ("_blocks", "scale", "_starts", "_keys", "uniform", "n_blocks")

    def __init__(
        self,
        blocks: tuple[Block, ...] | None,
        scale: tuple[tuple[str, float], ...] = (),
        starts: list[int] | None = None,
        keys: tuple[str, ...] | None = None,
        uniform: tuple[tuple[Source, float], ...] | None = None,
    ) -> None:
        if blocks is None and (starts is None or keys is None or uniform is None):
            raise ValueError("a value without blocks needs its layout and uniform terms")
        self._blocks = blocks
        self.scale = scale
        # Row offset where each block starts, plus the total (built on first
        # use): splitting a wide value bisects it instead of scanning it.
        self._starts = starts
        self._keys = keys
        self.uniform = uniform
        self.n_blocks: int = len(keys) if blocks is None else len(blocks)  # type: ignore[arg-type]

    @property
    def blocks(self) -> tuple[Block, ...]:
        bl = self._blocks
        if bl is None:
            st, terms, new = self._starts, self.uniform, tuple.__new__
            bl = self._blocks = tuple([
                new(Block, (k, st[i + 1] - st[i], terms)) for i, k in enumerate(self._keys)])  # type: ignore[index]
        return bl

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Value):
            return NotImplemented
        return self.blocks == other.blocks and self.scale == other.scale

    def __hash__(self) -> int:
        return hash((self.blocks, self.scale))

    def __repr__(self) -> str:
        return f"Value(blocks={self.blocks!r}, scale={self.scale!r})"

    def starts(self) -> list[int]:
        st = self._starts
        if st is None:
            st, pos = [], 0
            for b in self.blocks:
                st.append(pos)
                pos += b.rows
            st.append(pos)
            self._starts = st
        return st

    @property
    def rows(self) -> int:
        return self.starts()[-1]

    def scale_of(self, component: str) -> float:
        for c, f in self.scale:
            if c == component:
                return f
        return 1.0

    def components(self) -> set[str]:
        return {src[0] for b in self.blocks for src, _ in b.terms}

    def keys(self) -> tuple[str, ...]:
        ks = self._keys
        if ks is None:
            ks = self._keys = tuple([b.key for b in self.blocks])  # (a list: no generator to resume per block)
        return ks

    def same_rows(self, other: Value) -> bool:
        """The same row blocks (keys and sizes) as `other`."""
        if self is other or (self._blocks is not None and self._blocks is other._blocks):
            return True
        if self.n_blocks != other.n_blocks:
            return False
        # The cached layouts read directly (a call each only when not built yet).
        ka, kb = self._keys or self.keys(), other._keys or other.keys()
        if not (ka is kb or ka == kb):
            return False
        sa, sb = self._starts or self.starts(), other._starts or other.starts()
        return sa is sb or sa == sb


def snap(v: float) -> float:
    """v, or the integer within EPS of it (finite values only)."""
    if v == 1.0 or v == 0.0:
        return v
    if math.isfinite(v):
        r = round(v)
        if abs(v - r) < EPS:
            return float(r)
    return v


def _terms(d: dict[Source, float]) -> tuple[tuple[Source, float], ...]:
    items = []
    for k, v in d.items():
        v = snap(v)
        if v != 0.0:  # NaN != 0.0: kept
            items.append((k, v))
    if len(items) > 1:
        items.sort(key=_src_sort)
    return tuple(items)


def _src_sort(item: tuple[Source, float]) -> tuple[str, str, str]:
    (c, s, f), _ = item
    return (c, s, f or "")
