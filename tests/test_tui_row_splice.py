"""tui/row_splice.py: a dirty content row made as the row Textual drew there with the new line inside must be the
strip Textual's own StylesCache makes for it, segment for segment, refresh after refresh of 16 H200 jobs, across a
focus change (Textual's cache cleared: a new frame) and in a -dense panel (other border, other padding)."""

from __future__ import annotations

import tui_fixtures as fx
from batchmon.tui import row_splice
from batchmon.tui.app import BatchmonApp
from batchmon.tui.header import HeaderBar
from batchmon.tui.job_panel import JobPanel


async def test_spliced_rows_are_the_strips_textual_renders(monkeypatch):
    from batchmon.monitor.replay import load_snapshots

    snaps = load_snapshots(fx.FIXTURES / "tui_h200_16_agents.jsonl")
    full = [s for s in snaps if len(s.running) == 16]
    first, later = full[-9], full[-8:]
    spliced: list[str] = []  # the widgets whose rows went the spliced way
    real = row_splice.spliced_lines

    def compared(widget, crop, content_line):
        sc = widget._styles_cache
        cache, dirty, width = dict(sc._cache), set(sc._dirty_lines), sc._width
        mine = real(widget, crop, content_line)
        if mine is None:
            return None
        after = dict(sc._cache), set(sc._dirty_lines)
        sc._cache.clear()  # Textual's way from the same state (its frame left out: Textual never sees it)
        sc._cache.update({k: v for k, v in cache.items() if k != row_splice._KEY})
        sc._dirty_lines.clear()
        sc._dirty_lines.update(dirty)
        sc._width = width
        theirs = sc.render_widget(widget, crop)
        assert [s._segments for s in mine] == [s._segments for s in theirs], type(widget).__name__
        assert {k: v for k, v in sc._cache.items()} == {k: v for k, v in after[0].items() if k != row_splice._KEY}
        assert sc._dirty_lines == after[1]
        sc._cache[row_splice._KEY] = after[0][row_splice._KEY]
        spliced.append(type(widget).__name__)
        return mine

    monkeypatch.setattr(row_splice, "spliced_lines", compared)  # (panels and the header: row_splice.rows)
    app = BatchmonApp(snapshot=first)
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 16)
        await pilot.pause()
        for i, snap in enumerate(later):
            if i == 4:  # another job in full, the first one compact: both panels' caches cleared, new frames
                await pilot.press("down")
                await pilot.pause()
            app.deliver(snap)
            await fx.wait_for(pilot, lambda: app.shown is snap)
            await pilot.pause()
        text = fx.screen_text(app)
    assert "HeaderBar" in spliced and spliced.count("JobPanel") >= 8, spliced
    assert text  # the screen was drawn


async def test_no_frame_where_textual_adds_more_than_a_frame():
    """A panel whose rows Textual tints is never spliced: its cache is marked as Textual's."""
    app = BatchmonApp(snapshot=fx.one_gpu(1))
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and app.query(JobPanel))
        panel = app.query(JobPanel).first()
        panel.styles.tint = "red 20%"
        await pilot.pause()
        await pilot.pause()
        assert panel._styles_cache._cache.get(row_splice._KEY) is row_splice._NO_FRAME
        header = app.query_one(HeaderBar)
        frame = header._styles_cache._cache.get(row_splice._KEY)
        assert frame is not None and frame is not row_splice._NO_FRAME and frame.left == frame.right == ()
