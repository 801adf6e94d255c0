"""Pilot tests of the monitor: every key changes the state it should and the screen shows it.

Real Textual (run_test, headless), real memory model, Snapshots built from tests/tui_fixtures.py.
"""

from __future__ import annotations

import threading
import time

import pytest
from textual.widgets import Input

import tui_fixtures as fx
from batchmon import memory_model
from batchmon.monitor import step_history
from batchmon.memory_model import WhatIf
from batchmon.tui.app import BatchmonApp
from batchmon.tui.fmt import fmt_bytes
from batchmon.tui.gpu_panel import GpuPanel
from batchmon.tui.job_panel import JobPanel
from batchmon.tui.messages import SnapshotArrived
from batchmon.tui.screens import BatchPrompt, HelpScreen
from list_source import ListSource
from batchmon.tui.state import WhatIfState

WIDE = (160, 48)


def expected(snap, what_if: WhatIf, agent_index: int = 0):
    """The memory model's own answer for an agent of the snapshot (what the panel must show): fitted, as the
    hub fits its prediction, on the reference summary of the history (step_history.model_steps)."""
    a = snap.agents[agent_index]
    model = memory_model.fit(step_history.model_steps(tuple(a.history)), optimizer=a.hello.optimizer)
    dev = snap.device_of(a)
    return model.predict(what_if, device_total=dev.memory.total if dev else None)


def job_key(app: BatchmonApp, index: int = 0) -> str:
    return list(app.query(JobPanel))[index].view.key


def state_of(app: BatchmonApp, index: int = 0) -> WhatIfState:
    return app.what_ifs.get(job_key(app, index), WhatIfState())


async def test_one_gpu_screen_shows_device_process_breakdown_and_prediction():
    snap = fx.one_gpu(1)
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and app.query(JobPanel))
        text = fx.screen_text(app)
        pred = expected(snap, WhatIf(batch_size=16))
        assert "GPU 0" in text and "H200" in text and "driver 570.124.06" in text
        assert "train.py --model gpt-medium --batch-size 16" in text
        assert "4242" in text and "python -m jupyter kernel" in text  # process rows, agent and foreign
        assert f"largest batch {pred.max_batch}" in text
        assert fmt_bytes(pred.headroom) in text
        for name in ("parameters", "gradients", "optimizer", "activations", "batch", "other", "cache", "context"):
            assert name in text
        assert "device limit" in text and f"max {pred.max_batch}" in text  # the chart and its legend
        assert "● live" in text and "every 1 s" in text


async def test_plus_minus_step_the_what_if_batch_and_the_prediction_follows():
    snap = fx.one_gpu(1)
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: app.query(JobPanel))
        await pilot.press("plus")
        assert state_of(app).batch_size == 24
        text = fx.screen_text(app)
        assert "pred b=24" in text
        assert fmt_bytes(expected(snap, WhatIf(batch_size=24)).total) in text
        await pilot.press("minus", "minus")
        assert state_of(app).batch_size == 12
        assert "pred b=12" in fx.screen_text(app)
        await pilot.press("equals_sign")  # '=' is + without shift
        assert state_of(app).batch_size == 16


async def test_b_prompts_for_a_batch_size_rejects_nonsense_and_escape_cancels():
    snap = fx.one_gpu(1)
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: app.query(JobPanel))
        await pilot.press("b")
        await fx.wait_for(pilot, lambda: isinstance(app.screen, BatchPrompt))
        inp = app.screen.query_one(Input)
        inp.value = ""
        await pilot.press("0", "enter")
        assert isinstance(app.screen, BatchPrompt)  # stays open with an error
        assert "not a batch size" in fx.screen_text(app)
        inp.value = ""
        await pilot.press("1", "0", "0", "enter")
        await fx.wait_for(pilot, lambda: not isinstance(app.screen, BatchPrompt))
        assert state_of(app).batch_size == 100
        pred = expected(snap, WhatIf(batch_size=100))
        text = fx.screen_text(app)
        assert "pred b=100" in text and "WILL NOT FIT" in text if pred.headroom < 0 else "pred b=100" in text
        await pilot.press("b")
        await fx.wait_for(pilot, lambda: isinstance(app.screen, BatchPrompt))
        await pilot.press("escape")
        await fx.wait_for(pilot, lambda: not isinstance(app.screen, BatchPrompt))
        assert state_of(app).batch_size == 100


