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
    if len(old.plain) > width or len(new.plain) > width:
        # cut at the edge: the span reaches the edge (where the cut shows), or is empty when both are cut and
        # their first ``width`` cells read the same; the cells before it read the same
        assert 0 <= x0 <= x1 == width
        assert x0 < x1 or (len(old.plain) > width and len(new.plain) > width)
        assert cells(old, width)[:x0] == cells(new, width)[:x0]
        return
    assert 0 <= x0 < x1 <= width
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


def test_a_line_longer_than_its_panel_repaints_what_shows():
    """A compact title pushed past the panel's edge by a long command (the H200's fast16 screen): its step counter
    changing beyond the edge repaints nothing; a change inside, from there to the edge (the cut is there)."""
    def title(step: int, pid: str = "969") -> Text:
        return Text().append("examples/train_mlp.py --device cuda", style="bold").append(f"  pid {pid}",
                                                                                          style="#8a8f98").append(
            f"  step {step}", style="#8a8f98")

    assert changed_cells(title(1406), title(1407), 40) == (40, 40)
    assert changed_runs(title(1406), title(1407), 40) == []
    assert changed_cells(title(1406, "968"), title(1407, "970"), 44) == (42, 44)
    assert changed_cells(title(1406), title(1407), 60) == (54, 55)  # it fits: the digit alone
    assert changed_cells(title(1406), Text("short"), 40) == (0, 40)


@settings(max_examples=300, deadline=None)
@given(pieces, pieces, st.integers(1, 40))
@example(old_parts=[("000010", ""), ("00", ""), ("000000", ""), ("000000", "")],  # a line longer than the width
         new_parts=[("000010", ""), ("00", ""), ("000000", ""), ("000010", "")], width=19)  # (an empty run once)
def test_changed_runs_cover_every_changed_column_inside_changed_cells(old_parts, new_parts, width):
    old, new = make(old_parts), make(new_parts)
    runs = changed_runs(old, new, width)
    x0, x1 = changed_cells(old, new, width)
    if x0 == x1:  # nothing that shows changed (both cut at the edge)
        assert runs == [] and x0 == width
        return
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


def test_changed_runs_of_two_strings_are_those_of_two_texts_in_one_style():
    """A compact panel's step text is diffed as strings (no Texts made): the same runs, step texts and others."""
    import random

    from rich.text import Text

    from batchmon.tui.panel import changed_cells, changed_runs

    rng = random.Random(14)
    pairs = [("  step 5443  b=256  10 ms/step", "  step 5444  b=256  10 ms/step"),
             ("  step 999999  b=256  9 ms/step", "  step 1000000  b=256  10 ms/step"),
             ("same", "same"), ("", "x"), ("GPU 显存", "GPU 显卡")]
    for _ in range(400):
        a = "".join(rng.choice("ab  12") for _ in range(rng.randrange(0, 40)))
        b = list(a) + [rng.choice("ab  12") for _ in range(rng.randrange(0, 3))]
        for k in rng.sample(range(len(b)), min(len(b), rng.randrange(0, 4))):
            b[k] = rng.choice("xyz ")
        pairs.append((a, "".join(b)))
    for a, b in pairs:
        for width in (8, 20, 30, 60):
            assert changed_cells(a, b, width) == changed_cells(Text(a), Text(b), width), (a, b, width)
            assert changed_runs(a, b, width) == changed_runs(Text(a), Text(b), width), (a, b, width)


def test_a_title_with_a_new_tail_is_what_copy_crop_and_append_make():
    """job_panel.with_tail makes the compact title's new step text at once: the same Text as Rich's own road."""
    from rich.text import Text

    from batchmon.tui.job_panel import with_tail

    line = Text("▶ ", style="bold").append("train.py --lr 3", style="bold").append("  cuda:0 (GPU 0)", style="dim")
    line.append("  step 5443  b=256  10 ms/step", style="dim")
    line.stylize("underline", 5, 40)  # a span across the cut
    line.no_wrap, line.overflow, line.end = True, "ellipsis", ""
    for cut in (0, 5, 17, 33, len(line.plain) - 1):
        for tail in ("  step 5444  b=256  10 ms/step", "", "x"):
            rich = line.copy()
            rich.right_crop(len(line.plain) - cut)
            rich.append(tail, style="dim")
            mine = with_tail(line, cut, tail, "dim")
            assert (mine.plain, mine.spans, mine.style, mine.no_wrap, mine.overflow, mine.end) == \
                (rich.plain, rich.spans, rich.style, rich.no_wrap, rich.overflow, rich.end), (cut, tail)
