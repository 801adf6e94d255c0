"""Replay starts at the first agent's hello, seeks (by seconds, to the start, to the end) and says when the
recording ended: the pure ReplayCursor on real H200 recordings, then the threaded ReplaySource."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

from batchmon.monitor.replay import ReplayCursor, ReplaySource, load_snapshots, read_recording
from conftest import wait_until

FIXTURES = Path(__file__).parent / "fixtures"
DDP = FIXTURES / "ddp_h200_run.jsonl"  # a torchrun job: its ranks say hello 16 s into the recording
NO_AGENTS = FIXTURES / "tui_h200_no_agents.jsonl"


def shown(snap):
    """A snapshot without its agents' predictions: the hub refits at most once a second of snapshot time, so a
    seek, which builds no snapshot on the way, can show a fit one refresh fresher than playing would."""
    return dataclasses.replace(snap, agents=tuple(dataclasses.replace(a, prediction=None) for a in snap.agents))


def test_a_replay_starts_at_the_first_hello_unless_asked_from_the_start():
    every = load_snapshots(DDP)
    first_with_agent = next(s for s in every if s.agents)
    assert not every[0].agents and first_with_agent.time - every[0].time > 10
    cursor = ReplayCursor(read_recording(DDP))
    assert cursor.current == first_with_agent
    assert ReplayCursor(read_recording(DDP), from_start=True).current == every[0]


def test_a_recording_without_any_hello_starts_at_its_beginning():
    every = load_snapshots(NO_AGENTS)
    assert ReplayCursor(read_recording(NO_AGENTS)).current == every[0]


def test_stepping_gives_every_snapshot_then_says_the_end():
    every = load_snapshots(DDP)
    cursor = ReplayCursor(read_recording(DDP), from_start=True)
    seen = [cursor.current]
    while (snap := cursor.step()) is not None:
        seen.append(snap)
    assert seen == every
    assert cursor.at_end and cursor.position().at_end and cursor.step() is None


def test_seek_forward_and_back_lands_on_the_snapshot_of_that_time():
    every = load_snapshots(DDP)
    cursor = ReplayCursor(read_recording(DDP))
    here = cursor.current.time
    ahead = cursor.seek_by(10)
    assert shown(ahead) == shown(next(s for s in every if s.time >= here + 10))
    back = cursor.seek_by(-5)  # a fresh state streamed from the start: the same snapshot as playing there
    assert shown(back) == shown(next(s for s in every if s.time >= ahead.time - 5))
    assert cursor.seek_start() == every[0] and cursor.position().fraction < 0.01
    end = cursor.seek_end()
    assert shown(end) == shown(every[-1]) and cursor.at_end
    pos = cursor.position()
    assert pos.seeks == 4 and pos.start <= every[0].time and pos.end >= every[-1].time
    assert pos.fraction is not None and pos.fraction > 0.99
    # and from the end it plays on after a seek back
    cursor.seek_by(-3)
    assert not cursor.at_end and cursor.step() is not None


def test_the_recordings_span_is_read_from_its_first_and_last_lines():
    rec = read_recording(DDP)
    times = [s.time for s in load_snapshots(DDP)]
    assert rec.start_time is not None and rec.end_time is not None
    assert rec.start_time <= times[0] and rec.end_time >= times[-1] and rec.end_time - rec.start_time > 30


def test_the_source_seeks_on_request_and_publishes_the_end_once():
    every = load_snapshots(DDP)
    seen = []
    arrived = threading.Event()

    def got(snap):
        seen.append(snap)
        arrived.set()

    src = ReplaySource(DDP, speed=0.001, on_snapshot=got).start()  # so slow that only seeks move it
    try:
        wait_until(lambda: seen and seen[-1].agents, timeout=20)
        assert not src.position().at_end and src.position().fraction < 0.6
        src.seek_end()
        wait_until(lambda: src.position().at_end, timeout=20)
        assert shown(src.snapshot()) == shown(every[-1]) and src.finished.is_set()
        wait_until(lambda: len(seen) >= 2 and seen[-1] is seen[-2], timeout=20)  # the end, said once more
        count = len(seen)
        src.seek_start()
        wait_until(lambda: len(seen) > count, timeout=20)
        assert seen[-1] == every[0] and not src.position().at_end and not src.finished.is_set()
    finally:
        src.stop()
    assert not src.running
