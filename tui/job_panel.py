"""One training job (its ranks grouped): measured vs predicted component bars, the what-if prediction, events,
and the predicted-peak-vs-batch chart."""

from __future__ import annotations

from rich.segment import Segment
from rich.text import Span, Text
from textual.geometry import Region
from textual.strip import Strip

from batchmon.jobs import imbalance, imbalance_text
from batchmon.protocol import ALL_COMPONENTS, Event
from batchmon.snapshot import AgentView, StepPhases
from batchmon.tui.bars import COMPONENT_LABELS, COMPONENT_STYLES, component_parts, stacked_bar
from batchmon.tui.chart import ChartInput, render_chart
from batchmon.tui.ended_panel import ended_lines
from batchmon.tui.component_table import MIN_WIDTH as COMPACT_TABLE_WIDTH, compact_table
from batchmon.tui.fmt import clean_text, fit_label, fmt_bytes, fmt_count, fmt_seconds
from batchmon.tui.panel import LinesPanel, changed_runs
from batchmon.tui.predict import measured_components
from batchmon.tui.views import JobView, job_signature
from batchmon.tui.palette import ACCENT, BAD, BLUE, BORDER, DIM, OK, WARN

from batchmon.tui.job_compact import (EVENT_STYLES, command_text, compact_lines, device_label, kept_title, step_room,
                                      step_text)
from batchmon.tui.kept import Kept

__all__ = ["EVENT_STYLES", "JobPanel", "command_text", "job_lines"]  # command_text: where the app's modules take it


def _stats(v: JobView) -> Text:
    a = v.lead
    s = a.last_step
    t = Text("  ")
    if a.hello.model is not None:
        t.append(a.hello.model.cls or "model")
        t.append(f" {fmt_count(a.hello.model.parameters)} params", style=DIM)
        t.append("  ")
    if a.hello.optimizer:
        t.append(a.hello.optimizer)
        t.append("  ")
    if s is None:
        t.append("no step yet", style=DIM)
        return t
    t.append("step ", style=DIM)
    t.append(str(s.step), style="bold")
    t.append("  batch ", style=DIM)
    t.append(str(s.batch_size) if s.batch_size is not None else "n/a", style="bold")
    if s.batch_source:  # where the agent found it: a sequence-first model's batch is not dim 0
        t.append(f" ({s.batch_source})", style=DIM)
    t.append("  ", style=DIM)
    t.append(f"{fmt_seconds(s.step_seconds)}/step")
    if s.num_alloc_retries:
        t.append(f"  alloc retries {s.num_alloc_retries}", style=EVENT_STYLES["alloc_retry"])
    if s.num_ooms:
        t.append(f"  OOMs {s.num_ooms}", style=EVENT_STYLES["oom"])
    return t


def _bar_line(label: str, comps: dict[str, int] | None, scale: int, bar_w: int, total_label: str) -> Text:
    """A labelled stacked bar of the components and its total; kept by what it shows (steady training: the same
    bars second after second)."""
    key = ("bar", label, tuple(comps.items()) if comps is not None else None, scale, bar_w, total_label)
    return _KEPT.get(key, lambda: _make_bar_line(label, comps, scale, bar_w, total_label))


def _make_bar_line(label: str, comps: dict[str, int] | None, scale: int, bar_w: int, total_label: str) -> Text:
    t = Text().append(f"  {fit_label(label, 16)}", style=DIM)
    if comps is None:
        t.append("·" * bar_w, style=BORDER)
    else:
        t.append_text(stacked_bar(component_parts(comps), scale, bar_w))
    t.append(f" {total_label}", style="bold")
    return t


def _predicted_label(v: JobView) -> str:
    p = v.prediction
    b = p.batch_size if p is not None else v.what_if.effective_batch(v.observed_batch)
    if b is None:
        return "pred"
    extra = v.what_if.describe()
    return f"pred b={b}" + (f" {extra}" if extra else "")


def _summary(v: JobView) -> Text:
    """The prediction's answer (largest batch, headroom) or why there is none; kept by what it shows."""
    p = v.prediction
    key = (("summary", p.max_batch, p.headroom, p.batch_size, p.device_total, p.margin) if p is not None
           else ("no prediction", tuple(v.notes)))
    return _KEPT.get(key, lambda: _make_summary(v))


