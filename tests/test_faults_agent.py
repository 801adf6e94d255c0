"""Agent fault matrix (issue 7, point 1): whatever the monitor side or the socket folder does, training completes
with exactly the losses of an unattached run with the same seed, and an agent problem is reported exactly once
(one stderr line ``batchmon: ...`` and one ``warning`` event).

Training runs in-process (real torch, CPU build) with the real agent; the faults come from real sockets, a real
subprocess monitor killed with SIGKILL, and real folders. The unattached baseline is computed once per model.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import batchmon
from batchmon.agent import handle as agent
from batchmon.protocol import Event, Hello, Step

from agent_helpers import Reader, agent_dir, wait_for  # noqa: F401 (agent_dir: a fixture)

STEPS = 12


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Weird(torch.nn.Module):
    """Keyword-only forward, nested dict/list inputs, a dict of tensors and non-tensors as output."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 8)
        self.b = torch.nn.Linear(8, 4)

    def forward(self, *, batch: dict[str, Any], flags: tuple[str, ...] = ("x",), scale: float = 1.0) -> dict[str, Any]:
        h = torch.tanh(self.a(batch["inputs"][0])) * scale
        return {"logits": self.b(h), "aux": [h.mean()], "note": flags[0], "n": 3}


class OddOptimizer(torch.optim.Optimizer):
    """SGD with momentum whose state holds non-tensor entries (ints, strings, lists, None, nested dicts)."""

    def __init__(self, params: Any, lr: float = 0.05) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["count"] = 0
                    st["tag"] = "odd"
                    st["history"] = []
                    st["nothing"] = None
                    st["nested"] = {"buf": torch.zeros_like(p), "k": 1}
                st["count"] += 1
                st["history"].append(st["count"])
                buf = st["nested"]["buf"]
                buf.mul_(0.9).add_(p.grad)
                p.add_(buf, alpha=-group["lr"])


