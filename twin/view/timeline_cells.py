"""The cells of the timeline (twin/view/timeline.py): how each step category
looks, the time scale, and a row laid out as fixed-width (character, style)
cells before it becomes a rich Text.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass

from rich.text import Text

from scenarios.trace import COLLECTIVE, COMPUTE, EVENT, PADDING, WAIT, Step
from twin.textsafe import printable, same_width


@dataclass(frozen=True)
class Look:
    legend: str  # legend key
    fill: str  # monochrome identity of the category
    colour: str  # fill character colour
    label: str  # style of the step name written on the bar


LOOKS: dict[str, Look] = {
    "compute": Look("compute", "█", "white", "bold black on white"),
    "routed": Look("routed", "▓", "blue", "bold bright_white on blue"),
    "shared": Look("shared", "▒", "magenta", "bold bright_white on magenta"),
    "collective": Look("collective", "═", "yellow", "bold black on yellow"),
    "padding": Look("pad/trim", "░", "cyan", "bold black on cyan"),
    "wait": Look("wait", "╌", "bright_black", "bright_white on bright_black"),
    "other": Look("other", "-", "bright_black", "bright_white on bright_black"),
}
ERROR_STYLE = "bold bright_white on red"
HAZARD_STYLE = "bold red"
DIVERGE_STYLE = "bold yellow"
DIM = "bright_black"
# Zero-duration steps worth a thin marker (only drawn into empty cells).
POINT_MARKS = {WAIT: "╎", EVENT: "·"}


def look_key(st: Step) -> str:
    if st.category == COMPUTE:
        return st.component if st.component in ("routed", "shared") else "compute"
    if st.category in (COLLECTIVE, PADDING, WAIT):
        return st.category
    return "other"


# --------------------------------------------------------------------------- scale


class Scale:
    """Maps microseconds to bar columns; cell c starts at c * t_max / cols."""

    def __init__(self, t_max: float, cols: int) -> None:
        # Below a picosecond there is nothing to draw (and cols / t_max overflows).
        self.t_max = t_max if t_max > 1e-6 else 1.0
        self.cols = cols
        self.k = cols / self.t_max

    def col(self, t: float) -> int:
        return min(max(round(t * self.k), 0), self.cols - 1)

    def span(self, start: float, end: float) -> tuple[int, int]:
        """Columns [c0, c1) of a bar; a step with any duration gets at least one cell."""
        c0 = self.col(start)
        c1 = min(max(round(end * self.k), c0), self.cols)
        if end > start and c1 <= c0:
            c1 = min(c0 + 1, self.cols)
            if c1 == c0:  # a bar at the very end: draw it in the last cell
                c0 -= 1
        return c0, c1

    def ticks(self) -> list[tuple[int, str]]:
        """Round tick values (1/2/5 x 10^k) spaced so their labels never touch."""
        exp = math.floor(math.log10(self.t_max)) - 3
        while True:
            for mult in (1, 2, 5):
                step = mult * 10.0**exp
                decimals = max(0, -math.floor(math.log10(step) + 1e-9))
                n = int(self.t_max / step + 1e-9)
                labels = [f"{i * step:.{decimals}f}" for i in range(n + 1)]
                widest = max(len(s) for s in labels)
                # Room for the label plus a gap, and never denser than every 8 columns.
                if step * self.k >= max(widest + 3, 8) or n == 0:
                    return [(self.col(i * step), s) for i, s in enumerate(labels)]
            exp += 1


def scale_rows(scale: Scale, compact: bool) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Tick label cells and axis cells (compact: labels written on the axis)."""
    labels = [(" ", "")] * scale.cols
    axis = [("─", DIM)] * scale.cols
    ticks = scale.ticks()
    free = 0  # first column a label may use, so labels never run together
    for c, text in ticks:
        axis[c] = ("┬", DIM)
        at = c
        if at + len(text) > scale.cols:  # the last label: right-align it at the edge
            at = scale.cols - len(text)
        if at < free:
            continue
        for j, ch in enumerate(text):
            labels[at + j] = (ch, "")
        free = at + len(text) + 1
    if compact:
        merged = [
            (ch, "bold") if ch != " " else axis[j] for j, (ch, _st) in enumerate(labels)
        ]
        return merged, []
    return labels, axis


