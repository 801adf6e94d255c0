"""The replay's position bar: where in the recording the screen is, the keys that seek, and "end of recording".

``replay_bar_text`` is pure (tested without Textual); the widget repaints only the cells that read differently
(the position moves by a cell, the clock by a second), its row made as the header's (tui/line_bar.py).
"""

from __future__ import annotations

from typing import Protocol

from rich.text import Text

from batchmon.tui.fmt import clean_line
from batchmon.tui.line_bar import LineBar
from batchmon.tui.palette import BG, BORDER, DIM, OK, PURPLE, WARN

SEEK_SECONDS = 10.0  # what ← and → move by


class Position(Protocol):
    """What the bar reads (batchmon.monitor.replay.ReplayPosition; the UI does not import the monitor)."""

    time: float
    start: float | None
    end: float | None
    at_end: bool

    @property
    def fraction(self) -> float | None: ...


def fmt_clock(seconds: float) -> str:
    """Recorded time from the recording's start: '0:07', '12:30', '1:02:03'."""
    s = max(0, int(seconds))
    h, rest = divmod(s, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}:{m:02d}:{sec:02d}" if h else f"{m}:{sec:02d}"


def replay_bar_text(pos: Position, width: int) -> Text:
    """` replay  0:16 ━━━━●──── 0:36  ←/→ 10 s  home/end`, with "end of recording" in place of the marker's
    label once the last snapshot is shown. The keys give way first when narrow, then the bar shrinks."""
    t = Text()
    if pos.at_end:
        t.append(" ■ end of recording ", style=f"bold {BG} on {WARN}")
    else:
        t.append(" ▶ replay ", style=f"bold {BG} on {PURPLE}")
    start = pos.start if pos.start is not None else pos.time
    now = fmt_clock(pos.time - start)
    end = fmt_clock(pos.end - start) if pos.end is not None else "?"
    keys = f"  ←/→ {SEEK_SECONDS:g} s  home/end"
    room = width - len(t.plain) - len(now) - len(end) - 4
    if room - len(keys) < 10:
        keys = ""
    bar_w = max(4, room - len(keys))
    t.append(f" {now} ", style="bold")
    frac = pos.fraction
    if frac is None:
        t.append("─" * bar_w, style=BORDER)
    else:
        at = min(bar_w - 1, int(round(frac * (bar_w - 1))))
        t.append("━" * at, style=OK if pos.at_end else PURPLE)
        t.append("●", style=f"bold {WARN if pos.at_end else PURPLE}")
        t.append("─" * (bar_w - at - 1), style=BORDER)
    t.append(f" {end}", style=DIM)
    if keys:
        t.append(keys, style=DIM)
    t.no_wrap = True
    t.overflow = "ellipsis"
    return clean_line(t)


class ReplayBar(LineBar):
    """One line above the what-if bar, shown only when the monitor runs on a replay."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.position: Position | None = None
        self._made: tuple[object, int, Text] | None = None  # (position, width, its line)

    def update_position(self, pos: Position | None) -> None:
        """Repaint only the cells that read differently: the clock's seconds and the marker, not the whole line."""
        self.position = pos
        self.repaint_changed()

    def line(self) -> Text:
        """The bar for the position now; made once per position and width (the repaint and the row ask for it)."""
        if self.position is None:
            return Text()
        width = self.content_size.width or 80
        made = self._made
        if made is None or made[0] is not self.position or made[1] != width:
            made = self._made = (self.position, width, replay_bar_text(self.position, width))
        return made[2]
