"""What the running monitor costs: its collector settled once the first screen is up (tui/app_cost.py); the
cropped partial updates are tested in test_tui_driver.py."""

from __future__ import annotations

import subprocess
import sys

import tui_fixtures as fx
from batchmon.tui import app_cost
from batchmon.tui.app import BatchmonApp
from batchmon.tui.job_panel import JobPanel


def test_settle_gc_freezes_what_lives_and_collects_young_objects_less_often():
    # in a fresh interpreter: the test process's own collector is left as it is
    code = ("import gc; from batchmon.tui.app_cost import settle_gc, GC_THRESHOLD; import batchmon.tui.app; "
            "before = gc.get_freeze_count(); settle_gc(); "
            "print(before, gc.get_freeze_count(), gc.get_threshold()[0] == GC_THRESHOLD)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    before, frozen, threshold = out.stdout.split()
    assert before == "0" and int(frozen) > 10_000 and threshold == "True"


async def test_the_app_settles_the_collector_once_after_its_first_screen(monkeypatch):
    calls = []
    monkeypatch.setattr(app_cost, "settle_gc", lambda: calls.append(1))
    monkeypatch.setattr(app_cost.CostApp, "_gc_settled", False)
    monkeypatch.setattr(app_cost.CostApp, "_settles_gc", lambda self: True)  # as in a terminal
    app = BatchmonApp(snapshot=fx.one_gpu(1))
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and app.query(JobPanel) and calls)
        app.deliver(fx.one_gpu(1))
        await fx.wait_for(pilot, lambda: app.received >= 1)
        await pilot.pause()
    assert calls == [1]


async def test_headless_apps_leave_the_collector_alone(monkeypatch):
    calls = []
    monkeypatch.setattr(app_cost, "settle_gc", lambda: calls.append(1))
    monkeypatch.setattr(app_cost.CostApp, "_gc_settled", False)
    app = BatchmonApp(snapshot=fx.one_gpu(1))
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and app.query(JobPanel))
        await pilot.pause()
    assert calls == [] and not app_cost.CostApp._gc_settled


async def test_a_job_panel_below_the_fold_is_not_repainted_but_shows_its_new_lines_when_scrolled_to():
    from dataclasses import replace

    snap = fx.many()  # 9 jobs (a torchrun job of 8 ranks, 8 single runs): the last ones are below the fold
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=(160, 40)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 9)
        await pilot.pause()
        panels = list(app.query(JobPanel))
        last = panels[-1]
        column = app.query_one("#jobs")
        column.scroll_end(animate=False)  # drawn once, then scrolled away: its old lines are what Textual kept
        await fx.wait_for(pilot, lambda: not last._off_screen())
        await pilot.pause()
        column.scroll_home(animate=False)
        await fx.wait_for(pilot, lambda: last._off_screen())
        await pilot.pause()
        assert not panels[0]._off_screen()
        key = last.view.lead.key
        lead = next(a for a in snap.agents if a.key == key)
        later = replace(lead.last_step, step=4321, time=lead.last_step.time + 1)
        moved = replace(lead, last_step=later, history=(*lead.history, later))
        newer = replace(snap, agents=tuple(moved if a.key == key else a for a in snap.agents), time=snap.time + 1)
        repaints = []
        refresh, repaint_regions = last.refresh, last.repaint_regions
        last.refresh = lambda *a, **k: (repaints.append(a), refresh(*a, **k))[1]  # type: ignore[method-assign]
        last.repaint_regions = lambda *a: (repaints.append(a), repaint_regions(*a))[1]  # type: ignore[method-assign]
        builds = []
        build = last.build
        last.build = lambda *a, **k: (builds.append(a), build(*a, **k))[1]  # type: ignore[method-assign]
        assert last.level == "compact" and last.fixed_line_count() == 2
        app.deliver(newer)
        await fx.wait_for(pilot, lambda: app.shown is newer)
        await pilot.pause()
        assert builds == []  # a compact panel out of sight (two lines whatever it shows) is not even built ...
        assert "4321" in "".join(line.plain for line in last.lines(last.content_size.width))  # its new lines
        assert repaints == []  # ... not repainted while out of sight
        assert "4321" not in fx.screen_text(app)
        column.scroll_end(animate=False)
        await fx.wait_for(pilot, lambda: "4321" in fx.screen_text(app))  # drawn anew once it shows


