"""Memory over time, drawn without Textual: the job timeline (stacked components over steps) shows a leak and
names it, columns are step-aligned (a new step changes the last column only), the GPU history has an axis in
the tables' units; and in the app, the timeline fills the GPU column's free rows at 160×48."""

from __future__ import annotations

import tui_fixtures as fx
from batchmon.protocol import Step
from batchmon.tui.app import BatchmonApp
from batchmon.tui.timeline import changes, history_lines, steps_per_column, timeline_columns, timeline_lines
from batchmon.tui.timeline_panel import TimelinePanel

MiB = 1 << 20


def leaky(n: int, leak_per_step: int = 4 * MiB) -> list[Step]:
    """A run whose 'other' grows every step (a list of loss tensors kept alive): the creep a user looks for."""
    out = []
    for i in range(n):
        comps = {"parameters": 400 * MiB, "gradients": 400 * MiB, "optimizer": 800 * MiB,
                 "activations": 2000 * MiB, "batch": MiB, "other": 100 * MiB + i * leak_per_step}
        peak = sum(comps.values())
        out.append(Step(step=i, time=1000.0 + i, step_seconds=0.1, batch_size=16, components=comps,
                        allocated=peak // 2, peak_allocated=peak, reserved=peak + 64 * MiB,
                        num_alloc_retries=0, num_ooms=0, device_used=peak + 64 * MiB + 500 * MiB))
    return out


def test_a_leak_rises_in_the_timeline_and_is_named():
    steps = leaky(400)
    cols = timeline_columns(steps, 50)
    assert len(cols) <= 50 and cols[0].first == 0 and cols[-1].last >= 399
    assert cols[-1].total > cols[0].total + 1000 * MiB  # the stack rises
    (change, *others) = changes(cols)
    assert change.name == "other" and change.rising and change.last - change.first > 1000 * MiB and not others
    text = "\n".join(line.plain for line in timeline_lines(steps, 60, 10, device_total=140 << 30))
    last_column = timeline_columns(steps, 51)[-1].first  # the axis ends where the last column starts
    assert "moved: other +" in text and "step 0" in text and str(last_column) in text and "GiB" in text
    rows = timeline_lines(steps, 60, 10)[2:12]
    heights = [sum(1 for r in rows if len(r.plain) > 9 + c and r.plain[9 + c] != " ") for c in (0, len(cols) - 1)]
    assert heights[1] > heights[0]  # the last column is taller than the first


def test_a_steady_run_says_so_and_a_new_step_changes_only_the_last_column():
    steps = leaky(200, leak_per_step=0)
    assert changes(timeline_columns(steps, 40)) == []
    assert "steady" in timeline_lines(steps, 60, 8)[1].plain
    n = steps_per_column(0, 151, 40)
    before = timeline_columns(steps[:151], 40)  # the last column holds steps 144..150 of 144..151
    after = timeline_columns(steps[:152], 40)
    assert n == 8 and len(after) == len(before) and before[:-1] == after[:-1]
    assert len(timeline_columns(steps[:153], 40)) == len(before) + 1  # a new column starts at step 152


def test_a_leak_freed_every_epoch_is_a_range_not_a_rise():
    steps = [s for _ in range(4) for s in leaky(100)]
    renumbered = []
    for i, s in enumerate(steps):
        d = {k: v for k, v in vars(s).items() if k != "type"}
        d["step"] = i
        renumbered.append(Step(**d))
    cols = timeline_columns(renumbered, 40)  # 10 steps a column: the sawtooth of 'other', epoch by epoch
    (change, *_) = changes(cols)
    assert change.name == "other" and not change.rising and change.high - change.low > 300 * MiB
    assert "other " in change.text() and "–" in change.text()


def test_the_gpu_history_is_rows_with_an_axis_in_gib():
    lines = history_lines([i << 30 for i in range(100)], 60, 5, maximum=140 << 30)
    assert len(lines) == 5 and "140 GiB" in lines[0].plain and all(len(ln.plain) <= 60 for ln in lines)
    assert lines[-1].plain.rstrip().endswith("█")  # the latest sample at the right, the bottom row full


async def test_the_timeline_fills_the_gpu_column_at_160x48():
    snaps = fx.series(20, n_agents=2)
    app = BatchmonApp(snapshot=snaps[-1])
    app.add_history(snaps[:-1])
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: "memory over steps" in fx.screen_text(app))
        panel = app.query_one(TimelinePanel)
        assert panel.display and panel.rows >= 8
        text = fx.screen_text(app)
        lines = text.splitlines()
        title = next(i for i, line in enumerate(lines) if "memory over steps" in line)
        assert "train.py --model gpt-medium" in lines[title - 1]  # the selected job's
        await pilot.press("down")  # the other job: the timeline follows the selection
        await fx.wait_for(pilot, lambda: "finetune.py" in (panel.job_name or ""))


async def test_no_timeline_at_80x24():
    app = BatchmonApp(snapshot=fx.one_gpu(2))
    async with app.run_test(size=(80, 24)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and "largest batch" in fx.screen_text(app))
        assert "memory over steps" not in fx.screen_text(app)


async def test_new_steps_redraw_the_timeline_at_most_every_five_seconds():
    snaps = fx.series(5)
    app = BatchmonApp(snapshot=snaps[0])
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: "memory over steps" in fx.screen_text(app))
        panel = app.query_one(TimelinePanel)
        agent = snaps[0].agents[0]
        later = snaps[1].agents[0]  # the same job, one more step
        panel.show(agent, "job", None, 8, now=100.0)
        drawn = panel._signature
        panel.show(later, "job", None, 8, now=104.5)
        assert panel._signature == drawn and panel.agent is agent  # within MIN_REDRAW_S: not redrawn
        panel.show(later, "job", None, 8, now=105.0)
        assert panel._signature != drawn and panel.agent is later
        panel.show(later, "job", None, 12, now=105.1)  # other rows: at once
        assert panel.rows == 12


def test_the_gpu_history_keeps_one_sample_per_five_seconds():
    import dataclasses

    base = fx.one_gpu(1)
    quick = [dataclasses.replace(base, time=fx.T0 + i * 0.5) for i in range(24)]  # 12 s at 2 snapshots a second
    app = BatchmonApp(snapshot=quick[-1])
    app.add_history(quick[:-1])
    (samples,) = app.history.values()
    assert fx.T0 % 5 == 0 and len(samples) == 3  # 0-5 s, 5-10 s, 10-12 s: the picture shifts every 5 s
