"""The real Ops interpreter: real tensors, collectives, streams and kernels.

The *modeled* platform (the scenario's, e.g. `cuda`, on which the runner's
decision logic chooses multi-stream overlap) is kept apart from the
*execution* device here. On CPU:

- streams are stand-ins: the main stream runs on the rank's own thread; every
  other stream ("aux", "comm") is a worker thread executing its ops in issue
  order, with threading.Event as CUDA events. A modeled `rocm` platform takes
  the same path (HIP streams and events order work as CUDA's do); the note
  names the stream it stands in for. torch ops release the GIL, so
  two streams really run at once (one intra-op thread per rank).
- token-routing all-to-all backends (DeepEP, FlashInfer NVLink, MORI, NIXL)
  are stand-ins built on torch.distributed all_to_all: dispatch sends each
  token to the ranks owning its experts, combine adds one row per
  contributing rank in fp32, as those libraries' combine does.
- gloo has no reduce-scatter: it is an all-reduce followed by taking this
  rank's chunk (same result, more traffic).
- nor all_gatherv / reduce_scatterv (row counts that differ per member, e.g.
  the naive DP dispatch/combine with uneven tokens per DP rank): the members
  exchange row counts, pad to the largest, all-gather and unpad; and
  all-reduce, then keep this member's rows. Named in the step's detail.
- the custom-op boundary check stands in for torch.compile's fake-tensor
  shape assertion.

Every stand-in used is listed in the run's notes.

On CUDA the same interpreter uses real CUDA streams and events (a
torch.cuda.Stream per stream name, torch.cuda.Event for ordering and timing),
NCCL collectives on the current stream, and tensors on the rank's device.
That path cannot be exercised on this project's CPU-only machines.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from real.comm import CommOps
from real.compute import FUSED_SLOT, ComputeOps, fingerprints, take_untimed_s  # noqa: F401  (FUSED_SLOT: importable here as before)
from real.errors import IN_OP, RETURNED, UpstreamFailure
from real.model import LayerWeights, layer_input
from real.streams import RealEvent, RealTensor, StreamThread
from scenarios import contain
from scenarios.dispatch_layout import VLLM_LAYOUT, DispatchLayout
from scenarios.ops import (
    VIEW_ROWS_UNMODELED,
    Ops,
    OpsShapeError,
    OpsUsageError,
    trim_error,
    view_shape,
)
from scenarios.spec import Scenario
from scenarios.trace import COLLECTIVE, COMPUTE, DECISION, EVENT, LIFECYCLE, PADDING, WAIT, Step
from scenarios.workload import routing, slice_token_ids

MODEL = "model"


def _mark_in_op(exc: BaseException) -> None:
    """Tag an exception raised inside an op's own function: no runner code runs
    there, so a programming error is the interpreter's (real/errors.py)."""
    with contextlib.suppress(AttributeError, TypeError):
        setattr(exc, IN_OP, True)


