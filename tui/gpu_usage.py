"""Where a GPU's "used" goes, for its panel: the processes' share and the unattributed rest; per attached
process its allocator pool and what lies outside it (context, kernels, NCCL, libraries); processes without an
agent named as such. The split is batchmon.where_used's, the same as --once prints.

Built with the panel's lines, only when its device sample or process rows change.
"""

from __future__ import annotations

from rich.text import Text

from batchmon.tui.fmt import fmt_bytes
from batchmon.tui.palette import ACCENT, DIM, FAINT, WARN
from batchmon.tui.views import GpuView
from batchmon.snapshot import device_use

AGENT_STYLE = f"bold {ACCENT}"


def usage_lines(v: GpuView, width: int) -> list[Text]:
    """'used 15.7 GiB = 2 processes 15.7 GiB + unattributed 14.4 MiB', then a line per attached process."""
    d = v.device
    if d.memory is None or not v.procs:
        return []
    figures = {p.pid: p.figures for p in v.procs if p.figures is not None}
    use = device_use(d, figures)
    t = Text().append("  used ", style=DIM)
    t.append(fmt_bytes(use.used))
    t.append(f" = {len(use.processes)} process{'es' if len(use.processes) != 1 else ''} ", style=DIM)
    t.append(fmt_bytes(use.processes_total))
    if use.unattributed is not None:
        t.append(" + unattributed ", style=DIM)
        t.append(fmt_bytes(use.unattributed), style=WARN if use.unattributed > (256 << 20) else "")
        if width - len(t.plain) >= 28:
            t.append(" (driver, unseen processes)", style=FAINT)
    lines = [t]
    for p in use.processes:
        if not p.agent:
            continue
        row = Text().append(f"  ● {p.pid:>7} ", style=AGENT_STYLE)
        row.append("allocator ", style=DIM)
        row.append(fmt_bytes(p.reserved) if p.reserved is not None else "n/a")
        row.append(f" + {p.outside_label} ", style=DIM)
        row.append(fmt_bytes(p.outside) if p.outside is not None else "n/a")
        lines.append(row)
    ended = {p.pid for p in v.procs if p.ended}
    exiting = [p for p in use.processes if p.pid in ended]
    if exiting:
        row = Text().append("  run ended, process still on the GPU: ", style=DIM)
        row.append(", ".join(f"{p.pid} {fmt_bytes(p.used) if p.used is not None else 'n/a'}" for p in exiting))
        lines.append(row)
    others = [p for p in use.processes if not p.agent and p.pid not in ended]
    if others:
        row = Text().append("  without an agent: ", style=DIM)
        row.append(", ".join(f"{p.pid} {fmt_bytes(p.used) if p.used is not None else 'n/a'}" for p in others))
        lines.append(row)
    return lines
