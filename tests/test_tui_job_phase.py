"""The job panel's line for the peak's phase within the step (issue 16 point 4): the real Textual app on
snapshots from the real HubState (tests/phase_fixtures.py): one short line, the longest form that fits, that
never moves a bar or a total; nothing for a run (or a recording) without a sampled step."""

from __future__ import annotations

import dataclasses

import pytest

import phase_fixtures as pf
import tui_fixtures as fx
from batchmon.snapshot import RunEnd
from batchmon.tui.app import BatchmonApp
from batchmon.tui.ended_panel import ended_lines
from batchmon.tui.job_panel import job_lines
from batchmon.tui.predict import Predictor
from batchmon.tui.state import WhatIfState
from batchmon.tui import views


def the_job(snap):
    ((key, ranks),) = views.ordered_jobs(snap)
    return views.job_view(snap, key, ranks, WhatIfState(), Predictor())


@pytest.mark.parametrize("level", ["full", "medium"])
@pytest.mark.parametrize("width", [40, 60, 78, 100, 156])
def test_the_phase_line_fits_and_leaves_every_other_line_as_it_was(width, level):
    with_phase = [t.plain for t in job_lines(the_job(pf.run_with_phases()), width, level)]
    without = [t.plain for t in job_lines(the_job(pf.run_with_phases(sample_every=None)), width, level)]
    (phase,) = [line for line in with_phase if "peak in backward" in line]
    assert len(phase) <= width and "…" not in phase
    assert with_phase[:with_phase.index(phase)] == without[:with_phase.index(phase)]  # bars and totals unmoved
    at = with_phase.index(phase)
    if level == "full":  # a tall panel: the line is added, the rest follows unchanged
        assert with_phase[at + 1:] == without[at:]
    else:  # the short terminal's panel: the chart gives the line one of its rows, the panel keeps its height
        assert len(with_phase) == len(without)
    if width >= 100:
        assert phase.strip() == "peak in backward (forward 35.3 GiB → backward 38.0 GiB → step 38.0 GiB)  step 37"
    elif width >= 78:
        assert phase.strip() == "peak in backward (fwd 35.3 → bwd 38.0 → step 38.0 GiB)  step 37"


def test_a_sample_at_the_step_shown_names_no_step():
    lines = [t.plain for t in job_lines(the_job(pf.run_with_phases(last_sampled=True)), 156, "full")]
    assert "  peak in backward (forward 35.3 GiB → backward 38.0 GiB → step 38.0 GiB)" in lines


def test_a_sample_at_another_batch_size_names_it():
    snap = pf.run_with_phases()
    (agent,) = snap.agents
    other = dataclasses.replace(agent, phases=dataclasses.replace(agent.phases, batch_size=8))
    view = views.job_view(dataclasses.replace(snap, agents=(other,)), "k", [other], WhatIfState(), Predictor())
    lines = [t.plain for t in job_lines(view, 156, "full")]
    assert any(line.endswith("GiB)  step 37 b=8") for line in lines)


def test_the_compact_level_stays_two_lines():
    assert len(job_lines(the_job(pf.run_with_phases()), 100, "compact")) == 2


def test_an_ended_run_says_its_last_sampled_step():
    snap = pf.run_with_phases()
    (agent,) = snap.agents
    end = RunEnd(fx.T0 + 1, "exited", "exited", 40, agent.phases.peaks["optimizer"])
    ended = dataclasses.replace(agent, state="ended", ended=end)
    view = views.job_view(dataclasses.replace(snap, agents=(ended,)), "k", [ended], WhatIfState(), Predictor())
    lines = [t.plain for t in ended_lines(view, "train.py", 80, "full")]
    assert any(line.startswith("  last sampled step 37 (batch 16): peak in backward") and len(line) <= 80 for line in lines)
    assert not any("sampled" in t.plain for t in ended_lines(view, "train.py", 80, "compact"))


@pytest.mark.parametrize("size", [(80, 24), (160, 48)])
async def test_the_app_shows_the_phase_without_cutting_a_bar_or_a_total(size):
    app = BatchmonApp(snapshot=pf.run_with_phases())
    async with app.run_test(size=size) as pilot:
        await fx.wait_for(pilot, lambda: "peak in backward" in fx.screen_text(app))
        screen = fx.screen_text(app).splitlines()
        (phase,) = [line for line in screen if "peak in backward" in line]
        assert "step 37" in phase and "…" not in phase.split("peak in backward")[1]
        bars = [line for line in screen if "measured b=16" in line or "pred b=16" in line]
        assert len(bars) == 2 and all("40.0 GiB" in line for line in bars)


async def test_the_phase_line_follows_new_sampled_steps():
    app = BatchmonApp(snapshot=pf.run_with_phases(steps=40))
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: "step 37" in fx.screen_text(app))
        app.deliver(pf.run_with_phases(steps=40, last_sampled=True))
        await fx.wait_for(pilot, lambda: "peak in backward" in fx.screen_text(app)
                          and "GiB)  step" not in fx.screen_text(app))


async def test_a_recording_from_before_the_field_shows_no_phase_and_no_none():
    app = fx.recorded_app("tui_h200_two_jobs.jsonl")
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: "measured b=" in fx.screen_text(app))
        screen = fx.screen_text(app)
        assert "peak in" not in screen and "None" not in screen and "step peak" not in screen
