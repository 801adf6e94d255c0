"""The fit advisor in the monitor: the pure view (advisor_lines) and the real app (b, type a target, the ranked
ways to fit it, Enter applies the batch). Real Textual, real memory model, tests/tui_fixtures.py snapshots."""

from __future__ import annotations


from textual.widgets import Input, Static

import tui_fixtures as fx
from batchmon.memory_model import advise
from batchmon.tui.advisor import AdvisorInput, AdvisorPrompt, advisor_input, advisor_lines
from batchmon.tui.app import BatchmonApp
from batchmon.tui.job_panel import JobPanel
from batchmon.tui.screens import BatchPrompt

WIDE = (160, 48)


def _job_input(snap) -> AdvisorInput:
    app = BatchmonApp(snapshot=snap)
    key, ranks = __import__("batchmon.tui.views", fromlist=["ordered_jobs"]).ordered_jobs(snap)[0]
    return advisor_input(app._job_view(snap, key, ranks))


def test_view_lists_every_ranked_way_with_its_batch_and_cost():
    inp = _job_input(fx.one_gpu(1))
    assert inp.model is not None and inp.device_total == fx.H200_TOTAL
    plain = inp.model.max_batch(inp.device_total)
    target = 3 * plain
    advice = advise(inp.model, capacity=inp.device_total, target_batch=target)
    lines = [line.plain for line in advisor_lines(inp, target)]
    assert lines[0].startswith(f"Ways to fit batch {target} on ")
    reach = [a for a in advice if a.fits_target]
    assert reach, "a target 3x the plain largest batch is reachable with accumulation"
    first = next(line for line in lines if line.startswith(" ✓ "))
    assert reach[0].what_if in first and f"largest {reach[0].max_batch:>7}" in first
    assert f"×{reach[0].step_time_factor:.2f}" in first
    if any(not a.fits_target for a in advice[:10]):
        assert any(line.startswith("Not enough for") for line in lines)
        assert all(" ✓ " not in line for line in lines[lines.index(next(x for x in lines
                                                                          if x.startswith("Not enough"))):])
    assert any(reach[0].factor_basis in line for line in lines)


def test_view_without_target_model_or_device_says_so():
    inp = _job_input(fx.one_gpu(1))
    lines = [line.plain for line in advisor_lines(inp, None)]
    assert lines[0].startswith("Largest batch per cost") and any(" · " in line for line in lines)
    assert "No memory model yet" in advisor_lines(AdvisorInput(None, fx.H200_TOTAL), 8)[0].plain
    assert "No device size" in advisor_lines(AdvisorInput(inp.model, None), 8)[0].plain


async def test_b_opens_the_advisor_ranks_as_you_type_and_enter_applies_the_batch():
    snap = fx.one_gpu(1)
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: app.query(JobPanel))
        await pilot.press("b")
        await fx.wait_for(pilot, lambda: isinstance(app.screen, AdvisorPrompt))
        assert isinstance(app.screen, BatchPrompt)  # the batch prompt it always was, with the advice under it
        inp = app.screen.advisor
        target = 3 * inp.model.max_batch(inp.device_total)
        app.screen.query_one(Input).value = ""
        await pilot.press(*str(target))
        await fx.wait_for(pilot, lambda: app.screen.shown_target == target)
        advice = advise(inp.model, capacity=inp.device_total, target_batch=target)
        text = fx.screen_text(app)
        assert f"Ways to fit batch {target}" in text
        assert advice[0].what_if[:40] in text and str(advice[0].max_batch) in text
        shown = str(app.screen.query_one("#advice", Static).render())
        assert f"×{advice[0].step_time_factor:.2f}" in shown
        await pilot.press("enter")
        await fx.wait_for(pilot, lambda: not isinstance(app.screen, BatchPrompt))
        key = list(app.query(JobPanel))[0].view.key
        assert app.what_ifs[key].batch_size == target




def test_advisor_with_a_target_batch_snapshot(snap_compare, utc):
    """The advisor over the real H200 recording of two jobs, for a target twice the first job's largest batch.
    Update after an intended change with: pytest tests/test_tui_advisor.py --snapshot-update"""
    snap = fx.recorded_or("tui_h200_two_jobs.jsonl", lambda: fx.one_gpu(2))

    async def run_before(pilot) -> None:
        await fx.wait_for(pilot, lambda: pilot.app.query(JobPanel))
        await pilot.press("b")
        await fx.wait_for(pilot, lambda: isinstance(pilot.app.screen, AdvisorPrompt))
        inp = pilot.app.screen.advisor
        target = 2 * (inp.model.max_batch(inp.device_total) or 1)
        pilot.app.screen.query_one(Input).value = str(target)
        await fx.wait_for(pilot, lambda: pilot.app.screen.shown_target == target)

    assert snap_compare(BatchmonApp(snapshot=snap, title=None), terminal_size=(160, 48), run_before=run_before)
