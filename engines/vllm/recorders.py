"""Recorders bound in place of vLLM's collectives, streams and expert GEMMs
(CPU stand-ins, runs inside the engine venv). Each records what the engine's
code asked for into `Recorders.events` (plain dicts) and returns a tensor of
the shape the real piece would return, so the engine's own control flow goes
on as it would on GPUs. Structured so a later full-trace binding can turn the
events into Ops steps: in trace mode (`Recorders.tracer`, engines/vllm/trace_mode.py)
each recorder also reports its input and output tensors as one step.
"""

from __future__ import annotations

import sys
from typing import Any

import torch


def _site(depth: int = 2) -> str:
    """The engine function that called the recorder (its reason for the call)."""
    return sys._getframe(depth).f_code.co_name


class RecStream:
    """A stream stand-in: `with torch.cuda.stream(s)` makes it current."""

    def __init__(self, rec: Recorders, name: str) -> None:
        self.rec, self.name = rec, name

    def wait_stream(self, other: Any) -> None:
        self.rec.event("wait_stream", stream=self.name, on=getattr(other, "name", "?"))
        self.rec.trace("wait_stream", [], [], stream=self.name, on=getattr(other, "name", "?"))


def bind_record_stream() -> None:
    """`Tensor.record_stream(stream)` with a recorded stream (<= 0.22 calls it
    on the shared experts' input before the aux-stream launch): recorded, as
    the real call only tells the CUDA allocator about the stream."""
    real = torch.Tensor.record_stream

    def record_stream(self: torch.Tensor, stream: Any) -> None:
        if isinstance(stream, RecStream):
            stream.rec.event("record_stream", stream=stream.name)
            return None
        return real(self, stream)

    torch.Tensor.record_stream = record_stream  # type: ignore[method-assign]


class RecEvent:
    def __init__(self, rec: Recorders) -> None:
        self.rec = rec
        self.number = rec.new_event_number()  # which event a wait joins on

    def record(self, stream: Any = None) -> None:
        on = getattr(stream, "name", self.rec.current)
        self.rec.event("record_event", stream=on)
        self.rec.trace("record_event", [], [], stream=on, event=self.number)

    def wait(self, stream: Any = None) -> None:
        on = getattr(stream, "name", self.rec.current)
        self.rec.event("wait_event", stream=on)
        self.rec.trace("wait_event", [], [], stream=on, event=self.number)


class _StreamCtx:
    def __init__(self, rec: Recorders, stream: RecStream) -> None:
        self.rec, self.stream, self.prev = rec, stream, "main"

    def __enter__(self) -> RecStream:
        self.prev, self.rec.current = self.rec.current, self.stream.name
        return self.stream

    def __exit__(self, *exc: object) -> None:
        self.rec.current = self.prev


class RecCuda:
    """The parts of `torch.cuda` the shared-experts code uses."""

    def __init__(self, rec: Recorders) -> None:
        self.rec = rec
        self.Stream = lambda *a, **k: RecStream(rec, "aux")
        self.Event = lambda *a, **k: RecEvent(rec)

    def stream(self, s: RecStream) -> _StreamCtx:
        return _StreamCtx(self.rec, s)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cuda, name)


class RecTorch:
    """`torch` with `.cuda` replaced (bound as the module's `torch` name)."""

    def __init__(self, rec: Recorders) -> None:
        self.cuda = RecCuda(rec)

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)


