"""`batchmon export --prometheus`: a real exporter subprocess scraped over HTTP, and the collector on H200 data."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

prometheus_client = pytest.importorskip("prometheus_client")
from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from batchmon import protocol  # noqa: E402
from batchmon.monitor.export import SnapshotCollector  # noqa: E402
from batchmon.protocol import step_components  # noqa: E402
from batchmon.monitor.replay import final_snapshot, iter_snapshots, read_recording  # noqa: E402
from hub_peer import FakeAgent, LivePid, make_hello, make_step, wait_for  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
FAMILIES = ("batchmon_device_memory_bytes", "batchmon_component_bytes", "batchmon_predicted_max_batch",
            "batchmon_step_seconds")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse(text: str) -> dict[str, list]:
    """family name -> [(labels, value)], every family present even when empty."""
    out: dict[str, list] = {}
    for fam in text_string_to_metric_families(text):
        out[fam.name] = [(dict(s.labels), s.value) for s in fam.samples]
    return out


def scrape(port: int) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            return r.read().decode()
    except (urllib.error.URLError, ConnectionError, OSError):
        return None


@pytest.fixture
def sockdir(tmp_path):
    return protocol.ensure_socket_dir(tmp_path / "sock")


def start_exporter(sockdir, port: int, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, BATCHMON_DIR=str(sockdir))
    return subprocess.Popen([sys.executable, "-m", "batchmon", "export", "--prometheus", "--port", str(port),
                             "--interval", "0.2", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(proc: subprocess.Popen) -> tuple[int, str, str]:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=10)
    return proc.returncode, out, err


def test_export_scraped_over_http_follows_agents(sockdir):
    pid = LivePid()
    hello = make_hello(pid.pid, rank=0)
    steps = [make_step(n, batch=8 if n < 5 else 16) for n in range(1, 21)]
    agent = FakeAgent(sockdir, pid.pid, hello, steps)
    port = free_port()
    proc = start_exporter(sockdir, port)
    try:
        def component_series():
            text = scrape(port)
            if text is None:
                return None
            fams = parse(text)
            return fams if fams.get("batchmon_component_bytes") and fams.get("batchmon_step_seconds") else None

        fams = wait_for(component_series, timeout=15, what="component series in the scrape")
        assert set(FAMILIES) <= set(fams)
        expected = {name: v for name, v in step_components(steps[-1]).items() if v is not None}
        got = {labels["component"]: value for labels, value in fams["batchmon_component_bytes"]}
        assert got == {k: float(v) for k, v in expected.items()}
        for labels, _ in fams["batchmon_component_bytes"]:
            assert labels == {"host": hello.host, "gpu": "cpu", "pid": str(pid.pid), "rank": "0",
                              "component": labels["component"]}
        assert fams["batchmon_step_seconds"] == [({"host": hello.host, "pid": str(pid.pid), "rank": "0"},
                                                  steps[-1].step_seconds)]
        # no GPU here: the family is served, with no series
        assert fams["batchmon_device_memory_bytes"] == []

        # A new step changes the values at the next scrape (read at scrape time, not cached).
        newer = make_step(21, batch=32)
        agent.send_message(newer)
        want = float(step_components(newer)["activations"])
        wait_for(lambda: (t := scrape(port)) and any(
            lab["component"] == "activations" and v == want for lab, v in parse(t)["batchmon_component_bytes"]),
            timeout=10, what="the new step's activations")

        # The agent ends: its series disappear (no stale labels).
        agent.close()
        pid.kill()
        wait_for(lambda: (t := scrape(port)) and parse(t)["batchmon_component_bytes"] == []
                 and parse(t)["batchmon_step_seconds"] == [], timeout=10, what="series of the ended agent gone")
    finally:
        agent.close()
        pid.kill()
        code, out, err = stop(proc)
    assert code == 0, err
    assert f"127.0.0.1:{port}" in out
    assert "Traceback" not in err


def test_export_port_in_use_is_one_line_error(sockdir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        proc = start_exporter(sockdir, port)
        code, _, err = stop_after_exit(proc)
    assert code == 1
    assert err.strip().count("\n") == 0
    assert "address already in use" in err and str(port) in err


def stop_after_exit(proc: subprocess.Popen) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out, err


def test_export_bind_is_the_address_it_listens_on(sockdir):
    port = free_port()
    proc = start_exporter(sockdir, port, "--bind", "127.0.0.1")
    try:
        text = wait_for(lambda: scrape(port), 60, "first scrape")
        assert all(f"# TYPE {fam} gauge" in text for fam in FAMILIES)
    finally:
        code, out, err = stop(proc)
    assert code == 0 and f"on http://127.0.0.1:{port}/metrics" in out and "Traceback" not in err, (code, out[-500:], err[-1500:])


def test_export_host_is_a_usage_error_naming_bind(sockdir):
    """Issue 17 C13: one meaning per name: --host is a remote box everywhere; export listens on --bind."""
    proc = start_exporter(sockdir, free_port(), "--host", "127.0.0.1")
    code, _, err = stop_after_exit(proc)
    assert code == 2 and "--bind ADDR" in err and "usage: batchmon export" in err and "Traceback" not in err


def test_export_bind_that_is_not_an_address_here_is_one_line_error(sockdir):
    proc = start_exporter(sockdir, free_port(), "--bind", "gpu1.invalid")
    code, _, err = stop_after_exit(proc)
    assert code == 1 and err.strip().startswith("batchmon: error: cannot listen on gpu1.invalid:") and "Traceback" not in err


@pytest.mark.parametrize("fixture", ["tui_h200_two_jobs.jsonl"])
def test_collector_on_h200_recording(fixture):
    """Device memory and predictions come from a real H200 recording (no GPU here): its last moment with both runs
    running; at its end both ended, and an ended run has no series (test_export_ended_runs_have_no_series)."""
    snap = [s for s in iter_snapshots(read_recording(FIXTURES / fixture)) if len(s.running) == 2][-1]
    assert snap.nvml.devices and snap.agents
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    fams = parse(generate_latest(registry).decode())

    device = {(lab["gpu"], lab["kind"]): v for lab, v in fams["batchmon_device_memory_bytes"]}
    for dev in snap.nvml.devices:
        for kind in ("used", "reserved", "total", "free"):
            value = getattr(dev.memory, kind)
            if value is None:
                assert (str(dev.index), kind) not in device
            else:
                assert device[(str(dev.index), kind)] == float(value)

    comps = {(lab["pid"], lab["component"]): (lab, v) for lab, v in fams["batchmon_component_bytes"]}
    preds = {lab["pid"]: v for lab, v in fams["batchmon_predicted_max_batch"]}
    for agent in snap.agents:
        pid = str(agent.hello.pid)
        dev = snap.device_of(agent)
        assert dev is not None
        for name, value in step_components(agent.last_step).items():
            if value is None:
                assert (pid, name) not in comps
                continue
            labels, got = comps[(pid, name)]
            assert got == float(value)
            assert labels["gpu"] == str(dev.index) and labels["rank"] == str(agent.hello.rank)
            assert labels["host"] == agent.hello.host
        if agent.prediction is not None and agent.prediction.max_batch is not None:
            assert preds[pid] == float(agent.prediction.max_batch)
    # cache and context are derived from the recorded CUDA figures, so they are exported too
    assert {name for _, name in comps} >= {"cache", "context"}
    assert preds, "the H200 recording has predictions"


def test_export_ended_runs_have_no_series():
    """The recording's end: both runs ended (kept on screen), so no component, max batch or step series."""
    snap = final_snapshot(FIXTURES / "tui_h200_two_jobs.jsonl")
    assert {a.state for a in snap.agents} == {"ended"} and len(snap.agents) == 2
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(lambda: snap))
    fams = parse(generate_latest(registry).decode())
    assert fams["batchmon_device_memory_bytes"]
    assert not fams.get("batchmon_component_bytes") and not fams.get("batchmon_predicted_max_batch")


