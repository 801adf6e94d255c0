"""The monitor on the recorded two-GPU torchrun job: one panel for the job, a line per rank with its components,
and the imbalance between the ranks (real Textual, headless; the recording is real agent output from two H200s)."""

from __future__ import annotations

import re

import pytest

import tui_fixtures as fx
from batchmon.tui.app import BatchmonApp
from batchmon.jobs import imbalance_text
from batchmon.tui.fmt import fmt_bytes
from batchmon.tui.job_panel import JobPanel
from batchmon.tui.predict import measured_components
from test_h200_recordings import DDP_RECORDINGS, ddp_job


@pytest.mark.parametrize("name", DDP_RECORDINGS)
async def test_one_panel_per_job_with_rank_lines_and_imbalance(name):
    snap, job = ddp_job(name)
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) >= 1)
        panels = [p for p in app.query(JobPanel) if len(p.view.ranks) == 2]
        assert len(panels) == 1 and [a.key for a in panels[0].view.ranks] == [a.key for a in job.ranks]
        text = fx.screen_text(app)
        assert "2/2 ranks" in text
        for agent in job.ranks:
            total = sum(measured_components(agent.last_step).values())  # the bar: components, cache, context
            line = next(ln for ln in text.splitlines() if re.search(rf"rank {agent.hello.rank}\s+pid {agent.hello.pid}", ln))
            assert fmt_bytes(total) in line and f"step {agent.last_step.step}" in line
        expected = imbalance_text(job.imbalance())
        assert expected[:60] in text and "rank 1 over rank 0" in text
