"""Scenario- and runner-supplied text on a terminal: never markup, never escape codes.

Names, summaries, step names, decision values and exception messages come from
TOML files and runner code. Rendered with rich they must not be parsed as
markup (`[/bold]` crashes it, `[link=...]` makes a hyperlink) and must not
carry control characters (an ANSI escape would reach the terminal). Reports
put such text into `rich.text.Text` (never a markup string) after `printable`;
`Sanitized` is the safety net around whole renderables.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType
from rich.segment import Segment

# C0 controls except tab and newline, DEL, C1 controls, and the bidirectional
# overrides/isolates that reorder what a terminal shows.
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_CONTROL_OR_NEWLINE = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def _visible(m: re.Match[str]) -> str:
    c = ord(m.group())
    return f"\\x{c:02x}" if c < 0x100 else f"\\u{c:04x}"


def printable(text: Any, one_line: bool = False) -> str:
    """`text` with every control character shown as an escape (`\\x1b`);
    `one_line` escapes newlines and tabs too (error messages stay one line)."""
    s = str(text)
    pattern = _CONTROL_OR_NEWLINE if one_line else _CONTROL
    return pattern.sub(_visible, s)


def same_width(text: str) -> str:
    """Control characters replaced one for one (grids keep their columns)."""
    return _CONTROL_OR_NEWLINE.sub("?", text)


class Sanitized:
    """A renderable whose text segments cannot carry control characters, whatever
    a report forgot to clean (rich's own control segments pass through)."""

    def __init__(self, inner: RenderableType) -> None:
        self.inner = inner

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Segment]:
        for seg in console.render(self.inner, options):
            if seg.control or not _CONTROL.search(seg.text):
                yield seg
            else:
                yield Segment(printable(seg.text), seg.style)


__all__ = ["Sanitized", "printable", "same_width"]
