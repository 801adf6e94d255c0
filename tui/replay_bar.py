"""The replay's position bar: where in the recording the screen is, the keys that seek, and "end of recording".

``replay_bar_text`` is pure (tested without Textual); the widget repaints only when the line would read
differently (the position moves by a cell, the clock by a second), as every other widget here.
"""

from __future__ import annotations

from typing import Protocol

from rich.text import Text
from textual.geometry import Region
from textual.widget import Widget

from batchmon.tui.fmt import clean_line
from batchmon.tui.palette import BG, BORDER, DIM, OK, PURPLE, WARN
from batchmon.tui.panel import changed_cells

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


class ReplayBar(Widget):
    """One line above the what-if bar, shown only when the monitor runs on a replay."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.position: Position | None = None
        self._shown: Text | None = None

    def update_position(self, pos: Position | None) -> None:
        """Repaint only when the line would read differently."""
        self.position = pos
        if not self.is_mounted or self.content_size.width <= 0:
            self.refresh()
            return
        new, shown = self._text(), self._shown
        if shown is None:
            self.refresh()
        elif new != shown or new.spans != shown.spans:
            x0, x1 = changed_cells(shown, new, self.content_size.width)
            if x0 < x1:  # (else changed only beyond the line's edge)
                self.refresh(Region(x0, 0, x1 - x0, 1))  # the clock's seconds and the marker, not the whole line

    def _text(self) -> Text:
        if self.position is None:
            return Text()
        return replay_bar_text(self.position, self.content_size.width or 80)

    def render(self) -> Text:
        self._shown = self._text()
        return self._shown
