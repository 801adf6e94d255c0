"""tui/line_strip.py renders a line as the very strip Textual makes for it (segment for segment: text, style, the
offset meta text selection reads), on every line the monitor draws from the H200 recordings, focused or not, and
leaves to Textual the lines it cannot promise that for."""

from __future__ import annotations

import pytest
from rich.text import Text
from textual.strip import Strip
from textual.visual import Visual, visualize

import tui_fixtures as fx
from batchmon.tui.app import BatchmonApp
from batchmon.tui.line_bar import LineBar
from batchmon.tui.line_strip import LineStrips
from batchmon.tui.panel import LinesPanel

pytestmark = pytest.mark.usefixtures("utc")


def textual_strip(widget, text: Text, width: int) -> Strip:
    strips = Visual.to_strips(widget, visualize(widget, text, markup=False), width, 1, widget.visual_style)
    return strips[0]


def segments(strip: Strip) -> list[tuple]:
    # Rich's Style equality is its hash: compare what each part is (the meta, pickled, included)
    return [(s.text, s.style, s.style and s.style._meta, s.control) for s in strip]


def compare_every_line(app) -> tuple[int, int]:
    """(lines rendered by LineStrips, lines left to Textual); fails on the first strip that differs."""
    fast = slow = 0
    widgets = [*app.query(LinesPanel), *(bar for bar in app.query(LineBar) if bar.display)]
    assert widgets
    for widget in widgets:
        if isinstance(widget, LineBar):  # the header, the replay's bar
            width, lines = widget.size.width, [widget.line()]
        else:
            width = widget.content_size.width
            lines = widget.lines(width)
        renderer = LineStrips()
        for _ in range(2):  # the second pass from the remembered styles
            for line in lines:
                mine = renderer.strip(widget, line, width, widget.visual_style)
                if mine is None:
                    slow += 1
                    continue
                fast += 1
                theirs = textual_strip(widget, line, width)
                assert segments(mine) == segments(theirs), line.plain
                assert mine.cell_length == theirs.cell_length
    return fast, slow


@pytest.mark.parametrize("name,size", [("tui_h200_two_jobs.jsonl", (160, 48)), ("tui_h200_16_agents.jsonl", (160, 48)),
                                       ("tui_h200_peak_phase.jsonl", (80, 24)), ("agent_h200_oom.jsonl", (160, 48))])
async def test_every_line_of_the_recorded_screens_is_textuals_own(name, size):
    app = fx.recorded_app(name)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        fast, slow = compare_every_line(app)
        assert fast > 20 and fast >= 10 * slow  # nearly every line takes the fast path
        await pilot.press("down")  # another panel focused: its background (the visual style) changes
        await pilot.pause()
        fast2, _ = compare_every_line(app)
        assert fast2 > 20


async def test_the_replay_bar_is_textuals_own_playing_and_at_the_end():
    from batchmon.monitor.replay import ReplaySource
    from batchmon.tui.replay_bar import ReplayBar

    src = ReplaySource(fx.FIXTURES / "tui_h200_two_jobs.jsonl", speed=0.001)  # only the keys move it
    app = BatchmonApp(src, title="replay")
    async with app.run_test(size=(120, 36)) as pilot:
        bar = app.query_one(ReplayBar)
        await fx.wait_for(pilot, lambda: "▶ replay" in bar.line().plain)
        fast, _ = compare_every_line(app)
        await pilot.press("end")
        await fx.wait_for(pilot, lambda: "end of recording" in bar.line().plain)
        fast2, _ = compare_every_line(app)
        assert fast > 20 and fast2 > 20
        assert "end of recording" in fx.screen_text(app)  # the row drawn (spliced) shows it


async def test_after_a_theme_change_every_line_goes_textuals_way():
    app = fx.recorded_app("tui_h200_two_jobs.jsonl")
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.pause()
        panel = app.query(LinesPanel).first()
        r = LineStrips()
        named = Text("red ", style="red").append("and blue", style="bold blue")
        before = r.strip(panel, named, 40, panel.visual_style)
        assert before is not None and segments(before) == segments(textual_strip(panel, named, 40))
        app.theme = "textual-light" if app.theme != "textual-light" else "textual-dark"
        await pilot.pause()
        assert r.strip(panel, named, 40, panel.visual_style) is None


async def test_lines_it_cannot_promise_are_left_to_textual():
    app = BatchmonApp(snapshot=fx.one_gpu(1), title=None)
    async with app.run_test(size=(120, 36)) as pilot:
        await pilot.pause()
        panel = app.query(LinesPanel).first()
        r = LineStrips()
        style = panel.visual_style
        long = Text("x" * 25 + "y" * 5, style="italic")
        long.stylize("bold", 10, 30)
        cut = r.strip(panel, long, 20, style)  # wider than the line: cut with Textual's ellipsis
        assert cut is not None and cut.text == "x" * 19 + "…"
        assert segments(cut) == segments(textual_strip(panel, long, 20))
        assert r.strip(panel, Text("GPU 显存"), 40, style) is None  # two cells per character
        assert r.strip(panel, Text("a\tb"), 40, style) is None  # a tab to expand
        linked = Text("a ").append("link", style="link https://example.com")  # a link in a span: Textual's way
        assert r.strip(panel, linked, 40, style) is None
        own = Text("link", style="link https://example.com")  # the Text's own style: parsed as Textual parses it
        mine = r.strip(panel, own, 40, style)
        assert mine is None or segments(mine) == segments(textual_strip(panel, own, 40))
        plain = r.strip(panel, Text("plain"), 40, style)
        assert plain is not None and segments(plain) == segments(textual_strip(panel, Text("plain"), 40))
        empty = r.strip(panel, Text(""), 40, style)
        assert empty is not None and segments(empty) == segments(textual_strip(panel, Text(""), 40))
        owned = Text("base style and a span", style="bold")
        owned.stylize("red", 5, 10)
        mine = r.strip(panel, owned, 40, style)
        assert mine is not None and segments(mine) == segments(textual_strip(panel, owned, 40))
