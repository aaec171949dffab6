"""Export traces in the Chrome trace event format (Perfetto, chrome://tracing).

One process per (trace, rank), one thread per stream. Perfetto only draws
properly nested slices on one thread, so steps of one stream that overlap
(measured timings can) are spread over extra "lane" threads of that stream.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from scenarios.trace import Hazard, Step, Trace

__all__ = ["to_chrome_trace", "write_chrome_trace", "PID_STRIDE"]

PID_STRIDE = 1000  # pid = trace_index * PID_STRIDE + rank
STREAM_ORDER = ("main", "aux", "comm")


def _us(t: float) -> float:
    # Nanosecond resolution is all a microsecond-scale layer needs; keeps the JSON short.
    return round(float(t), 3)


def _stream_order(steps: Sequence[Step]) -> list[str]:
    seen: list[str] = []
    for st in steps:
        if st.stream not in seen:
            seen.append(st.stream)
    known = [s for s in STREAM_ORDER if s in seen]
    return known + [s for s in seen if s not in known]


def _lanes(steps: Sequence[Step]) -> dict[int, int]:
    """Step index -> lane within its stream, so no two steps of a lane overlap.

    Zero-duration steps stay on lane 0: a point inside a slice nests properly.
    """
    lane_of: dict[int, int] = {}
    lane_ends: list[float] = []
    for st in sorted(steps, key=lambda s: (s.start, s.index)):
        if st.end <= st.start:
            lane_of[st.index] = 0
            continue
        for lane, end in enumerate(lane_ends):
            if end <= st.start:
                lane_ends[lane] = st.end
                lane_of[st.index] = lane
                break
        else:
            lane_ends.append(st.end)
            lane_of[st.index] = len(lane_ends) - 1
    return lane_of


def _step_args(st: Step) -> dict[str, Any]:
    args: dict[str, Any] = {
        "index": st.index,
        "op": st.op,
        "stream": st.stream,
        "component": st.component,
        "in_shapes": [list(s) for s in st.in_shapes],
        "out_shape": list(st.out_shape) if st.out_shape is not None else None,
        "error": st.error,
    }
    if st.group is not None:
        args["group"] = list(st.group)
    if st.detail:
        args["detail"] = st.detail
    if st.waits:
        args["waits"] = list(st.waits)
    if st.records is not None:
        args["records"] = st.records
    if st.value is not None:
        args["value"] = dict(st.value)
    if st.residual is not None:
        args["residual"] = st.residual
    return args


def _process_names(traces: Sequence[Trace]) -> list[str]:
    """"sim" / "real", or source + runner when two traces share a source."""
    sources = [t.source for t in traces]
    return [
        f"{t.source} {t.runner}" if sources.count(t.source) > 1 else t.source for t in traces
    ]


def _meta(name: str, pid: int, tid: int, args: dict[str, Any]) -> dict[str, Any]:
    return {"ph": "M", "name": name, "pid": pid, "tid": tid, "ts": 0, "args": args}


def _hazard_event(h: Hazard, steps: Sequence[Step], pid: int, tids: dict[int, int]) -> dict[str, Any]:
    if 0 <= h.step < len(steps):
        st: Step | None = steps[h.step]
        ts = st.start
    else:  # a hang past the last issued step: mark where the rank stopped
        st = steps[-1] if steps else None
        ts = st.end if st is not None else 0.0
    args: dict[str, Any] = {"hazard": str(h), **h.to_dict()}
    return {
        "ph": "i",
        "s": "t",
        "name": h.kind.value,
        "cat": "hazard",
        "ts": _us(ts),
        "pid": pid,
        "tid": tids.get(st.index, 1) if st is not None else 1,
        "args": args,
    }


def to_chrome_trace(traces: Trace | Sequence[Trace]) -> dict[str, Any]:
    """Chrome trace JSON (as a dict) of one or more traces, e.g. [sim, real].

    Times are microseconds from the layer start (the format's native unit).
    """
    if isinstance(traces, Trace):
        traces = [traces]
    events: list[dict[str, Any]] = []
    names = _process_names(traces)
    for ti, tr in enumerate(traces):
        for rank in sorted(tr.steps):
            steps = tr.rank_steps(rank)
            pid = ti * PID_STRIDE + rank
            events.append(_meta("process_name", pid, 0, {"name": f"{names[ti]} rank {rank}"}))
            events.append(_meta("process_sort_index", pid, 0, {"sort_index": pid}))
            events.append(
                _meta("process_labels", pid, 0, {"labels": f"{tr.runner} · {tr.scenario}"})
            )
            # tids numbered stream by stream, lane by lane, so threads sort as streams.
            tid_of_step: dict[int, int] = {}
            next_tid = 1
            for stream in _stream_order(steps):
                on_stream = [st for st in steps if st.stream == stream]
                lanes = _lanes(on_stream)
                for lane in range(max(lanes.values()) + 1):
                    tid = next_tid
                    next_tid += 1
                    label = stream if lane == 0 else f"{stream} (overlap {lane})"
                    events.append(_meta("thread_name", pid, tid, {"name": label}))
                    events.append(_meta("thread_sort_index", pid, tid, {"sort_index": tid}))
                    for st in on_stream:
                        if lanes[st.index] == lane:
                            tid_of_step[st.index] = tid
            for st in steps:
                events.append(
                    {
                        "ph": "X",
                        "name": st.name,
                        "cat": st.category,
                        "ts": _us(st.start),
                        "dur": _us(max(st.end - st.start, 0.0)),
                        "pid": pid,
                        "tid": tid_of_step[st.index],
                        "args": _step_args(st),
                    }
                )
            for h in tr.hazards:
                if h.rank == rank:
                    events.append(_hazard_event(h, steps, pid, tid_of_step))
        # Hazards on ranks without steps still deserve a place in the view.
        named: set[int] = set()
        for h in tr.hazards:
            if h.rank not in tr.steps:
                pid = ti * PID_STRIDE + h.rank
                if pid not in named:
                    named.add(pid)
                    events.append(
                        _meta("process_name", pid, 0, {"name": f"{names[ti]} rank {h.rank}"})
                    )
                events.append(_hazard_event(h, [], pid, {}))
    return {
        "traceEvents": events,
        "displayTimeUnit": "ns",
        "otherData": {
            "traces": [
                {
                    "source": t.source,
                    "runner": t.runner,
                    "scenario": t.scenario,
                    "world": t.world,
                    "latency_us": _us(t.latency_us),
                    "overlap_us": {str(r): _us(v) for r, v in t.overlap_us.items()},
                    "pid_base": i * PID_STRIDE,
                }
                for i, t in enumerate(traces)
            ]
        },
    }


def write_chrome_trace(traces: Trace | Sequence[Trace], path: str | Path) -> Path:
    """Write `to_chrome_trace(traces)` as JSON; open it in ui.perfetto.dev."""
    path = Path(path)
    path.write_text(json.dumps(to_chrome_trace(traces), separators=(",", ":")) + "\n")
    return path
