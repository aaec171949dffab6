"""Terminal Gantt view of a Trace: one row per (rank, stream), time on the x axis.

Every row is laid out as a list of fixed-width cells before it becomes a rich
Text, so the view fills exactly the width it was given and reads the same with
colour off (golden tests compare the colourless text): categories differ by fill
character as well as by colour.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from rich.console import Console, RenderableType
from rich.text import Text

from scenarios.trace import Hazard, Step, Trace
from twin.view.timeline_cells import (
    DIM,
    DIVERGE_STYLE,
    HAZARD_STYLE,
    LOOKS,
    Mark,
    Scale,
    bar_cells,
    cells_line,
    look_key,
    mark_cells,
    plain_line,
    scale_rows,
    wrapped_lines,
)

__all__ = ["render_timeline", "render_text", "terminal_width", "overlap_of"]

STREAM_ORDER = ("main", "aux", "comm")
MIN_BAR_COLUMNS = 10


def overlap_of(trace: Trace, rank: int) -> float:
    """The trace's shared/routed overlap for a rank, computed from the steps if absent."""
    if rank in trace.overlap_us:
        return trace.overlap_us[rank]
    from sim.hazards import overlap_us

    return overlap_us(trace.rank_steps(rank))


def _streams(traces: Sequence[Trace], rank: int) -> list[str]:
    seen: list[str] = []
    for tr in traces:
        for s in tr.streams(rank):
            if s not in seen:
                seen.append(s)
    known = [s for s in STREAM_ORDER if s in seen]
    return known + [s for s in seen if s not in known] or ["main"]


def _hazard_step(trace: Trace, h: Hazard) -> Step | None:
    steps = trace.rank_steps(h.rank)
    if 0 <= h.step < len(steps):
        return steps[h.step]
    # A hang or error past the last issued step: mark where the rank stopped.
    return steps[-1] if steps else None


def _hazard_groups(traces: Sequence[Trace], prefixes: Sequence[str], ranks: set[int]) -> list[tuple[int, int, list[Hazard]]]:
    """Hazards grouped by identical finding across ranks: (id, trace index, hazards)."""
    groups: dict[tuple, list[Hazard]] = {}
    order: list[tuple] = []
    for ti, tr in enumerate(traces):
        for h in tr.hazards:
            if h.rank not in ranks:
                continue
            key = (ti, h.kind, h.step, h.step_name, h.detail, h.cost_us)
            if key not in groups:
                groups[key] = []
                order.append(key)
            groups[key].append(h)
    return [(i + 1, key[0], groups[key]) for i, key in enumerate(order)]


def _hazard_legend(ti: int, hs: list[Hazard], prefix: str) -> str:
    h = hs[0]
    where = ", ".join(str(r) for r in sorted({x.rank for x in hs}))
    text = f"{h.kind.value} at step {h.step} {h.step_name} (rank{'s' if len(hs) > 1 else ''} {where})"
    if h.cost_us is not None:
        text += f" +{h.cost_us:.1f} us"
    return f"{prefix + ' ' if prefix else ''}{text}: {h.detail}"


def _prefixes(trace: Trace, compare: Trace | None) -> list[str]:
    if compare is None:
        return [""]
    if trace.source != compare.source:
        return [trace.source, compare.source]
    if trace.runner != compare.runner:
        return [trace.runner, compare.runner]
    return [f"{trace.source}1", f"{compare.source}2"]


# --------------------------------------------------------------------------- public


