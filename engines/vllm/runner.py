"""`--runner vllm`: vLLM's own MoE forward as the runner under test.

`VllmRunner.forward` replays the trace of the installed engine's forward for
this rank (engines/vllm/traces.py: the probe runs vLLM's MoERunner once per
distinct rank program) as Ops calls, each named by the engine function that
issued it (`MoERunner._maybe_reduce_final_output`), so a hazard points at the
engine's code. Selected as `vllm` (the pinned release) or `vllm@<version>`.

Stand-ins: the engine's prepare/finalize internals are not run (the probe has
no GPU library); a kernel call whose prepare/finalize communicates is the
twin's own dispatch/experts/combine model of the scenario's backend. The
expert GEMMs, shared MLP and latent projections are the recorders' stand-ins
on the probe side and the twin's ops here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from engines.vllm import NO_REDUCE_RESULTS_KNOB, OLD_BACKEND_NAMES, PINNED_VERSION, TWIN_VERSION
from scenarios.ops import Ops
from scenarios.runner_base import MoERunner

# Prepare/finalize classes that move no tokens (the kernel runs on local rows).
LOCAL_PF_MARKERS = ("NoDPEP",)
# Recorded group names the Ops vocabulary has.
GROUPS = {"tp": "tp", "dp": "dp", "ep": "ep"}


class EngineTraceError(RuntimeError):
    """A step of the engine's forward the Ops vocabulary cannot represent
    (raised inside the runner program: the interpreters report it as a
    RUNNER_ERROR naming the engine function)."""


class _Buffer:
    """A buffer the engine allocated that no followed step has written to:
    unwritten, zero-filled (`zeros`), filled with another value (`fill`), or
    written in a way the trace cannot follow (`written`: the engine line that
    noticed). `like` is the replayed tensor a zeros_like-style buffer copies
    its shape from (None: the shape is the traced one)."""

    def __init__(self, site: str, shape: tuple[int, ...], zeros: bool, like: Any = None,
                 fill: float | None = None, written: str | None = None) -> None:
        self.site, self.shape, self.zeros, self.like = site, shape, zeros, like
        self.fill, self.written = fill, written


def _zero(v: Any) -> bool:
    return isinstance(v, _Buffer) and v.zeros


class VllmRunner(MoERunner):
    """The installed vLLM's runner (its own code, traced per rank)."""

    name = "vllm"
    version = PINNED_VERSION
    load_spec = "vllm"
    description = "vLLM's own MoE runner forward (traced from the installed engine)"

    # ---- the engine's answers ----

    def _renamed(self) -> bool:
        return self.version not in OLD_BACKEND_NAMES

    def _answer(self, d: int = 0) -> dict[str, Any]:
        from engines.vllm.traces import rank_answer

        return rank_answer(self.version, self.scenario, d, self._renamed())

    def _not_expressible(self) -> str | None:
        from engines.vllm.config_map import not_evaluable_here, not_expressible

        # The scenario's `parallel.version` picks the twin's rules for the
        # model side and the judges; the engine's own code is what runs here,
        # so it need not match the release (where the model side's SP slicing
        # differs from the engine's, unsupported() says so).
        s = self.scenario
        return (not_expressible(s, s.parallel.version, self.version not in NO_REDUCE_RESULTS_KNOB, self._renamed())
                or not_evaluable_here(s) or _row_parallel_up(s))

    def engine_refusal(self) -> str | None:
        if self._not_expressible() is not None:
            return None  # not asked: no engine configuration exists for it
        ans = self._answer()
        return None if ans.get("accepted", True) else str(ans.get("message"))

    def unsupported(self) -> str | None:
        why = self._not_expressible()
        if why is not None:
            return f"vllm {self.version} has no configuration for it: {why}"
        ans = self._answer()
        if "error" in ans:
            return f"the vllm {self.version} probe failed on it: {ans['error']}"
        if not ans["accepted"]:
            return f"vllm {self.version} refuses this configuration: {ans['message']}"
        return self._model_side_disagrees(ans)

    def _model_side_disagrees(self, ans: dict[str, Any]) -> str | None:
        """The twin's model side slices rows for SP by the scenario's version
        rules; vLLM's model reads the same `use_sequence_parallel_moe` its
        runner does, so where the two differ the scenario describes no model
        this release could run (only with a scenario of other rules)."""
        engine_sp, model_sp = bool(ans.get("sp_config")), self.scenario.sp
        if engine_sp == model_sp:
            return None
        return (f"the scenario's model side (parallel.version {self.scenario.parallel.version!r}) "
                f"{'slices' if model_sp else 'does not slice'} tokens for sequence parallelism but "
                f"vllm {self.version}'s use_sequence_parallel_moe is {engine_sp}")

    @classmethod
    def prepare_program(cls, scenario: Any) -> None:
        """Trace every distinct rank program here, before the program runs: a
        probe start is not the runner's time, and rank processes of a real
        run read the disk cache (they cannot import vLLM)."""
        runner = cls(scenario)
        if runner.unsupported() is not None:
            return
        for d in range(scenario.parallel.dp):
            runner._answer(d)

    # ---- decisions the engine made (read from its answer) ----

    def process_weights(self, ops: Ops) -> None:
        return None  # the engine built its own kernel in the probe

    def is_sequence_parallel(self) -> bool:
        return bool(self._answer().get("sp"))

    def fused_output_is_reduced(self) -> bool:
        return bool(self._answer().get("fused_output_is_reduced"))

    # ---- the program ----

    def forward(self, ops: Ops, x: Any) -> Any:
        d, _t = self.scenario.coords(ops.rank)
        ans = self._answer(d)
        if "trace" not in ans:  # this rank's forward was refused or failed in the probe
            why = ans.get("message") or ans.get("error") or "no trace"
            raise EngineTraceError(f"vllm {self.version} gave no forward for DP rank {d}: {why}")
        if self.scenario.model.has_shared:
            ops.decide("shared_experts_order", ans.get("shared_experts_order"))
        return Replay(self, ops, x, ans["trace"]).run_all()


