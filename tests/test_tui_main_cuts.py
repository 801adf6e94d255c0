"""The main thread's per-refresh cuts beside many jobs (issue 14 point 3): a compact panel waiting below the fold
reads nothing of new snapshots, the compositor's chop owners made once per layout, a panel's screen kept while it
stays where it is, a repaint's dirty regions and a spliced row's colour filter as Textual makes them."""

from __future__ import annotations

from dataclasses import replace

import pytest
from textual.color import Color
from textual.dom import DOMNode, NoScreen
from textual.filter import ANSIToTruecolor, Monochrome
from textual.geometry import Region
from textual.strip import Strip

import tui_fixtures as fx
from batchmon.tui import app_cost, views
from batchmon.tui.app import BatchmonApp
from batchmon.tui.job_panel import JobPanel
from batchmon.tui.repaint import _set_dirty
from batchmon.tui.row_splice import _apply_filter


def _stepped(snap, key: str, step: int):  # noqa: ANN001, ANN202 - a snapshot with one agent a step further
    lead = next(a for a in snap.agents if a.key == key)
    later = replace(lead.last_step, step=step, time=lead.last_step.time + 1)
    moved = replace(lead, last_step=later, history=(*lead.history, later))
    return replace(snap, agents=tuple(moved if a.key == key else a for a in snap.agents), time=snap.time + 1)


async def test_a_compact_panel_waiting_below_the_fold_reads_nothing_new_and_shows_the_latest_when_scrolled_to():
    snap = fx.many()  # 9 jobs: the last single runs are below the fold at 40 rows
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=(160, 40)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 9)
        await pilot.pause()
        last = list(app.query(JobPanel))[-1]
        assert last._off_screen() and last.level == "compact"
        key = last.view.lead.key
        first = _stepped(snap, key, 4321)  # marks it stale (LinesPanel's road: a signature made and compared)
        app.deliver(first)
        await fx.wait_for(pilot, lambda: app.shown is first)
        await pilot.pause()
        assert last._stale and last.waits_off_screen()
        signed = []
        job_signature = views.job_signature
        import batchmon.tui.app as app_module
        app_module.views.job_signature = lambda v, level="full": (signed.append(v.key), job_signature(v, level))[1]
        try:
            second = _stepped(first, key, 4322)
            app.deliver(second)
            await fx.wait_for(pilot, lambda: app.shown is second)
            await pilot.pause()
        finally:
            app_module.views.job_signature = job_signature
        assert key not in signed and signed  # the others were compared; the waiting one was not
        # its view's prediction, notes and user were never made (deferred until read)
        assert type(last.view.__dict__["_prediction"]).__name__ == "_Deferred"
        assert "4322" not in fx.screen_text(app)
        app.query_one("#jobs").scroll_end(animate=False)
        await fx.wait_for(pilot, lambda: "step 4322" in fx.screen_text(app))  # the latest, once it shows
        assert not last._stale


async def test_the_chop_owners_are_made_once_per_layout_and_name_the_front_widget_of_each_chop():
    from batchmon.monitor.replay import load_snapshots

    snaps = [s for s in load_snapshots(fx.FIXTURES / "tui_h200_16_agents.jsonl") if len(s.running) == 16]
    app = BatchmonApp(snapshot=snaps[-8])
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 16)
        await pilot.pause()
        compositor = app.screen._compositor
        made = []  # (the owners returned, the layout they were asked for: visible widgets and cuts)
        chop_owners = app_cost._chop_owners

        def recorded(c):  # noqa: ANN001, ANN202
            owners = chop_owners(c)
            made.append((owners, c.visible_widgets, c.cuts))
            return owners

        app_cost._chop_owners = recorded
        try:
            for snap in snaps[-7:-3]:
                app.deliver(snap)
                await fx.wait_for(pilot, lambda: app.shown is snap)
                await pilot.pause()
        finally:
            app_cost._chop_owners = chop_owners
        assert len(made) >= 3
        for i, (owners, visible, cuts) in enumerate(made):
            assert owners.made_for[0] is visible and owners.made_for[1] is cuts
            for other, visible2, cuts2 in made[:i]:
                assert (other is owners) == (visible2 is visible and cuts2 is cuts)  # one per layout
        assert len({id(m[0]) for m in made}) < len(made)  # refreshes without a new layout reused them
        owners = chop_owners(compositor)
        assert chop_owners(compositor) is owners
        app.screen.refresh(layout=True)  # Textual lays out again: new owners
        await pilot.pause()
        fresh = chop_owners(compositor)
        assert fresh is not owners and fresh.made_for[0] is compositor.visible_widgets
        visible = [(w, Region.intersection(r, c)) for w, (r, c) in compositor.visible_widgets.items()]
        for y, row in enumerate(fresh):
            for cut, end, index in row:
                front = next((w for w, v in visible if v.width and v.y <= y < v.bottom and v.x <= cut < v.right),
                             None)
                assert (fresh.layout[index][0] if index >= 0 else None) is front


async def test_a_panels_screen_is_kept_while_it_stays_and_looked_up_again_once_removed(monkeypatch):
    app = BatchmonApp(snapshot=fx.one_gpu(1))
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and app.query(JobPanel))
        await pilot.pause()
        panel = app.query(JobPanel).first()
        walks = []
        textual = DOMNode.screen
        monkeypatch.setattr(DOMNode, "screen", property(lambda node: (walks.append(node), textual.fget(node))[1]))
        panel._kept_screen = None
        assert panel.screen is app.screen and walks == [panel]
        for _ in range(5):
            assert panel.screen is app.screen
        assert walks == [panel]  # kept
        await panel.remove()
        with pytest.raises(NoScreen):  # detached: looked up again, and Textual's answer is no screen
            panel.screen  # noqa: B018