# --------------------------------------------------------------------------- rows


@dataclass
class Mark:
    step: int
    c0: int
    c1: int
    head: str
    fill: str
    style: str


def bar_cells(
    steps: Sequence[Step],
    scale: Scale,
    emphasis: set[int],
    heads: dict[int, tuple[str, str]] | None = None,
) -> list[tuple[str, str]]:
    """One row of bars; `heads` (compact form) puts a marker in a step's first cell."""
    heads = heads or {}
    cells: list[tuple[str, str]] = [(" ", "")] * scale.cols
    points: list[tuple[int, str, str, bool]] = []
    for st in steps:
        if st.end <= st.start:
            if st.index in heads:
                points.append((scale.col(st.start), *heads[st.index], True))
            elif st.category in POINT_MARKS:
                points.append((scale.col(st.start), POINT_MARKS[st.category], DIM, False))
            continue
        look = LOOKS[look_key(st)]
        fill_style = "red" if st.error else look.colour
        label_style = ERROR_STYLE if st.error else look.label
        if st.index in emphasis:
            fill_style += " reverse"
            label_style += " underline"
        c0, c1 = scale.span(st.start, st.end)
        if st.index in heads:
            cells[c0] = heads[st.index]
            c0 += 1
        w = c1 - c0
        # Keep one fill cell after the name so adjacent bars stay apart in monochrome.
        name = st.name
        if len(name) > w - 1:
            name = name[: w - 2] + "…" if w >= 3 else ""
        for j in range(w):
            cells[c0 + j] = (name[j], label_style) if j < len(name) else (look.fill, fill_style)
    for c, ch, style, must_show in points:
        if cells[c][0] == " ":
            cells[c] = (ch, style)
        elif must_show:
            # The cell is a bar's start: use the fill cell just before it instead.
            cells[max(c - 1, 0)] = (ch, style)
    return cells


def mark_cells(marks: list[Mark], cols: int) -> list[tuple[str, str]]:
    cells: list[tuple[str, str]] = [(" ", "")] * cols
    free = 0
    for m in sorted(marks, key=lambda m: m.c0):
        at = max(m.c0, free)
        if at + len(m.head) > cols:
            at = max(cols - len(m.head), 0)
        for j in range(m.c0, m.c1):
            if cells[j][0] == " ":
                cells[j] = (m.fill, m.style)
        for j, ch in enumerate(m.head):
            if at + j < cols:
                cells[at + j] = (ch, m.style)
        free = at + len(m.head)
    return cells


def cells_line(label: str, label_w: int, cells: list[tuple[str, str]], label_style: str = "") -> Text:
    # Labels and cells carry step names (runner text): control characters are
    # replaced one for one so the grid keeps its columns.
    text = Text(no_wrap=True, overflow="ellipsis")
    text.append(same_width(label).ljust(label_w)[:label_w], style=label_style)
    run, run_style = "", None
    for ch, st in ((same_width(c), s) for c, s in cells):
        if st != run_style and run:
            text.append(run, style=run_style or "")
            run = ""
        run += ch
        run_style = st
    if run:
        text.append(run, style=run_style or "")
    return text


def plain_line(text: str, width: int, style: str = "") -> Text:
    text = printable(text, one_line=True)
    if len(text) > width:
        text = text[: max(width - 1, 0)] + "…"
    return Text(text, style=style, no_wrap=True, overflow="ellipsis")


def wrapped_lines(text: str, width: int, indent: int, style: str = "") -> list[Text]:
    lines = textwrap.wrap(
        printable(text, one_line=True), width=max(width, indent + 8), subsequent_indent=" " * indent, break_on_hyphens=False
    )
    return [Text(line, style=style, no_wrap=True, overflow="ellipsis") for line in lines]
