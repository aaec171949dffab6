"""Timeline rendering (golden text at 80/160 columns) and the Chrome trace export.

Regenerate the golden files on purpose only: MOE_TWIN_REGEN_GOLDEN=1 pytest tests/test_timeline.py
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len

from scenarios.trace import (
    COLLECTIVE,
    COMPUTE,
    EVENT,
    PADDING,
    WAIT,
    Hazard,
    HazardKind,
    Step,
    Trace,
)
from twin.view.export import to_chrome_trace, write_chrome_trace
from twin.view.timeline import render_text, render_timeline, terminal_width

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parent.parent
REGEN = os.environ.get("MOE_TWIN_REGEN_GOLDEN") == "1"


# --------------------------------------------------------------------------- fixtures


def _rank_steps(rank: int, shared_end: float, routed_end: float, reduce_end: float) -> list[Step]:
    """A multi-stream shared/routed layer with fixed times (microseconds)."""
    join = max(shared_end, routed_end)
    spec = [
        # op, name, stream, category, component, start, end
        ("router", "router", "main", COMPUTE, None, 0.0, 4.0),
        ("record_event", "fork_to_aux", "main", EVENT, None, 4.0, 4.0),
        ("wait_event", "aux_waits_fork", "aux", WAIT, None, 4.0, 4.0),
        ("shared_experts", "shared_experts", "aux", COMPUTE, "shared", 4.0, shared_end),
        ("record_event", "shared_done", "aux", EVENT, None, shared_end, shared_end),
        ("experts", "routed_experts", "main", COMPUTE, "routed", 4.0, routed_end),
        ("wait_event", "join_shared", "main", WAIT, None, routed_end, join),
        ("add", "shared_add", "main", COMPUTE, None, join, join + 1.0),
        ("trim", "post_trim", "main", PADDING, None, join + 1.0, join + 1.5),
        ("all_reduce", "final_all_reduce", "main", COLLECTIVE, None, join + 1.5, reduce_end),
    ]
    return [
        Step(
            rank=rank,
            index=i,
            op=op,
            name=name,
            stream=stream,
            category=cat,
            component=comp,
            group=(0, 1) if cat == COLLECTIVE else None,
            in_shapes=[(8, 128)] if cat in (COMPUTE, COLLECTIVE, PADDING) else [],
            out_shape=(8, 128) if cat in (COMPUTE, COLLECTIVE, PADDING) else None,
            start=start,
            end=end,
        )
        for i, (op, name, stream, cat, comp, start, end) in enumerate(spec)
    ]


def make_trace(source: str = "sim") -> Trace:
    """Two ranks; rank 1's shared experts outlast the routed ones (a real wait)."""
    late = 3.0 if source == "real" else 0.0  # the measured run is slower at the end
    steps = {
        0: _rank_steps(0, shared_end=10.0, routed_end=12.0, reduce_end=22.0 + late),
        1: _rank_steps(1, shared_end=14.0, routed_end=12.0, reduce_end=22.0 + late),
    }
    hazards = [
        Hazard(
            kind=HazardKind.UNSAFE_OVERLAP,
            step=3,
            step_name="shared_experts",
            rank=1,
            detail="shared experts read the input the routed kernel writes in place",
        )
    ]
    return Trace(
        source=source,
        scenario="hand-built",
        runner="fixed",
        world=2,
        steps=steps,
        hazards=hazards if source == "sim" else [],
        latency_us=22.0 + late,
        overlap_us={0: 6.0, 1: 8.0} if source == "sim" else {0: 5.5, 1: 7.5},
    )


def make_overlapping_real() -> Trace:
    """A measured trace where two main-stream steps overlap (timer jitter)."""
    tr = make_trace("real")
    steps = tr.steps[0]
    steps[7].start = 11.5  # shared_add starts before routed_experts (ends 12.0) ends
    return tr


def text(renderable: object, width: int) -> str:
    return render_text(renderable, width, color=False)  # type: ignore[arg-type]


def check_golden(name: str, actual: str) -> None:
    path = GOLDEN / name
    if REGEN:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.exists(), f"{path} missing: run with MOE_TWIN_REGEN_GOLDEN=1 to create it"
    expected = path.read_text(encoding="utf-8")
    assert actual == expected, (
        f"rendering differs from {path} (MOE_TWIN_REGEN_GOLDEN=1 regenerates it on purpose)\n"
        f"--- got ---\n{actual}"
    )