class RecGroup:
    """A process group coordinator: naive dispatch/combine (all-gather over
    the group, then reduce-scatter back) recorded with row counts."""

    def __init__(self, rec: Recorders, name: str, world_size: int, rows: list[int]) -> None:
        self.rec, self.name, self.world_size = rec, name, world_size
        self.rank_in_group, self.rank = 0, 0
        self.rows = rows  # rows each member holds (dispatch gathers them all)
        self.device_communicator = None

    def dispatch_router_logits(self, hidden: torch.Tensor, logits: torch.Tensor,
                               is_sequence_parallel: bool = False, *a: Any) -> tuple[torch.Tensor, torch.Tensor]:
        total = sum(self.rows)
        self.rec.event("dispatch", group=self.name, rows=total, sp=bool(is_sequence_parallel))
        self._local = hidden.shape[0]
        out = hidden.new_zeros((total, hidden.shape[-1])), logits.new_zeros((total, logits.shape[-1]))
        self.rec.trace("dispatch", [hidden, logits], list(out), group=self.name, sp=bool(is_sequence_parallel))
        return out

    def combine(self, hidden: torch.Tensor, is_sequence_parallel: bool = False, *a: Any) -> torch.Tensor:
        self.rec.event("combine", group=self.name, sp=bool(is_sequence_parallel))
        out = hidden[: self._local].clone()
        self.rec.trace("combine", [hidden], [out], group=self.name, sp=bool(is_sequence_parallel))
        return out

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.rec.all_reduce_on(self.name, x, _site())

    def all_gather(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self.rec.event("all_gather", group=self.name, site=_site())
        out = torch.cat([x] * self.world_size, dim=dim)
        self.rec.trace("all_gather", [x], [out], group=self.name, dim=dim)
        return out

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        self.rec.event("reduce_scatter", group=self.name, site=_site())
        out = x.chunk(self.world_size, dim=dim)[0].clone()
        self.rec.trace("reduce_scatter", [x], [out], group=self.name, dim=dim)
        return out


class Recorders:
    """Everything recorded for one scenario's forward."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.current = "main"
        self.tags: dict[int, str] = {}  # id(tensor) -> which output it is
        self.tracer: Any = None  # trace mode: a trace_mode.Tracer
        self._events = 0

    def event(self, op: str, **fields: Any) -> None:
        self.events.append({"op": op, "stream": self.current, **fields})

    def trace(self, op: str, ins: list[Any], outs: list[Any], **attrs: Any) -> None:
        """Trace mode: the same call as a step with tensor identity."""
        if self.tracer is not None:
            self.tracer.stream = self.current
            self.tracer.step(op, ins, outs, **attrs)

    def new_event_number(self) -> int:
        self._events += 1
        return self._events

    def tag(self, x: torch.Tensor, what: str) -> torch.Tensor:
        self.tags[id(x)] = what
        return x

    def all_reduce_on(self, group: str, x: torch.Tensor, site: str) -> torch.Tensor:
        self.event("all_reduce", group=group, site=site, tensor=self.tags.get(id(x), "?"),
                   width=int(x.shape[-1]))
        out = x.clone()
        self.trace("all_reduce", [x], [out], group=group)
        return out

    def tp_all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_on("tp", x, _site())

    def tp_all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        self.event("all_gather", group="tp", site=_site())
        if self.tracer is None:
            return x
        out = x.clone()  # a distinct tensor, so the step's output has its own id
        self.trace("all_gather", [x], [out], group="tp", dim=dim)
        return out


class SharedMLP(torch.nn.Module):
    """The shared-expert MLP stand-in: records where it ran (stream)."""

    def __init__(self, rec: Recorders, hidden: int) -> None:
        super().__init__()
        self.rec, self.hidden = rec, hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rec.event("shared_experts", rows=int(x.shape[0]), width=int(x.shape[-1]))
        out = self.rec.tag(x.new_zeros((x.shape[0], self.hidden)), "shared")
        self.rec.trace("shared_experts", [x], [out])
        return out


class Transform(torch.nn.Module):
    """Latent projection stand-in (down or up); `linear` declares that it
    commutes with the TP sum, as a linear projection does."""

    def __init__(self, rec: Recorders, name: str, out: int, linear: bool) -> None:
        super().__init__()
        self.rec, self.name, self.out = rec, name, out
        if linear:
            self.reduce_commutative = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.rec.event(self.name, width=int(self.out))
        out = x.new_zeros((x.shape[0], self.out))
        self.rec.trace(self.name, [x], [out], linear=bool(getattr(self, "reduce_commutative", False)))
        return out
