"""Agent fault matrix, round 2 (issue 17, A1/A2/A4/C9): SIGPIPE at its default, a stalled monitor while hellos
are re-published, a live socket of another process at the agent's name, a folder where only the final socket
name fits. Training completes with exactly the losses of an unattached run, the agent's buffers stay within
their caps, and step time does not change.

Real torch (CPU build), the real agent, real sockets and a real child process with SIGPIPE at SIG_DFL (forked from
the session's torch-preloaded server, tests/preloaded.py: the script sets SIGPIPE and attaches in its own code).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
import torch

import batchmon
from batchmon import protocol
from batchmon.agent import handle as agent
from batchmon.agent import transport as agent_transport
from batchmon.monitor.agent_sockets import scan
from batchmon.protocol import Hello, Step

from agent_helpers import ROOT, Reader, agent_dir, wait_for  # noqa: F401 (agent_dir: a fixture)

STEPS = 12

TRAIN = r"""
import json, signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # the CLI idiom: a write to a closed pipe/socket kills the process
import torch
attach = sys.argv[1] == "attach"
steps = int(sys.argv[2])
torch.manual_seed(0)
gen = torch.Generator().manual_seed(1)
model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.05)
if attach:
    import batchmon
    handle = batchmon.attach(model, opt, activation_every=1)
losses = []
for i in range(steps):
    x = torch.randn(8, 16, generator=gen)
    y = torch.randint(0, 4, (8,), generator=gen)
    opt.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()
    losses.append(loss.item())
    if attach and i == 0:
        while handle.socket_path is None or not handle.socket_path.exists():
            time.sleep(0.01)
        print("socket", handle.socket_path, flush=True)
    time.sleep(0.004)  # a training step's pace, so monitors come and go during the run
print("losses", json.dumps(losses), flush=True)
"""


def _run_training(preloaded, attach: bool, steps: int, env: dict[str, str], during=None) -> list[float]:
    """TRAIN in a child forked from the session's torch-preloaded server (a real process: its own signal
    dispositions, its exit status; the script attaches in its own code)."""
    proc = preloaded.popen(["-c", TRAIN, "attach" if attach else "plain", str(steps)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        if during is not None:
            first = proc.stdout.readline().split()
            assert first[:1] == ["socket"], (first, proc.stderr.read())
            during(Path(first[1]), proc)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"training died with {proc.returncode}: {err[-2000:]}"
    lines = [ln for ln in out.splitlines() if ln.startswith("losses ")]
    assert lines, out
    return json.loads(lines[-1].split(" ", 1)[1])


@pytest.mark.slow
def test_sigpipe_at_default_and_monitors_that_hang_up(agent_dir, preloaded) -> None:
    """A1: monitors that connect and close at once, hundreds of times, while the script runs with SIGPIPE at
    SIG_DFL: the agent's sends to closed sockets must not raise SIGPIPE (the process died with -13)."""
    # OMP_WAIT_POLICY=PASSIVE: OpenMP's threads sleep between the paced steps instead of spinning (~4 CPU s a run)
    env = {**os.environ, "BATCHMON_DIR": str(agent_dir), "PYTHONPATH": str(ROOT), "OMP_WAIT_POLICY": "PASSIVE"}
    steps = 150
    hangups = []

    def hang_up_repeatedly(path: Path, proc: subprocess.Popen) -> None:
        while proc.poll() is None and len(hangups) < 100:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(str(path))
                s.recv(16)  # the agent is sending its hello and history burst; leave in the middle of it
            except OSError:
                pass
            finally:
                s.close()
            hangups.append(1)

    baseline = _run_training(preloaded, False, steps, env)
    assert _run_training(preloaded, True, steps, env, during=hang_up_repeatedly) == baseline
    assert len(hangups) > 20  # the agent really saw monitors vanish while it was sending


def _tiny_buffers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(agent_transport, "CLIENT_MAX_LINES", 16)
    monkeypatch.setattr(agent_transport, "CLIENT_MAX_BYTES", 8192)


def _train(on_step=None, attach: bool = False, steps: int = STEPS) -> tuple[list[float], list[float]]:
    """A seeded run; returns (losses, step seconds)."""
    torch.manual_seed(1234)
    gen = torch.Generator().manual_seed(99)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if attach:
        batchmon.attach(model, opt, activation_every=1)
    losses, times = [], []
    for i in range(steps):
        t0 = time.perf_counter()
        x = torch.randn(8, 16, generator=gen)
        y = torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        if on_step is not None:
            on_step(i)
    return losses, times