def lines_of(rendered: str) -> list[str]:
    return rendered.rstrip("\n").split("\n")


# --------------------------------------------------------------------------- golden


@pytest.mark.parametrize("width", [80, 160])
def test_golden_timeline(width: int) -> None:
    check_golden(f"timeline_{width}.txt", text(render_timeline(make_trace(), width=width), width))


@pytest.mark.parametrize("width", [80, 160])
def test_golden_compare(width: int) -> None:
    r = render_timeline(
        make_trace("sim"), width=width, compare=make_trace("real"), first_divergence=(1, 6)
    )
    check_golden(f"timeline_compare_{width}.txt", text(r, width))


def test_golden_compact() -> None:
    r = render_timeline(make_trace("sim"), width=80, compare=make_trace("real"), compact=True)
    check_golden("timeline_compact_80.txt", text(r, 80))


# --------------------------------------------------------------------------- layout


@pytest.mark.parametrize("width", [40, 60, 80, 100, 160, 220])
@pytest.mark.parametrize("mode", ["single", "compare", "compact"])
def test_lines_fit_and_fill_width(width: int, mode: str) -> None:
    compare = make_trace("real") if mode != "single" else None
    r = render_timeline(
        make_trace(), width=width, compare=compare, compact=mode == "compact", first_divergence=(0, 5)
    )
    lines = lines_of(text(r, width))
    assert all(cell_len(line) <= width for line in lines), max(lines, key=cell_len)
    # The time axis spans the whole width: the view uses every column it is given.
    assert max(cell_len(line) for line in lines) == width


def test_rows_scale_and_bars() -> None:
    lines = lines_of(text(render_timeline(make_trace(), width=80), 80))
    labels = [" ".join(line.split()[:2]) for line in lines]
    for row in ("r0 main", "r0 aux", "r1 main", "r1 aux"):
        assert row in labels
    scale = next(line for line in lines if line.startswith("us "))
    ticks = [int(v) for v in scale[2:].split()]
    assert ticks[0] == 0 and all(t % 5 == 0 for t in ticks)  # round tick values
    main = next(line for line in lines if line.startswith("r0 main"))
    assert "router" in main and "routed_experts" in main and "▓" in main and "═" in main
    aux = next(line for line in lines if line.startswith("r1 aux"))
    assert "shared_experts" in aux and "▒" in aux  # shared is told apart from routed


def test_overlap_numbers_shown() -> None:
    out = text(render_timeline(make_trace(), width=80), 80)
    assert "r0 · overlap 6.0 us" in out and "r1 · overlap 8.0 us" in out
    compact = text(render_timeline(make_trace(), width=80, compact=True), 80)
    assert "r0 6.0" in compact and "r1 8.0" in compact


def test_hazard_marked_under_its_step_and_listed() -> None:
    lines = lines_of(text(render_timeline(make_trace(), width=80), 80))
    i = next(i for i, line in enumerate(lines) if line.startswith("r1 aux"))
    marker = lines[i + 1]
    assert marker.lstrip().startswith("!1")
    # The marker sits at the step's first column.
    assert marker.index("!1") == lines[i].index("shared_experts")
    assert any(line.startswith("!1 UNSAFE_OVERLAP at step 3 shared_experts (rank 1)") for line in lines)


def test_compare_draws_sim_and_real_on_one_scale() -> None:
    width = 100
    lines = lines_of(
        text(
            render_timeline(make_trace("sim"), width=width, compare=make_trace("real"), first_divergence=(1, 6)),
            width,
        )
    )
    assert sum(1 for line in lines if line.startswith("us ")) == 1  # one shared scale
    sim_main = next(line for line in lines if line.startswith("sim r0 main"))
    real_main = next(line for line in lines if line.startswith("real r0 main"))
    assert any(line.startswith("sim r1 aux") for line in lines)
    assert any(line.startswith("real r1 aux") for line in lines)
    # Identical start times land in identical columns...
    assert sim_main.index("routed_experts") == real_main.index("routed_experts")
    assert sim_main.index("final_all_reduce") == real_main.index("final_all_reduce")
    # ...and the real run, 3 us longer, reaches further right on the same scale.
    assert len(real_main.rstrip()) == width
    assert len(sim_main.rstrip()) < width
    # First divergence is marked on both timelines and explained.
    i_sim = next(i for i, line in enumerate(lines) if line.startswith("sim r1 main"))
    i_real = next(i for i, line in enumerate(lines) if line.startswith("real r1 main"))
    assert "≠" in lines[i_sim + 1] and "≠" in lines[i_real + 1]
    assert any(line.startswith("≠ first divergence: rank 1 step 6") for line in lines)