class Replay:
    """One rank's trace as Ops calls (tensor ids -> Ops handles)."""

    def __init__(self, runner: VllmRunner, ops: Ops, x: Any, trace: dict[str, Any]) -> None:
        self.runner, self.ops, self.trace = runner, ops, trace
        self.x = x
        self.vals: dict[str, Any] = {trace["input"]: x}
        self.logits = trace["logits"]
        self.dispatched_routing: dict[str, Any] = {}
        self.events: dict[int, Any] = {}

    def run_all(self) -> Any:
        self.run(self.trace["steps"])
        out = self.trace.get("output")
        if out not in self.vals:
            raise EngineTraceError("the engine's forward returned a tensor the trace did not follow")
        return self.vals[out]

    def run(self, steps: list[dict[str, Any]]) -> None:
        for st in steps:
            handler: Callable[[dict[str, Any]], None] | None = getattr(self, f"_{st['op']}", None)
            if handler is None or st["op"] == "unsupported":
                raise EngineTraceError(self.unrepresentable(st))
            with self.ops.stream(st.get("stream", "main")):
                handler(st)

    @staticmethod
    def unrepresentable(st: dict[str, Any]) -> str:
        what = st.get("what") or st["op"]
        return f"{st['site']} ({st.get('where', '?')}) issues {what}, which the Ops vocabulary cannot represent"

    def peek(self, st: dict[str, Any], i: int = 0) -> Any:
        """Input i's replayed value, a _Buffer included (None: not followed)."""
        tid = st["in"][i]
        return self.vals.get(tid) if tid is not None else None

    def val(self, st: dict[str, Any], i: int = 0) -> Any:
        v = self.peek(st, i)
        if isinstance(v, _Buffer) and v.zeros:
            raise EngineTraceError(f"{st['site']} ({st.get('where', '?')}) reads the zero-filled buffer allocated at "
                                   f"{v.site} other than by adding into it, which the Ops vocabulary cannot represent")
        if isinstance(v, _Buffer) and v.written is not None:
            raise EngineTraceError(f"{st['site']} ({st.get('where', '?')}) reads the buffer allocated at {v.site}, "
                                   f"which was written in a way the trace cannot follow (noticed at {v.written})")
        if isinstance(v, _Buffer) and v.fill is not None:
            raise EngineTraceError(f"{st['site']} ({st.get('where', '?')}) reads the buffer allocated at {v.site}, "
                                   f"filled with {v.fill}: a fill other than zero, which the Ops vocabulary "
                                   "cannot represent")
        if isinstance(v, _Buffer):
            raise EngineTraceError(f"{st['site']} reads the buffer allocated at {v.site} before anything was written to it")
        if v is None:
            raise EngineTraceError(f"{st['site']} ({st.get('where', '?')}) reads a tensor the trace did not follow")
        return v

    def bind(self, st: dict[str, Any], *values: Any) -> None:
        for tid, v in zip(st["out"], values, strict=True):
            self.vals[tid] = v

    def group(self, st: dict[str, Any]) -> str:
        g = GROUPS.get(st.get("group", ""))
        if g is None:
            raise EngineTraceError(f"{st['site']} issues {st['op']} over the {st.get('group')} group, "
                                   "which the Ops vocabulary has no group for")
        return g

    # ---- routing, experts, communication ----

    def routing_for(self, st: dict[str, Any], tid: str) -> Any:
        """The routing handle of router logits `tid`: the gate over the layer
        input (the logits the model computed), or a naive dispatch's routing."""
        if tid == self.logits:
            return self.ops.router(self.x, name=f"{st['site']} (router)")
        if tid in self.dispatched_routing:
            return self.dispatched_routing[tid]
        raise EngineTraceError(f"{st['site']} routes logits the trace did not follow")

    def _router(self, st: dict[str, Any]) -> None:
        routing = self.routing_for(st, st["in"][0])
        self.bind(st, routing, routing)

    def _dispatch(self, st: dict[str, Any]) -> None:
        # The twin's dispatch carries routing: the gate runs before it (vLLM's
        # naive dispatch sends the logits and routes after).
        routing = self.routing_for(st, st["in"][1])
        xd, rd = self.ops.dispatch(self.val(st), routing, name=st["site"])
        self.vals[st["out"][0]] = xd
        self.dispatched_routing[st["out"][1]] = rd

    def _combine(self, st: dict[str, Any]) -> None:
        self.bind(st, self.ops.combine(self.val(st), name=st["site"]))

    def _modular_kernel(self, st: dict[str, Any]) -> None:
        x, routing = self.val(st, 0), self.val(st, 1)
        inside = st.get("inside") or []
        pf = st.get("prepare_finalize")
        if pf is None or any(m in pf for m in LOCAL_PF_MARKERS):
            self.run(inside)
            self.bind(st, self.ops.experts(x, routing, inplace=False, name=st["site"]))
            return
        if inside:  # the shared experts ran inside the kernel (its finalize)
            out, _shared = self.runner.overlapped_routed_path(self.ops, x, routing, lambda: self.run(inside))
            self.bind(st, out)
            return
        xd, rd = self.ops.dispatch(x, routing, name=f"{st['site']} ({pf} prepare)")
        y = self.ops.experts(xd, rd, inplace=False, name=st["site"])
        self.bind(st, self.ops.combine(y, name=f"{st['site']} ({pf} finalize)"))

    def _monolithic_experts(self, st: dict[str, Any]) -> None:
        routing = self.routing_for(st, st["in"][1])
        self.bind(st, self.ops.experts(self.val(st), routing, inplace=False, name=st["site"]))

    def _shared_experts(self, st: dict[str, Any]) -> None:
        # Sharded or not is the model's build (unsharded under SP), as in the twin.
        r = self.runner
        self.bind(st, self.ops.shared_experts(self.val(st), sharded=r.shared_experts_sharded(), name=st["site"]))

    def _latent_down(self, st: dict[str, Any]) -> None:
        self.bind(st, self.ops.latent_down(self.val(st), name=st["site"]))

    def _latent_up(self, st: dict[str, Any]) -> None:
        # Replicated: a row-parallel up-projection over tp > 1 is out of scope (_row_parallel_up).
        self.bind(st, self.ops.latent_up(self.val(st), name=st["site"]))

    def _all_reduce(self, st: dict[str, Any]) -> None:
        self.bind(st, self.ops.all_reduce(self.val(st), self.group(st), name=st["site"]))

    def _all_gather(self, st: dict[str, Any]) -> None:
        self.bind(st, self.ops.all_gather(self.val(st), self.group(st), name=st["site"]))

    def _reduce_scatter(self, st: dict[str, Any]) -> None:
        self.bind(st, self.ops.reduce_scatter(self.val(st), self.group(st), name=st["site"]))

    # ---- streams and events ----

    def _record_event(self, st: dict[str, Any]) -> None:
        self.events[st["event"]] = self.ops.record_event(name=st["site"])

    def _wait_event(self, st: dict[str, Any]) -> None:
        ev = self.events.get(st["event"])
        if ev is None:
            raise EngineTraceError(f"{st['site']} waits on an event that was never recorded")
        self.ops.wait_event(ev, name=st["site"])

    def _wait_stream(self, st: dict[str, Any]) -> None:
        """`a.wait_stream(b)`: an event recorded on b that a waits on."""
        with self.ops.stream(st["on"]):
            ev = self.ops.record_event(name=f"{st['site']} (record on {st['on']})")
        self.ops.wait_event(ev, name=st["site"])

    # ---- the engine's own tensor ops ----

    def _boundary(self, st: dict[str, Any]) -> None:
        self.bind(st, self.ops.boundary(self.val(st), tuple(st["shape"]), name=st["site"]))

    def _pad(self, st: dict[str, Any]) -> None:
        self.bind(st, self.ops.pad(self.val(st), st["width"], name=st["site"]))

    def _trim(self, st: dict[str, Any]) -> None:
        self.bind(st, self.ops.trim(self.val(st), st["width"], name=st["site"]))

    def _trim_rows(self, st: dict[str, Any]) -> None:
        self.bind(st, self.ops.trim_rows(self.val(st), st["rows"], name=st["site"]))

    def _view(self, st: dict[str, Any]) -> None:
        v = self.peek(st)
        if _zero(v):  # still zeros, in the traced shape
            self.bind(st, _Buffer(v.site, tuple(st["shape"]), True))
            return
        self.bind(st, self.ops.view(self.val(st), tuple(st["shape"]), name=st["site"]))

    def _add(self, st: dict[str, Any]) -> None:
        a, b = self.peek(st, 0), self.peek(st, 1)
        if _zero(a) and _zero(b) and tuple(a.shape) == tuple(b.shape):
            self.bind(st, a)  # zeros + zeros
        elif _zero(a) and _zero(b):
            raise self.broadcast(st, a, b.shape)
        elif _zero(a) or _zero(b):
            buf, y = (a, self.val(st, 1)) if _zero(a) else (b, self.val(st, 0))
            self.bind(st, self.first_write(st, buf, y))
        else:
            self.bind(st, self.ops.add(self.val(st, 0), self.val(st, 1), name=st["site"]))

    def first_write(self, st: dict[str, Any], buf: _Buffer, y: Any) -> Any:
        """zeros + y: a copy of y (an add kernel into a fresh buffer), when the shapes agree."""
        if tuple(y.shape) == tuple(buf.shape):
            return self.ops.clone(y, name=st["site"])
        if buf.like is not None:
            # The shape error the engine's add would raise, at this step.
            self.ops.add(buf.like, y, name=st["site"])
        raise self.broadcast(st, buf, y.shape)

    @staticmethod
    def broadcast(st: dict[str, Any], buf: _Buffer, shape: Any) -> EngineTraceError:
        return EngineTraceError(f"{st['site']} ({st.get('where', '?')}) adds a {list(shape)} tensor into the "
                                f"{list(buf.shape)} zero buffer allocated at {buf.site}: a broadcast, which the Ops "
                                "vocabulary cannot represent")

    def _scale(self, st: dict[str, Any]) -> None:
        v = self.peek(st)
        self.bind(st, v if _zero(v) else self.ops.scale(self.val(st), st["factor"], name=st["site"]))

    def _clone(self, st: dict[str, Any]) -> None:
        v = self.peek(st)
        self.bind(st, v if _zero(v) else self.ops.clone(self.val(st), name=st["site"]))

    def _copy(self, st: dict[str, Any]) -> None:
        v = self.peek(st, 0)  # dst now holds src's values
        self.bind(st, v if _zero(v) else self.ops.clone(self.val(st, 0), name=st["site"]))

    def _buffer(self, st: dict[str, Any]) -> None:
        src = self.peek(st) if st["in"] else None
        like = src if st.get("like") and src is not None else None
        shape = tuple(like.shape) if like is not None else tuple(st["shape"])
        handle = like if like is not None and not isinstance(like, _Buffer) else None
        self.bind(st, _Buffer(st["site"], shape, bool(st.get("zeros")), handle, fill=st.get("fill")))

    def _overwritten(self, st: dict[str, Any]) -> None:
        """The tensor was (or may have been) written by something the trace
        does not follow: whatever the replay held for it is stale."""
        v = self.peek(st)
        site, shape = (v.site, v.shape) if isinstance(v, _Buffer) else ("?", ())
        self.bind(st, _Buffer(site, shape, False, written=f"{st['site']} ({st.get('where', '?')})"))


