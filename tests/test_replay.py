"""Replay: a recording replays to exactly what the live hub showed; damaged recordings still replay, with warnings."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time

import pytest

from batchmon import protocol
from batchmon.monitor.hub import Hub
from batchmon.monitor.recorder import LineWriter, meta_record
from batchmon.monitor.replay import ReplaySource, final_snapshot, load_snapshots
from hub_peer import FakeAgent, LivePid, make_step, wait_for

INTERVAL = 0.05


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """A real recording of a live hub hearing one agent, plus the snapshots the live hub published."""
    tmp = tmp_path_factory.mktemp("rec")
    sockdir = protocol.ensure_socket_dir(tmp / "sock")
    pid = LivePid()
    agent = FakeAgent(sockdir, pid.pid, history=[make_step(n) for n in range(1, 6)])
    path = tmp / "run.jsonl"
    live = []
    with open(path, "w") as f:
        writer = LineWriter(f)
        writer(meta_record(INTERVAL, "record"))
        hub = Hub(interval=INTERVAL, socket_dir=sockdir, recorder=writer, on_snapshot=live.append).start()
        try:
            wait_for(lambda: hub.snapshot().agents, what="agent")
            for n in range(6, 12):
                agent.send_message(make_step(n, batch=32))
                wait_for(lambda n=n: hub.snapshot().agents[0].last_step.step == n)
            agent.send(b"garbage\n")
            wait_for(lambda: hub.snapshot().agents[0].invalid_lines == 1)
            start = hub.ticks
            wait_for(lambda: hub.ticks >= start + 2)
        finally:
            hub.stop()
            agent.close()
            pid.kill()
    return path, tuple(live)


def comparable(snap):
    return dataclasses.replace(snap, source="-")


def test_replay_reproduces_every_live_snapshot(recorded):
    path, live = recorded
    replayed = load_snapshots(path)
    assert len(replayed) == len(live) >= 3
    for a, b in zip(live, replayed):
        assert b.source == "replay"
        assert comparable(a) == comparable(b)
    assert replayed[-1].agents[0].last_step.step == 11 and replayed[-1].agents[0].invalid_lines == 1
    assert load_snapshots(path) == replayed  # deterministic
    assert final_snapshot(path) == replayed[-1]


def test_truncated_and_damaged_recordings_replay_with_warnings(recorded, tmp_path):
    path, live = recorded
    text = path.read_text()
    damaged = tmp_path / "damaged.jsonl"
    lines = text.split("\n")[:-1]
    lines.insert(3, "this is not json")
    body = "\n".join(lines)
    damaged.write_text(body[: len(body) - len(lines[-1]) // 2])  # the writer died mid-line
    snaps = load_snapshots(damaged)
    assert snaps and snaps[-1].agents[0].last_step.step == 11
    (w,) = [w for w in snaps[-1].warnings if w.source == "recording"]
    assert w.count == 2 and "truncated last line" in w.message


def test_recording_without_ticks_snapshots_before_each_nvml_sample(recorded, tmp_path):
    path, live = recorded
    records = [json.loads(line) for line in path.read_text().splitlines()]
    no_ticks = tmp_path / "noticks.jsonl"
    no_ticks.write_text("".join(json.dumps(r) + "\n" for r in records if r["kind"] != "tick"))
    snaps = load_snapshots(no_ticks)
    assert len(snaps) == sum(r["kind"] == "nvml" for r in records)
    assert comparable(snaps[-1]).agents == comparable(live[-1]).agents


def test_empty_and_garbage_files_replay_to_one_empty_snapshot(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    (snap,) = load_snapshots(empty)
    assert snap.agents == () and not snap.nvml.available
    meta_only = tmp_path / "meta.jsonl"
    meta_only.write_text('{"kind": "meta", "version": 1, "interval": 2.5, "t": 5.0}\n')
    (snap,) = load_snapshots(meta_only)
    assert snap.interval == 2.5 and snap.agents == () and final_snapshot(meta_only) == snap
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\x00\xff\n[1]\n{\"kind\": 5}\n")
    (snap,) = load_snapshots(junk)
    (w,) = snap.warnings
    assert w.count == 3


def test_replay_source_paces_by_recorded_time(recorded):
    path, _ = recorded
    expected = load_snapshots(path)
    span = expected[-1].time - expected[0].time
    seen = []
    done = threading.Event()
    src = ReplaySource(path, speed=2.0, from_start=True, on_snapshot=seen.append)
    assert src.snapshot() == expected[0] and src.interval == INTERVAL
    t0 = time.monotonic()
    src.start()
    assert src.finished.wait(30)
    elapsed = time.monotonic() - t0
    src.stop()
    done.set()
    # every snapshot once, then the last once more: the end of the recording, said by position()
    assert seen == expected + [expected[-1]]
    assert src.snapshot() == expected[-1] and src.position().at_end
    assert elapsed >= span / 2.0 * 0.9


def test_replay_source_stops_promptly(recorded):
    path, _ = recorded
    src = ReplaySource(path, speed=0.001).start()
    wait_for(lambda: src.running)
    t0 = time.monotonic()
    src.stop()
    assert time.monotonic() - t0 < 2.0 and not src.running and not src.finished.is_set()


def run_cli(*args, **kw):
    env = dict(os.environ, BATCHMON_DIR=str(kw.pop("sockdir", "/nonexistent-batchmon")))
    return subprocess.run([sys.executable, "-m", "batchmon", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_replay_of_a_missing_file_is_one_line_exit_1(tmp_path):
    r = run_cli("replay", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("batchmon: error: cannot read recording")
    r = run_cli("replay", "--once", str(tmp_path))  # a folder, not a file
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_replay_once_json_prints_the_final_snapshot(recorded):
    path, live = recorded
    r = run_cli("replay", "--once", "--json", str(path))
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    (agent,) = out["agents"]
    assert agent["pid"] == live[-1].agents[0].hello.pid
    assert agent["step"] == 11
