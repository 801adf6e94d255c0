"""Small, exact formatters for the UI (seconds, batch sizes, intervals). Pure functions, no textual.

Bytes (also the chart's axis labels) and clean text are the shared ones (batchmon.units), so the UI and `--once`
print the same figure."""

from __future__ import annotations

from rich.text import Text

from batchmon.units import clean_text, fmt_bytes, fmt_short_bytes, fmt_used_total

__all__ = ["clean_line", "clean_text", "fit_label", "fmt_axis_bytes", "fmt_bytes", "fmt_count", "fmt_interval",
           "fmt_seconds", "fmt_short_bytes", "fmt_used_total"]


def fmt_seconds(s: float | None) -> str:
    """Step time: '125 ms', '1.25 s', 'n/a'."""
    if s is None:
        return "n/a"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    return f"{s:.2f} s"


def fmt_count(n: int | None) -> str:
    """Compact counts for axes and parameter totals: 2048 -> '2048', 12_600_000 -> '12.6M'."""
    if n is None:
        return "n/a"
    if abs(n) < 10_000:
        return str(n)
    for unit, div in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)  # pragma: no cover


def fmt_interval(seconds: float) -> str:
    """Refresh interval: '250 ms', '1 s', '2.5 s'."""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    return f"{seconds:g} s"


def clean_line(text: Text) -> Text:
    """``text`` with every control character (terminal escapes among them) drawn as a space, in place: what an
    agent, a recording or another user's command line holds is shown, never obeyed. Length-preserving
    (units.clean_text maps a character to one character), so the line's styles stay where they were. Every
    line the UI draws passes here (LinesPanel.lines, the header, the what-if bar)."""
    plain = text.plain
    if not plain.isprintable():
        text.plain = clean_text(plain)
    return text


def fmt_axis_bytes(n: float | None) -> str:
    """Axis-label bytes in the tables' units, at most 8 characters: '140 GiB', '1.5 GiB', '512 MiB', '0'."""
    if n is None:
        return "?"
    if n == 0:
        return "0"
    text = fmt_bytes(n, 0 if abs(n) >= 10 * 1024 ** 3 or 10 * 1024 ** 2 <= abs(n) < 1024 ** 3 else 1)
    if len(text) > 8:  # '1023 MiB' fits; anything longer loses its decimal
        text = fmt_bytes(n, 0)
    return text


def fit_label(label: str, width: int) -> str:
    """``label`` padded to ``width`` cells, or cut with '…': a label never pushes what follows it (a bar, a
    total) off the line."""
    if len(label) <= width:
        return f"{label:<{width}}"
    return label[: max(0, width - 2)] + "… "
