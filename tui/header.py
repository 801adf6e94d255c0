"""The one-line header: host, driver, GPU count, host memory, refresh interval, live/paused/replay, time."""

from __future__ import annotations

import time as _time

from rich.text import Text

from batchmon.snapshot import Snapshot
from batchmon.tui.fmt import clean_line, fmt_bytes, fmt_interval
from batchmon.tui.line_bar import LineBar
from batchmon.tui.views import agent_count
from batchmon.tui.palette import BG, BLUE, DIM, OK, PURPLE, WARN


def header_text(snapshot: Snapshot | None, *, interval: float, paused: bool, title: str | None, width: int) -> Text:
    """Header line. Wide: every field; narrow: host, interval and state only."""
    text = Text().append(" batchmon ", style=f"bold {BG} on {BLUE}")
    text.append(" ")
    if paused:
        text.append(" ⏸ PAUSED ", style=f"bold {BG} on {WARN}")
    elif snapshot is not None and snapshot.source == "replay":
        text.append(" ▶ replay ", style=f"bold {BG} on {PURPLE}")
    else:
        text.append(" ● live ", style=f"bold {BG} on {OK}")
    text.append(" every ", style=DIM)
    text.append(fmt_interval(interval), style="bold")
    text.append("  ")
    if title:
        text.append(title, style="bold")
        text.append("  ")
    if snapshot is None:
        text.append("waiting for the first sample…", style=f"italic {DIM}")
    else:
        host = snapshot.host
        text.append("host ", style=DIM)
        text.append(host.hostname or "?", style="bold")
        nv = snapshot.nvml
        if nv.available:
            text.append("  driver ", style=DIM)
            text.append(nv.driver or "n/a")
            text.append(f"  {len(nv.devices)} GPU{'s' if len(nv.devices) != 1 else ''}", style=DIM)
        else:
            text.append("  no NVML", style=WARN)
        if width >= 100 and host.memory_total:
            text.append("  host mem ", style=DIM)
            text.append(f"{fmt_bytes(host.memory_used)} / {fmt_bytes(host.memory_total)}")
        agents = agent_count(snapshot)  # every box's: the job panels show them all
        text.append(f"  {agents} agent{'s' if agents != 1 else ''}", style=DIM)
    if snapshot is not None:
        # the clock stays at the right end, whatever the width: what does not fit before it is cut with '…'
        # (the state, live / replay / paused, comes first, so it is never what is cut)
        stamp = _time.strftime("%H:%M:%S", _time.localtime(snapshot.time))
        room = width - len(stamp) - 2
        if len(text.plain) > room:
            text.truncate(max(0, room), overflow="ellipsis")
            if len(text.plain) >= room and room > 0:
                text.right_crop(len(text.plain) - room + 1)
                text.append("…", style=DIM)
        text.append(" " * max(1, width - len(text.plain) - len(stamp) - 1))
        text.append(stamp, style=DIM)
    text.no_wrap = True
    text.overflow = "ellipsis"
    return clean_line(text)  # the host name and the title come from outside (a remote box, a recording's name)


class HeaderBar(LineBar):
    """Docked header; the app sets .snapshot/.paused/.interval and calls update_text() (or refresh())."""

    def __init__(self, *, title: str | None = None, id: str | None = None) -> None:
        super().__init__(id=id)
        self.title_text = title
        self.snapshot: Snapshot | None = None
        self.paused = False
        self.interval = 1.0
        self._made: tuple[tuple, Text] | None = None  # (what it showed, the line): see line

    def line(self) -> Text:
        """The header line for what it shows now; built once per change of that (update_text and render both
        ask for it each refresh)."""
        width = self.content_size.width or 80
        inputs = (self.snapshot, self.paused, self.interval, self.title_text, width)
        made = self._made
        if made is None or made[0][0] is not inputs[0] or made[0][1:] != inputs[1:]:
            made = self._made = (inputs, header_text(self.snapshot, interval=self.interval, paused=self.paused,
                                                     title=self.title_text, width=width))
        return made[1]

    def update_text(self) -> None:
        """Repaint the columns whose text changed since the last render (each second: the clock, perhaps the
        host memory), or nothing; the whole line when it was never drawn at this width."""
        self.repaint_changed()
