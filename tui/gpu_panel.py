"""One GPU: memory bar (used, driver-reserved), utilization, history sparkline, the processes on it."""

from __future__ import annotations

from rich.text import Text

from batchmon.probes.nvml import DeviceSample
from batchmon.tui.bars import memory_bar, percent_bar, sparkline
from batchmon.tui.fmt import fmt_bytes, fmt_used_total
from batchmon.tui.gpu_usage import usage_lines
from batchmon.tui.kept import Kept
from batchmon.tui.panel import LinesPanel
from batchmon.tui.timeline import history_lines
from batchmon.tui.views import GpuView, ProcRow
from batchmon.tui.palette import ACCENT, BAD, DIM, WARN

AGENT_STYLE = f"bold {ACCENT}"


def _title(v: GpuView, width: int) -> Text:
    d = v.device
    t = Text()
    t.append(f"GPU {d.index}", style="bold")
    if v.host:
        t.append(f" @{v.host}", style=DIM)
    if d.name:
        t.append(" ")
        t.append(d.name.replace("NVIDIA ", "") if width < 80 else d.name)
    if d.temperature is not None:
        t.append(f"  {d.temperature}°C", style=DIM)
    if d.power is not None:
        t.append(f"  {d.power:.0f} W", style=DIM)
    return t


def _mem_label(d: DeviceSample) -> Text:
    m = d.memory
    if m is None:
        return Text().append("memory n/a", style=DIM)
    t = Text().append(f"{fmt_bytes(m.used)}", style="bold")
    t.append(f" / {fmt_bytes(m.total)}")
    if m.reserved:
        t.append(f"  reserved {fmt_bytes(m.reserved)}", style=DIM)
    return t


def _util(d: DeviceSample, bar_w: int) -> Text:
    t = Text().append("util ", style=DIM)
    t.append_text(percent_bar(d.utilization, bar_w))
    t.append(f" {d.utilization:>3d}%" if d.utilization is not None else "  n/a")
    return t


def _proc_line(p: ProcRow, width: int) -> Text:
    t = Text()
    t.append("● " if p.agent else "  ", style=AGENT_STYLE)
    t.append(f"{p.pid:>7d} ")
    user = (p.info.user if p.info else None) or "?"
    t.append(f"{user[:10]:<10} ", style=DIM)
    t.append(f"{fmt_bytes(p.used) if p.used is not None else 'n/a':>10} ")
    if p.info is not None and p.info.state != "ok":
        t.append(f"({p.info.state}) ", style=WARN)
    cmd = (p.info.command if p.info else None) or ""
    t.append(cmd, style=AGENT_STYLE if p.agent else "")  # literal: Text.append never parses markup
    return t