async def test_a_repaints_dirty_regions_are_those_textual_marks():
    app = BatchmonApp(snapshot=fx.many())
    async with app.run_test(size=(160, 40)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 9)
        await pilot.pause()
        regions = (Region(3, 0, 9, 1), Region(0, 1, 40, 2))
        for panel in [*app.query(JobPanel)][:3]:  # the focused one (another border) and two compact ones
            marked = []
            for mark in (lambda: panel._set_dirty(*regions), lambda: _set_dirty(panel, regions)):
                panel._dirty_regions.clear()
                panel._repaint_regions.clear()
                panel._styles_cache._dirty_lines.clear()
                mark()
                marked.append((set(panel._dirty_regions), set(panel._repaint_regions),
                               set(panel._styles_cache._dirty_lines)))
            assert marked[0] == marked[1] and marked[0][0]


async def test_a_spliced_rows_colour_filter_gives_textuals_strip():
    app = BatchmonApp(snapshot=fx.many())
    async with app.run_test(size=(160, 40)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 9)
        await pilot.pause()
        truecolor = ANSIToTruecolor(app.ansi_theme_dark)
        strips = [s for w in app.query(JobPanel) for s in w._styles_cache._cache.values() if isinstance(s, Strip)]
        strips.append(Strip([], 0))
        assert len(strips) > 10
        for background in (Color(0, 0, 0), Color(30, 30, 46)):
            for strip in strips:
                want = Strip(truecolor.apply(strip._segments, background), strip.cell_length)
                got = _apply_filter(strip, truecolor, background)
                assert list(got) == list(want) and got.cell_length == want.cell_length
                assert _apply_filter(strip, truecolor, background) is got  # kept in the strip's filter cache
        mono = Monochrome()
        assert _apply_filter(strips[0], mono, Color(0, 0, 0)) is strips[0].apply_filter(mono, Color(0, 0, 0))


@pytest.mark.parametrize("title", ["  ▶ python train.py --model gpt2 --batch 32…", "  python train.py", "  "])
def test_a_compact_title_with_a_new_tail_equals_the_text_rich_builds(title: str) -> None:
    """job_panel.with_tail makes its Text without Rich's control-code pass (the parts are clean): the same text,
    spans and settings as the Text Rich builds, whether the line was the short road's own (its step text one
    span at its end) or another."""
    from rich.text import Span, Text

    from batchmon.tui.job_panel import with_tail

    line = Text(title, style="", overflow="ellipsis", no_wrap=True, end="")
    line.stylize("bold", 2, max(3, len(title) // 2))
    line.append("  step 1234  b=32  15 ms/step", style="dim")
    cut = len(title)
    for tail in ("  step 1235  b=32  15 ms/step", "  step 10000  b=32  9 ms/step"):
        new = with_tail(line, cut, tail, "dim")
        want = Text(title + tail, style=line.style, overflow="ellipsis", no_wrap=True, end="")
        want._spans = [sp if sp.end < cut else Span(sp.start, cut, sp.style) for sp in line._spans
                       if sp.start < cut] + [Span(cut, cut + len(tail), "dim")]
        assert new == want and new.plain == want.plain and new._spans == want._spans and len(new) == len(want)
        assert (new.style, new.overflow, new.no_wrap, new.end) == (want.style, want.overflow, want.no_wrap, want.end)
        line = new  # the next refresh starts from the short road's own line


def test_same_spans_say_same_styles_as_cutting_them_does() -> None:
    """panel._same_styles' short answer for two Texts with the same spans over the same columns is the answer
    of cutting both span lists, and the diff of header-like lines is what it was."""
    import random

    from rich.text import Text

    from batchmon.tui import panel

    rng = random.Random(7)
    styles = ["bold", "dim", "bold red", "", "italic"]
    for _ in range(300):
        n = rng.randrange(1, 40)
        spans = sorted((rng.randrange(0, n), rng.randrange(0, n + 1), rng.choice(styles)) for _ in range(4))
        a = Text("".join(rng.choice("ab: 0123") for _ in range(n)))
        b = Text("".join(rng.choice("ab: 0123") for _ in range(n)))
        for start, end, style in spans:
            a.stylize(style, start, end)
            b.stylize(style, start, end)
        if rng.random() < 0.3:  # sometimes not the same spans: the long road
            b.stylize("underline", rng.randrange(0, n), n)
        lo = rng.randrange(0, n + 1)
        hi = rng.randrange(lo, n + 1)
        slow = panel._styles(a, lo, hi) == panel._styles(b, lo, hi)
        assert panel._same_styles(a, b, lo, hi, lo, hi) == slow
        x1 = rng.randrange(0, n + 1)
        assert panel._same_styles(a, b, lo, hi, x1, x1 + hi - lo) == (
            panel._styles(a, lo, hi) == panel._styles(b, x1, x1 + hi - lo))
    old = Text(" batchmon  ● live  every 1 s  host h  12:00:01")
    new = Text(" batchmon  ● live  every 1 s  host h  12:00:02")
    for line in (old, new):
        line.stylize("bold", 0, 10)
        line.stylize("dim", 38, 46)
    assert panel.changed_runs(old, new, 60) == [(45, 46)]