def train(kind: str, on_step: Callable[[int], None] | None = None, attach: bool = False,
          steps: int = STEPS) -> list[float]:
    """A seeded training run; returns the loss of every step. ``attach``: with the agent attached."""
    torch.manual_seed(1234)
    gen = torch.Generator().manual_seed(99)
    if kind == "mlp":
        model: torch.nn.Module = MLP()
        opt: torch.optim.Optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:
        model = Weird()
        opt = OddOptimizer(model.parameters())
    crit = torch.nn.CrossEntropyLoss()
    handle = batchmon.attach(model, opt, activation_every=1) if attach else None
    losses = []
    for i in range(steps):
        x = torch.randn(8, 16, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        if kind == "mlp":
            out = model(x)
        else:
            out = model(batch={"inputs": [x], "meta": "m"}, flags=("a", "b"), scale=0.5)["logits"]
        loss = crit(out, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if on_step is not None:
            on_step(i)
    assert handle is None or handle is agent.current()
    return losses


@pytest.fixture(scope="module")
def baseline() -> dict[str, list[float]]:
    agent.detach()  # whatever an earlier test left attached: the baseline runs unattached
    assert agent.current() is None
    return {kind: train(kind) for kind in ("mlp", "weird")}


def agent_lines(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("batchmon:")]


def warnings_of(handle: agent.AgentHandle) -> list[Event]:
    return [e for e in handle.events if e.kind == "warning"]


def assert_clean(capfd: pytest.CaptureFixture[str], handle: agent.AgentHandle) -> None:
    """No problem of the agent: no stderr line, no warning event, every step measured."""
    assert agent_lines(capfd.readouterr().err) == []
    assert warnings_of(handle) == []
    assert handle.error is None and handle.socket_error is None
    assert len(handle.steps) == STEPS


def assert_warned_once(capfd: pytest.CaptureFixture[str], handle: agent.AgentHandle, words: str) -> None:
    lines = agent_lines(capfd.readouterr().err)
    assert len(lines) == 1, lines
    assert words in lines[0]
    events = warnings_of(handle)
    assert len(events) == 1, events
    assert words in events[0].message


def socket_of(handle: agent.AgentHandle) -> Path:
    return wait_for(lambda: handle.socket_path if handle.socket_path and handle.socket_path.exists() else None,
                    10, "agent socket")  # type: ignore[return-value]


def fresh_reader_sees_steps(handle: agent.AgentHandle) -> None:
    """The agent still serves: a new monitor gets the hello and the history up to the last step."""
    reader = Reader(socket_of(handle))
    try:
        reader.until(lambda ms: any(isinstance(m, Step) and m.step == handle.last_step.step for m in ms), timeout=10)
        assert isinstance(reader.messages[0], Hello)
    finally:
        reader.close()


# ------------------------------------------------------------------------------------------ the matrix


def test_no_monitor(baseline, agent_dir, capfd) -> None:
    assert train("mlp", attach=True) == baseline["mlp"]
    handle = agent.current()
    assert handle is not None and handle.socket_path is not None and handle.socket_path.exists()
    assert_clean(capfd, handle)


def test_torch_without_cuda(baseline, agent_dir, capfd) -> None:
    assert not torch.cuda.is_available()  # the CPU build: the agent must not need CUDA
    assert train("mlp", attach=True) == baseline["mlp"]
    handle = agent.current()
    assert_clean(capfd, handle)
    last = handle.last_step
    assert last.components["parameters"] > 0 and last.components["optimizer"] > 0
    assert last.allocated is None and last.device_used is None  # CUDA-only figures are absent, not made up


def test_unknown_model_and_optimizer(baseline, agent_dir, capfd) -> None:
    assert train("weird", attach=True) == baseline["weird"]
    handle = agent.current()
    assert_clean(capfd, handle)
    last = handle.last_step
    params = (16 * 8 + 8 + 8 * 4 + 4) * 4  # Weird's fp32 parameters
    assert last.components["parameters"] == params
    assert last.components["optimizer"] == params  # only the tensor in the odd state counts (buf)
    assert last.batch_size == 8


MONITOR = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
got = b""
while b'"type": "step"' not in got and b'"type":"step"' not in got:
    got += s.recv(65536)
print("streaming", flush=True)
while True:
    s.recv(65536)
"""


def test_monitor_killed_mid_stream(baseline, agent_dir, capfd) -> None:
    procs: list[subprocess.Popen[str]] = []

    def on_step(i: int) -> None:
        if i == 0:
            handle = agent.current()
            proc = subprocess.Popen([sys.executable, "-c", MONITOR, str(socket_of(handle))],
                                    stdout=subprocess.PIPE, text=True)
            procs.append(proc)
            assert proc.stdout.readline().strip() == "streaming"
            wait_for(lambda: handle._transport.monitors == 1, 10, "monitor connected")
        if i == 3:
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()

    try:
        assert train("mlp", on_step=on_step, attach=True) == baseline["mlp"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    handle = agent.current()
    wait_for(lambda: handle._transport.monitors == 0, 10, "dead monitor dropped")
    fresh_reader_sees_steps(handle)
    assert_clean(capfd, handle)


def test_monitor_that_never_reads(baseline, agent_dir, capfd, monkeypatch) -> None:
    from batchmon.agent import transport as agent_transport

    # A small kernel send buffer (accepted sockets inherit it from the listener) and a small per-monitor bound,
    # so the agent really has to drop lines for the stalled monitor within a few steps.
    steps = 40
    monkeypatch.setattr(agent_transport, "CLIENT_MAX_BYTES", 4096)
    # every step its own message (no coalescing): 40 fast steps coalesce into a few lines that never fill the
    # stalled monitor's buffers, and this test is about what the agent does when they are full
    from batchmon.agent import publisher as agent_publisher

    monkeypatch.setattr(agent_publisher, "WINDOW_SECONDS", 0.0)
    stalled: list[socket.socket] = []

    def on_step(i: int) -> None:
        if i == 0:
            path = socket_of(agent.current())
            agent.current()._transport._listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
            s.connect(str(path))
            stalled.append(s)

    try:
        losses = train("mlp", on_step=on_step, attach=True, steps=steps)
        handle = agent.current()
        assert handle._transport.monitors == 1  # still connected, never read from
        fresh_reader_sees_steps(handle)
    finally:
        for s in stalled:
            s.close()
    wait_for(lambda: handle.stats["monitors"] == 0, 10, "stalled monitor closed")
    assert handle.stats["monitor_dropped"] > 0  # its oldest lines were dropped, memory stayed bounded
    assert agent_lines(capfd.readouterr().err) == [] and warnings_of(handle) == []
    assert len(handle.steps) == steps
    agent.detach()
    assert losses == train("mlp", steps=steps)  # unattached, same seed


def test_fifty_monitors_at_once(baseline, agent_dir, capfd) -> None:
    readers: list[Reader] = []

    def on_step(i: int) -> None:
        if i == 2:
            path = socket_of(agent.current())
            barrier = threading.Barrier(50)

            def connect() -> None:
                barrier.wait()
                readers.append(Reader(path))

            threads = [threading.Thread(target=connect) for _ in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    try:
        assert train("mlp", on_step=on_step, attach=True) == baseline["mlp"]
        assert len(readers) == 50
        for r in readers:
            # steps covered, not messages: fast steps come as windows (batchmon.agent.coalesce)
            r.until(lambda ms: sum(m.steps for m in ms if isinstance(m, Step)) >= STEPS, timeout=10)
            got = r.of(Step)
            assert got[-1].step == agent.current().steps[-1].step and sum(m.steps for m in got) == STEPS
    finally:
        for r in readers:
            r.close()
    assert_clean(capfd, agent.current())


def test_garbage_partial_lines_and_100mb_line(baseline, agent_dir, capfd) -> None:
    done = threading.Event()
    sent: list[int] = []

    def flood(path: Path) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        try:
            s.sendall(b"\x00\xff\xfe garbage {not json\n")
            s.sendall(b'{"v": 1, "type": "step", "step": ')  # a partial line, never finished
            chunk = b"x" * (1 << 20)
            for _ in range(100):  # one 100 MB line without a newline
                s.sendall(chunk)
            sent.append(100 << 20)
            s.sendall(b"\n" + os.urandom(4096))
        finally:
            s.close()
            done.set()

    def on_step(i: int) -> None:
        if i == 1:
            threading.Thread(target=flood, args=(socket_of(agent.current()),), daemon=True).start()

    assert train("mlp", on_step=on_step, attach=True) == baseline["mlp"]
    assert done.wait(60) and sent == [100 << 20]  # the agent read (and dropped) all of it
    handle = agent.current()
    fresh_reader_sees_steps(handle)
    assert_clean(capfd, handle)


# ------------------------------------------------------------------------------------------ socket folder


def _bad_dir_not_creatable(base: Path) -> Path:
    blocker = base / "file"
    blocker.write_text("a regular file")
    return blocker / "s"  # mkdir fails with ENOTDIR, even for root


def _bad_dir_other_owner(base: Path) -> Path:
    path = base / "s"
    path.mkdir(mode=0o700)
    nobody = pwd.getpwnam("nobody")
    os.chown(path, nobody.pw_uid, nobody.pw_gid)
    return path


def _bad_dir_symlink(base: Path) -> Path:
    real = base / "real"
    real.mkdir(mode=0o700)
    link = base / "s"
    link.symlink_to(real)
    return link


def _bad_dir_open(base: Path) -> Path:
    path = base / "s"
    path.mkdir()
    path.chmod(0o777)
    return path


@pytest.mark.parametrize("make, words", [
    (_bad_dir_not_creatable, "cannot create socket folder"),
    (_bad_dir_other_owner, "is owned by uid"),
    (_bad_dir_symlink, "is a symlink"),
    (_bad_dir_open, "open to other users"),
], ids=["not-creatable", "other-owner", "symlink", "world-writable"])
def test_unusable_socket_folder(baseline, make, words, monkeypatch, capfd) -> None:
    if make is _bad_dir_other_owner and os.getuid() != 0:
        pytest.skip("chown to nobody needs root")
    base = Path(tempfile.mkdtemp(prefix="bmf"))
    try:
        path = make(base)
        monkeypatch.setenv("BATCHMON_DIR", str(path))
        assert train("mlp", attach=True) == baseline["mlp"]
        handle = agent.current()
        assert handle.socket_path is None or not handle.socket_path.exists()
        assert handle.error is None  # measuring goes on, only the socket is missing
        assert len(handle.steps) == STEPS
        assert_warned_once(capfd, handle, words)
        assert not any(p.suffix == ".sock" for p in base.rglob("*"))
    finally:
        agent.detach()
        shutil.rmtree(base, ignore_errors=True)