def test_export_ctrl_c_exits_zero(sockdir):
    port = free_port()
    proc = start_exporter(sockdir, port)
    try:
        wait_for(lambda: scrape(port) is not None or proc.poll() is not None, timeout=15, what="exporter up")
        assert proc.poll() is None
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        code, _, err = stop_after_exit(proc)
    assert code == 0, err
    assert "Traceback" not in err


def listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_export_stopped_the_moment_it_listens_exits_zero_having_said_where(sockdir, sig):
    """The signal lands as soon as the port accepts, before or while the exporter prints its line: a clean
    exit that printed it (a Ctrl-C there exited 130 silently; a TERM left without the line)."""
    port = free_port()
    proc = start_exporter(sockdir, port)
    try:
        wait_for(lambda: listening(port) or proc.poll() is not None, timeout=15, what="exporter listening")
    finally:
        if proc.poll() is None:
            proc.send_signal(sig)
        code, out, err = stop_after_exit(proc)
    assert code == 0, err
    assert f"on http://127.0.0.1:{port}/metrics" in out and "Traceback" not in err


def test_export_without_prometheus_client_says_how_to_install(sockdir, tmp_path):
    # A package on PYTHONPATH that fails to import, as a missing prometheus-client does.
    shadow = tmp_path / "shadow" / "prometheus_client"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named prometheus_client')\n")
    env = dict(os.environ, BATCHMON_DIR=str(sockdir), PYTHONPATH=str(shadow.parent))
    r = subprocess.run([sys.executable, "-m", "batchmon", "export", "--prometheus", "--port", str(free_port())],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0
    assert 'pip install "batchmon[prometheus]"' in r.stderr