def render_timeline(
    trace: Trace,
    width: int = 80,
    ranks: list[int] | None = None,
    compare: Trace | None = None,
    first_divergence: tuple[int, int] | None = None,
    compact: bool = False,
) -> RenderableType:
    """A Gantt view of `trace` (and `compare`, e.g. the measured run, on the same scale).

    Rows are "r0 main" etc.; with `compare`, "sim r0 main" above "real r0 main".
    Hazards are marked "!n" under their step and listed in the legend;
    `first_divergence` (rank, step index) is marked "≠" on both timelines.
    `compact` is the embeddable form: scale, one row per rank-stream and a
    one-line summary, with markers drawn onto the bars.
    """
    traces = [trace] if compare is None else [trace, compare]
    prefixes = _prefixes(trace, compare)
    if ranks is None:
        ranks = sorted({r for tr in traces for r in tr.steps} | {h.rank for tr in traces for h in tr.hazards})
    rank_set = set(ranks)

    def row_label(ti: int, rank: int, stream: str) -> str:
        return f"{prefixes[ti]} r{rank} {stream}".strip()

    layout = [(r, _streams(traces, r)) for r in ranks]
    label_w = max(
        [len(row_label(ti, r, s)) for ti in range(len(traces)) for r, ss in layout for s in ss] + [2]
    ) + 1
    cols = max(width - label_w, MIN_BAR_COLUMNS)
    t_max = max(
        [st.end for tr in traces for r in ranks for st in tr.rank_steps(r)] + [0.0]
    )
    scale = Scale(t_max, cols)

    # Markers per (trace, rank, stream): hazards, first divergence, errors.
    marks: dict[tuple[int, int, str], list[Mark]] = {}
    hazard_groups = _hazard_groups(traces, prefixes, rank_set)
    marked_steps: set[tuple[int, int, int]] = set()
    for hid, ti, hs in hazard_groups:
        for h in hs:
            st = _hazard_step(traces[ti], h)
            if st is None:
                continue
            c0, c1 = scale.span(st.start, st.end)
            marks.setdefault((ti, h.rank, st.stream), []).append(
                Mark(st.index, c0, max(c1, c0 + 1), f"!{hid}", "^", HAZARD_STYLE)
            )
            marked_steps.add((ti, h.rank, st.index))
    emphasis: dict[tuple[int, int], set[int]] = {}
    if first_divergence is not None:
        d_rank, d_index = first_divergence
        for ti, tr in enumerate(traces):
            steps = tr.rank_steps(d_rank)
            if 0 <= d_index < len(steps) and d_rank in rank_set:
                st = steps[d_index]
                emphasis.setdefault((ti, d_rank), set()).add(d_index)
                c0, c1 = scale.span(st.start, st.end)
                marks.setdefault((ti, d_rank, st.stream), []).append(
                    Mark(st.index, c0, max(c1, c0 + 1), "≠", "~", DIVERGE_STYLE)
                )
    for ti, tr in enumerate(traces):
        for r in ranks:
            for st in tr.rank_steps(r):
                if st.error and (ti, r, st.index) not in marked_steps:
                    c0, c1 = scale.span(st.start, st.end)
                    marks.setdefault((ti, r, st.stream), []).append(
                        Mark(st.index, c0, max(c1, c0 + 1), "✗", "^", HAZARD_STYLE)
                    )

    lines: list[Text] = []
    if not compact:
        lines.append(plain_line(_title(traces, prefixes), width, "bold"))
    tick_cells, axis_cells = scale_rows(scale, compact)
    lines.append(cells_line("us", label_w, tick_cells, DIM))
    if axis_cells:
        lines.append(cells_line("", label_w, axis_cells))

    used_looks: set[str] = set()
    for r, streams in layout:
        if not compact:
            lines.append(_rank_header(r, traces, prefixes, width))
        for s in streams:
            for ti, tr in enumerate(traces):
                steps = [st for st in tr.rank_steps(r) if st.stream == s]
                used_looks.update(look_key(st) for st in steps if st.end > st.start)
                row_marks = marks.get((ti, r, s), [])
                heads: dict[int, tuple[str, str]] | None = None
                if compact:
                    heads = {}
                    for m in row_marks:  # hazards were added first: they win a shared step
                        heads.setdefault(m.step, (m.head[0], m.style))
                cells = bar_cells(steps, scale, emphasis.get((ti, r), set()), heads)
                lines.append(cells_line(row_label(ti, r, s), label_w, cells))
                if row_marks and not compact:
                    lines.append(cells_line("", label_w, mark_cells(row_marks, cols)))

    if compact:
        lines.append(plain_line(_compact_summary(traces, prefixes, ranks, hazard_groups), width, DIM))
    else:
        lines.extend(_legend(used_looks, hazard_groups, first_divergence, traces, prefixes, width))
    return Text("\n", no_wrap=True, overflow="ellipsis").join(lines)


def _title(traces: Sequence[Trace], prefixes: Sequence[str]) -> str:
    head = traces[0]
    if len(traces) == 1:
        return (
            f"{head.source} · runner {head.runner} · scenario {head.scenario}"
            f" · latency {head.latency_us:.1f} us"
        )
    other = traces[1]
    if head.source != other.source:
        who = f"{head.source} vs {other.source} · runner {head.runner}"
        if other.runner != head.runner:
            who += f" / {other.runner}"
    else:
        who = f"{head.source} · {head.runner} vs {other.runner}"
    lat = " vs ".join(f"{t.latency_us:.1f}" for t in traces)
    return f"{who} · scenario {head.scenario} · latency {lat} us"


