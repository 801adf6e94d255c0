"""Panels for the empty cases: no GPU (why, and host memory), no agents (how to attach), counted warnings."""

from __future__ import annotations

import textwrap

from rich.text import Text

from batchmon.probes.host import HostSample
from batchmon.probes.nvml import NvmlSample
from batchmon.snapshot import Warning
from batchmon.tui.bars import memory_bar
from batchmon.tui.fmt import fmt_bytes
from batchmon.tui.panel import LinesPanel
from batchmon.tui.views import HostView
from batchmon.tui.palette import ACCENT, DIM, WARN

ATTACH_ONE_LINER = "batchmon.attach(model, optimizer)"
RUN_COMMAND = "batchmon run -- python train.py"


def no_gpu_lines(nvml: NvmlSample, host: HostSample, width: int, *, box: str = "") -> list[Text]:
    """Why no GPU is shown, and the box's memory; ``box``: the --host box it is about ("" for this one)."""
    t = Text().append("No GPU visible", style=f"bold {WARN}")
    if box:
        t.append(f" @{box}", style=DIM)
    lines = [t]
    reason = textwrap.wrap(nvml.error or "no devices found", max(20, width - 6)) or [""]
    for i, part in enumerate(reason):
        line = Text().append("NVML: " if i == 0 else "      ", style=DIM)
        line.append(part)
        lines.append(line)
    lines.append(Text().append("Training processes on the CPU are still measured below.", style=DIM))
    lines.append(Text(""))
    lines.extend(host_lines(host, width))
    return lines


def host_lines(host: HostSample, width: int) -> list[Text]:
    t = Text().append("host ", style="bold")
    t.append(host.hostname or "?")
    lines = [t]
    if host.memory_total:
        bar = Text().append("mem  ", style=DIM)
        used = host.memory_used or 0
        bar.append_text(memory_bar(used, None, host.memory_total, max(8, min(60, width - 5))))
        lines.append(bar)
        lines.append(Text(f"     {fmt_bytes(used)} / {fmt_bytes(host.memory_total)} used"))
    else:
        lines.append(Text().append("memory n/a", style=DIM))
    return lines


def no_agents_lines(width: int) -> list[Text]:
    lines = [Text().append("No training process attached", style="bold")]
    lines.append(Text().append("Attach from your training script:", style=DIM))
    one = Text().append("    import batchmon; ", style=f"bold {ACCENT}")
    one.append(ATTACH_ONE_LINER, style=f"bold {ACCENT}")
    lines.append(one)
    lines.append(Text().append("or run it unchanged under the agent:", style=DIM))
    lines.append(Text().append(f"    {RUN_COMMAND}", style=f"bold {ACCENT}"))
    lines.append(Text().append("It appears here within a second; the monitor and the run may start in any order.",
                               style=DIM))
    return lines


def warning_lines(warnings: tuple[Warning, ...], width: int) -> list[Text]:
    out = []
    for w in warnings[-5:]:
        t = Text().append("⚠ ", style=WARN)
        t.append(w.source, style="bold")
        t.append(": ")
        t.append(w.message)
        if w.count > 1:
            t.append(f" (×{w.count})", style=DIM)
        out.append(t)
    return out


class NoGpuPanel(LinesPanel):
    """A box with no GPU to show: why, and its host memory (views.host_views says which boxes get one)."""

    def __init__(self, view: HostView, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="notice")
        self.view = view

    def build(self, width: int) -> list[Text]:
        return no_gpu_lines(self.view.nvml, self.view.sample, width, box=self.view.host)


class NoAgentsPanel(LinesPanel):
    can_focus = False

    def build(self, width: int) -> list[Text]:
        return no_agents_lines(width)


class WarningsPanel(LinesPanel):
    can_focus = False

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="warnings")
        self.warnings: tuple[Warning, ...] = ()

    def build(self, width: int) -> list[Text]:
        return warning_lines(self.warnings, width)