async def test_a_render_due_while_the_app_closes_draws_nothing_and_raises_nothing():
    """A render scheduled by a snapshot (call_later / a frame timer) can run after the app has begun to close and
    its widgets are gone (seen in CI: NoMatches for HeaderBar, a traceback on the way out); it must do nothing."""
    app = BatchmonApp(snapshot=fx.one_gpu(1))
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and app.query(JobPanel))
        for widget in list(app.screen.children):  # what closing does to the screen before a late timer fires
            await widget.remove()
        app.latest = fx.one_gpu(2)
        renders = app.renders
        await app._render_now()
        assert app.renders == renders + 1 and not app.query(JobPanel)


async def test_partial_updates_rendered_by_rows_draw_what_textuals_draw():
    """rows_partial_update renders each widget only on the rows a changed region touches; the terminal must get
    the same cells as from Textual's own partial update (every widget in the changed regions' bounding box,
    each over its whole visible area), refresh after refresh of 16 H200 jobs, and fewer lines rendered."""
    from rich.console import Console
    from textual._compositor import Compositor

    from batchmon.monitor.replay import load_snapshots
    from test_tui_driver import terminal_cells

    snaps = load_snapshots(fx.FIXTURES / "tui_h200_16_agents.jsonl")
    full = [s for s in snaps if len(s.running) == 16]
    first, later = full[-7], full[-6:]  # the run's last moments: 16 jobs stepping, a snapshot a refresh
    console = Console(color_system="256", force_terminal=True, width=160)
    compared: list[tuple[int, int]] = []  # (changed rows, widgets' rows Textual rendered)
    app = BatchmonApp(snapshot=first)
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 16)
        await pilot.pause()
        compositor = app.screen._compositor
        ours = compositor.render_partial_update
        assert getattr(ours, "__func__", None) is not Compositor.render_partial_update  # the app uses it

        def both(*_):
            regions = compositor._dirty_regions.copy()
            if not regions:
                return None
            textual = Compositor.render_partial_update(compositor)
            compositor._dirty_regions.update(regions)
            mine = ours()
            spans = mine.spans
            assert spans == textual.spans
            shown = {(x, y) for y, x1, x2 in spans for x in range(x1, x2)}
            want = {c: v for c, v in terminal_cells(textual.render_segments(console)).items() if c in shown}
            got = {c: v for c, v in terminal_cells(mine.render_segments(console)).items() if c in shown}
            assert got == want and set(want) == shown
            rows = {y for y, _, _ in spans}
            box = (min(rows), max(rows) + 1)
            textual_rows = sum(min(r.bottom, c.bottom, box[1]) > max(r.y, c.y, box[0])
                               and max(0, min(r.bottom, c.bottom) - max(r.y, c.y))
                               for r, c in compositor.visible_widgets.values())
            compared.append((len(rows), textual_rows))
            return mine

        compositor.render_partial_update = both
        for snap in later:
            app.deliver(snap)
            await fx.wait_for(pilot, lambda: app.shown is snap)
            await pilot.pause()
    assert len(compared) >= 4
    assert any(changed < widget_rows / 4 for changed, widget_rows in compared), compared


async def _compact_single_panels(app: BatchmonApp, pilot) -> list[JobPanel]:  # noqa: ANN001
    """fx.many()'s app once its 9 job panels are drawn: the compact panels of single runs on screen."""
    await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 9)
    await pilot.pause()
    return [p for p in app.query(JobPanel) if p.level == "compact" and len(p.view.ranks) == 1 and not p._off_screen()]