def _make_summary(v: JobView) -> Text:
    p = v.prediction
    t = Text("  ")
    if p is None:
        t.append("prediction: ", style=DIM)
        t.append("; ".join(v.notes) if v.notes else "waiting for steps", style=WARN if v.notes else DIM)
        return t
    t.append("largest batch ", style=DIM)
    t.append(fmt_count(p.max_batch) if p.max_batch is not None else "n/a (no device limit)", style=f"bold {OK}")
    if p.headroom is not None:
        t.append(f"  headroom at b={p.batch_size} ", style=DIM)
        t.append(fmt_bytes(p.headroom), style=f"bold {OK if p.headroom >= 0 else BAD}")
        if p.headroom < 0:
            t.append("  WILL NOT FIT", style=f"bold {BAD}")
    if p.device_total is not None:
        t.append(f"  of {fmt_bytes(p.device_total)}", style=DIM)
    t.append(f"  margin {fmt_bytes(p.margin)}", style=DIM)
    return t


def _phase_line(v: JobView, width: int) -> list[Text]:
    """Where in the step the lead rank's peak was reached (its latest sampled step): one line, the longest form
    that fits the panel, so it never widens the panel or pushes anything off; nothing without a sampled step."""
    ph = v.lead.phases
    if ph is None:
        return []
    last = v.lead.last_step
    since = ""
    if last is not None and last.step != ph.step:
        since = f"  step {ph.step}"
        if ph.batch_size != last.batch_size:  # no sample at the batch size of the step shown yet
            since += f" b={ph.batch_size}"
    return _KEPT.get(("phase", ph.peak_phase, tuple(ph.peaks.items()), since, width),
                     lambda: _make_phase_line(ph, since, width))


def _make_phase_line(ph: StepPhases, since: str, width: int) -> list[Text]:
    bare = f"peak in {ph.peak_phase}" if ph.peak_phase else "step peak"
    for text in (ph.text() + since, ph.text(short=True) + since, ph.text(short=True), bare):
        if len(text) <= width - 2:
            break
    t = Text("  ")
    head, _, rest = text.partition(" (")
    if head.startswith("peak in "):
        t.append("peak in ", style=DIM)
        t.append(head[len("peak in "):], style=f"bold {ACCENT}")
    else:
        t.append(head, style=DIM)
    if rest:
        t.append(" (" + rest, style=DIM)
    t.truncate(width, overflow="ellipsis")
    return [t]


def _events(v: JobView, limit: int) -> list[Text]:
    out: list[Text] = []
    events: list[tuple[AgentView, Event]] = [(a, e) for a in v.ranks for e in a.events if e.kind != "detached"]
    events.sort(key=lambda ae: ae[1].time or 0)
    for a, e in events[-limit:]:
        style = EVENT_STYLES.get(e.kind, WARN)
        t = Text("  ")
        t.append(f" {e.kind.upper()} ", style=f"reverse {style}")
        where = []
        if len(v.ranks) > 1:
            where.append(f"rank {a.hello.rank}")
        if e.step is not None:
            where.append(f"step {e.step}")
        if e.batch_size is not None:
            where.append(f"batch {e.batch_size}")
        if e.requested_bytes is not None:
            where.append(f"wanted {fmt_bytes(e.requested_bytes)}")
        if where:
            t.append(" " + ", ".join(where), style=style)
        t.append(": ")
        t.append(e.message.splitlines()[0] if e.message else "", style=style)
        out.append(t)
    return out


def _table(v: JobView, measured: dict[str, int] | None) -> list[Text]:
    p = v.prediction
    head = Text().append(f"  {'component':<14}{'measured':>11}{'predicted':>12}", style=f"bold {DIM}")
    lines = [head]
    for name in ALL_COMPONENTS:
        t = Text("  ")
        t.append("■ ", style=COMPONENT_STYLES[name])
        t.append(f"{COMPONENT_LABELS[name]:<12}")
        t.append(f"{fmt_bytes(measured.get(name)) if measured else '':>11}")
        t.append(f"{fmt_bytes(p.components.get(name)) if p else '':>12}", style=DIM if p is None else "")
        lines.append(t)
    total = Text().append(f"  {'total':<14}", style="bold")
    total.append(f"{fmt_bytes(sum(measured.values())) if measured else '':>11}", style="bold")
    total.append(f"{fmt_bytes(p.total) if p else '':>12}", style="bold")
    lines.append(total)
    return lines


def _legend(width: int, measured: dict[str, int] | None) -> Text:
    t = Text("  ")
    for name in ALL_COMPONENTS:
        t.append("■", style=COMPONENT_STYLES[name])
        t.append(f"{COMPONENT_LABELS[name]}")
        if measured is not None and width >= 130:
            t.append(f" {fmt_bytes(measured.get(name, 0))}", style=DIM)
        t.append(" ")
    return t