def _fmt_overlap(v: float) -> str:
    return f"{v:.1f}"


def _rank_header(rank: int, traces: Sequence[Trace], prefixes: Sequence[str], width: int) -> Text:
    if len(traces) == 1:
        ov = f"overlap {_fmt_overlap(overlap_of(traces[0], rank))} us"
    else:
        ov = "overlap " + " · ".join(
            f"{p} {_fmt_overlap(overlap_of(t, rank))} us" for p, t in zip(prefixes, traces)
        )
    head = f"── r{rank} · {ov} "
    if len(head) > width:
        return plain_line(head, width, DIM)
    return Text(head + "─" * (width - len(head)), style=DIM, no_wrap=True, overflow="ellipsis")


def _compact_summary(
    traces: Sequence[Trace],
    prefixes: Sequence[str],
    ranks: Sequence[int],
    hazard_groups: list[tuple[int, int, list[Hazard]]],
) -> str:
    parts = [
        (p + " " if p else "")
        + " ".join(f"r{r} {_fmt_overlap(overlap_of(t, r))}" for r in ranks)
        for p, t in zip(prefixes, traces)
    ]
    text = "overlap " + " · ".join(parts) + " us"
    if hazard_groups:
        kinds = []
        for _hid, _ti, hs in hazard_groups:
            if hs[0].kind.value not in kinds:
                kinds.append(hs[0].kind.value)
        text += " · ! " + ", ".join(kinds)
    return text


def _legend(
    used_looks: set[str],
    hazard_groups: list[tuple[int, int, list[Hazard]]],
    first_divergence: tuple[int, int] | None,
    traces: Sequence[Trace],
    prefixes: Sequence[str],
    width: int,
) -> list[Text]:
    out: list[Text] = [Text("", no_wrap=True)]
    keys = Text(no_wrap=True, overflow="ellipsis")
    items: list[tuple[str, str, str]] = [
        (look.fill, look.colour, look.legend) for key, look in LOOKS.items() if key in used_looks
    ]
    if hazard_groups:
        items.append(("!", HAZARD_STYLE, "hazard"))
    if first_divergence is not None:
        items.append(("≠", DIVERGE_STYLE, "first divergence"))
    # Wrap the key by items so a narrow view never splits "▓ routed".
    line_len = 0
    for fill, style, name in items:
        piece = len(fill) + 1 + len(name)
        if line_len and line_len + 2 + piece > width:
            out.append(keys)
            keys = Text(no_wrap=True, overflow="ellipsis")
            line_len = 0
        if line_len:
            keys.append("  ")
            line_len += 2
        keys.append(fill, style=style)
        keys.append(" " + name, style=DIM)
        line_len += piece
    if line_len:
        out.append(keys)
    for hid, ti, hs in hazard_groups:
        text = f"!{hid} " + _hazard_legend(ti, hs, prefixes[ti] if len(traces) > 1 else "")
        out.extend(wrapped_lines(text, width, indent=len(f"!{hid} "), style="red"))
    if first_divergence is not None:
        rank, index = first_divergence
        where = []
        for p, tr in zip(prefixes, traces):
            steps = tr.rank_steps(rank)
            if 0 <= index < len(steps):
                st = steps[index]
                where.append(
                    f"{p + ' ' if p else ''}{st.name} on {st.stream} {st.start:.1f}-{st.end:.1f} us"
                )
            else:
                where.append(f"{p + ' ' if p else ''}no step")
        text = f"≠ first divergence: rank {rank} step {index}: " + "; ".join(where)
        out.extend(wrapped_lines(text, width, indent=2, style="yellow"))
    return out


def render_text(renderable: RenderableType, width: int, color: bool) -> str:
    """Render to a string; with color False there are no escape codes at all."""
    buf = io.StringIO()
    console = Console(
        file=buf,
        width=width,
        force_terminal=color,
        # The palette is the 16 standard colours, so this needs no terminal detection.
        color_system="standard" if color else None,
        legacy_windows=False,
        highlight=False,
        emoji=False,
        markup=False,
    )
    console.print(renderable)
    out = buf.getvalue()
    if not color:
        out = "\n".join(line.rstrip() for line in out.split("\n"))
    return out


def terminal_width(default: int = 80) -> int:
    """The console's width in columns (COLUMNS or the terminal), else `default`."""
    try:
        width = Console().width
    except Exception:  # no usable console at all (e.g. closed stdio)
        return default
    return width if width and width > 0 else default
