"""A tiny protocol-v1 peer for hub tests: listens on <pid>.sock like the agent, sends hello + history on connect.

It is the other end of the socket (a peer), not a stand-in for the hub under test. Pids come from real
processes (`sleep`), so the hub's liveness checks see what they would see for a real agent.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from batchmon import protocol
from batchmon.protocol import Hello, ModelInfo, Step
from conftest import make_step as conftest_make_step
from conftest import wait_until


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """conftest.wait_until with this module's default deadline."""
    return wait_until(predicate, timeout, what)


def make_hello(pid: int, **kw) -> Hello:
    base: dict[str, Any] = dict(pid=pid, host=socket.gethostname(), argv=("train.py", "--lr", "3e-4"), python="3.11",
                torch="2.13.0", device="cpu", nvml_uuid=None, rank=0, local_rank=0, world_size=1,
                model=ModelInfo("MLP", 1000, 4000), optimizer="Adam")
    base.update(kw)
    return Hello(**base)


def make_step(n: int, batch: int = 16, t0: float = 1_700_000_000.0) -> Step:
    """conftest.make_step at 0.1 s per step from ``t0``."""
    return conftest_make_step(n, batch, time=t0 + n * 0.1)


class LivePid:
    """A real process whose pid names a fake agent's socket; kill() makes that pid dead."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
        self.pid = self.proc.pid

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


class FakeAgent:
    """Listens on ``<directory>/<pid>.sock``; each monitor that connects gets hello, history, then ``send()``s."""

    def __init__(self, directory: Path, pid: int, hello: Hello | None = None, history: Iterable[Step] = (),
                 *, greeting: bytes | None = None) -> None:
        self.path = protocol.socket_path(pid, directory)
        self.pid = pid
        self.greeting = greeting if greeting is not None else (
            protocol.encode(hello or make_hello(pid)) + b"".join(protocol.encode(s) for s in history))
        self.clients: list[socket.socket] = []
        self._lock = threading.Lock()
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.server.listen(8)
        self.accepted = 0
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            try:
                conn.sendall(self.greeting)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self.clients.append(conn)
                self.accepted += 1

    def send(self, data: bytes) -> None:
        with self._lock:
            for c in self.clients:
                c.sendall(data)

    def send_message(self, message: protocol.Message) -> None:
        self.send(protocol.encode(message))

    def drop_clients(self) -> None:
        with self._lock:
            for c in self.clients:
                c.close()
            self.clients.clear()

    def client_closed(self) -> bool:
        """True when every accepted monitor connection was closed by the monitor (EOF on our side)."""
        with self._lock:
            clients = list(self.clients)
        for c in clients:
            c.setblocking(False)
            try:
                if c.recv(1) != b"":
                    return False
            except BlockingIOError:
                return False
            except OSError:
                pass
        return bool(clients)

    def close(self, unlink: bool = True) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() thread on Linux
        except OSError:
            pass
        self.server.close()
        self._thread.join(5)
        self.drop_clients()
        if unlink:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
