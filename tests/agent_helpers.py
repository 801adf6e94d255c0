"""Shared pieces of the agent, accounting and launcher tests: a short socket folder, models, a socket reader."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest

from batchmon import protocol
from conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


@pytest.fixture
def agent_dir(monkeypatch: pytest.MonkeyPatch):
    """BATCHMON_DIR in a short folder (unix socket paths are limited to 107 bytes); detaches after the test."""
    base = tempfile.mkdtemp(prefix="bmt")
    path = Path(base) / "s"
    monkeypatch.setenv("BATCHMON_DIR", str(path))
    yield path
    from batchmon.agent import handle as agent

    agent.detach()
    shutil.rmtree(base, ignore_errors=True)


def wait_for(condition: Callable[[], Any], timeout: float = 90.0, what: str = "condition") -> Any:
    """conftest.wait_until with this module's default deadline."""
    return wait_until(condition, timeout, what)


class Reader:
    """A plain socket client that decodes protocol lines."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(0.05)
        self.buf = protocol.LineBuffer()
        self.messages: list[object] = []
        self.eof = False

    def pump(self) -> None:
        try:
            data = self.sock.recv(1 << 16)
        except (socket.timeout, BlockingIOError):
            return
        if not data:
            self.eof = True
            return
        for line in self.buf.feed(data):
            self.messages.append(protocol.decode(line))

    def until(self, condition: Callable[[list[object]], bool], timeout: float = 90.0) -> list[object]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition(self.messages):
                return self.messages
            if self.eof:
                break
            self.pump()
        raise AssertionError(f"condition not met; got {len(self.messages)} messages, eof={self.eof}")

    def of(self, kind: type) -> list:
        return [m for m in self.messages if isinstance(m, kind)]

    def close(self) -> None:
        self.sock.close()


def batchmon_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "batchmon", *args]


def run_batchmon(*args: str, env: dict[str, str] | None = None, timeout: float = 60,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(batchmon_cmd(*args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, input=input, cwd=ROOT)


class FakeAllocator:
    """Live bytes and their peak since a reset: the two counters of CUDA's caching allocator that the agent's
    PhaseTracker reads (its injected ``read_and_reset``), for the peak-phase and segment tests on the CPU."""

    def __init__(self, live: int = 1000) -> None:
        self.current = self.peak = live
        self.reads: list[int] = []

    def alloc(self, n: int) -> None:
        self.current += n
        self.peak = max(self.peak, self.current)

    def free(self, n: int) -> None:
        self.current -= n

    def read_and_reset(self) -> int:
        peak, self.peak = self.peak, self.current
        self.reads.append(peak)
        return peak


def train_token_model(model: Any, opt: Any, vocab: int, seq: int, attach: bool,
                      batches: tuple[int, ...] = (8, 8, 8, 4)) -> tuple[list[float], list[protocol.Step]]:
    """A token model predicting its own input, one step per batch size in ``batches`` (inputs seeded by the step's
    index), attached through the real agent with every step sampled, or not: the losses, and the agent's steps."""
    import torch
    import torch.nn.functional as F

    import batchmon

    handle = batchmon.attach(model, opt, activation_every=1) if attach else None
    losses = []
    for i, b in enumerate(batches):
        x = torch.randint(0, vocab, (b, seq), generator=torch.Generator().manual_seed(i))
        loss = F.cross_entropy(model(x).reshape(-1, vocab), x.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    steps = list(handle.steps) if handle is not None else []
    if handle is not None:
        handle.detach()
    return losses, steps
