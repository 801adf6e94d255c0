"""A job panel's component table beside its chart is laid out once while what it shows reads the same (the same
lines, shared, not copies), and anew when a measured component or the prediction changes
(tui/job_panel._table_beside_chart)."""

from __future__ import annotations

from dataclasses import replace

import pytest

import tui_fixtures as fx
from batchmon.tui import job_panel
from batchmon.tui.app import BatchmonApp
from batchmon.tui.job_panel import JobPanel, job_lines

pytestmark = pytest.mark.usefixtures("utc")


async def test_the_table_beside_the_chart_is_reused_while_it_reads_the_same(monkeypatch):
    app = BatchmonApp(snapshot=fx.one_gpu(1), title=None)
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and app.query(JobPanel))
        view = app.query_one(JobPanel).view
        assert view.chart is not None and view.chart.key is not None
        width = 100
        first = job_lines(view, width, "full")
        tables = []
        table = job_panel._table
        monkeypatch.setattr(job_panel, "_table", lambda *a: (tables.append(a), table(*a))[1])
        again = job_lines(view, width, "full")
        assert tables == [] and again == first
        # the block's lines are the very ones of the first build (no copies), as are the other lines kept by what
        # they show (tui/kept.py); the stats line (the step counter) is made anew
        shared = [a is b for a, b in zip(again, first)]
        assert sum(shared) >= len(table(view, None)) and not shared[1]
        # another step with more activations: the table is laid out again and shows it
        step = view.lead.last_step
        comps = dict(step.components, activations=step.components["activations"] + 3 * 2**30)
        lead = replace(view.lead, last_step=replace(step, step=step.step + 1, components=comps))
        moved = replace(view, ranks=[lead, *view.ranks[1:]])
        changed = job_lines(moved, width, "full")
        assert len(tables) == 1 and changed != first
        assert "\n".join(line.plain for line in changed) != "\n".join(line.plain for line in first)
