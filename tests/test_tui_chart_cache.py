"""The chart drawing is reused while its key holds, and drawn again when anything it shows changes."""

from __future__ import annotations

from batchmon.tui.chart import ChartInput, render_chart


def counting_line(calls: list[int], slope: int = 1000):
    def predict(b: int) -> int:
        calls.append(b)
        return 5_000_000 + slope * b
    return predict


def test_same_key_reuses_the_drawing_and_a_new_key_redraws() -> None:
    calls: list[int] = []
    inp = ChartInput(counting_line(calls), ((64, 5_064_000),), 10_000_000, 5000, 64, key=("a", 1))
    first = render_chart(inp, 60, 10)
    drawn = len(calls)
    assert drawn > 10  # one prediction per plot column at least
    again = render_chart(inp, 60, 10)
    assert len(calls) == drawn and [t.plain for t in again] == [t.plain for t in first]
    again[0].append("x")  # callers get copies: changing one never changes the cached drawing
    assert render_chart(inp, 60, 10)[0].plain == first[0].plain
    render_chart(inp, 70, 10)  # another size is another drawing
    assert len(calls) > drawn
    moved = ChartInput(counting_line(calls, slope=2000), ((64, 5_128_000),), 10_000_000, 2500, 64, key=("a", 2))
    assert [t.plain for t in render_chart(moved, 60, 10)] != [t.plain for t in first]


def test_no_key_always_draws() -> None:
    calls: list[int] = []
    inp = ChartInput(counting_line(calls), ((8, 5_008_000),), None, None, 8)
    render_chart(inp, 40, 6)
    n = len(calls)
    render_chart(inp, 40, 6)
    assert len(calls) == 2 * n
