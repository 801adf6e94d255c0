"""A job whose run ended: dimmed, its final summary (how it ended, steps, peak), and after an out-of-memory error
the post-mortem as the panel: the components at the failing moment against the device, the bytes asked for, the
allocator's pool, and which change would have fit the failing batch (batchmon.postmortem, the fit advisor).

Built only when the panel's signature changes (an ended run's never does), so it costs nothing per refresh.
"""

from __future__ import annotations

import time

from rich.console import Console
from rich.text import Text

from batchmon.protocol import ALL_COMPONENTS
from batchmon.snapshot import OOM, OomReport, RunEnd
from batchmon.tui.bars import COMPONENT_LABELS, COMPONENT_STYLES, component_parts, stacked_bar
from batchmon.tui.fmt import fmt_bytes, fmt_count
from batchmon.tui.palette import ACCENT, BAD, DIM, OK, WARN
from batchmon.tui.predict import measured_components
from batchmon.tui.views import JobView

ADVICE_ROWS = {"full": 6, "medium": 3}
_CONSOLE = Console(width=1000, color_system=None, legacy_windows=False)  # Text.wrap's measuring console only


def end_summary(end: RunEnd) -> str:
    """'ended 15:38:33 · exited (exit code not reported by the agent) · 60 steps · peak 12.6 GiB'."""
    when = time.strftime("%H:%M:%S", time.localtime(end.time)) if end.time else "?"
    steps = f"{end.steps} step{'s' if end.steps != 1 else ''}"
    peak = "peak n/a" if end.peak is None else f"peak {fmt_bytes(end.peak)}"
    return f"ended {when} · {end.text} · {steps} · {peak}"


def _wrapped(t: Text, width: int) -> list[Text]:
    """A line folded at its spaces into lines of ``width`` cells (continuations indented): a label never pushes
    what follows off the panel; a word longer than a line is cut with '…'."""
    if len(t.plain) <= width:
        return [t]
    out: list[Text] = []
    for piece in t.wrap(_CONSOLE, max(width - 4, 10)):
        piece.rstrip()
        line = piece if not out else Text("    ").append_text(piece)
        line.truncate(width, overflow="ellipsis")
        out.append(line)
    return out


def _title(v: JobView, command: str, focused: bool, width: int) -> Text:
    a = v.lead
    oom = a.state == OOM
    t = Text().append("▶ " if focused else "  ", style=f"bold {ACCENT}")
    t.append(" OOM " if oom else " ENDED ", style=f"reverse {BAD}" if oom else f"reverse {DIM}")
    t.append(" ")
    rest = f"  pid {a.hello.pid}" + (f" @{v.host}" if v.host else "")
    if len(v.ranks) > 1 or a.hello.world_size > 1:
        rest = f"  {len(v.ranks)}/{a.hello.world_size} ranks" + rest
    cmd = command
    room = max(12, width - len(t.plain) - len(rest) - 1)
    if len(cmd) > room:
        cmd = cmd[: room - 1] + "…"
    t.append(cmd, style=DIM)
    t.append(rest, style=DIM)
    return t


