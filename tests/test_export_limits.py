"""Issue 17 C8: the exporter at the usual open-file limit (ulimit -n 1024) survives slow and idle connections:
bounded threads, bounded fds, and /metrics still answered while 1500 connections sit idle or drip a byte at a
time. A real `batchmon export` child with RLIMIT_NOFILE 1024, real TCP connections."""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

from batchmon import protocol

ROOT = Path(__file__).resolve().parents[1]
IDLE = 1500


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def _scrape(port: int, timeout: float = 3.0) -> str | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            return r.read().decode()
    except OSError:
        return None


def test_slow_connections_at_ulimit_1024_do_not_take_the_exporter_down(tmp_path):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < IDLE + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, IDLE + 500), hard))
    port = _free_port()
    env = {**os.environ, "BATCHMON_DIR": str(protocol.ensure_socket_dir(tmp_path / "sock")),
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "batchmon", "export", "--prometheus", "--port", str(port),
                             "--interval", "0.5"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=_limit_fds)
    conns: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 30
        while _scrape(port) is None:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
            time.sleep(0.1)
        for i in range(IDLE):
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=2)
            except OSError:
                continue  # the backlog was full for a moment: the exporter closes old ones as new ones come
            if i % 10 == 0:
                s.sendall(b"GET /metr")  # a slow client: part of a request, never the rest
            conns.append(s)
        assert len(conns) > 1000
        answered = 0
        started = time.monotonic()
        for _ in range(5):
            if _scrape(port, timeout=5) is not None:
                answered += 1
        assert answered == 5, f"{answered}/5 scrapes answered with {len(conns)} slow connections open"
        assert time.monotonic() - started < 20
        exporter = psutil.Process(proc.pid)
        assert exporter.num_threads() < 16  # bounded: it was one thread per connection
        assert exporter.num_fds() < 1024 - 64
        assert proc.poll() is None
    finally:
        for s in conns:
            s.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