@pytest.mark.slow
def test_stalled_monitor_and_republished_hellos(agent_dir, monkeypatch) -> None:
    """A2: a monitor that never reads (a TUI suspended with Ctrl-Z) while the script re-calls
    attach(name=...) every step: each re-published hello replaces the one still waiting, so the per-monitor
    buffer stays within both caps (hellos are pinned: before, every one of them was kept)."""
    _tiny_buffers(monkeypatch)
    steps = 60
    stalled: list[socket.socket] = []
    peaks = {"lines": 0, "bytes": 0}

    def on_step(i: int) -> None:
        handle = agent.current()
        transport = handle._transport
        if i == 0:
            path = wait_for(lambda: handle.socket_path if handle.socket_path and handle.socket_path.exists() else None,
                            10, "agent socket")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            stalled.append(s)
            wait_for(lambda: transport.monitors == 1, 10, "stalled monitor accepted")
            # A unix socket's accepting end is made at connect(), not cloned from the listener: a small kernel
            # buffer on it, so the agent's own buffer really fills within a few steps.
            for client in list(transport._clients.values()):
                client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        batchmon.attach(name=f"run-{i}")  # a new hello, pinned in every monitor's buffer
        wait_for(lambda: transport._new_hello is None, 10, "hello taken by the agent thread")
        for client in list(transport._clients.values()):
            peaks["lines"] = max(peaks["lines"], len(client.lines))
            peaks["bytes"] = max(peaks["bytes"], client.bytes)

    try:
        losses, _ = _train(on_step, attach=True, steps=steps)
        handle = agent.current()
        assert handle._transport.monitors == 1
        # A monitor that comes now gets the latest name first.
        reader = Reader(handle.socket_path)
        try:
            reader.until(lambda ms: any(isinstance(m, Step) and m.step == handle.last_step.step for m in ms), 10)
            assert isinstance(reader.messages[0], Hello) and reader.messages[0].name == f"run-{steps - 1}"
        finally:
            reader.close()
    finally:
        for s in stalled:
            s.close()
    assert peaks["lines"] <= agent_transport.CLIENT_MAX_LINES + 1, peaks  # +1: a bye may be pinned at the end
    assert peaks["bytes"] <= agent_transport.CLIENT_MAX_BYTES + 4096, peaks  # one line may overshoot
    agent.detach()
    assert losses == _train(steps=steps)[0]


def test_republished_hello_keeps_the_burst_length(agent_dir, monkeypatch) -> None:
    """A replaced hello that was the monitor's first line keeps its history count (the burst's length)."""
    client = agent_transport._Client(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
    try:
        first = b'{"hello": 1}\n'
        client.push_hello(first, history=5)
        client.push(b'{"step": 1}\n')
        second = b'{"hello": 2, "renamed": true}\n'
        client.push_hello(second)
        assert list(client.lines) == [second, b'{"step": 1}\n'] and client.history == 5
        assert client.bytes == len(second) + len(b'{"step": 1}\n')
    finally:
        client.sock.close()


def _listening(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


def test_live_socket_at_its_name_is_left_alone(agent_dir) -> None:
    """A4: another process (another container sharing the folder) listens at <pid>.sock: the agent never
    unlinks it; it serves at <pid>-1.sock, which monitors find."""
    agent_dir.mkdir(mode=0o700)
    taken = protocol.socket_path(os.getpid(), agent_dir)
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(taken))
    other.listen(1)
    inode = os.stat(taken).st_ino
    try:
        baseline = _train()[0]
        losses, _ = _train(attach=True)
        assert losses == baseline
        handle = agent.current()
        assert os.stat(taken).st_ino == inode  # the other process's socket is still there, still listening
        assert _listening(taken)
        assert handle.socket_path == agent_dir / f"{os.getpid()}-1.sock"
        assert handle.socket_error is None
        assert sorted(f.path for f in scan(agent_dir)) == sorted([taken, handle.socket_path])
        reader = Reader(handle.socket_path)
        try:
            reader.until(lambda ms: sum(m.steps for m in ms if isinstance(m, Step)) >= STEPS, 10)  # windows (coalesced)
        finally:
            reader.close()
        agent.detach()
        assert os.stat(taken).st_ino == inode and not (agent_dir / f"{os.getpid()}-1.sock").exists()
    finally:
        other.close()


def test_stale_socket_at_its_name_is_replaced(agent_dir) -> None:
    """A socket file nobody listens on (a dead process that had our pid) is replaced: the agent keeps its name."""
    agent_dir.mkdir(mode=0o700)
    stale = protocol.socket_path(os.getpid(), agent_dir)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(stale))
    dead.close()  # the file stays, nothing listens
    _train(attach=True)
    assert agent.current().socket_path == stale and _listening(stale)


def test_folder_where_only_the_final_name_fits() -> None:
    """C9: the staging name is no longer than <pid>.sock, so a folder whose final socket path is exactly at
    the unix-socket limit (107 bytes) works (the staging name used to be 5 bytes longer: refused)."""
    base = Path(tempfile.mkdtemp(prefix="bmt"))
    try:
        name = f"{os.getpid()}.sock"
        pad = 107 - len(str(base)) - 2 - len(name)
        folder = base / ("d" * pad)
        assert len(str(folder / name)) == 107
        model = torch.nn.Linear(4, 2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = batchmon.attach(model, opt, socket_dir=folder)
        try:
            model(torch.randn(2, 4)).sum().backward()
            opt.step()
            path = wait_for(lambda: handle.socket_path if handle.socket_path and handle.socket_path.exists() else None,
                            10, "agent socket at the limit")
            assert path == folder / name and handle.socket_error is None
        finally:
            agent.detach()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_step_time_unchanged_behind_a_stalled_monitor(agent_dir, monkeypatch) -> None:
    """Step time with a stalled monitor and re-published hellos stays that of an attached run with none
    (a loose bound: this box is shared)."""
    _tiny_buffers(monkeypatch)
    steps = 50
    stalled: list[socket.socket] = []

    def on_step(i: int) -> None:
        if i == 0:
            handle = agent.current()
            path = wait_for(lambda: handle.socket_path if handle.socket_path and handle.socket_path.exists() else None,
                            10, "agent socket")
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(str(path))
            stalled.append(s)
        batchmon.attach(name=f"n{i}")

    _, plain = _train(lambda i: batchmon.attach(name=f"n{i}"), attach=True, steps=steps)
    agent.detach()
    try:
        _, behind = _train(on_step, attach=True, steps=steps)
    finally:
        for s in stalled:
            s.close()
    assert statistics.median(behind[10:]) < 3 * statistics.median(plain[10:]) + 0.002