def _oom_lines(r: OomReport, width: int, level: str) -> list[Text]:
    lines: list[Text] = []
    head = Text("  ")
    head.append("failed ", style=DIM)
    head.append(f"step {r.step if r.step is not None else '?'}", style="bold")
    head.append("  batch ", style=DIM)
    head.append(str(r.batch_size) if r.batch_size is not None else "?", style="bold")
    head.append("  asked for ", style=DIM)
    head.append(fmt_bytes(r.requested_bytes) if r.requested_bytes is not None else "?", style=f"bold {BAD}")
    head.append("  with ", style=DIM)
    head.append(fmt_bytes(r.allocated), style="bold")
    head.append(" live", style=DIM)
    if r.device_total is not None:
        head.append(f" of {fmt_bytes(r.device_total)}", style=DIM)
    if r.device_free is not None:
        head.append("  free ", style=DIM)
        head.append(fmt_bytes(r.device_free), style=BAD)
    lines.extend(_wrapped(head, width))
    scale = r.device_total or (r.allocated + (r.requested_bytes or 0)) or 1
    bar_w = max(10, width - 4)
    parts: list[tuple] = list(component_parts({k: v or 0 for k, v in r.components.items()}))
    if r.requested_bytes:
        parts.append((r.requested_bytes, f"bold {BAD}", "▒"))  # what it asked for, past what it had
    bar = Text("  ").append_text(stacked_bar(parts, scale, bar_w))
    lines.append(bar)
    if level == "full":  # the components at the failing moment, wrapped to the width
        items = [("■", COMPONENT_STYLES[n], COMPONENT_LABELS[n], fmt_bytes(v))
                 for n in ALL_COMPONENTS if (v := r.components.get(n)) is not None]
        items.append(("▒", f"bold {BAD}", "asked for", fmt_bytes(r.requested_bytes) if r.requested_bytes else "?"))
        row = Text("  ")
        for glyph, style, label, value in items:
            cell = len(glyph) + len(label) + 1 + len(value) + 2
            if len(row.plain) > 2 and len(row.plain) + cell > width:
                lines.append(row)
                row = Text("  ")
            row.append(glyph, style=style)
            row.append(f"{label} ")
            row.append(f"{value}  ", style=DIM)
        lines.append(row)
    pool = Text("  ")
    pool.append("reserved ", style=DIM)
    if r.reserved is None:
        pool.append("n/a (not reported by the agent)")
    else:
        pool.append(("~" if r.reserved_estimated else "") + fmt_bytes(r.reserved))
        if r.reserved_estimated:
            pool.append(" (NVML less the context)", style=DIM)
    if r.fragmentation is not None:
        pool.append("  fragmentation ", style=DIM)
        pool.append(fmt_bytes(r.fragmentation), style=WARN)
    if r.device_used is not None:
        pool.append("  NVML ", style=DIM)
        pool.append(fmt_bytes(r.device_used))
        pool.append(" (beyond live tensors ", style=DIM)
        pool.append(fmt_bytes(r.beyond_allocated))
        pool.append(")", style=DIM)
    pool.append("  retries ", style=DIM)
    pool.append(str(r.num_alloc_retries) if r.num_alloc_retries is not None else "n/a")
    lines.extend(_wrapped(pool, width))
    rows = ADVICE_ROWS.get(level, 0)
    if rows and r.advice:
        lines.append(Text().append(f"  what would have fit batch {r.batch_size}, cheapest first", style=f"bold {DIM}"))
        label_w = max(16, min(44, width - 34))
        for a in r.advice[:rows]:
            t = Text("  ")
            t.append("✓ " if a.fits_target else "✗ ", style=OK if a.fits_target else BAD)
            label = a.what_if if len(a.what_if) <= label_w else a.what_if[: label_w - 1] + "…"
            t.append(f"{label:<{label_w}}")
            t.append(" max ", style=DIM)
            t.append(f"{fmt_count(a.max_batch) if a.max_batch is not None else 'n/a':>7}",
                     style=f"bold {OK if a.fits_target else WARN}")
            t.append(f"  step x{a.step_time_factor:.2f}", style=DIM)
            lines.append(t)
        if level == "full" and r.advice_basis:
            lines.extend(_wrapped(Text().append(f"  basis: {r.advice_basis}", style=DIM), width))
    elif rows and r.advice_basis:
        lines.extend(_wrapped(Text().append(f"  {r.advice_basis}", style=DIM), width))
    return lines


def ended_lines(v: JobView, command: str, width: int, level: str, *, focused: bool = False) -> list[Text]:
    """level as job_panel.job_lines: 'full', 'medium', 'compact'; ``command``: the run's command as the running
    panel shortens it."""
    a = v.lead
    lines = [_title(v, command, focused, width)]
    end = a.ended
    if end is not None:
        lines.extend(_wrapped(Text().append(f"  {end_summary(end)}", style=DIM), width))
    if level != "compact" and a.phases is not None:  # where a finished step of this run peaked, its last sampled
        ph = a.phases
        which = f"  last sampled step {ph.step}" + (f" (batch {ph.batch_size})" if ph.batch_size is not None else "")
        text = f"{which}: {ph.text()}"
        if len(text) > width:
            text = f"{which}: {ph.text(short=True)}"
        line = Text(text, style=DIM)
        line.truncate(width, overflow="ellipsis")
        lines.append(line)
    if a.state == OOM and a.oom is not None:
        if level == "compact":
            r = a.oom
            asked = fmt_bytes(r.requested_bytes) if r.requested_bytes is not None else "?"
            best = next((x for x in r.advice if x.fits_target), None)
            t = Text().append(f"  batch {r.batch_size} asked for {asked}", style=BAD)
            if best is not None:
                t.append(f"  → {best.what_if}: max {fmt_count(best.max_batch)}", style=OK)
            return [lines[0], t]
        return lines + _oom_lines(a.oom, width, level)
    if level != "compact" and len(v.ranks) > 1:  # a distributed job: each rank's own end
        for rank in v.ranks:
            t = Text().append(f"  rank {rank.hello.rank:<3} pid {rank.hello.pid:<7} ", style=DIM)
            if rank.ended is not None:
                peak = "n/a" if rank.ended.peak is None else fmt_bytes(rank.ended.peak)
                t.append(f"{rank.ended.how}, {rank.ended.steps} steps, peak {peak}",
                         style=f"dim {BAD}" if rank.state == OOM else "dim")
            lines.extend(_wrapped(t, width))
        return lines
    if level != "compact" and a.last_step is not None:
        measured = measured_components(a.last_step)
        total = sum(measured.values())
        t = Text().append(f"  last step {a.last_step.step:<9}", style=DIM)
        t.append_text(stacked_bar(component_parts(measured), max(total, 1), max(10, width - 32)))
        t.append(f" {fmt_bytes(total)}", style=DIM)
        t.stylize("dim")  # faint, colours kept: the run is over
        lines.append(t)
    return lines[:2] if level == "compact" else lines


def clear_ended_runs(source: object) -> bool:
    """The `x` key: ask the source to forget every ended run (the hub records the request, so a replay of its
    recording clears them at the same moment; a replay clears them from the position shown, see
    batchmon.monitor.replay). False when the source cannot (a fixed snapshot)."""
    clear = getattr(source, "clear_ended", None)
    if not callable(clear):
        return False
    clear()
    return True