def _rank_lines(v: JobView, width: int) -> list[Text]:
    if len(v.ranks) <= 1:
        return []
    totals = {a.key: sum(measured_components(a.last_step).values()) for a in v.ranks if a.last_step}
    scale = max(totals.values(), default=1) or 1
    bar_w = max(6, min(30, width // 4))
    out = []
    for a in v.ranks:
        t = Text().append(f"  rank {a.hello.rank:<3} pid {a.hello.pid:<7} ", style=DIM)
        t.append(f"{device_label(a, v.devices.get(a.key)):<16} ")
        s = a.last_step
        if s is None:
            t.append("no step yet", style=DIM)
        else:
            t.append_text(stacked_bar(component_parts(measured_components(s)), scale, bar_w))
            t.append(f" {fmt_bytes(totals.get(a.key)):>10}  step {s.step}")
        if any(e.kind == "oom" for e in a.events):
            t.append("  OOM", style=EVENT_STYLES["oom"])
        out.append(t)
    out.extend(_imbalance_line(v))
    return out


def _imbalance_line(v: JobView) -> list[Text]:
    """The spread between the ranks' totals and the components that differ most; literal text."""
    if len(v.ranks) <= 1:
        return []
    found = imbalance(v.ranks)
    if found is None:
        return [Text().append("  imbalance: waiting for two ranks' steps", style=DIM)]
    style = BAD if found.spread_pct >= 20 else WARN if found.spread_pct >= 5 else OK
    return [Text("  ").append(imbalance_text(found), style=style)]


def _side_by_side(left: list[Text], right: list[Text], left_w: int) -> list[Text]:
    out = []
    for i in range(max(len(left), len(right))):
        t = left[i].copy() if i < len(left) else Text()
        t.truncate(left_w, pad=True)
        if i < len(right):
            t.append_text(right[i])
        out.append(t)
    return out


_BLOCKS: Kept[list[Text]] = Kept(32)  # table beside chart, by what they show


def _table_beside_chart(v: JobView, measured: dict[str, int] | None, width: int, rows: int,
                        table_w: int) -> list[Text]:
    """The component table beside the chart, the same Text objects while the measured components, the prediction
    and the chart's input read the same: steady training shows the same ~12 lines second after second (not copied:
    see gpu_panel._process_block)."""
    chart, p = v.chart, v.prediction
    assert chart is not None
    key = None if chart.key is None else (tuple(measured.items()) if measured else None, chart.key, width, rows,
                                          (tuple(p.components.items()), p.total) if p is not None else None, table_w)
    if key is None:
        return _make_table_beside_chart(v, measured, chart, width, rows, table_w)
    return list(_BLOCKS.get(key, lambda: _make_table_beside_chart(v, measured, chart, width, rows, table_w)))


def _make_table_beside_chart(v: JobView, measured: dict[str, int] | None, chart: ChartInput, width: int, rows: int,
                             table_w: int) -> list[Text]:
    table = _table(v, measured)
    return _side_by_side(table, render_chart(chart, width - table_w, max(rows, len(table))), table_w)


_KEPT: Kept = Kept(64)  # the full and medium panels' lines that read the same second after second (tui/kept.py)


def _chart_key(high_side: bool) -> Text:
    """What the chart's marks mean (the high side's only where the chart draws it)."""

    def make() -> Text:
        key = Text("  ")
        key.append("● observed  ", style=f"bold {WARN}")
        key.append("◆ what-if  ", style=f"bold {ACCENT}")
        key.append("── predicted peak  ", style=BLUE)
        if high_side:
            key.append("⠂⠂ high side  ", style=DIM)
        key.append("┄┄ device limit  ", style=BAD)
        key.append("┊ largest batch", style=OK)
        return key

    return _KEPT.get(("chart key", high_side), make)


def job_lines(v: JobView, width: int, level: str, *, focused: bool = False, chart_rows: int = 10) -> list[Text]:
    """level: 'full' (bars, table and chart), 'medium' (bars and summary), 'compact' (two lines)."""
    a = v.lead
    if a.ended is not None:  # an ended run: its summary, after an OOM its post-mortem (tui/ended_panel.py)
        return ended_lines(v, command_text(a), width, level, focused=focused)
    s = a.last_step
    measured = measured_components(s) if s is not None else None
    measured_total = sum(measured.values()) if measured else 0
    p = v.prediction
    if level == "compact":
        return compact_lines(v, focused, width, measured, measured_total)

    lines = [kept_title(v, focused, width), _stats(v)]
    if s is None:
        lines.append(Text().append("  waiting for the first training step (hello received)", style=DIM))
        lines.extend(_events(v, 3))
        return lines
    bar_w = max(10, width - 2 - 16 - 12)
    scale = max(measured_total, p.total if p else 0, 1)
    lines.append(_bar_line(f"measured b={s.batch_size}" if s else "measured", measured, scale, bar_w,
                           fmt_bytes(measured_total) if measured else "n/a"))
    lines.append(_bar_line(_predicted_label(v), p.components if p else None, scale, bar_w,
                           fmt_bytes(p.total) if p else "n/a"))
    lines.append(_summary(v))
    phase = _phase_line(v, width)
    lines.extend(phase)
    if level != "full":
        chart_rows -= len(phase)  # the rows the app measured for the chart: the phase line took one of them
    if level == "full":
        table_w = 40
        chart = v.chart if chart_rows >= 4 else None
        if chart is not None and width >= table_w + 32:
            lines.extend(_table_beside_chart(v, measured, width, chart_rows, table_w))
        else:
            lines.extend(_table(v, measured))
            if chart is not None:
                lines.extend(render_chart(chart, width, chart_rows))
        if chart is not None:
            lines.append(_chart_key(p is not None and p.band is not None and p.band.high > p.total))
    elif width >= COMPACT_TABLE_WIDTH:  # short terminals (80×24): the table in two columns, not a legend
        lines.extend(compact_table(measured, p.components if p else None))
        if v.chart is not None and chart_rows >= 5:
            lines.extend(render_chart(v.chart, width, chart_rows))
    else:
        lines.append(_legend(width, measured))
        if v.chart is not None and chart_rows >= 5:
            lines.extend(render_chart(v.chart, width, chart_rows))
    if p is not None and p.basis and level == "full":
        # without the fitted steps' range, which moves with every refit: the job line shows the step, and a last
        # line that changed every second would widen each frame's repaint to the whole panel (--once keeps it)
        basis = f"  basis: {p.basis_fields.text(step_range=False)}"
        lines.append(_KEPT.get(("basis", basis), lambda: Text().append(basis, style=DIM)))
    for note in v.notes if p is not None else []:
        lines.append(Text().append(f"  {note}", style=WARN))
    lines.extend(_events(v, 3 if level == "full" else 2))
    lines.extend(_rank_lines(v, width) if level == "full" else _imbalance_line(v))
    return lines


def with_tail(line: Text, cut: int, tail: str, style: str) -> Text:
    """``line`` with its text from ``cut`` on replaced by ``tail`` in ``style``: what ``line.copy()``, then
    ``right_crop`` to ``cut`` and ``append(tail, style=style)`` make (the spans over the cut end at it), made at
    once (~10 compact titles a second). ``tail`` must be printable (clean_text)."""
    old_spans = line._spans
    plain = line.plain
    last = old_spans[-1] if old_spans else None
    if (last is not None and tail and style and last.start == cut and last.end == len(plain) and last.style == style
            and all(sp.start < cut and sp.end <= cut for sp in old_spans[:-1])):
        # the line the short road made last time (its step text one span at its end): the spans before it stand
        spans = old_spans[:-1]
    else:
        spans = [sp if sp.end < cut else Span(sp.start, cut, sp.style) for sp in old_spans if sp.start < cut]
    if tail and style:
        spans.append(Span(cut, cut + len(tail), style))
    text = plain[:cut] + tail
    if _UNSANITIZED:
        # Text() strips control codes with str.translate and a dict, ~5 us on a line with a '▶' or a '…' (a
        # non-ASCII string): both parts are clean already (the line was drawn, the tail went through clean_text)
        new = Text("", style=line.style, justify=line.justify, overflow=line.overflow, no_wrap=line.no_wrap,
                   end=line.end, tab_size=line.tab_size)
        new._text, new._length = [text], len(text)
    else:
        new = Text(text, style=line.style, justify=line.justify, overflow=line.overflow, no_wrap=line.no_wrap,
                   end=line.end, tab_size=line.tab_size)
    new._spans = spans
    return new


_UNSANITIZED = {"_text", "_length"} <= set(getattr(Text, "__slots__", ()))  # Rich's Text keeps its text so


def step_strip(old: Strip | None, line: Text, cut: int, new: Text) -> Strip | None:
    """The strip of a compact title whose step text alone changed (``new``: ``line`` with its text from ``cut`` on
    replaced by one span), from the strip of ``line``: what LineStrips makes of the cells before ``cut`` is the
    same (the same spans over them), and the step text is one segment whose style is that of the old step text
    (the same spans over it, from the same column). None where that cannot be promised: the old strip was not
    made so (a last segment other than the old step text, cells beyond it), a span of the old line crosses
    ``cut``, or the new text is not plain one-cell characters. Then the line is rendered afresh, as before.
    Beside 16 fast jobs ~10 such lines a second; rendering each afresh was ~6% of the main thread."""
    if old is None:
        return None
    segments = old._segments
    tail = new.plain[cut:]
    if (not segments or segments[-1].text != line.plain[cut:] or old.cell_length != len(line.plain)
            or not tail.isascii() or not tail.isprintable() or line.style != new.style):
        return None
    spans = line._spans
    if (not spans or (spans[-1].start, spans[-1].end) != (cut, len(line.plain))
            or any(sp.end > cut for sp in spans[:-1]) or len(new._spans) != len(spans)
            or new._spans[-1].style != spans[-1].style):
        return None
    return Strip([*segments[:-1], Segment(tail, segments[-1].style)], len(new.plain))


class JobPanel(LinesPanel):
    """A focusable job panel; the app assigns .view/.level/.chart_rows and calls changed()."""

    def __init__(self, view: JobView, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="job")
        self.view = view
        self.level = "full"
        self.chart_rows = 10

    def build(self, width: int) -> list[Text]:
        self._step_key = self._step_only_key()  # what update_if_changed's short road compares with
        return job_lines(self.view, width, self.level, focused=self.has_focus, chart_rows=self.chart_rows)

    def fixed_line_count(self) -> int | None:
        """A running job's compact panel is two lines, whatever it shows (job_lines)."""
        return 2 if self.level == "compact" and self.view.lead.ended is None else None

    def update_if_changed(self, signature: object) -> bool:
        """LinesPanel's, with a short road for the common case beside many fast jobs: a compact panel whose new
        data changes its step text alone (the step counter, the step time) - its title line's end is replaced
        and those cells repainted; nothing else is built or compared (16 jobs: ~10 such panels a second)."""
        if self._stale:  # not built since it went off screen: LinesPanel's road (its next build makes the key)
            return super().update_if_changed(signature)
        key = self._step_only_key(signature)
        kept, self._step_key = getattr(self, "_step_key", None), key
        if key is None or kept is None or kept[0] != key[0] or not self.is_mounted:
            return super().update_if_changed(signature)
        if kept[1] == key[1]:
            self._signature = signature
            return False
        old = self._cache
        width, off_screen = self._place()
        line = old[2][0] if old is not None and len(old[2]) == 2 else None
        cut = len(line.plain) - len(kept[1]) if line is not None else -1
        end = cut + max(len(kept[1]), len(key[1]))
        if (old is None or line is None or width <= 0 or old[0] != width or old[1] != self._version or cut < 0
                or end > width or not line.plain.endswith(kept[1])):
            return super().update_if_changed(signature)
        self._signature = signature
        if off_screen:  # as LinesPanel: built when it shows
            self._stale = True
            self._strips_key = None
            self._set_dirty()
            return True
        new = with_tail(line, cut, clean_text(key[1]), DIM)
        self._version += 1
        self._cache = (width, self._version, [new, old[2][1]])
        if self._strips_key is not None and self._strips_key[:2] == (width, self._version - 1) and self._strips:
            first = step_strip(self._strips[0], line, cut, new) if self.text_selection is None else None
            self._strips = [first, self._strips[-1]]
            self._strips_key = (width, self._version, self._strips_key[2])
        runs = changed_runs(kept[1], key[1], width - cut)  # (one style: the text decides)
        self.repaint_regions(*(Region(cut + x0, 0, x1 - x0, 1) for x0, x1 in runs))
        return True

    def _step_only_key(self, signature: object = None) -> tuple[tuple, str] | None:
        """(what a running single-rank job's compact panel shows but its step text, the step text); None where
        the short road does not apply: views.job_signature's ranks without their last step, and the last step's
        figures the panel draws (its memory figures, batch size, the room its text takes)."""
        v = self.view
        s = v.lead.last_step
        if self.level != "compact" or v.lead.ended is not None or len(v.ranks) != 1 or s is None:
            return None
        # the app hands update_if_changed views.job_signature(view, level): at this level, the same tuple
        ranks, devices, _, p, user, _ = (signature if isinstance(signature, tuple) and len(signature) == 6
                                         else job_signature(v, "compact"))
        shown = (tuple(r[:1] + r[2:] for r in ranks), devices, user, v.host, self.has_focus,
                 (p.batch_size, p.total, p.max_batch, p.headroom) if p is not None else None,  # as _compact_bars
                 s.batch_size, s.components, s.allocated, s.peak_allocated, s.reserved, s.device_used, step_room(s))
        return shown, step_text(s)
