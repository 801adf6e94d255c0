"""A job's title line, and its compact panel (two lines: title and step, measured bar and prediction), kept while
what they show reads the same: beside 16 jobs the compact panels are built again every second for their step
counters, their titles and bar lines the same as the second before. tui/job_panel.py draws the other levels."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable

from rich.text import Text

from batchmon.probes.nvml import DeviceSample
from batchmon.protocol import Step
from batchmon.snapshot import AgentView
from batchmon.tui.bars import component_parts, stacked_bar
from batchmon.tui.fmt import fmt_bytes, fmt_count, fmt_seconds
from batchmon.tui.palette import ACCENT, BAD, DIM, OK, PURPLE, WARN
from batchmon.tui.views import JobView

EVENT_STYLES = {"oom": f"bold {BAD}", "alloc_retry": f"bold {WARN}", "warning": WARN, "detached": DIM}


def command_text(agent: AgentView) -> str:
    """The training command as the agent reported it (literal), shortened to the script and its flags."""
    argv = list(agent.hello.argv)
    if agent.hello.name:
        return agent.hello.name
    if len(argv) > 1 and argv[0].rsplit("/", 1)[-1].startswith("python"):
        argv = argv[1:]
    return " ".join(argv) if argv else f"pid {agent.hello.pid}"


def device_label(agent: AgentView, dev: DeviceSample | None) -> str:
    if dev is not None:
        return f"{agent.hello.device} (GPU {dev.index})"
    return agent.hello.device


def job_title(v: JobView, focused_marker: bool, width: int = 200) -> Text:
    """Marker, command, ranks, device, pid, user: all literal text. When narrow, the user gives way, then the
    command is cut; the pid stays, since it is what names the process in the GPU panel and in `ps`."""
    a = v.lead
    parts: list[tuple[str, str, int]] = []  # (text, style, drop order: higher goes first)
    if len(v.ranks) > 1 or a.hello.world_size > 1:
        parts.append((f"  {len(v.ranks)}/{a.hello.world_size} ranks", PURPLE, 0))
    parts.append((f"  {device_label(a, v.devices.get(a.key))}", DIM, 0))
    parts.append((f"  pid {a.hello.pid}", DIM, 0))
    if v.host:
        parts.append((f" @{v.host}", DIM, 0))
    if v.user:
        parts.append((f" {v.user}", DIM, 2))
    if a.detached:
        parts.append(("  detached", WARN, 0))
    elif not a.connected:
        parts.append(("  disconnected", WARN, 0))
    cmd = command_text(a)
    budget = width - 2
    for level in (2, 1):
        if len(cmd) + sum(len(p[0]) for p in parts) <= budget:
            break
        parts = [p for p in parts if p[2] < level]
    room = max(16, budget - sum(len(p[0]) for p in parts))
    if len(cmd) > room:
        cmd = cmd[: room - 1] + "…"
    t = Text().append("▶ " if focused_marker else "  ", style=f"bold {ACCENT}")
    t.append(cmd, style="bold")
    for text, style, _ in parts:
        t.append(text, style=style)
    return t


_COMPACT: OrderedDict[tuple, tuple[Any, Text]] = OrderedDict()  # compact panels' titles and bar lines, kept


def _kept(key: tuple, make: Callable[[], Text]) -> Text:
    """``make()``, the same Text while ``key`` reads the same: beside 16 jobs, a compact panel is built again every
    second for its step counter, its title and its bar line the same as the second before. Not copied: no one
    changes a line once made (see gpu_panel._process_block)."""
    hit = _COMPACT.get(key)
    if hit is None:
        hit = _COMPACT[key] = (None, make())
        if len(_COMPACT) > 256:
            _COMPACT.popitem(last=False)
    else:
        _COMPACT.move_to_end(key)
    return hit[1]


def kept_title(v: JobView, focused: bool, width: int) -> Text:
    """job_title, kept by what it reads: the hello by identity (hashing a Hello, or the device sample, every refresh
    cost more than the title), the device by its index. The same Text while kept (compact_lines appends it to
    its own line: it is not changed)."""
    a = v.lead
    dev = v.devices.get(a.key)
    key = ("title", a.key, id(a.hello), len(v.ranks), dev.index if dev is not None else None, v.host, v.user,
           a.detached, a.connected, focused, width)
    kept = _COMPACT.get(key)
    if kept is not None and kept[0] is a.hello:  # the same hello (an id is reused only once its object is gone)
        _COMPACT.move_to_end(key)
        return kept[1]
    title = job_title(v, focused, width)
    _COMPACT[key] = (a.hello, title)
    if len(_COMPACT) > 256:
        _COMPACT.popitem(last=False)
    return title


def _compact_bars(measured: dict[str, int] | None, measured_total: int, p: Any, width: int) -> Text:
    """The compact panel's second line: the measured bar and total, the prediction at the what-if batch."""
    key = ("bars", tuple(measured.items()) if measured else None, width,
           (p.batch_size, p.total, p.max_batch, p.headroom) if p is not None else None)

    def make() -> Text:
        figures = Text()
        if p is not None:
            figures.append(f"  → b={p.batch_size}: ", style=DIM)
            figures.append(fmt_bytes(p.total), style="bold")
            figures.append("  max ", style=DIM)
            figures.append(fmt_count(p.max_batch) if p.max_batch is not None else "n/a", style=f"bold {OK}")
            if p.headroom is not None:
                figures.append("  headroom ", style=DIM)
                figures.append(fmt_bytes(p.headroom), style=OK if p.headroom >= 0 else BAD)
        t2 = Text("  ")
        if measured:
            total = f" {fmt_bytes(measured_total)}"
            # the bar gives way to the figures (a line longer than its panel is cut, and repainted whole)
            bar_w = max(8, min(40, width // 3, width - len(t2) - len(total) - len(figures)))
            t2.append_text(stacked_bar(component_parts(measured), max(measured_total, p.total if p else 0, 1), bar_w))
            t2.append(total, style="bold")
        else:
            t2.append("no step yet", style=DIM)
        return t2.append_text(figures)

    return _kept(key, make)


def compact_lines(v: JobView, focused: bool, width: int, measured: dict[str, int] | None,
                  measured_total: int) -> list[Text]:
    """A running job's compact panel: an OOM or RETRY mark, the title, the step; the measured bar and the
    prediction at the what-if batch."""
    s = v.lead.last_step
    t1 = Text()
    if any(e.kind == "oom" for r in v.ranks for e in r.events):
        t1.append(" OOM ", style=f"reverse {EVENT_STYLES['oom']}")
        t1.append(" ")
    elif any(e.kind == "alloc_retry" for r in v.ranks for e in r.events):
        t1.append(" RETRY ", style=f"reverse {EVENT_STYLES['alloc_retry']}")
        t1.append(" ")
    step = step_text(s) if s is not None else ""
    t1.append_text(kept_title(v, focused, width - len(t1.plain) - (step_room(s) if s is not None else 0)))
    if step:
        t1.append(step, style=DIM)
    return [t1, _compact_bars(measured, measured_total, v.prediction, width)]


STEP_DIGITS = 6  # the step counter's room: a million steps (~3 hours at 100 steps/s) before the title gives a cell
TIME_CELLS = 6  # '999 ms', '1.25 s'


def step_text(s: Step) -> str:
    """The compact title's step, batch and step time."""
    return f"  step {s.step}  b={s.batch_size}  {fmt_seconds(s.step_seconds)}/step"


def step_room(s: Step) -> int:
    """The cells the title leaves for ``step_text``, the same second after second: the title is cut to leave
    them (the H200's commands are longer than a panel: appended after a full-width title, the step counter was
    cut off the screen, and the line, longer than its panel, was repainted whole every second), and a counter
    that gains a digit or a step time that reads '9 ms' after '10 ms' does not move the title."""
    return (len("  step   b=  /step") + max(STEP_DIGITS, len(str(s.step))) + len(str(s.batch_size))
            + max(TIME_CELLS, len(fmt_seconds(s.step_seconds))))