class RealOps(CommOps, ComputeOps, Ops):
    """One rank's Ops on real tensors."""

    def __init__(
        self,
        scenario: Scenario,
        rank: int,
        groups: dict[tuple[int, ...], Any],
        kernel: Callable[..., torch.Tensor],
        t0: float,
        predicted_shapes: dict[int, tuple[int, ...]] | None = None,
        delay: dict[str, float] | None = None,
        notes: Callable[[str], None] | None = None,
        dispatch_layout: DispatchLayout = VLLM_LAYOUT,
    ) -> None:
        self.scenario = scenario
        # The runner's engine layout: what dispatch, combine and the routed tokens follow.
        self.layout = dispatch_layout
        self.rank = rank
        self.d, self.t = scenario.coords(rank)
        self.groups = groups
        self.kernel = kernel
        self.t0 = t0
        self._pid = os.getpid()  # the rank's own process (runner code may fork)
        self.current_stream = "main"
        self._budget: contain.Budget | None = None
        self.steps: list[Step] = []
        self.tensors: dict[int, RealTensor] = {}
        self.streams: dict[str, StreamThread] = {}
        self.predicted_shapes = predicted_shapes or {}
        self.delay = delay or {}
        self.note = notes or (lambda _t: None)
        self.weights = LayerWeights(scenario)
        self.route = routing(scenario)
        # Reads that came before their value existed: (reader step, its name, what).
        self.observations: list[tuple[int, str, str]] = []
        # Every step that raised, by index (any stream): the worker reports the
        # earliest-issued one, as the simulator raises at issue time.
        self.failed: dict[int, BaseException] = {}
        self.stand_ins: set[str] = set()
        self.output: RealTensor | None = None
        self._events = 0
        self._local: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self._shared: dict[tuple[bool, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self._fi: Any = None  # FlashInferA2A on CUDA
        self._fi_reason: str | None = None
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda", torch.cuda.current_device()) if self.cuda else torch.device("cpu")
        self._cuda_streams: dict[str, Any] = {}
        self._cuda_timings: list[tuple[Step, Any, Any]] = []
        self._cuda_origin: Any = None

    # ---- infrastructure ----

    def now_us(self) -> float:
        return (time.perf_counter() - self.t0) * 1e6

    def close(self) -> None:
        for s in self.streams.values():
            s.close()
        if self.cuda:
            # Step times come from CUDA events, readable once the device is done.
            torch.cuda.synchronize(self.device)
            if self._cuda_origin is not None:
                for st, e0, e1 in self._cuda_timings:
                    st.start = self._cuda_origin.elapsed_time(e0) * 1e3
                    st.end = self._cuda_origin.elapsed_time(e1) * 1e3

    def _cuda_stream(self, name: str) -> Any:
        if name == "main":
            return torch.cuda.current_stream(self.device)
        if name not in self._cuda_streams:
            self._cuda_streams[name] = torch.cuda.Stream(device=self.device)
        return self._cuda_streams[name]

    def _stream(self, name: str) -> StreamThread:
        if self.cuda:
            raise RuntimeError("stream threads are the CPU stand-in; CUDA uses torch.cuda.Stream")
        if name not in self.streams:
            self.streams[name] = StreamThread(name)
            self.stand_ins.add(f"stream '{name}': worker thread with threading.Event events "
                               f"(stands in for a {self._modeled_stream_kind()})")
        return self.streams[name]

    def _modeled_stream_kind(self) -> str:
        # ROCm streams (HIP) behave like CUDA streams for ordering; both take the thread stand-in.
        return "HIP stream (ROCm)" if self.scenario.runtime.platform == "rocm" else "CUDA stream"

    def _step(self, op: str, name: str, category: str, ins: tuple[Any, ...] = (), component: str | None = None, group: tuple[int, ...] | None = None) -> Step:
        # The op budget (--max-ops) applies on real ranks too, as it stood at the
        # program's first op (runner code raising it later changes nothing).
        if self._budget is None:
            self._budget = contain.current_budget()
        contain.check_op(len(self.steps), budget=self._budget)
        if os.getpid() != self._pid:  # a process runner code forked: it may not talk on the rank's groups
            os._exit(0)
        st = Step(rank=self.rank, index=len(self.steps), op=op, name=name, stream=self.current_stream,
                  category=category, component=component, group=group,
                  in_shapes=[tuple(t.shape) for t in ins if hasattr(t, "shape")])
        self.steps.append(st)
        return st

    def _data(self, h: Any, consumer: Step) -> torch.Tensor:
        """Resolve a handle's data for an op. Reading a tensor whose producing
        op has not run yet is a real race: it is recorded, then waited out so
        the run can go on."""
        if not isinstance(h, RealTensor):
            raise OpsUsageError(f"{consumer.name}: expected a tensor handle, got {type(h).__name__}")
        if not h.ready.is_set():
            self.observations.append((consumer.index, consumer.name, (
                f"step {consumer.index} {consumer.name} ({consumer.stream}) read the output of step "
                f"{h.step} ({h.stream}) before it was produced")))
            h.ready.wait()
        if h.error is not None:
            raise UpstreamFailure(h.step, h.error)
        assert h.data is not None
        return h.data

    def _run(self, st: Step, fn: Callable[[], torch.Tensor | None], out: RealTensor | None) -> None:
        """Execute fn on the step's stream, timing it."""
        stream = st.stream
        delay = self.delay.get(stream, 0.0)

        def body() -> None:
            if delay:
                time.sleep(delay)
            take_untimed_s()  # a fresh count for this op
            st.start = self.now_us()
            try:
                result = fn()
            except BaseException as exc:
                st.end = self.now_us()
                _mark_in_op(exc)
                st.error = f"{type(exc).__name__}: {exc}"
                self.failed[st.index] = exc
                if out is not None:
                    out.error = exc
                    out.ready.set()
                if stream == "main":
                    raise
                return
            st.end = max(st.start, self.now_us() - 1e6 * take_untimed_s())
            if out is not None and result is not None:
                # Routing handles report [rows, top_k] like the simulator's.
                shape = (result.shape[0], result.shape[2]) if out.extra.get("routing") else None
                # Snapshot for the fit: a later in-place write must not change
                # what this step is judged on.
                out.extra["snapshot"] = result.detach().clone()
                out.set(result, shape)
                st.out_shape = out.shape

        if self.cuda:
            self._run_cuda(st, fn, out, delay)
        elif stream == "main":
            self.note(f"step {st.index} {st.name}")
            body()
            self.note(f"step {st.index} {st.name}{RETURNED}")  # back in runner code: a hang here is its own
        else:
            self._stream(stream).submit(body)

    def _run_cuda(self, st: Step, fn: Callable[[], torch.Tensor | None], out: RealTensor | None, delay: float) -> None:
        """CUDA: issue on the step's stream; the device orders the work, CUDA
        events time it. Host-side errors (shape checks) raise at once."""
        self.note(f"step {st.index} {st.name}")
        stream = self._cuda_stream(st.stream)
        with torch.cuda.stream(stream):
            if delay:
                torch.cuda._sleep(int(delay * 1e9))  # ~1 GHz cycles: a schedule perturbation
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record(stream)
            try:
                result = fn()
            except BaseException as exc:
                _mark_in_op(exc)
                st.error = f"{type(exc).__name__}: {exc}"
                self.failed[st.index] = exc
                if out is not None:
                    out.error = exc
                    out.ready.set()
                raise
            e1.record(stream)
            self._cuda_timings.append((st, e0, e1))
            if out is not None and result is not None:
                shape = (result.shape[0], result.shape[2]) if out.extra.get("routing") else None
                out.extra["snapshot"] = result.detach().clone()
                out.set(result, shape)
                st.out_shape = out.shape

    def _op(self, op: str, name: str, category: str, ins: tuple[Any, ...], fn: Callable[..., torch.Tensor], component: str | None = None, group: tuple[int, ...] | None = None, space: str | None = None, agree: Callable[..., None] | None = None) -> RealTensor:
        for t in ins:
            if not isinstance(t, RealTensor):
                raise OpsUsageError(f"{name}: {op} needs tensor handles from earlier ops, got {type(t).__name__}")
        st = self._step(op, name, category, ins, component, group)
        hint = self.predicted_shapes.get(st.index, ())
        sp = space or next((t.space for t in ins if isinstance(t, RealTensor) and t.space != "native"), "native")
        out = RealTensor(hint, st.index, st.stream, sp)
        # A routing handle (and a collective of one) reports [rows, top_k] like the simulator's.
        if op == "router" or self._passes_routing_on(op, category, ins):
            out.extra["routing"] = True
        self.tensors[st.index] = out

        def call() -> torch.Tensor:
            args = [self._data(t, st) for t in ins]
            if agree is not None:
                agree(*args)
                st.start = self.now_us()  # the members' agreement check is not the collective's time
            return fn(*args)

        self._run(st, call, out)
        return out

    # ---- streams, lifecycle, decisions ----

    def record_event(self, name: str = "record_event") -> RealEvent:
        st = self._step("record_event", name, EVENT)
        self._events += 1
        ev = RealEvent(self._events)
        st.records = ev.id
        if self.cuda:
            ev.cuda_event = torch.cuda.Event()
            ev.cuda_event.record(self._cuda_stream(st.stream))
            ev.flag.set()
            return ev

        def fn() -> None:
            ev.flag.set()

        self._run(st, fn, None)
        return ev

    def wait_event(self, event: Any, name: str = "wait_event") -> None:
        if not isinstance(event, RealEvent):
            raise OpsUsageError(f"{name}: wait_event needs an event from record_event, got {type(event).__name__}")
        st = self._step("wait_event", name, WAIT)
        st.waits = [event.id]
        if self.cuda:
            self._cuda_stream(st.stream).wait_event(event.cuda_event)
            return

        def fn() -> None:
            if not event.flag.wait(timeout=300):
                raise TimeoutError(f"event {event.id} never recorded")

        self._run(st, fn, None)

    def lifecycle(self, phase: str) -> None:
        st = self._step("lifecycle", phase, LIFECYCLE)
        s = self.scenario
        if phase == "construct":
            # The platform's streams exist before the first forward, as in engines.
            make = self._cuda_stream if self.cuda else self._stream
            if s.runtime.aux_stream:
                make("aux")
            if self.layout.all2all_kernels(s):
                make("comm")
        elif phase == "build_kernel":
            # Weights are processed here, not in the forward (the model's sharding).
            self._local_weights()
            if s.model.has_shared:
                self._shared_weights(not s.sp)
        elif phase == "forward":
            # Align the ranks at the start of the forward and make it the time
            # origin, as the simulator's (weight set-up is not layer latency).
            full = tuple(range(s.world))
            if s.world > 1:
                self._dist(dist.barrier, group=self.groups[full])
            self.t0 = time.perf_counter()
            if self.cuda:
                self._cuda_origin = torch.cuda.Event(enable_timing=True)
                self._cuda_origin.record(self._cuda_stream("main"))
            for earlier in self.steps[:-1]:
                earlier.start = earlier.end = 0.0
        st.start = st.end = self.now_us()
        self.note(f"step {st.index} {phase}")

    def decide(self, point: str, value: Any) -> None:
        st = self._step("decide", point, DECISION)
        st.detail = str(value)
        st.start = st.end = self.now_us()

    # ---- model side ----

    def layer_input(self, name: str = "layer_input") -> RealTensor:
        x = layer_input(self.scenario, self.d)
        self.own_prints = fingerprints(x)  # the router recognises its rows by them (real/compute.py), untimed here
        x = x.to(self.device)
        return self._op("layer_input", name, MODEL, (), lambda: x.clone())

    def sp_slice(self, x: RealTensor, name: str = "sp_slice") -> RealTensor:
        tp = self.scenario.parallel.tp

        def fn(v: torch.Tensor) -> torch.Tensor:
            per = -(-v.shape[0] // tp)
            v = F.pad(v, (0, 0, 0, per * tp - v.shape[0]))
            return v[self.t * per : (self.t + 1) * per]

        ids = slice_token_ids(self.scenario.dp_tokens(self.d), tp, self.t)
        self.layer_tokens = [(self.d, i) for i in ids]
        return self._op("sp_slice", name, MODEL, (x,), fn)

    def trim_rows(self, x: RealTensor, rows: int, name: str = "trim_rows") -> RealTensor:
        return self._op("trim_rows", name, PADDING, (x,), lambda v: v[:rows])

    @staticmethod
    def _passes_routing_on(op: str, category: str, ins: tuple[Any, ...]) -> bool:
        """A collective or a chunk of a routing handle, or a join of routing handles, is one."""
        if not ins:
            return False
        if op == "cat_rows":
            return all(t.extra.get("routing") for t in ins)
        return (category == COLLECTIVE or op == "take_rows") and bool(ins[0].extra.get("routing"))

    def take_rows(self, x: RealTensor, start: int, end: int, name: str = "take_rows") -> RealTensor:
        if any(isinstance(n, bool) or not isinstance(n, int) for n in (start, end)) or not 0 <= start <= end:
            raise OpsUsageError(f"{name}: rows [{start}, {end}) are not a range of rows")

        def fn(v: torch.Tensor) -> torch.Tensor:
            if end > v.shape[0]:
                raise OpsShapeError(f"rows [{start}, {end}) of a tensor of {v.shape[0]} rows")
            return v[start:end]

        return self._op("take_rows", name, PADDING, (x,), fn)

    def cat_rows(self, parts: Sequence[RealTensor], name: str = "cat_rows") -> RealTensor:
        if not isinstance(parts, list | tuple) or not parts:
            raise OpsUsageError(f"{name}: argument parts must be a non-empty list of tensors")

        def fn(*vs: torch.Tensor) -> torch.Tensor:
            widths = {tuple(v.shape[1:]) for v in vs}
            if len(widths) > 1:
                raise OpsShapeError(f"parts of widths {sorted(list(w) for w in widths)}")
            return torch.cat(vs)

        return self._op("cat_rows", name, PADDING, tuple(parts), fn)

    def layer_output(self, x: RealTensor, name: str = "layer_output") -> RealTensor:
        expected = (self.scenario.dp_tokens(self.d), self.scenario.model.hidden)

        def fn(v: torch.Tensor) -> torch.Tensor:
            if tuple(v.shape) != expected:
                raise OpsShapeError(f"layer output {list(v.shape)}, the model expects {list(expected)}")
            return v

        out = self._op("layer_output", name, MODEL, (x,), fn)
        self.output = out
        return out

    def boundary(self, x: RealTensor, shape: tuple[int, ...], name: str = "custom_op_boundary") -> RealTensor:
        def fn(v: torch.Tensor) -> torch.Tensor:
            # Stands in for torch.compile's assert on the fake implementation's shape.
            if tuple(v.shape) != tuple(shape):
                raise OpsShapeError(f"returns {list(v.shape)} but its fake implementation declared {list(shape)}")
            return v

        self.stand_ins.add("custom-op boundary: explicit shape assertion (stands in for torch.compile's fake-tensor check)")
        return self._op("boundary", name, MODEL, (x,), fn)

    # ---- elementwise and layout ----

    def pad(self, x: RealTensor, width: int, name: str = "pad") -> RealTensor:
        def fn(v: torch.Tensor) -> torch.Tensor:
            if width < v.shape[-1]:
                raise OpsShapeError(f"cannot pad width {v.shape[-1]} down to {width}")
            return F.pad(v, (0, width - v.shape[-1]))

        return self._op("pad", name, PADDING, (x,), fn)

    def trim(self, x: RealTensor, width: int, name: str = "trim") -> RealTensor:
        def fn(v: torch.Tensor) -> torch.Tensor:
            # torch's slice would silently keep everything: the twin's contract is an error.
            if width > v.shape[-1] or width <= 0:
                raise OpsShapeError(trim_error(tuple(v.shape), width))
            return v[..., :width]

        return self._op("trim", name, PADDING, (x,), fn)

    def view(self, x: RealTensor, shape: tuple[int, ...], name: str = "view") -> RealTensor:
        if not isinstance(shape, tuple | list) or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
            raise OpsUsageError(f"{name}: argument shape must be a tuple of ints, got {shape!r}")

        def fn(v: torch.Tensor) -> torch.Tensor:
            out_shape, problem = view_shape(tuple(v.shape), tuple(shape))
            if problem is not None:
                raise OpsShapeError(problem)
            if out_shape[0] != v.shape[0]:
                raise OpsUsageError(f"{name}: {VIEW_ROWS_UNMODELED}")
            return v.view(out_shape)

        return self._op("view", name, PADDING, (x,), fn)

    def add(self, a: RealTensor, b: RealTensor, name: str = "add") -> RealTensor:
        def fn(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            # Checked before torch: broadcasting would accept [1, h] + [n, h].
            if tuple(u.shape) != tuple(v.shape):
                raise OpsShapeError(f"{list(u.shape)} + {list(v.shape)}")
            return u + v

        return self._op("add", name, COMPUTE, (a, b), fn)

    def scale(self, x: RealTensor, factor: float, name: str = "scale") -> RealTensor:
        return self._op("scale", name, COMPUTE, (x,), lambda v: v * factor)

    def clone(self, x: RealTensor, name: str = "clone") -> RealTensor:
        return self._op("clone", name, COMPUTE, (x,), lambda v: v.clone())
