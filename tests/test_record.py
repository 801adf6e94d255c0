"""`batchmon record` and `batchmon stream` as real subprocesses: flushed lines, clean stops, clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from batchmon import protocol
from batchmon.monitor.replay import load_snapshots
from hub_peer import FakeAgent, LivePid, make_step, wait_for


@pytest.fixture
def env(tmp_path):
    e = dict(os.environ)
    e["BATCHMON_DIR"] = str(protocol.ensure_socket_dir(tmp_path / "sock"))
    e["PYTHONUNBUFFERED"] = "0"
    return e


@pytest.fixture
def live_agent(env):
    pid = LivePid()
    agent = FakeAgent(Path(env["BATCHMON_DIR"]), pid.pid, history=[make_step(n) for n in range(1, 4)])
    yield agent
    agent.close()
    pid.kill()


def batchmon(*args: str, env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "batchmon", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def complete_lines(path: Path) -> list[dict]:
    """The lines of a file being written, each parsed; an unfinished last line is left out."""
    text = path.read_text() if path.exists() else ""
    lines = text.split("\n")[:-1]
    return [json.loads(line) for line in lines]


def test_record_flushes_each_line_while_running_and_stops_cleanly_on_ctrl_c(tmp_path, env, live_agent):
    out = tmp_path / "run.jsonl"
    # A long interval keeps the output far below any buffer size: lines can only appear by per-line flushes.
    proc = batchmon("record", "-o", str(out), "--interval", "30", env=env)
    try:
        wait_for(lambda: any(r.get("kind") == "agent" and r["data"].get("type") == "step"
                             for r in complete_lines(out)), what="history in the file")
        live_agent.send_message(make_step(4))
        wait_for(lambda: any(r.get("kind") == "agent" and r["data"].get("step") == 4 for r in complete_lines(out)),
                 what="a live step flushed while the recorder runs")
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0, stderr
    assert stderr == "" and stdout == ""
    records = complete_lines(out)
    assert records[0]["kind"] == "meta" and records[0]["version"] == 1 and records[0]["interval"] == 30
    assert {"nvml", "host", "tick", "agent"} <= {r["kind"] for r in records}
    final = load_snapshots(out)[-1]
    (view,) = final.agents
    assert view.hello.pid == live_agent.pid and view.last_step.step == 4 and len(view.history) == 4


def test_record_duration_and_sigterm(tmp_path, env):
    out = tmp_path / "short.jsonl"
    proc = batchmon("record", "-o", str(out), "--duration", "0.4", "--interval", "0.05", env=env)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    ticks = [r for r in complete_lines(out) if r["kind"] == "tick"]
    assert len(ticks) >= 2

    out2 = tmp_path / "term.jsonl"
    proc = batchmon("record", "-o", str(out2), "--interval", "0.05", env=env)
    wait_for(lambda: any(r["kind"] == "tick" for r in complete_lines(out2)), what="first tick")
    proc.terminate()
    _, stderr = proc.communicate(timeout=20)
    assert proc.returncode == 0 and stderr == ""


def test_record_to_a_bad_path_is_one_line_exit_1(tmp_path, env):
    proc = batchmon("record", "-o", str(tmp_path / "no" / "such" / "dir" / "x.jsonl"), env=env)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 1
    assert stderr.count("\n") == 1 and stderr.startswith("batchmon: error: cannot write")
    assert "Traceback" not in stderr


def test_stream_writes_records_to_stdout(env, live_agent):
    proc = batchmon("stream", "--duration", "0.5", "--interval", "0.05", env=env)
    stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    records = [json.loads(line) for line in stdout.splitlines()]
    assert records[0]["kind"] == "meta" and records[0]["command"] == "stream"
    hello = [r for r in records if r["kind"] == "agent" and r["data"]["type"] == "hello"]
    assert len(hello) == 1 and hello[0]["data"]["pid"] == live_agent.pid


def test_stream_ends_quietly_when_the_reader_goes_away(env):
    proc = batchmon("stream", "--interval", "0.02", env=env)
    first = proc.stdout.readline()
    assert json.loads(first)["kind"] == "meta"
    proc.stdout.close()  # like `ssh host batchmon stream | head -1`, or a closed ssh session
    proc.wait(timeout=20)
    stderr = proc.stderr.read()
    assert proc.returncode == 0 and "Traceback" not in stderr and "Exception" not in stderr, stderr


@pytest.mark.parametrize("command", ["record", "stream"])
def test_help_advertises_only_options_it_accepts(command):
    """Issue 17 C13: record/stream --help listed --host, then refused it (rc 1). Now neither: a usage error."""
    import subprocess
    import sys

    help_text = subprocess.run([sys.executable, "-m", "batchmon", command, "--help"], capture_output=True,
                               text=True, timeout=30).stdout
    assert "--host" not in help_text and "--interval" in help_text
    extra = ["-o", "-"] if command == "record" else []
    for argv in ([command, *extra, "--host", "gpu1"], ["--host", "gpu1", command, *extra]):
        proc = subprocess.run([sys.executable, "-m", "batchmon", *argv], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, (argv, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) <= 3  # usage + one error line