def gpu_lines(v: GpuView, width: int, level: str) -> list[Text]:
    """level: 'full' (bars, sparkline, process table), 'dense' (2 lines), 'line' (1 line)."""
    d = v.device
    if d.lost or d.memory is None and d.error:
        t = _title(v, width)
        t.append("  LOST" if d.lost else "  error", style=f"bold {BAD}")
        if d.error:
            t.append(f": {d.error}", style=BAD)
        return [t]
    m = d.memory
    agents = sum(1 for p in v.procs if p.agent)
    if level == "line":
        t = Text().append(f"GPU{d.index} ", style="bold")
        bar_w = max(6, min(30, width // 4))
        t.append_text(memory_bar(m.used, m.reserved, m.total, bar_w) if m else Text("?" * bar_w))
        if m:
            t.append(f" {fmt_used_total(m.used, m.total, 0)}")  # '13/140 GiB': the tables' units
        t.append(f" {d.utilization}%" if d.utilization is not None else " n/a", style=DIM)
        t.append(f" {len(v.procs)}p", style=DIM)
        if agents:
            t.append(f" ●{agents}", style=AGENT_STYLE)
        if d.name and width - len(t.plain) > 12:  # the model, if it fits
            t.append(f" {d.name.replace('NVIDIA ', '')}", style=DIM)
        return [t]
    lines: list[Text] = []
    if level == "dense":
        line = _title(v, width)
        line.append("  ")
        line.append_text(_util(d, 10))
        line.append(f"  {len(v.procs)} proc", style=DIM)
        if agents:
            line.append(f"  ●{agents} agent{'s' if agents != 1 else ''}", style=AGENT_STYLE)
        lines.append(line)
        short = Text()
        if m:
            short.append(f" {fmt_used_total(m.used, m.total)}", style="bold")
        bar_w = max(8, (width - len(short.plain)) * 3 // 5)
        l2 = memory_bar(m.used, m.reserved, m.total, bar_w) if m else Text("·" * bar_w)
        l2.append_text(short)
        l2.append("  ")
        l2.append_text(sparkline(v.history, max(4, width - len(l2.plain)), maximum=m.total if m else None))
        lines.append(l2)
        return lines
    # the full panel, each part kept by what it shows (tui/kept.py): beside training jobs the title's watts change
    # every second or two, the history every 5 s (app_memory.HISTORY_SECONDS), the rest seldom
    lines.extend(_KEPT.get(("title", d.index, v.host, d.name, d.temperature, d.power, d.utilization, width),
                           lambda: _full_title(v, width)))
    lines.extend(_KEPT.get(("memory", m.used if m else None, m.reserved if m else None, m.total if m else None,
                            width), lambda: _memory_lines(d, width)))
    total = m.total if m else None
    lines.extend(_KEPT.get(("history", tuple(v.history), v.history_rows, total, width),
                           lambda: _history(v.history, v.history_rows, total, width)))
    if v.procs:
        lines.extend(_process_block(v, width))
    else:
        lines.append(Text().append("  no processes", style=DIM))
    return lines


def _full_title(v: GpuView, width: int) -> list[Text]:
    """A full panel's title with the utilization at its right end, or on a line of its own where it does not fit."""
    title = _title(v, width)
    util_w = 10
    title_room = width - len(title.plain) - (util_w + 10)
    if title_room < 2:
        return [title, _util(v.device, util_w)]
    title.append(" " * title_room)
    title.append_text(_util(v.device, util_w))
    return [title]


def _memory_lines(d: DeviceSample, width: int) -> list[Text]:
    """The memory bar (where the GPU reports its memory) and the used / total label."""
    lines = []
    m = d.memory
    if m:
        bar = Text().append("mem  ", style=DIM)
        bar.append_text(memory_bar(m.used, m.reserved, m.total, max(8, width - 5)))
        lines.append(bar)
    label_line = Text("     ")
    label_line.append_text(_mem_label(d))
    lines.append(label_line)
    return lines


def _history(history: list[int], rows: int, total: int | None, width: int) -> list[Text]:
    """Used memory over time: with an axis where there is room for it (tui/timeline.py), else a sparkline."""
    if rows > 1:
        return history_lines(history, width, rows, maximum=total)
    hist = Text().append("hist ", style=DIM)
    hist.append_text(sparkline(history, max(4, width - 5), maximum=total))
    return [hist]


_KEPT: Kept[list[Text]] = Kept(32)  # a full panel's title, memory and history lines, by what they show
_BLOCKS: Kept[list[Text]] = Kept(16)  # the process table and usage lines, by what they show


def _process_block(v: GpuView, width: int) -> list[Text]:
    """The process table and where "used" goes (tui/gpu_usage.py), the same Text objects while what they show
    reads the same: the panel is built again every refresh (its memory history moves on), but beside 16 training
    jobs its 34 process lines stay the same second after second (a process's CPU share and RSS are not shown
    here). Not copied (copying them was most of the GPU panel's build): the lines are the panel's, never changed
    after they are made (LinesPanel's clean-up and no-wrap settings are the same each time), and the panel's line
    diff finds them equal by identity."""
    d = v.device
    key = (width, d.index, d.memory, tuple(
        (p.pid, p.used, p.agent, p.figures, p.ended, p.info.user, p.info.command, p.info.state) if p.info is not None
        else (p.pid, p.used, p.agent, p.figures, p.ended) for p in v.procs))
    return list(_BLOCKS.get(key, lambda: _make_process_block(v, width)))


def _make_process_block(v: GpuView, width: int) -> list[Text]:
    lines = [Text().append(f"  {'PID':>7} {'USER':<10} {'GPU MEM':>10} COMMAND", style="bold " + DIM)]
    for p in sorted(v.procs, key=lambda p: (-(p.used or 0), p.pid)):
        lines.append(_proc_line(p, width))
    lines.extend(usage_lines(v, width))
    return lines


class GpuPanel(LinesPanel):
    """A focusable GPU panel; the app assigns .view and .level and calls changed()."""

    def __init__(self, view: GpuView, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="gpu")
        self.view = view
        self.level = "full"

    def build(self, width: int) -> list[Text]:
        return gpu_lines(self.view, width, self.level)
