"""changed_cells: which columns of a redrawn line can differ (what a partial repaint sends to the terminal)."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st
from rich.console import Console
from rich.text import Text

from batchmon.tui.panel import changed_cells, changed_runs

CONSOLE = Console(width=200)
STYLES = ["", "bold", "#8a8f98", "bold #3fc1c9", "red"]

pieces = st.lists(st.tuples(st.text(alphabet="ab 0123456789W°C.:▂█·", max_size=6), st.sampled_from(STYLES)),
                  max_size=6)


def make(parts) -> Text:
    t = Text()
    for text, style in parts:
        t.append(text, style=style)
    return t


def cells(t: Text, width: int) -> list:
    """Each of the width cells as drawn: (character, style); blank past the end."""
    out = [(ch, t.get_style_at_offset(CONSOLE, i)) for i, ch in enumerate(t.plain)]
    return out + [(" ", None)] * (width - len(out))


@settings(max_examples=300, deadline=None)
@given(pieces, pieces, st.integers(1, 40))
def test_columns_outside_the_span_draw_the_same(old_parts, new_parts, width):
    old, new = make(old_parts), make(new_parts)
    x0, x1 = changed_cells(old, new, width)
    assert 0 <= x0 < x1 <= width
    if len(old.plain) > width or len(new.plain) > width:
        assert (x0, x1) == (0, width)  # cut with an ellipsis: whole line
        return
    a, b = cells(old, width), cells(new, width)
    assert [c for i, c in enumerate(a) if not x0 <= i < x1] == [c for i, c in enumerate(b) if not x0 <= i < x1]


def test_a_clock_tick_repaints_only_the_seconds_and_a_shorter_line_clears_its_tail():
    def clock(s: str) -> Text:
        return Text().append(" batchmon ", style="bold").append("  host vm   ").append(s, style="#8a8f98")

    assert changed_cells(clock("19:20:05"), clock("19:20:06"), 80) == (29, 30)
    assert changed_cells(Text("GPU 0  111 W"), Text("GPU 0  94 W"), 40) == (7, 12)
    # only colours changed, a different base style, or wide characters: the whole line (never too little)
    assert changed_cells(Text("ab").append("cd", style="red"), Text("ab").append("cd", style="bold"), 10) == (0, 10)
    assert changed_cells(Text("abc", style="red"), Text("abc", style="bold"), 10) == (0, 10)
    assert changed_cells(Text("日本"), Text("日木"), 10) == (0, 10)


@settings(max_examples=300, deadline=None)
@given(pieces, pieces, st.integers(1, 40))
@example(old_parts=[("000010", ""), ("00", ""), ("000000", ""), ("000000", "")],  # a line longer than the width
         new_parts=[("000010", ""), ("00", ""), ("000000", ""), ("000010", "")], width=19)  # (an empty run once)
def test_changed_runs_cover_every_changed_column_inside_changed_cells(old_parts, new_parts, width):
    old, new = make(old_parts), make(new_parts)
    runs = changed_runs(old, new, width)
    x0, x1 = changed_cells(old, new, width)
    assert runs and runs[0][0] == x0 and runs[-1][1] == x1
    assert all(a < b for a, b in runs) and all(b < c for (_, b), (c, _) in zip(runs, runs[1:]))
    if len(old.plain) > width or len(new.plain) > width:
        return
    covered = {i for a, b in runs for i in range(a, b)}
    a, b = cells(old, width), cells(new, width)
    assert [c for i, c in enumerate(a) if i not in covered] == [c for i, c in enumerate(b) if i not in covered]


def test_two_changes_far_apart_are_two_repaints():
    def header(mem: str, clock: str) -> Text:
        t = Text().append(" batchmon ", style="bold").append("  host mem ", style="#8a8f98").append(mem)
        return t.append(" " * 30).append(clock, style="#8a8f98")

    old = header("680.2 MiB", "19:20:17")
    assert changed_runs(old, header("826.2 MiB", "19:20:18"), 80) == [(21, 24), (67, 68)]
    assert changed_runs(old, header("680.2 MiB", "19:20:18"), 80) == [(67, 68)]
    # close together (fewer than SPLIT_GAP equal cells between): one repaint
    assert changed_runs(Text("a 123 W 45%"), Text("a 124 W 46%"), 20) == [(4, 10)]
