"""Which scenario predicates a simulated run consulted, and with what values.

`recording(s)` returns a copy of `s` whose reads are logged while `reads()`
is active: derived properties (`sp`, `model.padded`, ...), raw fields
(`parallel.eplb`) and method calls (`group("tp", 0)`, with their arguments),
each with the value it returned. Only the outermost read is logged (the
fields `sp` reads inside itself are not), which is what makes two
assignments equivalent when they differ only below a predicate (e.g. the
engine version when the layout is not sequence parallel anyway).

Everything that reads the scenario during `simulate` is logged: the runner's
decisions, and the simulator's own checks and cost model (the outcome of a
run is a function of all of them; logging the runner alone would be unsound,
e.g. for a runner that never looks at tp but whose missing reduction matters
only when tp > 1). A read whose value is not plain data (a scenario copy
from `with_`, a dict from `to_dict`) cannot be compared with another
assignment's: such a run is marked `opaque` and never stands for another.
The argument assumes the runner's decisions are a function of what it reads
from the scenario and from Ops (shapes the simulator derives from logged
reads); a runner that keeps state across scenarios (a module-level cache)
or draws random numbers is outside it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from enum import Enum
from typing import Any

from scenarios.spec import ModelTraits, ParallelConfig, Runtime, Scenario, Workload

# Labels the simulator copies into the trace; they never change a decision.
_LABELS = frozenset({"name", "summary"})
Read = tuple[str, Any]  # (dotted path, call arguments or None)


class _State:
    log: dict[Read, Any] | None = None
    depth = 0
    opaque = False


_S = _State()


def _plain(v: Any) -> bool:
    if v is None or isinstance(v, (bool, int, float, str, Enum)):
        return True
    if isinstance(v, tuple):
        return all(_plain(x) for x in v)
    return False


class _Recording:
    """Mixin: logs outermost attribute reads while a log is active."""

    _rec_prefix = ""
    __hash__ = object.__hash__  # identity: no cache may hand a run another run's result

    def __eq__(self, other: object) -> bool:
        return self is other

    def __getattribute__(self, name: str) -> Any:
        if name.startswith("_") or _S.log is None or _S.depth or name in _LABELS:
            return object.__getattribute__(self, name)
        _S.depth += 1
        try:
            value = object.__getattribute__(self, name)
        finally:
            _S.depth -= 1
        if isinstance(value, _Recording):
            return value  # a section: its own reads are logged
        path = type(self)._rec_prefix + name
        if callable(value):
            return _recorded_call(path, value)
        _log((path, None), value)
        return value


def _log(key: Read, value: Any) -> None:
    assert _S.log is not None
    if not _plain(value):
        _S.opaque = True
        return
    _S.log.setdefault(key, value)


def _recorded_call(path: str, fn: Any) -> Any:
    def call(*args: Any, **kwargs: Any) -> Any:
        _S.depth += 1
        try:
            out = fn(*args, **kwargs)
        finally:
            _S.depth -= 1
        if _S.log is not None:
            key = (path, (args, tuple(sorted(kwargs.items()))))
            if _plain(key[1]):
                _log(key, out)
            else:
                _S.opaque = True
        return out

    return call


class _RecModel(_Recording, ModelTraits):
    _rec_prefix = "model."


class _RecParallel(_Recording, ParallelConfig):
    _rec_prefix = "parallel."


class _RecRuntime(_Recording, Runtime):
    _rec_prefix = "runtime."


class _RecWorkload(_Recording, Workload):
    _rec_prefix = "workload."


class _RecScenario(_Recording, Scenario):
    _rec_prefix = ""


_SECTIONS = {"model": _RecModel, "parallel": _RecParallel, "runtime": _RecRuntime, "workload": _RecWorkload}


def recording(s: Scenario) -> Scenario:
    """A copy of `s` that logs its reads inside `reads()`."""
    parts = {f.name: getattr(s, f.name) for f in dataclasses.fields(Scenario)}
    for name, cls in _SECTIONS.items():
        sec = parts[name]
        parts[name] = cls(**{f.name: getattr(sec, f.name) for f in dataclasses.fields(sec)})
    return _RecScenario(**parts)


@dataclasses.dataclass
class Reads:
    """What one run read: {(path, args): value}; opaque if some read was not plain data."""

    values: dict[Read, Any] = dataclasses.field(default_factory=dict)
    opaque: bool = False

    def consulted(self) -> list[str]:
        return sorted({path for path, _args in self.values})


@contextlib.contextmanager
def reads() -> Iterator[Reads]:
    """Log the reads of recording scenarios made inside the block."""
    if _S.log is not None:
        raise RuntimeError("reads() does not nest")
    out = Reads()
    _S.log, _S.depth, _S.opaque = out.values, 0, False
    try:
        yield out
    finally:
        out.opaque = _S.opaque
        _S.log, _S.depth, _S.opaque = None, 0, False


_MISSING = object()


def evaluate(s: Scenario, key: Read) -> Any:
    """The value `key` reads on a plain scenario (_MISSING if it cannot be read)."""
    path, args = key
    obj: Any = s
    try:
        for part in path.split("."):
            obj = getattr(obj, part)
        if args is not None:
            pos, kw = args
            obj = obj(*pos, **dict(kw))
    except Exception:  # noqa: BLE001 - a read that fails here differs from the recorded one
        return _MISSING
    return obj


def same_reads(s: Scenario, recorded: Reads) -> bool:
    """Every predicate the recorded run consulted has the same value on `s`:
    `s` runs the same program, judged the same way."""
    if recorded.opaque:
        return False
    for key, value in recorded.values.items():
        got = evaluate(s, key)
        if got is _MISSING or type(got) is not type(value) or got != value:
            return False
    return True


__all__ = ["Reads", "evaluate", "reads", "recording", "same_reads"]
