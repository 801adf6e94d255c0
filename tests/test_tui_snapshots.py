"""SVG snapshots of the main screens (pytest-textual-snapshot): fixed size, fixed snapshot time, UTC clock.

Update after an intended change with: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations


import pytest

import tui_fixtures as fx
from batchmon.tui.app import BatchmonApp


pytestmark = pytest.mark.usefixtures("utc")  # conftest: the header's clock in UTC for every SVG here


def app_for(snapshot) -> BatchmonApp:
    return BatchmonApp(snapshot=snapshot, title=None)


def test_one_gpu_two_jobs(snap_compare):
    snap = fx.recorded_or("tui_h200_two_jobs.jsonl", lambda: fx.one_gpu(2))
    assert snap_compare(app_for(snap), terminal_size=(160, 48))


def test_eight_gpus_sixteen_agents(snap_compare):
    snap = fx.recorded_or("tui_h200_16_agents.jsonl", fx.many)
    assert snap_compare(app_for(snap), terminal_size=(160, 48))


def test_eight_gpus_sixteen_agents_compact(snap_compare):
    snap = fx.recorded_or("tui_h200_16_agents.jsonl", fx.many)
    assert snap_compare(app_for(snap), terminal_size=(80, 24))


def test_what_if_larger_batch_amp_checkpointing(snap_compare):
    snap = fx.recorded_or("tui_h200_one_job.jsonl", lambda: fx.one_gpu(1))
    assert snap_compare(app_for(snap), terminal_size=(160, 48), press=["plus", "plus", "a", "c"])


def test_no_gpu(snap_compare):
    assert snap_compare(app_for(fx.no_gpu()), terminal_size=(120, 36))


def test_no_agents(snap_compare):
    snap = fx.recorded_or("tui_h200_no_agents.jsonl", fx.no_agents)
    assert snap_compare(app_for(snap), terminal_size=(120, 36))


def test_two_jobs_live_with_memory_over_time(snap_compare):
    """Two jobs on one H200, the GPT's timeline under the GPU and a 6-row GPU history (issue 16 point 4)."""
    assert snap_compare(fx.recorded_app("tui_h200_two_jobs.jsonl"), terminal_size=(160, 48))


def test_timeline_after_a_long_run(snap_compare):
    """1600 ResNet-18 steps with a logits leak freed every epoch: the sawtooth of 'other' in the timeline."""
    assert snap_compare(fx.recorded_app("tui_h200_long_run.jsonl"), terminal_size=(160, 48))


def test_oom_post_mortem(snap_compare):
    """The GPT OOM on the H200: the recording's end, the run ended by the OOM and kept on screen."""
    assert snap_compare(fx.recorded_app("agent_h200_oom.jsonl", index=-1), terminal_size=(160, 48))


def test_torchrun_job(snap_compare):
    assert snap_compare(fx.recorded_app("ddp_h200_run.jsonl"), terminal_size=(160, 48))


def test_component_table_at_80x24(snap_compare):
    assert snap_compare(fx.recorded_app("tui_h200_two_jobs.jsonl"), terminal_size=(80, 24))


def test_help_screen(snap_compare):
    assert snap_compare(app_for(fx.one_gpu(1)), terminal_size=(120, 40), press=["question_mark"])


def test_job_panel_with_the_peaks_phase(snap_compare):
    """Issue 16 point 4, from the H200 recording with the peak's phase (a CNN and a GPT side by side): the GPT job
    selected, where in the step its peak was reached one line under the summary; bars and totals where they were."""
    assert snap_compare(fx.recorded_app("tui_h200_peak_phase.jsonl"), terminal_size=(160, 48), press=["down"])


def test_job_panel_with_the_peaks_phase_at_80x24(snap_compare):
    assert snap_compare(fx.recorded_app("tui_h200_peak_phase.jsonl"), terminal_size=(80, 24))