def _row_parallel_up(s: Any) -> str | None:
    """The probe's latent projections are replicated stand-ins: a model's
    row-parallel up-projection (and whether its module declares
    `reduce_commutative`) is the model's code, which the probe does not build."""
    if s.model.latent_up_parallel == "row" and s.parallel.tp > 1:
        return "model.latent_up_parallel = row: the probe builds replicated latent projections only"
    return None


_CLASSES: dict[str, type[VllmRunner]] = {PINNED_VERSION: VllmRunner}


def runner_class(version: str = PINNED_VERSION) -> type[VllmRunner]:
    """The runner for an installed release (`vllm@<version>`)."""
    from engines.vllm import EngineMissing, engine_python, installed

    if version not in TWIN_VERSION:
        raise EngineMissing(f"vllm {version} is not a supported release (supported: {', '.join(sorted(TWIN_VERSION))})")
    if version != PINNED_VERSION and not installed(version):
        raise EngineMissing(f"vllm {version} is not installed: run scripts/install-engine.sh vllm=={version}")
    engine_python(version)  # raises EngineMissing with the install hint
    cls = _CLASSES.get(version)
    if cls is None:
        cls = type(f"VllmRunner_{version.replace('.', '_')}", (VllmRunner,),
                   {"version": version, "load_spec": f"vllm@{version}", "name": f"vllm@{version}"})
        _CLASSES[version] = cls
    return cls
