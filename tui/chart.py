"""Predicted peak memory against batch size, drawn with braille dots as Rich Text (Textual has no plotting).

The line is the memory model's prediction, observed steps are points, the device limit is a horizontal
line and the largest batch that fits a vertical one: the answer is seen, not only read. Where the observations
cannot support the central line (an extrapolation far beyond them, curvature between them), the band's high
side is drawn dotted above it: the largest batch is read off that side, not the central line.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from collections import OrderedDict
from typing import Callable, Hashable, Sequence

from rich.text import Text

from batchmon.tui.fmt import fmt_axis_bytes, fmt_count
from batchmon.tui.palette import ACCENT, BAD, BLUE, DIM, OK, WARN

# braille dot bit for (row 0..3, column 0..1) inside one cell
_DOTS = ((0x01, 0x08), (0x02, 0x10), (0x04, 0x20), (0x40, 0x80))

LINE_STYLE = BLUE
BAND_STYLE = DIM  # the band's high side, dotted
OVER_STYLE = BAD
LIMIT_STYLE = BAD
MAX_STYLE = OK
POINT_STYLE = f"bold {WARN}"
WHATIF_STYLE = f"bold {ACCENT}"
AXIS_STYLE = DIM


class BrailleCanvas:
    """A grid of cells, each 2x4 braille dots, with one style per cell and optional whole-cell glyphs."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.bits = [[0] * width for _ in range(height)]
        self.styles: list[list[str | None]] = [[None] * width for _ in range(height)]
        self.glyphs: dict[tuple[int, int], tuple[str, str]] = {}

    @property
    def px_width(self) -> int:
        return self.width * 2

    @property
    def px_height(self) -> int:
        return self.height * 4

    def dot(self, x: int, y: int, style: str) -> None:
        """Set dot (x, y), y = 0 at the top; outside the canvas is ignored."""
        if 0 <= x < self.px_width and 0 <= y < self.px_height:
            cx, cy = x // 2, y // 4
            self.bits[cy][cx] |= _DOTS[y % 4][x % 2]
            self.styles[cy][cx] = style

    def line(self, x0: int, y0: int, x1: int, y1: int, style: str) -> None:
        """Bresenham line between two dots."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.dot(x0, y0, style)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def glyph(self, cx: int, cy: int, char: str, style: str) -> None:
        if 0 <= cx < self.width and 0 <= cy < self.height:
            self.glyphs[(cx, cy)] = (char, style)

    def rows(self) -> list[Text]:
        out = []
        for cy in range(self.height):
            row = Text()
            for cx in range(self.width):
                if (cx, cy) in self.glyphs:
                    char, style = self.glyphs[(cx, cy)]
                    row.append(char, style=style)
                elif self.bits[cy][cx]:
                    row.append(chr(0x2800 + self.bits[cy][cx]), style=self.styles[cy][cx] or "")
                else:
                    row.append(" ")
            out.append(row)
        return out


@dataclass(frozen=True)
class ChartInput:
    """What one chart shows. predict(b) -> predicted peak bytes at batch b (None where unknown)."""

    predict: Callable[[int], int | None]
    observed: Sequence[tuple[int, int]]  # (batch size, measured peak bytes)
    device_total: int | None
    max_batch: int | None
    what_if_batch: int | None
    # equal keys promise the same chart (same observations, what-if, limits): the drawing is then reused, so a
    # steady run costs one chart per change rather than ~100 predictions every refresh; None never reuses
    key: Hashable | None = None
    # the band's high side at batch b (what the largest batch is read from), None where unknown or equal to the
    # central line; None: no band drawn
    predict_high: Callable[[int], int | None] | None = None


def nice_ceiling(x: float) -> int:
    """1, 2, 5 x 10^k at or above x (axis ends people can read)."""
    if x <= 1:
        return 1
    exp = 10 ** math.floor(math.log10(x))
    for m in (1, 2, 2.5, 5, 10):
        if m * exp >= x:
            return int(math.ceil(m * exp))
    return int(10 * exp)  # pragma: no cover


def x_range(inp: ChartInput) -> int:
    """Batch axis end: far enough to show the observed batches, the what-if batch and the largest batch."""
    candidates = [8]
    if inp.observed:
        candidates.append(max(b for b, _ in inp.observed) * 2)
    if inp.what_if_batch:
        candidates.append(int(inp.what_if_batch * 1.25) + 1)
    if inp.max_batch:
        candidates.append(int(inp.max_batch * 1.2) + 1)
    return nice_ceiling(max(candidates))


_DRAWN: OrderedDict[tuple, list[Text]] = OrderedDict()
_DRAWN_MAX = 32


def render_chart(inp: ChartInput, width: int, height: int) -> list[Text]:
    """The chart as ``height`` lines of ``width`` cells: y labels, plot, x axis and x labels included.
    The same Text objects while the input's key and the size stay the same: the panels that show them never change
    a line once made (see gpu_panel._process_block), and their line diff finds them equal by identity."""
    if inp.key is None:
        return _draw(inp, width, height)
    cache_key = (inp.key, width, height)
    lines = _DRAWN.get(cache_key)
    if lines is None:
        lines = _DRAWN[cache_key] = _draw(inp, width, height)
        while len(_DRAWN) > _DRAWN_MAX:
            _DRAWN.popitem(last=False)
    else:
        _DRAWN.move_to_end(cache_key)
    return list(lines)


def _draw(inp: ChartInput, width: int, height: int) -> list[Text]:
    label_w = 8  # '140 GiB', '1023 MiB': the tables' units
    plot_w = max(4, width - label_w - 1)
    plot_h = max(2, height - 2)
    canvas = BrailleCanvas(plot_w, plot_h)
    x_max = x_range(inp)

    xs = list(range(canvas.px_width))
    batches = [max(1, round(px * x_max / (canvas.px_width - 1))) for px in xs]
    cache: dict[int, int | None] = {}
    values: list[int | None] = []
    for b in batches:
        if b not in cache:
            cache[b] = inp.predict(b)
        values.append(cache[b])

    highs: list[int | None] = [None] * len(values)
    if inp.predict_high is not None:
        high_cache: dict[int, int | None] = {}
        for i, b in enumerate(batches):
            if b not in high_cache:
                high_cache[b] = inp.predict_high(b)
            h = high_cache[b]
            v = values[i]
            highs[i] = h if h is not None and v is not None and h > v else None

    known = [v for v in values if v is not None]
    y_top_candidates = [1] + known + [h for h in highs if h is not None] + [v for _, v in inp.observed]
    if inp.device_total:
        y_top_candidates.append(inp.device_total)
    y_max = max(y_top_candidates) * 1.08

    def ypx(v: float) -> int:
        return int(round((1 - v / y_max) * (canvas.px_height - 1)))

    def xpx(b: float) -> int:
        return int(round(b / x_max * (canvas.px_width - 1)))

    limit_y = ypx(inp.device_total) if inp.device_total else None
    if limit_y is not None:
        for x in range(0, canvas.px_width, 2):
            canvas.dot(x, limit_y, LIMIT_STYLE)
    if inp.max_batch:
        mx = xpx(inp.max_batch)
        for y in range(0, canvas.px_height, 2):
            canvas.dot(mx, y, MAX_STYLE)
    for x, h in zip(xs, highs):  # dotted, under the central line (a cell shared with it takes its colour)
        if h is not None and x % 2 == 0 and ypx(h) < ypx(values[x] or 0):
            canvas.dot(x, ypx(h), BAND_STYLE)
    prev: tuple[int, int] | None = None
    for x, v in zip(xs, values):
        if v is None:
            prev = None
            continue
        y = ypx(v)
        style = OVER_STYLE if inp.device_total and v > inp.device_total else LINE_STYLE
        if prev is not None:
            canvas.line(prev[0], prev[1], x, y, style)
        else:
            canvas.dot(x, y, style)
        prev = (x, y)
    if inp.what_if_batch:
        v = inp.predict(inp.what_if_batch)
        if v is not None:
            canvas.glyph(xpx(inp.what_if_batch) // 2, ypx(v) // 4, "◆", WHATIF_STYLE)
    for b, v in inp.observed:  # measured points win over the what-if marker where they share a cell
        canvas.glyph(xpx(b) // 2, ypx(v) // 4, "●", POINT_STYLE)

    lines: list[Text] = []
    label_rows = {0: y_max / 1.08 if not inp.device_total else None}
    if limit_y is not None:
        label_rows = {limit_y // 4: inp.device_total}
    label_rows.setdefault(plot_h - 1, 0)
    label_rows.setdefault(0, y_max)
    mid = plot_h // 2
    if mid not in label_rows and abs(mid - min(label_rows)) > 1:
        label_rows[mid] = y_max * (1 - (mid * 4 + 2) / (canvas.px_height - 1))
    for cy, row in enumerate(canvas.rows()):
        label = label_rows.get(cy)
        text = Text().append(f"{fmt_axis_bytes(label) if label is not None else '':>{label_w}}", style=AXIS_STYLE)
        text.append("┤" if label is not None else "│", style=AXIS_STYLE)
        text.append_text(row)
        lines.append(text)
    axis = Text().append(" " * label_w + "└" + "─" * plot_w, style=AXIS_STYLE)
    lines.append(axis)
    lines.append(_x_labels(inp, x_max, label_w + 1, plot_w, canvas.px_width))
    return lines[:height] if height >= 4 else lines


def _x_labels(inp: ChartInput, x_max: int, left: int, plot_w: int, px_width: int) -> Text:
    """Batch labels under the axis: 0, the axis end, and the largest batch where it lands."""
    cells = [" "] * (left + plot_w)
    styles: list[str] = [AXIS_STYLE] * len(cells)

    def put(col: int, label: str, style: str) -> bool:
        around = cells[max(0, col - 1):col + len(label) + 1]
        if col < 0 or col + len(label) > len(cells) or any(c != " " for c in around):
            return False
        for i, ch in enumerate(label):
            cells[col + i] = ch
            styles[col + i] = style
        return True

    put(left, "0", AXIS_STYLE)
    put(1, "batch", AXIS_STYLE)
    end = fmt_count(x_max)
    put(left + plot_w - len(end), end, AXIS_STYLE)
    if inp.max_batch:
        col = left + int(round(inp.max_batch / x_max * (px_width - 1))) // 2
        label = f"max {fmt_count(inp.max_batch)}"
        (put(col - len(label) // 2, label, MAX_STYLE) or put(col, label, MAX_STYLE)
         or put(col - len(label), label, MAX_STYLE))
    text = Text()
    for ch, st in zip(cells, styles):
        text.append(ch, style=st)
    text.rstrip()
    return text
