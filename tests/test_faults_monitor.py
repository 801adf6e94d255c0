"""Monitor bad-input matrix (issue 7, point 2): the monitor keeps running and shows a counted warning.

A real Hub reads real unix sockets from an in-test protocol peer (tests/hub_peer.py); frames come from
hypothesis. NVML errors are injected into a replayed recording through the real NvmlProbe; a truncated
recording goes through the real replay loader; the real Textual app renders the resulting snapshots.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tui_fixtures as fx
from batchmon import protocol
from batchmon.monitor.hub import Hub
from batchmon.probes.nvml import NvmlProbe
from nvml_recording import ReplayBackend
from batchmon.protocol import COMPONENTS, MAX_SIZE
from hub_peer import FakeAgent, LivePid, make_hello, make_step, wait_for

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def sockdir(tmp_path):
    return protocol.ensure_socket_dir(tmp_path / "sock")


@pytest.fixture
def live():
    pid = LivePid()
    yield pid
    pid.kill()


def view(hub: Hub, pid: int):
    return next((a for a in hub.snapshot().agents if a.hello.pid == pid), None)


def warning_count(snap, words: str) -> int:
    return sum(w.count for w in snap.warnings if words in w.message or words in w.source)


def good_step(n: int) -> dict:
    return json.loads(protocol.encode(make_step(n)))


# ------------------------------------------------------------------------------------ invalid frames


def _step_with(field: str, value) -> bytes:
    d = good_step(1)
    if field in COMPONENTS:
        d["components"][field] = value
    else:
        d[field] = value
    return json.dumps(d).encode()


not_json = st.binary(max_size=200).map(lambda b: b"{" + b.replace(b"\n", b" "))
wrong_type = st.tuples(
    st.sampled_from(["step", "time", "components", *COMPONENTS]),
    st.one_of(st.text(max_size=10), st.lists(st.integers(), max_size=3), st.booleans()),
).map(lambda fv: _step_with(*fv))
out_of_range = st.tuples(
    st.sampled_from(["step", *COMPONENTS]),
    st.one_of(st.integers(max_value=-1), st.integers(min_value=MAX_SIZE + 1)),
).map(lambda fv: _step_with(*fv))
bad_time = st.one_of(st.floats(max_value=-1e-3), st.floats(min_value=1e13), st.just(1e400)).map(
    lambda v: _step_with("time", v) if math.isfinite(v) else _step_with("time", "inf"))
bad_version = st.one_of(st.integers().filter(lambda v: v != 1), st.text(max_size=5), st.none()).map(
    lambda v: json.dumps({**good_step(1), "v": v}).encode())
not_object = st.one_of(st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=10)).map(
    lambda v: json.dumps(v).encode())
bad_lines = st.lists(st.one_of(not_json, wrong_type, out_of_range, bad_time, bad_version, not_object),
                     min_size=1, max_size=6)


def test_hypothesis_invalid_frames_are_counted_and_the_stream_goes_on(sockdir, live) -> None:
    agent = FakeAgent(sockdir, live.pid, make_hello(live.pid), [make_step(1)])
    hub = Hub(interval=0.05, socket_dir=sockdir).start()
    state = {"step": 1, "invalid": 0}
    try:
        wait_for(lambda: (v := view(hub, live.pid)) and v.last_step and v.last_step.step == 1, 10, "first step")

        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
        @given(bad_lines)
        def check(lines: list[bytes]) -> None:
            for line in lines:  # each one really is invalid v1
                with pytest.raises(protocol.ProtocolError):
                    protocol.decode(line)
            state["step"] += 1
            state["invalid"] += len(lines)
            agent.send(b"\n".join(lines) + b"\n" + protocol.encode(make_step(state["step"])))
            v = wait_for(lambda: (a := view(hub, live.pid)) and a.last_step and a.last_step.step == state["step"]
                         and a, 10, "the valid step after the bad lines")
            assert v.connected and v.invalid_lines == state["invalid"]
            snap = hub.snapshot()
            assert warning_count(snap, "invalid lines") == state["invalid"]

        check()
        assert hub.running
    finally:
        hub.stop()
        agent.close()


def test_line_over_one_mib_is_dropped_and_counted(sockdir, live) -> None:
    agent = FakeAgent(sockdir, live.pid, make_hello(live.pid), [make_step(1)])
    hub = Hub(interval=0.05, socket_dir=sockdir).start()
    try:
        wait_for(lambda: view(hub, live.pid) is not None, 10, "agent")
        huge = json.dumps({**good_step(2), "pad": "x" * (protocol.MAX_LINE_BYTES + 10)}).encode()
        agent.send(huge + b"\n" + protocol.encode(make_step(3)))
        v = wait_for(lambda: (a := view(hub, live.pid)) and a.last_step and a.last_step.step == 3 and a, 10,
                     "step after the huge line")
        assert v.last_step.step == 3 and v.connected  # step 2 (inside the huge line) was never taken
        assert v.invalid_lines == 1
        assert warning_count(hub.snapshot(), "invalid lines") == 1
        assert hub.running
    finally:
        hub.stop()
        agent.close()


def test_agent_vanishing_mid_line(sockdir, live) -> None:
    agent = FakeAgent(sockdir, live.pid, make_hello(live.pid), [make_step(1)])
    hub = Hub(interval=0.05, socket_dir=sockdir).start()
    try:
        wait_for(lambda: (a := view(hub, live.pid)) and a.last_step, 10, "agent")
        agent.send(protocol.encode(make_step(2))[:25])  # half a line, then the process is gone
        agent.close()
        live.kill()
        wait_for(lambda: view(hub, live.pid) is None or not view(hub, live.pid).connected, 15, "agent marked gone")
        v = view(hub, live.pid)
        assert v is None or v.last_step.step == 1  # the half line was not taken as a step
        snap = hub.snapshot()
        (w,) = [w for w in snap.warnings if "mid-line" in w.message]
        assert w.count == 1 and "25 bytes" in w.message and str(live.pid) in w.source
        assert hub.running
    finally:
        hub.stop()


# ------------------------------------------------------------------------------------ NVML errors


NVML_RECORDING = FIXTURES / "nvml_synthetic_recording.json"


@pytest.mark.parametrize("error, fn, words", [
    ("GpuIsLost", None, "lost"),
    ("NotSupported", "nvmlDeviceGetMemoryInfo", None),
])
def test_nvml_errors_injected_keep_the_hub_running(sockdir, error, fn, words) -> None:
    replay = ReplayBackend(NVML_RECORDING, loop=True)
    replay.inject(error, fn=fn, device=0, start=2)
    hub = Hub(interval=0.05, socket_dir=sockdir, nvml_probe=NvmlProbe(backend=replay)).start()
    try:
        wait_for(lambda: hub.ticks >= 6, 15, "ticks after the injected error")
        snap = hub.snapshot()
        assert snap.nvml.available and hub.running
        dev0 = next(d for d in snap.nvml.devices if d.index == 0)
        others = [d for d in snap.nvml.devices if d.index != 0]
        assert others and all(not d.lost and d.memory is not None for d in others)  # the others go on
        if error == "GpuIsLost":
            assert dev0.lost and words in (dev0.error or "").lower() and dev0.memory is None
        else:  # not supported is "not available" (NA on screen), not an error
            assert not dev0.lost and dev0.name and dev0.memory is None
    finally:
        hub.stop()


def test_gpu_lost_adds_a_counted_warning(sockdir) -> None:
    replay = ReplayBackend(NVML_RECORDING, loop=True)
    replay.inject("GpuIsLost", device=0, start=2)
    hub = Hub(interval=0.05, socket_dir=sockdir, nvml_probe=NvmlProbe(backend=replay)).start()
    try:
        wait_for(lambda: hub.ticks >= 6, 15, "ticks after the injected error")
        lost = [w for w in hub.snapshot().warnings if "lost" in w.message.lower()]
        # once per turn to lost (the GPU stays lost on every later sample), naming the GPU
        assert len(lost) == 1 and lost[0].count == 1 and lost[0].message.startswith("GPU 0"), lost
        assert lost[0].source == "nvml"
    finally:
        hub.stop()


# ------------------------------------------------------------------------------------ truncated recording


def test_recording_truncated_mid_line_replays_with_a_counted_warning(tmp_path) -> None:
    from batchmon.monitor.replay import load_snapshots

    src = FIXTURES / "tui_h200_one_job.jsonl"
    raw = src.read_bytes()
    cut = raw.rfind(b"\n", 0, len(raw) * 2 // 3) + 40  # 40 bytes into a line two thirds through
    path = tmp_path / "cut.jsonl"
    path.write_bytes(raw[:cut])
    whole = load_snapshots(src)
    snaps = load_snapshots(path)
    assert 0 < len(snaps) < len(whole)
    last = snaps[-1]
    found = [w for w in last.warnings if "bad lines" in w.message]
    assert len(found) == 1 and found[0].count == 1, last.warnings
    assert last.agents  # what came before the cut is all there
    # the first replayed snapshots match the intact recording exactly
    assert snaps[0].agents == whole[0].agents


# ------------------------------------------------------------------------------------ the UI with warnings


async def test_tui_renders_snapshot_with_counted_warnings(tmp_path) -> None:
    import dataclasses

    from batchmon.snapshot import Warning
    from batchmon.tui.app import BatchmonApp

    warnings = (Warning("agent host:4242", "invalid lines dropped: line is not JSON", 37),
                Warning("nvml", "GPU 0 lost", 1),
                Warning("recording", "bad lines skipped: line 812: truncated last line [bold]x[/]", 1))
    snap = dataclasses.replace(fx.one_gpu(2), warnings=warnings)
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1)
        text = fx.screen_text(app)
        assert "37" in text and "invalid lines" in text, text
        await pilot.resize_terminal(80, 24)
        await pilot.pause()
        assert app.is_running
