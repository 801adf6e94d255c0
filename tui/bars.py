"""Text bars drawn with block characters: stacked component bars, device memory bars, sparklines.

Every function returns rich.text.Text built with append(), never markup, so names and numbers are literal.
"""

from __future__ import annotations

from typing import Mapping, Sequence

from rich.text import Text

from batchmon.protocol import ALL_COMPONENTS
from batchmon.tui.palette import ACCENT, BAD, BLUE, BORDER, DIM, FAINT, OK, PINK, PURPLE, WARN

#: one colour per component, fixed so measured and predicted bars read the same
COMPONENT_STYLES: dict[str, str] = {
    "parameters": BLUE,
    "gradients": ACCENT,
    "optimizer": PURPLE,
    "activations": WARN,
    "batch": OK,
    "other": PINK,
    "cache": DIM,
    "context": FAINT,
}
COMPONENT_LABELS: dict[str, str] = {
    "parameters": "parameters",
    "gradients": "gradients",
    "optimizer": "optimizer",
    "activations": "activations",
    "batch": "batch",
    "other": "other",
    "cache": "cache",
    "context": "context",
}
EMPTY_STYLE = BORDER
SPARK_CHARS = "▁▂▃▄▅▆▇█"
_EIGHTHS = " ▏▎▍▌▋▊▉█"


def stacked_bar(parts: Sequence[tuple], scale: int, width: int, *, fill: str = "█",
                empty: str = "·", empty_style: str = EMPTY_STYLE) -> Text:
    """A bar of ``width`` cells where each (bytes, style[, glyph]) part takes its share of ``scale``.

    Cells are apportioned by largest remainder so the bar never over- or under-runs.
    """
    text = Text()
    if width <= 0:
        return text
    scale = max(scale, 1)
    exact = [max(0, p[0]) * width / scale for p in parts]
    cells = [int(x) for x in exact]
    budget = min(width, round(sum(exact)))
    order = sorted(range(len(parts)), key=lambda i: exact[i] - cells[i], reverse=True)
    for i in order:
        if sum(cells) >= budget:
            break
        if exact[i] - cells[i] > 0:
            cells[i] += 1
    while sum(cells) > width:
        i = max(range(len(cells)), key=lambda j: cells[j])
        cells[i] -= 1
    for part, n in zip(parts, cells):
        if n > 0:
            glyph = part[2] if len(part) > 2 else fill
            text.append(glyph * n, style=part[1])
    rest = width - sum(cells)
    if rest > 0:
        text.append(empty * rest, style=empty_style)
    return text


def component_parts(components: Mapping[str, int]) -> list[tuple[int, str]]:
    """(bytes, style) in ALL_COMPONENTS order, for stacked_bar."""
    return [(int(components.get(name, 0) or 0), COMPONENT_STYLES[name]) for name in ALL_COMPONENTS]


def memory_bar(used: int, reserved: int | None, total: int, width: int) -> Text:
    """Device memory: used (solid), driver-reserved (shaded, shown separately), free (dotted)."""
    used_style = OK if used < 0.8 * total else (WARN if used < 0.95 * total else BAD)
    parts: list[tuple] = [(used, used_style)]
    if reserved:
        parts.append((reserved, DIM, "▒"))
    return stacked_bar(parts, total, width)


def percent_bar(percent: float | None, width: int) -> Text:
    """Utilization as a bar with eighth-cell resolution; 'n/a' bar when unknown."""
    if percent is None:
        return Text().append("·" * width, style=EMPTY_STYLE)
    pct = max(0.0, min(100.0, float(percent)))
    eighths = round(pct / 100 * width * 8)
    full, rem = divmod(eighths, 8)
    style = OK if pct < 60 else (WARN if pct < 90 else BAD)
    text = Text().append("█" * full, style=style)
    if rem and full < width:
        text.append(_EIGHTHS[rem], style=style)
    pad = width - len(text.plain)
    if pad > 0:
        text.append("·" * pad, style=EMPTY_STYLE)
    return text


def sparkline(values: Sequence[float], width: int, *, maximum: float | None = None, style: str = BLUE) -> Text:
    """The last ``width`` values as ▁..█ on a fixed 0..maximum scale (absolute, so heights compare over time)."""
    if width <= 0:
        return Text()
    vals = list(values)[-width:]
    top = maximum if maximum else (max(vals) if vals else 0)
    text = Text()
    pad = width - len(vals)
    if pad:
        text.append(" " * pad)
    for v in vals:
        if top <= 0:
            level = 0
        else:
            level = int(round(max(0.0, min(1.0, v / top)) * (len(SPARK_CHARS) - 1)))
        text.append(SPARK_CHARS[level], style=style)
    return text
