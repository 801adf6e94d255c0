"""Issue 13 point 1: where the observations cannot support the central line, the chart shows the band's high
side (dotted, above the line), the side the largest batch is read from."""

from __future__ import annotations

from batchmon.tui.chart import BAND_STYLE, LINE_STYLE, ChartInput, render_chart


def _cells(lines, style):
    """(row, column) of the braille cells drawn in ``style``."""
    out = set()
    for r, text in enumerate(lines):
        for span in text.spans:
            if str(span.style) == style:
                for c in range(span.start, span.end):
                    if 0x2800 < ord(text.plain[c]) <= 0x28FF:
                        out.add((r, c))
    return out


def central(b: int) -> int:
    return 2_000_000_000 + 10_000_000 * b


def high(b: int) -> int | None:
    """Widening with the batch: the extrapolation's uncertainty."""
    return central(b) + 50_000 * b * b // 10


def test_the_high_side_is_drawn_above_the_central_line() -> None:
    limit = 10_000_000_000
    inp = ChartInput(central, ((16, central(16)), (32, central(32))), limit, 400, 32, predict_high=high)
    lines = render_chart(inp, 80, 16)
    band, line = _cells(lines, BAND_STYLE), _cells(lines, LINE_STYLE)
    assert band and line
    # in every column where both show, the high side is on a row above (smaller index) the central line
    for col in {c for _, c in band} & {c for _, c in line}:
        assert min(r for r, c in band if c == col) <= min(r for r, c in line if c == col)
    assert any(min(r for r, c in band if c == col) < min(r for r, c in line if c == col)
               for col in {c for _, c in band} & {c for _, c in line})


def test_no_band_no_dots_and_a_band_equal_to_the_line_draws_nothing_more() -> None:
    limit = 10_000_000_000
    plain = render_chart(ChartInput(central, ((16, central(16)),), limit, 800, 16), 80, 16)
    same = render_chart(ChartInput(central, ((16, central(16)),), limit, 800, 16, predict_high=central), 80, 16)
    assert not _cells(plain, BAND_STYLE) and not _cells(same, BAND_STYLE)
    assert [t.plain for t in plain] == [t.plain for t in same]