async def test_a_compact_panel_whose_step_alone_changed_repaints_its_step_and_draws_what_a_build_draws():
    """Beside many fast jobs a compact panel's new data is mostly its step counter: the panel replaces its title
    line's end (no build) and repaints those cells; its lines are what building it anew gives, and a change of
    anything else it shows (the memory figures) builds it again."""
    from dataclasses import replace

    from batchmon.tui.job_panel import job_lines

    snap = fx.many()  # 8 single runs (compact, one rank each) beside a torchrun job
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=(160, 48)) as pilot:
        shown = await _compact_single_panels(app, pilot)
        assert len(shown) >= 3
        builds, repaints = [], []
        for p in shown:
            p.build = (lambda f, k: lambda *a, **kw: (builds.append(k), f(*a, **kw))[1])(p.build, p.view.key)
            for name in ("refresh", "repaint_regions"):  # Textual's road, and the repaint without its round trip
                setattr(p, name, (lambda f, k: lambda *a, **kw: (repaints.append((k, a)), f(*a, **kw))[1])(
                    getattr(p, name), p.view.key))
        keys = {p.view.key for p in shown}
        agent_keys = {p.view.lead.key for p in shown}

        def stepped(s, n: int, **figures):
            agents = []
            for a in s.agents:
                if a.key in agent_keys:
                    later = replace(a.last_step, step=a.last_step.step + n, time=a.last_step.time + n,
                                    step_seconds=a.last_step.step_seconds * (1 + n / 100), **figures)
                    a = replace(a, last_step=later, history=(*a.history, later))
                agents.append(a)
            return replace(s, agents=tuple(agents), time=s.time + n)

        for n in (1, 2, 950):  # a counter's last digit, then digits across the line (10 -> 960)
            newer = stepped(snap, n)
            app.deliver(newer)
            await fx.wait_for(pilot, lambda: app.shown is newer)
            await pilot.pause()
            assert builds == []
            for p in shown:
                width = p.content_size.width
                assert p.lines(width) == job_lines(p.view, width, "compact", focused=p.has_focus)
                assert f"step {p.view.lead.last_step.step}  " in fx.screen_text(app)
            # the first line's step text only: its digits, or from the first that moved on (10 -> 960)
            assert {k for k, _ in repaints} == keys
            most = 16 if n < 950 else len("960  b=32  3126 ms/step")
            assert all(1 <= len(a) <= 2 and all(r.height == 1 and r.y == 0 and r.width <= most for r in a)
                       for _, a in repaints), repaints
            repaints.clear()
        newer = stepped(snap, 951, reserved=snap.agents[-1].last_step.reserved * 2)  # the bar line changes
        app.deliver(newer)
        await fx.wait_for(pilot, lambda: app.shown is newer)
        await pilot.pause()
        assert sorted(builds) == sorted(keys)


async def test_a_repaint_reaches_the_screen_without_waking_the_widget_and_falls_back_when_not_shown():
    """tui/repaint.py: a panel's changed cells are drawn at the next screen update with the widget's own message
    task left asleep (no prompt to it, no Update message from it); a widget not shown goes Textual's road."""
    from textual.geometry import Region

    from batchmon.tui.repaint import repaint

    snap = fx.one_gpu(1)
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and app.query(JobPanel))
        await pilot.pause()
        panel = app.query(JobPanel).first()
        prompts, refreshes = [], []
        check_idle, refresh = panel.check_idle, panel.refresh
        panel.check_idle = lambda: (prompts.append(1), check_idle())[1]  # type: ignore[method-assign]
        panel.refresh = lambda *a, **k: (refreshes.append(a), refresh(*a, **k))[1]  # type: ignore[method-assign]
        width = panel.content_size.width
        old = panel.lines(width)[0]
        marked = old.copy()
        marked.right_crop(6)
        marked.append("XQXQXQ")
        panel._cache = (width, panel._version + 1, [marked, *panel.lines(width)[1:]])
        panel._version += 1
        panel._strips_key = None
        repaint(panel, Region(0, 0, panel.size.width, panel.size.height))
        await fx.wait_for(pilot, lambda: "XQXQXQ" in fx.screen_text(app))
        assert prompts == [] and refreshes == []
        panel.display = False
        await pilot.pause()
        before = len(refreshes)
        repaint(panel, Region(0, 0, 4, 1))
        assert refreshes[before:] == [(Region(0, 0, 4, 1),)]  # hidden: Widget.refresh, as before


async def test_a_compact_title_whose_step_alone_changed_gets_the_strip_a_fresh_render_gives(monkeypatch):
    """job_panel.step_strip: the short road's new title strip (the old strip's cells before the step text, the new
    step text in the old one's style) is, segment for segment, what LineStrips renders for the new line."""
    from dataclasses import replace

    from batchmon.tui import job_panel
    from batchmon.tui.line_strip import LineStrips

    made = []
    real = job_panel.step_strip

    def checked(old, line, cut, new):
        strip = real(old, line, cut, new)
        made.append(strip)
        return strip

    monkeypatch.setattr(job_panel, "step_strip", checked)
    snap = fx.many()
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=(160, 48)) as pilot:
        shown = await _compact_single_panels(app, pilot)
        keys = {p.view.lead.key for p in shown}
        for n in (1, 2, 3, 950):
            agents = [replace(a, last_step=replace(a.last_step, step=a.last_step.step + n)) if a.key in keys else a
                      for a in snap.agents]
            newer = replace(snap, agents=tuple(agents), time=snap.time + n)
            app.deliver(newer)
            await fx.wait_for(pilot, lambda: app.shown is newer)
            await pilot.pause()
            for p in shown:
                width = p.content_size.width
                fresh = LineStrips().strip(p, p.lines(width)[0], width, p.visual_style)
                assert p._strips[0] is not None and fresh is not None
                assert p._strips[0]._segments == fresh._segments
                assert p._strips[0].cell_length == fresh.cell_length
    assert sum(s is not None for s in made) >= 3 * len(shown), made