async def test_what_if_toggles_amp_checkpointing_accumulation_optimizer_and_reset():
    snap = fx.one_gpu(1)
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: app.query(JobPanel))
        panel = app.query_one(JobPanel)
        await pilot.press("a")
        assert state_of(app).amp is True
        assert "AMP on" in fx.screen_text(app)
        amp = expected(snap, WhatIf(batch_size=16, amp=True))
        assert panel.view.prediction.components == amp.components
        assert fmt_bytes(amp.components["activations"]) in fx.screen_text(app)

        await pilot.press("c")
        assert state_of(app).checkpointing is True
        assert "ckpt on" in fx.screen_text(app)
        both = expected(snap, WhatIf(batch_size=16, amp=True, checkpointing=True))
        assert panel.view.prediction.total == both.total < amp.total

        seen = []
        for _ in range(4):
            await pilot.press("g")
            seen.append(state_of(app).accumulation_steps)
        assert seen == [2, 4, 8, 1]
        await pilot.press("g")
        assert "accum 2" in fx.screen_text(app)

        optimizers = []
        for _ in range(4):
            await pilot.press("o")
            optimizers.append(state_of(app).optimizer)
            if optimizers[-1]:
                assert f"optim {optimizers[-1]}" in fx.screen_text(app)
        assert optimizers == ["sgd", "sgd-momentum", "adam", None]
        await pilot.press("o")  # sgd: no optimizer state
        assert panel.view.prediction.components["optimizer"] == 0

        await pilot.press("r")
        assert state_of(app) == WhatIfState()
        assert panel.view.prediction.total == expected(snap, WhatIf(batch_size=16)).total


async def test_pause_freezes_the_display_and_resume_shows_the_latest():
    snaps = fx.series(3)
    app = BatchmonApp(snapshot=snaps[0])
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: app.shown is snaps[0])
        await pilot.press("p")
        assert app.paused and "PAUSED" in fx.screen_text(app)
        app.deliver(snaps[1])
        await fx.wait_for(pilot, lambda: app.latest is snaps[1])
        await pilot.pause(0.3)  # a frame would be due by now if pause did not hold it
        assert app.shown is snaps[0]
        assert f"step {snaps[0].agents[0].last_step.step}" in fx.screen_text(app)
        await pilot.press("p")
        await fx.wait_for(pilot, lambda: app.shown is snaps[1])
        assert not app.paused and "● live" in fx.screen_text(app)
        assert f"step {snaps[1].agents[0].last_step.step}" in fx.screen_text(app)


async def test_interval_keys_change_the_source_interval_and_header():
    source = ListSource([fx.one_gpu(1)], interval=1.0)
    app = BatchmonApp(source, interval=1.0)
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: app.shown is not None)
        await pilot.press("left_square_bracket")
        assert app.interval == 0.5 and source.interval == 0.5
        assert "every 500 ms" in fx.screen_text(app)
        await pilot.press("right_square_bracket", "right_square_bracket")
        assert app.interval == 2.0 and source.interval == 2.0
        assert "every 2 s" in fx.screen_text(app)
        await pilot.press("i")
        assert app.interval == 5.0 and source.interval == 5.0


async def test_help_lists_every_key_and_closes():
    app = BatchmonApp(snapshot=fx.one_gpu(1))
    async with app.run_test(size=WIDE) as pilot:
        await pilot.press("question_mark")
        await fx.wait_for(pilot, lambda: isinstance(app.screen, HelpScreen))
        text = fx.screen_text(app)
        for binding in app.BINDINGS:
            for key in binding.key.split(","):
                assert app.get_key_display(type(binding)(key, binding.action)) in text, key
        assert "tab" in text and "mouse" in text
        await pilot.press("escape")
        await fx.wait_for(pilot, lambda: not isinstance(app.screen, HelpScreen))


async def test_q_quits_with_exit_code_zero():
    app = BatchmonApp(snapshot=fx.one_gpu(1))
    async with app.run_test(size=WIDE) as pilot:
        await pilot.press("q")
        await fx.wait_for(pilot, lambda: app._exit_renderables is not None or not app.is_running)
    assert app.return_code == 0


async def test_arrows_tab_and_click_select_devices_and_processes():
    snap = fx.many()
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: isinstance(app.focused, JobPanel))
        jobs = list(app.query(JobPanel))
        assert app.focused is jobs[0] and jobs[0].level == "full" and jobs[1].level == "compact"
        await pilot.press("down")
        assert app.focused is jobs[1] and jobs[1].level == "full" and jobs[0].level == "compact"
        await pilot.press("up")
        assert app.focused is jobs[0]
        await pilot.press("down", "down")  # sweep trial 1 runs on GPU 1
        await pilot.press("left")
        assert isinstance(app.focused, GpuPanel) and app.focused.view.device.index == 1
        assert app.focused.level == "full"
        await pilot.press("down")
        assert app.focused.view.device.index == 2
        await pilot.press("right")
        assert isinstance(app.focused, JobPanel)
        assert app.focused.view.devices[app.focused.view.lead.key].index in (2,) or "pretrain" in app.focused.view.key
        # what-if keys act on the selected job only
        await pilot.press("plus")
        selected = app.focused.view.key
        assert app.what_ifs.get(selected) is not None
        assert all(k == selected for k in app.what_ifs)
        await pilot.press("tab")
        assert app.focused is not None
        gpu3 = list(app.query(GpuPanel))[3]
        await pilot.click(gpu3)
        assert app.focused is gpu3


async def test_snapshots_from_a_thread_are_coalesced_and_throttled():
    snaps = fx.series(60)
    app = BatchmonApp(snapshot=snaps[0])
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1)
        start_renders, t0 = app.renders, time.monotonic()

        def burst() -> None:
            for s in snaps[1:]:
                app.deliver(s)

        th = threading.Thread(target=burst)
        th.start()
        th.join()
        await fx.wait_for(pilot, lambda: app.shown is snaps[-1])
        elapsed = time.monotonic() - t0
        frames = app.renders - start_renders
        assert frames <= elapsed / 0.25 + 2, (frames, elapsed)  # at most 4 a second (plus the edges)
        assert app.received <= len(snaps)
        assert f"step {snaps[-1].agents[0].last_step.step}" in fx.screen_text(app)


