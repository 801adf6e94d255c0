"""bench/load.py --serve --recorded: peers that send a recorded real agent's messages, read by a real Hub."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from batchmon.monitor.hub import Hub

ROOT = Path(__file__).resolve().parents[1]
RECORDING = ROOT / "tests" / "fixtures" / "fast16_h200_15s.jsonl.gz"


def test_recorded_peers_send_the_real_agents_messages_looped(tmp_path):
    sockdir = tmp_path / "sock"
    serve = subprocess.Popen([sys.executable, str(ROOT / "bench" / "load.py"), "--serve", str(sockdir), "--agents",
                              "2", "--rate", "50", "--recorded", str(RECORDING), "--gpu", "GPU-test",
                              "--duration", "60"], stdout=subprocess.PIPE, text=True)
    hub = None
    try:
        line = serve.stdout.readline() if serve.stdout else ""
        assert line.startswith("ready 2 agents"), line
        hub = Hub(interval=0.1, socket_dir=sockdir).start()
        deadline = time.monotonic() + 30
        first: dict[int, int] = {}
        while time.monotonic() < deadline:
            agents = hub.snapshot().agents
            if len(agents) == 2 and all(a.last_step is not None for a in agents):
                first = first or {a.hello.pid: a.last_step.step for a in agents}
                if all(a.last_step.step > first[a.hello.pid] + 100 for a in agents):
                    break
            time.sleep(0.05)
        agents = hub.snapshot().agents
        assert len(agents) == 2
        for a in agents:
            assert a.hello.argv[0] == "examples/train_mlp.py" and a.hello.nvml_uuid == "GPU-test"
            assert a.last_step.step > first[a.hello.pid] + 100  # live windows keep coming
            history = a.history
            assert len(history) > a.hello.history  # the announced burst, then live windows
            steps = [s.step for s in history]
            assert steps == sorted(steps) and len(set(steps)) == len(steps)
            assert any(s.phase_own_peaks for s in history) and any(not s.phase_own_peaks for s in history)
            assert max(s.steps for s in history) > 1  # coalesced windows, as recorded
            assert abs(history[-1].time - time.time()) < 5  # stamped now, not at the recording's time
    finally:
        if hub is not None:
            hub.stop()
        serve.terminate()
        serve.wait(30)


def test_a_recorded_peer_loops_with_steps_and_times_moved_on(tmp_path):
    """Past the recording's end its messages start again, step numbers and times after the last ones sent."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("load_bench", ROOT / "bench" / "load.py")
    load = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(load)
    source = load.load_recorded(str(RECORDING))[0]
    (tmp_path / "s").mkdir(mode=0o700)
    peer = load._RecordedAgent(tmp_path / "s", 0, 5.0, source)
    try:
        peer.shift -= 2.5 * peer.span_time  # as if two and a half recordings' time had passed
        sent = [json.loads(x) for x in peer.lines(50.0, time.monotonic()).splitlines()]
        assert peer.loop == 2 and len(sent) > 2 * len(source[2])
        steps, times = [m["step"] for m in sent], [m["time"] for m in sent]
        assert steps == sorted(steps) and len(set(steps)) == len(steps)
        assert times == sorted(times) and times[-1] <= time.time()
        assert {m["type"] for m in sent} == {"step"} and all(m.get("components") for m in sent)
        assert peer.lines(50.0, time.monotonic()) == b""  # nothing more is due yet
    finally:
        peer.server.close()
        peer.sleeper.kill()
        peer.sleeper.wait()
