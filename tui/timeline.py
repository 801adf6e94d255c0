"""Memory over time: one job's stacked components over its recent steps, and a GPU's used memory over time, as
rows of block characters. Pure (Rich Text only): tests/test_tui_timeline.py draws them without Textual.

The timeline reads AgentView.history (the hub's bounded window of steps). Steps are grouped into columns of a
fixed number of steps, aligned on step numbers (a column covers steps k·n … k·n+n−1), and each column shows its
highest-peak step: a new step changes the last column only, until a new column starts, so a panel that repaints
only changed cells repaints little. Creep and leaks show as a rising stack (or a component's colour band
widening); ``changes`` names the components that moved, and whether they kept rising.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from rich.text import Span, Text

from batchmon.protocol import ALL_COMPONENTS, Step
from batchmon.tui.bars import COMPONENT_LABELS, COMPONENT_STYLES
from batchmon.tui.fmt import fmt_axis_bytes, fmt_bytes
from batchmon.tui.palette import BAD, BLUE, BORDER, DIM, OK, WARN
from batchmon.tui.predict import measured_components

LABEL_W = 8  # y-axis labels: '140 GiB'
_EIGHTHS = " ▁▂▃▄▅▆▇█"
NICE_STEPS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80, 100, 120, 150, 200, 250, 300, 400, 500,
              1000, 2000, 5000, 10000)


@dataclass(frozen=True)
class Column:
    """One column of the timeline: the steps first..last, shown by their highest-peak step's components."""

    first: int
    last: int
    components: tuple[int, ...]  # in ALL_COMPONENTS order

    @property
    def total(self) -> int:
        return sum(self.components)


def _peak(step: Step) -> int:
    return step.peak_allocated if step.peak_allocated is not None else sum(step.components.values())