def test_ranks_selects_rows() -> None:
    out = text(render_timeline(make_trace(), width=80, ranks=[0]), 80)
    assert "r0 main" in out and "r1 main" not in out
    assert "UNSAFE_OVERLAP" not in out  # rank 1's hazard is not on screen


def test_compact_is_short() -> None:
    lines = lines_of(text(render_timeline(make_trace(), width=80, compact=True), 80))
    assert len(lines) == 1 + 4 + 1  # scale, one row per rank-stream, summary
    assert any("!" in line for line in lines if line.startswith("r1 aux"))


def test_colour_only_when_asked() -> None:
    r = render_timeline(make_trace(), width=80)
    assert "\x1b[" not in render_text(r, 80, color=False)
    coloured = render_text(r, 80, color=True)
    assert "\x1b[" in coloured
    assert re.sub(r"\x1b\[[0-9;]*m", "", coloured).split("\n")[3].rstrip() == text(r, 80).split("\n")[3]


def test_simulated_traces_render() -> None:
    from scenarios.spec import Scenario
    from sim import simulate

    s = Scenario().with_(
        **{
            "model.num_shared_experts": 1,
            "parallel.tp": 2,
            "runtime.platform": "cuda",
            "runtime.aux_stream": True,
        }
    )
    fixed, before = simulate(s, "fixed"), simulate(s, "before-38990")
    out = text(render_timeline(fixed, width=80, compare=before, first_divergence=(0, 6)), 80)
    assert "LOST_OVERLAP" in out and "!1" in out
    assert f"overlap fixed {fixed.overlap_us[0]:.1f} us" in out
    assert all(cell_len(line) <= 80 for line in lines_of(out))


def test_terminal_width_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "123")
    assert terminal_width() == 123
    monkeypatch.delenv("COLUMNS")
    assert terminal_width() > 0


_step_times = st.lists(
    st.tuples(
        st.sampled_from(["main", "aux", "comm"]),
        st.sampled_from([COMPUTE, COLLECTIVE, PADDING, WAIT, EVENT]),
        st.floats(0, 5000, allow_nan=False),
        st.floats(0, 500, allow_nan=False),
        st.text("abcdefghij_", min_size=1, max_size=30),
    ),
    min_size=1,
    max_size=12,
)


@settings(max_examples=60, deadline=None)
@given(_step_times, st.integers(30, 200), st.booleans())
def test_any_trace_fits_any_width(items: list, width: int, compact: bool) -> None:
    steps = [
        Step(rank=0, index=i, op="op", name=name, stream=stream, category=cat, start=t0, end=t0 + d)
        for i, (stream, cat, t0, d, name) in enumerate(items)
    ]
    hz = [Hazard(HazardKind.HANG, len(steps), "x", 0, "never arrives")]
    tr = Trace("sim", "s", "r", 1, steps={0: steps}, hazards=hz)
    lines = lines_of(text(render_timeline(tr, width=width, compact=compact), width))
    assert all(cell_len(line) <= width for line in lines)


# --------------------------------------------------------------------------- export


REQUIRED = {"X": ("ph", "ts", "dur", "pid", "tid", "name"), "i": ("ph", "ts", "pid", "tid", "name", "s")}


