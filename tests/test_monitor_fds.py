"""Issue 17 C8: many agent sockets do not exhaust the monitor's file descriptors (it connects to as many as
its open-file limit allows and says so), and an agent that refuses monitors is a warning, not silence.

Real unix sockets in a real folder, `batchmon --once --json` as a child with RLIMIT_NOFILE 1024."""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import threading
from pathlib import Path

from batchmon import protocol

ROOT = Path(__file__).resolve().parents[1]
SOCKETS = 1200


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def _once(sockdir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchmon", "--once", "--json"], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "BATCHMON_DIR": str(sockdir), "PYTHONPATH": str(ROOT)},
                          preexec_fn=_limit_fds)


def test_1200_agent_sockets_at_ulimit_1024(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < SOCKETS + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, SOCKETS + 500), hard))
    sockdir = protocol.ensure_socket_dir(tmp_path / "s")
    listeners = []
    try:
        for pid in range(100000, 100000 + SOCKETS):  # listening, never accepting: connect() lands in the backlog
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.bind(str(sockdir / f"{pid}.sock"))
            s.listen(4)
            listeners.append(s)
        proc = _once(sockdir)
    finally:
        for s in listeners:
            s.close()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    warnings = json.dumps(json.loads(proc.stdout)["warnings"])
    assert "more agent sockets than" in warnings and "open-file limit" in warnings


def test_an_agent_that_refuses_monitors_is_a_warning(tmp_path):
    """An agent at its 64-monitor limit accepts and closes at once: the monitor said "No training process
    attached" and nothing else."""
    sockdir = protocol.ensure_socket_dir(tmp_path / "s")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sockdir / f"{os.getpid()}.sock"))
    listener.listen(16)
    stop = threading.Event()

    def refuse() -> None:
        listener.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            conn.close()

    thread = threading.Thread(target=refuse, daemon=True)
    thread.start()
    try:
        proc = _once(sockdir)
    finally:
        stop.set()
        thread.join(5)
        listener.close()
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["agents"] == []
    assert "closed the connection without a word" in json.dumps(out["warnings"])
