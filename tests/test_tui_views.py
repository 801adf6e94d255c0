"""tui/views.py without a terminal: what each panel shows is a plain function of the snapshot (and of the
what-if keys), so it is tested here without Textual running."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import tui_fixtures as fx
from batchmon.memory_model import WhatIf
from batchmon.tui import views
from batchmon.tui.predict import Predictor
from batchmon.tui.state import WhatIfState


def test_views_import_no_textual():
    code = "import sys, batchmon.tui.views; print(sorted(m for m in sys.modules if m.split('.')[0] == 'textual'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_device_views_mark_agent_processes_and_carry_history():
    snap = fx.one_gpu(2)
    key = views.history_key(snap, snap.nvml.devices[0])
    ((got_key, view),) = views.device_views(snap, {key: [1, 2, 3]})
    assert got_key == key and view.history == [1, 2, 3] and view.host == ""
    assert {row.pid: row.agent for row in view.procs} == {4242: True, 5151: True, 777: False}
    assert dict(views.memory_samples(snap)) == {key: snap.nvml.devices[0].memory.used}


def test_host_views_only_for_boxes_without_a_gpu():
    assert views.host_views(fx.one_gpu(1), any_gpu=True) == []
    (only,) = views.host_views(fx.no_gpu(), any_gpu=False)
    assert only[0] == "host:" and only[1].host == "" and not only[1].nvml.available


def test_ordered_jobs_lead_gpu_then_pid_and_job_view_predicts_under_the_what_if():
    snap = fx.many()
    jobs = views.ordered_jobs(snap)
    assert len(jobs) == 9 and len(jobs[0][1]) == 8  # the 8-rank torchrun job (GPU 0) first, then one per run
    key, ranks = jobs[0]
    predictor = Predictor()
    plain = views.job_view(snap, key, ranks, WhatIfState(), predictor)
    assert plain.observed_batch == 8 and plain.prediction is not None and plain.prediction.batch_size == 8
    assert plain.chart is not None and plain.chart.observed and plain.notes == []
    assert plain.chart.predict(8) == plain.prediction.total
    bigger = views.job_view(snap, key, ranks, WhatIfState().with_batch(32), predictor)
    assert bigger.prediction is not None and bigger.prediction.total > plain.prediction.total
    assert views.job_signature(bigger) != views.job_signature(plain)
    assert views.job_signature(views.job_view(snap, key, ranks, WhatIfState(), predictor)) == \
        views.job_signature(plain)
    assert views.job_on_device({key: plain}, plain.devices[plain.lead.key]) == key


def test_a_job_without_steps_waits_and_has_no_chart():
    snap = fx.one_gpu(1)
    bare = dataclasses.replace(snap.agents[0], last_step=None, history=())
    view = views.job_view(snap, "k", [bare], WhatIfState(), Predictor())
    assert view.prediction is None and view.chart is None and view.observed_batch is None


def test_what_if_state_is_the_models_what_if_plus_the_keys():
    state = WhatIfState().toggle_amp().cycle_accumulation().cycle_optimizer()
    assert isinstance(state, WhatIf)
    assert state.to_what_if(16) == WhatIf(batch_size=16, amp=True, accumulation_steps=2, optimizer="sgd")
    assert state.to_what_if(16, 64).batch_size == 64 and state.describe() == "AMP, accum 2, sgd"
    assert WhatIfState().is_default and not state.is_default


def test_job_panel_names_where_the_batch_size_comes_from():
    """Issue 12: a sequence-first model's batch is found in dim 1; the panel says so next to the figure."""
    from batchmon.tui.job_panel import job_lines

    snap = fx.one_gpu(1)
    agent = snap.agents[0]
    seq_first = dataclasses.replace(agent.last_step, batch_source="input dim 1 (LSTM batch_first=False)")
    shown = dataclasses.replace(agent, last_step=seq_first)
    view = views.job_view(snap, "k", [shown], WhatIfState(), Predictor())
    text = "\n".join(line.plain for line in job_lines(view, 160, "full"))
    assert f"batch {seq_first.batch_size} (input dim 1 (LSTM batch_first=False))" in text
    plain = views.job_view(snap, "k", [agent], WhatIfState(), Predictor())
    assert "(input dim" not in "\n".join(line.plain for line in job_lines(plain, 160, "full"))