def test_snapshot_messages_replace_older_queued_ones():
    a, b = SnapshotArrived(fx.one_gpu(1)), SnapshotArrived(fx.no_gpu())
    assert a.can_replace(b)
    from textual.events import Key

    assert not a.can_replace(Key("q", "q"))


async def test_no_gpu_shows_reason_host_memory_and_cpu_agent():
    app = BatchmonApp(snapshot=fx.no_gpu())
    async with app.run_test(size=(120, 36)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1)
        text = fx.screen_text(app)
        assert "No GPU visible" in text and "NVML Shared Library Not Found" in text
        assert "187.0 GiB / 2.0 TiB" in text  # host memory
        assert "examples/train_mlp.py" in text and "cpu" in text
        assert "n/a (no device limit)" in text


async def test_no_agents_says_how_to_attach():
    app = BatchmonApp(snapshot=fx.no_agents())
    async with app.run_test(size=(100, 30)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1)
        text = fx.screen_text(app)
        assert "batchmon.attach(model, optimizer)" in text
        assert "batchmon run -- python train.py" in text
        await pilot.press("plus")  # nothing to predict: a notice, no crash
        assert app.what_ifs == {}


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
async def test_many_gpus_and_agents_stay_readable(size):
    snap = fx.many(8, 16)
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=size) as pilot:
        await fx.wait_for(pilot, lambda: len(app.query(JobPanel)) == 9 and "8/8 ranks" in fx.screen_text(app))
        text = fx.screen_text(app)
        assert "pretrain.py --model llama-1b" in text and "8/8 ranks" in text
        if size == (160, 48):
            assert "sweep.py --trial 0" in text
            for i in range(8):
                assert f"GPU {i}" in text
            assert "rank 7" in text and "largest batch" in text and "OOM" in text
        else:  # 80×24: the selected job's component table (two columns) first; the next job one key away
            assert "GPU0" in text and "GPU5" in text
            assert "largest batch" in text and "■ activations" in text and "■ context" in text
            await pilot.press("down")
            await fx.wait_for(pilot, lambda: "sweep.py --trial 0" in fx.screen_text(app))
        for _ in range(9):  # walk every job: each expands in turn without errors
            await pilot.press("down")
        assert "OOM" in fx.screen_text(app) or size == (80, 24)
        lines = fx.screen_text(app).splitlines()
        assert len(lines) == size[1] and all(len(line) <= size[0] for line in lines)


async def test_names_from_agents_and_processes_are_shown_literally():
    app = BatchmonApp(snapshot=fx.one_gpu(1, markup_names=True))
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1)
        text = fx.screen_text(app)
        assert "[bold red]x[/]" in text
        assert "[link=file:///etc]y[/link]" in text


async def test_list_source_drives_the_app_and_stops_with_it():
    snaps = fx.series(5)
    source = ListSource(snaps, interval=0.05)
    app = BatchmonApp(source, interval=0.05)
    async with app.run_test(size=WIDE) as pilot:
        await fx.wait_for(pilot, lambda: app.shown is snaps[-1])
        assert f"step {snaps[-1].agents[0].last_step.step}" in fx.screen_text(app)
    assert source._stop.is_set()


def odd_snapshot():
    """Everything a driver or an agent may leave out: a lost GPU, NA fields, an agent without steps, a gone one."""
    from dataclasses import replace

    from batchmon.probes.nvml import DeviceSample, GpuProcess

    base = fx.one_gpu(2)
    lost = DeviceSample(index=1, name="NVIDIA H200", uuid="GPU-lost", memory=None, utilization=None,
                        temperature=None, power=None, lost=True, error="GPU is lost")
    bare = DeviceSample(index=2, name=None, uuid=None, memory=None, utilization=None, temperature=None,
                        power=None, processes=(GpuProcess(999, None),))
    nvml = replace(base.nvml, devices=base.nvml.devices + (lost, bare))
    fresh = fx.agent(fx.hello(6161, ["python", "new.py"], uuid=None, device="cuda:2"), ())
    gone = replace(base.agents[1], connected=False, detached=True)
    return replace(base, nvml=nvml, agents=(base.agents[0], gone, fresh))


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
async def test_missing_fields_lost_gpu_and_stepless_agents_render(size):
    app = BatchmonApp(snapshot=odd_snapshot())
    async with app.run_test(size=size) as pilot:
        await fx.wait_for(pilot, lambda: len(app.query(JobPanel)) == 3)
        for _ in range(4):
            await pilot.press("down")
        await pilot.press("left", "plus", "a")
        text = fx.screen_text(app)
        assert "LOST" in text and "GPU is lost" in text or size == (80, 24)
        assert "new.py" in text or size == (80, 24)
        if size == (160, 48):
            assert "no step yet" in text and "detached" in text