def steps_per_column(first: int, last: int, columns: int) -> int:
    """The smallest 'nice' step count (1, 2, 3, 4, 5 …) that fits steps first..last into ``columns`` columns, for
    the span rounded up to a power of two: a young run's columns widen when its span doubles, not every few
    steps (each change redraws the whole timeline)."""
    span = 1 << max(0, last - first).bit_length()
    for n in NICE_STEPS:
        if -(-span // n) <= columns:
            return n
    return -(-span // max(1, columns))


_COLUMNS: OrderedDict[tuple[int, int, int], tuple[Step, Step, Column]] = OrderedDict()
# complete columns kept (each holds its first and last step: steps the hub has dropped stay alive while kept); the
# timeline draws one job's ~50-150 columns at a time, so a few of its windows fit
_COLUMNS_MAX = 1024


def _first_at_or_after(history: Sequence[Step], step: int, lo: int = 0) -> int:
    """Index of the first step numbered ``step`` or more (the history is in step order): a binary search, so a
    2000-step window costs a few comparisons per column, not a pass over it."""
    hi = len(history)
    while lo < hi:
        mid = (lo + hi) // 2
        if history[mid].step < step:
            lo = mid + 1
        else:
            hi = mid
    return lo


def _column(history: Sequence[Step], lo: int, hi: int, k: int, n: int, complete: bool) -> Column:
    """Column k (steps k·n … k·n+n−1, history[lo:hi]): its highest-peak step's components, the latest on ties. A
    complete column never changes (steps are immutable, the history only grows at its end): it is kept, found
    again by its first and last step objects."""
    key = (id(history[lo]), id(history[hi - 1]), n)
    if complete:
        found = _COLUMNS.get(key)
        if found is not None and found[0] is history[lo] and found[1] is history[hi - 1]:
            _COLUMNS.move_to_end(key)
            return found[2]
    best = history[lo]
    best_peak = _peak(best)
    for i in range(lo + 1, hi):
        s = history[i]
        p = _peak(s)
        if p >= best_peak:
            best, best_peak = s, p
    comps = measured_components(best)
    col = Column(k * n, k * n + n - 1, tuple(comps.get(name, 0) for name in ALL_COMPONENTS))
    if complete:
        _COLUMNS[key] = (history[lo], history[hi - 1], col)
        while len(_COLUMNS) > _COLUMNS_MAX:
            _COLUMNS.popitem(last=False)
    return col


def timeline_columns(history: Sequence[Step], columns: int) -> list[Column]:
    """The history (oldest first, in step order) in at most ``columns`` step-aligned columns, each its
    highest-peak step's eight components. Cost: a binary search per column and a pass over the last (filling)
    column; the complete ones are reused from earlier calls."""
    if not history or columns <= 0:
        return []
    n = steps_per_column(history[0].step, history[-1].step, columns)
    first_k, last_k = history[0].step // n, history[-1].step // n
    # the left edge moves in pages of a quarter of the width: as the window slides (its oldest steps dropped),
    # the picture shifts once every few columns instead of with every column, so it repaints in whole only then
    page = max(1, columns // 4)
    start = max(first_k, last_k - columns + 1)
    if start > 0 and (start + page - 1) // page * page <= last_k:
        start = (start + page - 1) // page * page
    out: list[Column] = []
    lo = _first_at_or_after(history, start * n)
    for k in range(start, last_k + 1):
        hi = _first_at_or_after(history, (k + 1) * n, lo) if k < last_k else len(history)
        if hi > lo:
            out.append(_column(history, lo, hi, k, n, complete=k < last_k))
        lo = hi
    return out


@dataclass(frozen=True)
class Change:
    """How one component moved over the window (from a quarter in, past the warm-up): its range and its ends."""

    name: str
    low: int
    high: int
    first: int
    last: int
    fall: int = 0  # the largest drop from one column to the next

    @property
    def rising(self) -> bool:
        """A creep: it ends at (or near) its highest, well above where it started, and never fell much on the
        way (a leak freed every epoch is a sawtooth, not a rise)."""
        span = self.high - self.low
        return (span > 0 and self.last - self.first >= 0.75 * span and self.last >= self.high - 0.1 * span
                and self.fall <= 0.25 * span)

    def text(self) -> str:
        label = COMPONENT_LABELS[self.name]
        if self.rising:
            return f"{label} +{fmt_bytes(self.last - self.first)}"
        return f"{label} {fmt_bytes(self.low)}–{fmt_bytes(self.high)}"


def changes(cols: Sequence[Column], *, least: int = 1 << 20) -> list[Change]:
    """The components whose figure moved by at least ``least`` across the columns from a quarter in (the first
    steps: allocator warm-up, the optimizer's state appearing), the widest range first. A leak that grows all
    the way is ``rising``; one freed now and then (per epoch) shows as a range."""
    window = cols[len(cols) // 4:] if len(cols) >= 4 else cols
    if len(window) < 2:
        return []
    out = []
    for i, name in enumerate(ALL_COMPONENTS):
        values = [c.components[i] for c in window]
        lo, hi = min(values), max(values)
        if hi - lo >= least:
            fall = max((a - b for a, b in zip(values, values[1:])), default=0)
            out.append(Change(name, lo, hi, values[0], values[-1], max(0, fall)))
    return sorted(out, key=lambda c: -(c.high - c.low))


def _stack_cell(comps: Sequence[int], lo: float, hi: float) -> tuple[str, str] | None:
    """The glyph and style of the cell covering bytes [lo, hi) of a column stacked bottom-up in component order:
    a full block in the colour of the component at the cell's middle, or the partial top of the stack."""
    total = sum(comps)
    if total <= lo:
        return None
    mid = (lo + hi) / 2 if total >= hi else (lo + total) / 2
    acc = 0
    style = COMPONENT_STYLES[ALL_COMPONENTS[-1]]
    for name, value in zip(ALL_COMPONENTS, comps):
        acc += value
        if acc > mid:
            style = COMPONENT_STYLES[name]
            break
    if total >= hi:
        return "█", style
    eighth = int((total - lo) / (hi - lo) * 8)
    return (_EIGHTHS[eighth], style) if eighth > 0 else None


def _axis_top(value: int) -> int:
    """A round top for the y axis at or above ``value`` (…, 1, 2, 5, 10 … in MiB or GiB)."""
    unit = 1 << 30 if value >= 1 << 30 else 1 << 20
    x = max(1.0, value / unit)
    mag = 1.0
    while mag * 10 < x:
        mag *= 10
    for m in (1, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10):
        if m * mag >= x:
            return int(m * mag * unit)
    return int(10 * mag * unit)  # pragma: no cover


_STACKS: OrderedDict[tuple, tuple[tuple[str, str] | None, ...]] = OrderedDict()
_STACKS_MAX = 1024


def _stack(comps: tuple[int, ...], rows: int, top: int) -> tuple[tuple[str, str] | None, ...]:
    """One column's cells, top row first; kept per (components, rows, top): a column drawn once is reused."""
    key = (comps, rows, top)
    cells = _STACKS.get(key)
    if cells is None:
        step = top / rows
        cells = _STACKS[key] = tuple(_stack_cell(comps, (rows - 1 - r) * step, (rows - r) * step)
                                     for r in range(rows))
        while len(_STACKS) > _STACKS_MAX:
            _STACKS.popitem(last=False)
    else:
        _STACKS.move_to_end(key)
    return cells


def stacked_rows(values: Sequence[Sequence[int]], rows: int, top: int) -> list[list[tuple[str, str] | None]]:
    """``rows`` rows (top first) of one cell per column: each column's components stacked on a 0..top scale."""
    columns = [_stack(tuple(v), rows, top) for v in values]
    return [[col[r] for col in columns] for r in range(rows)]


def _row_text(prefix: str, cells: Sequence[tuple[str, str] | None]) -> Text:
    """The axis prefix (dim) and the cells, as one string with a span per run of one style (a Text.append per
    cell cost most of the timeline's drawing time)."""
    chars = [prefix]
    spans = [Span(0, len(prefix), DIM)]
    pos = len(prefix)
    run_style: str | None = None
    run_start = pos
    for cell in cells:
        char, style = cell if cell is not None else (" ", None)
        if style != run_style:
            if run_style is not None and pos > run_start:
                spans.append(Span(run_start, pos, run_style))
            run_style, run_start = style, pos
        chars.append(char)
        pos += 1
    if run_style is not None and pos > run_start:
        spans.append(Span(run_start, pos, run_style))
    return Text("".join(chars), spans=spans)


def _with_axis(grid: list[list[tuple[str, str] | None]], top: int, width: int) -> list[Text]:
    rows = len(grid)
    labels = {0: fmt_axis_bytes(top), rows - 1: "0"}
    if rows >= 5:
        labels[rows // 2] = fmt_axis_bytes(top * (rows - rows // 2 - 0.5) / rows)
    out = []
    for r, cells in enumerate(grid):
        label = labels.get(r)
        prefix = f"{label or '':>{LABEL_W}}" + ("┤" if label is not None else "│")
        out.append(_row_text(prefix, cells))
    return out


def timeline_lines(history: Sequence[Step], width: int, rows: int, *, device_total: int | None = None) -> list[Text]:
    """The job's timeline: a title line (steps shown, what grew), ``rows`` rows of stacked components over steps
    with a y axis in MiB/GiB, the step axis, and a legend. Empty history: one line saying so."""
    if not history:
        return [Text().append("memory over steps: waiting for steps", style=DIM)]
    plot_w = max(4, width - LABEL_W - 1)
    cols = timeline_columns(history, plot_w)
    peak = max((c.total for c in cols), default=0)
    top = _axis_top(max(peak, 1))
    n = cols[0].last - cols[0].first + 1 if cols else 1
    # nothing here moves with every step (the job panel shows the step): the axis ends at the last column's
    # first step, so a new step repaints the last column's cells only, until a new column starts
    title = Text().append("memory over steps", style="bold")
    if n > 1:
        title.append(f"  {n} steps a column (its highest peak)", style=DIM)
    sub = Text()
    moved = changes(cols)
    if moved:
        sub.append("moved: ", style=DIM)
        for i, change in enumerate(moved[:2]):
            sub.append(", " if i else "", style=DIM)
            sub.append(change.text(), style=f"bold {WARN if change.rising else OK}")
    else:
        sub.append("steady: no component changed by 1 MiB over the window", style=DIM)
    lines = [title, sub]
    grid = stacked_rows([c.components for c in cols], max(2, rows), top)
    lines.extend(_with_axis(grid, top, width))
    axis = Text().append(" " * LABEL_W + "└" + "─" * len(cols), style=DIM)
    lines.append(axis)
    first, last = f"step {cols[0].first if n > 1 else history[0].step}", f"{cols[-1].first}"
    steps = Text().append(" " * (LABEL_W + 1) + first, style=DIM)
    gap = len(cols) - len(first) - len(last)
    if gap >= 1:
        steps.append(" " * gap + last, style=DIM)
    lines.append(steps)
    if device_total is not None and peak > 0:
        share = peak / device_total
        lines.append(Text().append(f"{'':>{LABEL_W}} peak {fmt_bytes(peak)} = {share:.1%} of the GPU",
                                   style=BAD if share > 0.95 else DIM))
    return lines


def history_lines(values: Sequence[int], width: int, rows: int, *, maximum: int | None) -> list[Text]:
    """A GPU's used memory over time (oldest first, one sample a column, the latest at the right) as ``rows``
    rows of eighth blocks on a 0..maximum scale, with a y axis in MiB/GiB."""
    plot_w = max(4, width - LABEL_W - 1)
    vals = list(values)[-plot_w:]
    top = maximum or _axis_top(max(vals, default=1) or 1)
    style = BLUE
    grid: list[list[tuple[str, str] | None]] = []
    step = top / rows
    pad = plot_w - len(vals)
    for r in range(rows):
        lo = (rows - 1 - r) * step
        row: list[tuple[str, str] | None] = [None] * pad
        for v in vals:
            if v >= lo + step:
                row.append(("█", style))
            elif v > lo:
                e = int((v - lo) / step * 8)
                row.append((_EIGHTHS[e], style) if e > 0 else (("▁", style) if r == rows - 1 else None))
            else:
                row.append(("▁", BORDER) if r == rows - 1 and not v else None)
        grid.append(row)
    return _with_axis(grid, top, width)


def legend(width: int) -> list[Text]:
    """The components' colours, on as many lines as the width needs."""
    out = [Text()]
    for name in ALL_COMPONENTS:
        piece = f"■{COMPONENT_LABELS[name]} "
        if out[-1].plain and len(out[-1].plain) + len(piece) > width:
            out.append(Text())
        out[-1].append("■", style=COMPONENT_STYLES[name])
        out[-1].append(f"{COMPONENT_LABELS[name]} ", style=DIM)
    return out