def test_chrome_trace_round_trip(tmp_path: Path) -> None:
    sim, real = make_trace("sim"), make_overlapping_real()
    path = write_chrome_trace([sim, real], tmp_path / "trace.json")
    data = json.loads(path.read_text())
    assert data["displayTimeUnit"] in ("ns", "ms")
    events = data["traceEvents"]
    for ev in events:
        assert ev["ph"] in ("X", "i", "M")
        for key in REQUIRED.get(ev["ph"], ("ph", "pid", "tid", "name", "args")):
            assert key in ev, (key, ev)
        if ev["ph"] == "X":
            assert isinstance(ev["ts"], (int, float)) and ev["dur"] >= 0
            assert {"op", "in_shapes", "out_shape", "component", "error"} <= set(ev["args"])
    procs = {ev["pid"]: ev["args"]["name"] for ev in events if ev["name"] == "process_name"}
    assert procs == {0: "sim rank 0", 1: "sim rank 1", 1000: "real rank 0", 1001: "real rank 1"}
    threads = {(ev["pid"], ev["tid"]): ev["args"]["name"] for ev in events if ev["name"] == "thread_name"}
    assert {"main", "aux"} <= {threads[k] for k in threads if k[0] == 0}

    xs = [ev for ev in events if ev["ph"] == "X"]
    assert len(xs) == sum(len(s) for tr in (sim, real) for s in tr.steps.values())
    # Every step's thread is named, and each stream has its own thread.
    for ev in xs:
        assert (ev["pid"], ev["tid"]) in threads
        assert threads[(ev["pid"], ev["tid"])].split(" ")[0] == ev["args"]["stream"]
    # Perfetto cannot draw overlapping slices on one thread.
    for pid in procs:
        mine = [ev for ev in xs if ev["pid"] == pid and ev["dur"] > 0]
        for a in mine:
            for b in mine:
                if a is not b and a["ts"] < b["ts"] + b["dur"] and b["ts"] < a["ts"] + a["dur"]:
                    assert a["tid"] != b["tid"], (a["name"], b["name"])
    # The jittered real step got a lane of its own on rank 0's main stream.
    add = next(ev for ev in xs if ev["pid"] == 1000 and ev["name"] == "shared_add")
    routed = next(ev for ev in xs if ev["pid"] == 1000 and ev["name"] == "routed_experts")
    assert add["tid"] != routed["tid"]

    (hz,) = [ev for ev in events if ev["ph"] == "i"]
    shared = sim.steps[1][3]
    assert hz["pid"] == 1 and hz["ts"] == shared.start and hz["s"] in ("t", "p")
    assert "UNSAFE_OVERLAP" in hz["args"]["hazard"]
    shared_ev = next(ev for ev in xs if ev["pid"] == 1 and ev["name"] == "shared_experts")
    assert hz["tid"] == shared_ev["tid"]


def test_chrome_trace_single_trace_pid_is_rank() -> None:
    data = to_chrome_trace([make_trace()])
    assert {ev["pid"] for ev in data["traceEvents"]} == {0, 1}


# --------------------------------------------------------------------------- tmux

_TMUX_SCRIPT = """
import sys
sys.path[:0] = [{repo!r}, {tests!r}]
from rich.console import Console
from test_timeline import make_trace
from twin.view.timeline import render_timeline, terminal_width
w = terminal_width()
print("WIDTH", w)
Console().print(render_timeline(make_trace(), width=w))
print("TIMELINE-END")
"""


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_real_terminal_with_tmux(tmp_path: Path) -> None:
    script = tmp_path / "show.py"
    script.write_text(_TMUX_SCRIPT.format(repo=str(REPO), tests=str(REPO / "tests")))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "NO_COLOR", "TMUX")}
    env["LC_ALL"] = "C.UTF-8"
    # A private server socket: never touches anyone else's tmux.
    tmux = ["tmux", "-u", "-L", f"moe-twin-test-{os.getpid()}", "-f", "/dev/null"]
    cmd = f"{sys.executable} {script}; sleep 30"
    subprocess.run(
        [*tmux, "new-session", "-d", "-s", "tl", "-x", "100", "-y", "50", cmd], env=env, check=True
    )
    try:
        plain = coloured = ""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            plain = subprocess.run(
                [*tmux, "capture-pane", "-p", "-t", "tl"], env=env, capture_output=True, text=True
            ).stdout
            if "TIMELINE-END" in plain:
                break
            time.sleep(0.2)
        coloured = subprocess.run(
            [*tmux, "capture-pane", "-p", "-e", "-t", "tl"], env=env, capture_output=True, text=True
        ).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], env=env, capture_output=True)
    assert "TIMELINE-END" in plain, plain
    assert "WIDTH 100" in plain  # the helper saw the terminal's width
    rows = {" ".join(line.split()[:2]): line for line in plain.splitlines() if line.startswith("r")}
    assert "router" in rows["r0 main"] and "▓" in rows["r0 main"] and "═" in rows["r0 main"]
    assert "shared_experts" in rows["r1 aux"] and "▒" in rows["r1 aux"]
    assert len(rows["r0 main"].rstrip()) <= 100
    assert "\x1b[" in coloured  # a real terminal gets colour
