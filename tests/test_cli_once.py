"""`batchmon --once` / `--once --json` as real subprocesses on this GPU-less machine, with a real agent socket."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from batchmon import protocol
from hub_peer import FakeAgent, LivePid, make_hello, make_step

TOP_KEYS = {"nvml", "host", "devices", "agents"}


@pytest.fixture
def sockdir(tmp_path):
    return protocol.ensure_socket_dir(tmp_path / "sock")


def run(*args: str, sockdir) -> subprocess.CompletedProcess:
    env = dict(os.environ, BATCHMON_DIR=str(sockdir))
    return subprocess.run([sys.executable, "-m", "batchmon", *args], capture_output=True, text=True, env=env,
                          timeout=60)


def test_once_table_without_gpu(sockdir):
    r = run("--once", sockdir=sockdir)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    assert socket.gethostname() in r.stdout  # host shown
    assert "NVML unavailable" in r.stdout


def test_once_json_schema_without_gpu(sockdir):
    r = run("--once", "--json", sockdir=sockdir)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert TOP_KEYS <= set(out)
    assert out["nvml"]["available"] is False
    reason = out["nvml"]["error"]
    assert isinstance(reason, str) and reason and "\n" not in reason
    assert set(out["nvml"]) >= {"available", "error", "driver"}
    host = out["host"]
    assert host["hostname"] == socket.gethostname()
    assert isinstance(host["memory_total"], int) and host["memory_total"] > 0
    assert isinstance(host["memory_used"], int)
    assert out["devices"] == [] and out["agents"] == []


def test_once_shows_attached_agents_with_components(sockdir):
    pid = LivePid()
    agent = FakeAgent(sockdir, pid.pid, make_hello(pid.pid, argv=("train.py", "--epochs", "3")),
                      [make_step(n, batch=8 if n < 5 else 16) for n in range(1, 1001)])
    try:
        t0 = time.monotonic()
        r = run("--once", "--json", sockdir=sockdir)
        elapsed = time.monotonic() - t0
        assert r.returncode == 0, r.stderr
        (a,) = json.loads(r.stdout)["agents"]
        assert a["pid"] == pid.pid and a["step"] == 1000 and a["batch_size"] == 16
        assert a["components"]["parameters"] == make_step(1000, 16).components["parameters"]
        assert a["components"]["activations"] == make_step(1000, 16).components["activations"]
        assert "prediction" in a
        assert elapsed < 20

        r = run("--once", sockdir=sockdir)
        assert r.returncode == 0, r.stderr
        assert str(pid.pid) in r.stdout and "train.py" in r.stdout
    finally:
        agent.close()
        pid.kill()


def test_bad_flag_is_argparse_error_exit_2(sockdir):
    r = run("--bogus-flag", sockdir=sockdir)
    assert r.returncode == 2
    assert "unrecognized arguments: --bogus-flag" in r.stderr and "Traceback" not in r.stderr
    r = run("--once", "--interval", "-1", sockdir=sockdir)
    assert r.returncode == 2 and "positive" in r.stderr
