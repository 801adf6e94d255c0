"""The peak's phase within the step (issue 16 point 4), end to end in the monitor: step messages with
``peak_phase`` / ``phase_peaks`` (on the agent's sampled steps only) through the real protocol encoding and the
real HubState, shown by `--once` and `--once --json`; the latest known phase is kept past unsampled steps, and
recordings made before the field existed show nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchmon import protocol, records
from batchmon.monitor.hub_state import HubState
from batchmon.monitor.render import format_table, snapshot_to_json
import tui_fixtures as fx
from batchmon.monitor.replay import iter_snapshots, read_recording
from batchmon.protocol import Bye, Event
from conftest import make_step
from hub_peer import make_hello

GiB = 1 << 30
FIXTURES = Path(__file__).parent / "fixtures"
#: the recordings made before step messages had the field (no line mentions it)
OLD_RECORDINGS = sorted(p for p in FIXTURES.glob("*.jsonl") if b"peak_phase" not in p.read_bytes())
PHASE_RECORDING = FIXTURES / "tui_h200_peak_phase.jsonl"  # bench/h200_run.sh phaserec: GPT and CNN on the H200
PEAKS = (int(10.2 * GiB), 12 * GiB, 12 * GiB)  # forward, backward, optimizer: the peak is reached in backward


def msg(pid: int, message, t: float = 1.0) -> dict:
    return records.agent(f"vm:{pid}", {"data": json.loads(protocol.encode(message))}, t=t)


def state_with(*steps, pid: int = 1, **kw) -> HubState:
    s = HubState(**kw)
    s.ingest(msg(pid, make_hello(pid)))
    for step in steps:
        s.ingest(msg(pid, step))
    return s


def test_the_latest_sampled_step_is_kept_and_an_unsampled_one_never_blanks_it():
    s = state_with(make_step(1, 32, phases=PEAKS), make_step(2, 32), make_step(3, 32))
    (agent,) = s.snapshot(2.0).agents
    assert agent.last_step.step == 3 and agent.last_step.peak_phase is None
    ph = agent.phases
    assert (ph.step, ph.batch_size, ph.peak_phase) == (1, 32, "backward")
    assert dict(ph.peaks) == {"forward": PEAKS[0], "backward": PEAKS[1], "optimizer": PEAKS[2]}
    s.ingest(msg(1, make_step(4, 64, phases=(5 * GiB, 6 * GiB, 9 * GiB))))  # a later sample replaces it
    s.ingest(msg(1, make_step(5, 64)))
    (agent,) = s.snapshot(3.0).agents
    assert (agent.phases.step, agent.phases.batch_size, agent.phases.peak_phase) == (4, 64, "optimizer")


def test_the_phase_outlives_its_step_in_a_bounded_history():
    s = state_with(make_step(1, phases=PEAKS), *(make_step(n) for n in range(2, 12)), history_limit=4)
    (agent,) = s.snapshot(2.0).agents
    assert len(agent.history) == 4 and agent.history[0].step == 8
    assert agent.phases is not None and agent.phases.step == 1


def test_once_text_and_json_show_the_phase():
    s = state_with(make_step(1, 32, phases=PEAKS), make_step(2, 32))
    snap = s.snapshot(2.0)
    text = format_table(snap, 120)
    assert "peak in backward (forward 10.2 GiB → backward 12.0 GiB → step 12.0 GiB), sampled at step 1" in text
    (agent,) = snapshot_to_json(snap)["agents"]
    assert agent["peak_phase"] == "backward" and agent["phase_step"] == 1 and agent["phase_batch_size"] == 32
    assert agent["phase_peaks"] == {"forward": PEAKS[0], "backward": PEAKS[1], "optimizer": PEAKS[2]}
    assert all(type(v) is int for v in agent["phase_peaks"].values())
    s.ingest(msg(1, make_step(3, 48, phases=PEAKS)))  # the step shown is the sampled one: no "sampled at"
    text = format_table(s.snapshot(3.0), 120)
    assert "peak in backward (forward 10.2 GiB → backward 12.0 GiB → step 12.0 GiB)\n" in text + "\n"
    assert "sampled at" not in text


def test_the_phase_shown_is_the_latest_at_the_batch_size_of_the_last_step():
    short = (GiB, 2 * GiB, 2 * GiB)  # an epoch's short last batch, sampled
    s = state_with(make_step(1, 16, phases=PEAKS), make_step(2, 8, phases=short), make_step(3, 16))
    (agent,) = s.snapshot(2.0).agents
    assert (agent.phases.step, agent.phases.batch_size) == (1, 16)
    s.ingest(msg(1, make_step(4, 8)))
    (agent,) = s.snapshot(3.0).agents
    assert (agent.phases.step, agent.phases.batch_size) == (2, 8)


def test_a_sample_from_another_batch_size_says_its_batch():
    s = state_with(make_step(1, 16, phases=PEAKS), make_step(2, 32))
    assert "sampled at step 1 (batch 16)" in format_table(s.snapshot(2.0), 140)


def test_only_peaks_or_only_the_phase_show_what_came():
    s = state_with(make_step(1, phase_peaks={"forward": GiB, "backward": 2 * GiB}))
    assert "step peak (forward 1.0 GiB → backward 2.0 GiB)" in format_table(s.snapshot(2.0), 120)
    s = state_with(make_step(1, peak_phase="forward"))
    text = format_table(s.snapshot(2.0), 120)
    assert "      peak in forward\n" in text + "\n"
    (agent,) = snapshot_to_json(s.snapshot(2.0))["agents"]
    assert agent["peak_phase"] == "forward" and agent["phase_peaks"] is None


def test_odd_phase_values_from_an_agent_are_none_and_show_nothing():
    line = json.loads(protocol.encode(make_step(1))) | {"peak_phase": "loss", "phase_peaks": {"forward": -5}}
    s = HubState()
    s.ingest(msg(1, make_hello(1)))
    s.ingest(records.agent("vm:1", {"data": line}, t=1.0))
    (agent,) = s.snapshot(2.0).agents
    assert agent.last_step is not None and agent.phases is None
    assert "peak in" not in format_table(s.snapshot(2.0), 120)


def test_an_ended_run_keeps_its_last_phase_and_the_oom_post_mortem_says_it():
    s = state_with(make_step(1, 16, phases=PEAKS), make_step(2, 16))
    oom = Event(kind="oom", message="out of memory in backward at step 3", step=3, batch_size=16,
                components=dict(make_step(2).components), requested_bytes=GiB, time=3.0)
    s.ingest(msg(1, oom))
    s.ingest(msg(1, Bye(reason="exit", time=4.0)))
    snap = s.snapshot(5.0)
    (agent,) = snap.agents
    assert agent.state == "oom" and agent.phases.step == 1
    text = format_table(snap, 140)
    ended = text[text.index("Ended runs"):]
    assert "last sampled step 1 (batch 16): peak in backward (forward 10.2 GiB → backward 12.0 GiB → step 12.0 GiB)" in ended
    assert ended.index("last sampled step") < ended.index("post-mortem")
    assert snapshot_to_json(snap)["agents"][0]["peak_phase"] == "backward"


def test_a_recording_of_sampled_steps_replays_to_the_same_phase(tmp_path):
    lines = [msg(1, make_hello(1), t=1.0), msg(1, make_step(1, phases=PEAKS), t=2.0), records.tick(t=2.5),
             msg(1, make_step(2), t=3.0), records.tick(t=3.5)]
    path = tmp_path / "rec.jsonl"
    path.write_text("".join(records.record_line(r) for r in lines))
    *_, last = iter_snapshots(read_recording(path))
    (agent,) = last.agents
    assert agent.last_step.step == 2 and agent.phases is not None and agent.phases.peak_phase == "backward"
    assert dict(agent.phases.peaks) == dict(zip(("forward", "backward", "optimizer"), PEAKS))


@pytest.mark.parametrize("path", OLD_RECORDINGS, ids=[p.stem for p in OLD_RECORDINGS])
def test_recordings_from_before_the_field_show_no_phase_and_no_none(path):
    snaps = list(iter_snapshots(read_recording(path)))
    for snap in (snaps[fx.busiest(snaps)], snaps[-1]):  # the run at its busiest, and its end
        assert all(a.phases is None for a in snap.agents)
        text = format_table(snap, 120)
        assert "peak in" not in text and "None" not in text and "sampled step" not in text
        for agent in snapshot_to_json(snap)["agents"]:
            assert (agent["peak_phase"], agent["phase_peaks"], agent["phase_step"]) == (None, None, None)


@pytest.mark.skipif(not PHASE_RECORDING.exists(), reason="the H200 recording with the peak's phase is not committed yet")
def test_the_h200_recording_shows_each_runs_phase():
    snaps = list(iter_snapshots(read_recording(PHASE_RECORDING)))
    snap = snaps[fx.busiest(snaps)]
    running = [a for a in snap.agents if a.state == "running"]
    assert running and all(a.phases is not None and a.phases.peak_phase in ("forward", "backward", "optimizer")
                           for a in running)
    for a in running:
        peaks = [a.phases.peaks[name] for name in ("forward", "backward", "optimizer") if name in a.phases.peaks]
        assert peaks == sorted(peaks)  # cumulative within the step
    assert format_table(snap, 140).count("peak in ") == len(running)
