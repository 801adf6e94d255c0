"""The agent's transport over real unix sockets: hello and history for late monitors, live lines, bounds,
permissions, input from monitors, several agents per host."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import batchmon
from batchmon import protocol
from batchmon.agent.transport import CLIENT_MAX_LINES, Transport
from batchmon.protocol import Bye, Event, Hello, Step
from agent_helpers import EXAMPLES, Reader, agent_dir, wait_for  # noqa: F401 - fixture

D, H = 8, 16


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, H)
        self.oom_at_call: int | None = None
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls == self.oom_at_call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 MiB.")
        return torch.relu(self.lin(x))


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    x = torch.randn(4, D)
    for _ in range(steps):
        opt.zero_grad()
        try:
            model(x).sum().backward()
        except torch.OutOfMemoryError:
            continue
        opt.step()


def test_late_monitor_gets_hello_history_then_live_lines_then_bye(agent_dir):
    model = Model()
    model.oom_at_call = 10
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt, name="late")
    train(model, opt, 1101)  # 1100 steps and one OOM (call 10)
    path = handle.socket_path
    assert path is not None and path == agent_dir / f"{os.getpid()}.sock"

    reader = Reader(path)
    reader.until(lambda ms: any(isinstance(m, Step) and m.step == 1100 for m in ms))
    hello = reader.messages[0]
    assert isinstance(hello, Hello)
    assert hello.pid == os.getpid() and hello.name == "late" and hello.device == "cpu"
    assert hello.model.cls == "Model" and hello.model.parameters == D * H + H
    assert hello.optimizer == "SGD" and (hello.rank, hello.local_rank, hello.world_size) == (0, 0, 1)
    assert hello.torch == torch.__version__ and hello.nvml_uuid is None
    assert hello.history == len(reader.messages) - 1  # the burst it announced: the steps' windows and the OOM
    steps = reader.of(Step)  # coalesced (batchmon.agent.coalesce): windows of consecutive steps, all covered
    assert [s.step - s.steps + 1 for s in steps] == [1] + [s.step + 1 for s in steps[:-1]]
    assert steps[-1].step == 1100 and sum(s.steps for s in steps) == 1100
    assert [s.step for s in steps[:3]] == [1, 2, 3]  # the first steps one by one
    events = reader.of(Event)
    assert [e.kind for e in events] == ["oom"]
    position = reader.messages.index(events[0])
    after = reader.messages[position + 1]
    assert reader.messages[position - 1].step == 9 and after.step - after.steps + 1 == 10  # in time order

    train(model, opt, 5)  # live
    reader.until(lambda ms: isinstance(ms[-1], Step) and ms[-1].step == 1105)
    handle.detach()
    reader.until(lambda ms: isinstance(ms[-1], Bye))
    assert not path.exists()
    reader.close()


def test_socket_file_0600_in_0700_folder(agent_dir):
    handle = batchmon.attach(nn.Linear(2, 2))
    mode = os.stat(handle.socket_path).st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE(os.stat(agent_dir).st_mode) == 0o700


def test_whatever_a_monitor_sends_is_discarded(agent_dir):
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt)
    reader = Reader(handle.socket_path)
    reader.sock.sendall(b'{"v":1,"type":"hello"}\n' + b"__import__('os').system('touch pwned')\n" + b"x" * (2 << 20))
    train(model, opt, 3)
    reader.until(lambda ms: any(isinstance(m, Step) and m.step == 3 for m in ms))
    assert handle.enabled and not Path("pwned").exists()


def test_monitor_that_never_reads_does_not_block_training(agent_dir):
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt)
    stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stuck.connect(str(handle.socket_path))  # never reads
    t0 = time.monotonic()
    train(model, opt, 600)
    assert time.monotonic() - t0 < 60
    reader = Reader(handle.socket_path)  # another monitor is served all the same
    reader.until(lambda ms: any(isinstance(m, Step) and m.step == 600 for m in ms))
    stuck.close()


def _step(n: int) -> Step:
    return Step(step=n, time=1e9 + n, step_seconds=0.01, batch_size=32,
                components=dict.fromkeys(protocol.COMPONENTS, 123456789))


def test_transport_bounds_a_stuck_monitor_and_keeps_its_hello(tmp_path):
    path = Path(f"/tmp/bmt-transport-{os.getpid()}.sock")
    transport = Transport(path)
    transport.start()
    try:
        transport.set_hello(Hello(pid=os.getpid(), host="h", argv=(), python="3", torch=None, device="cpu",
                                  nvml_uuid=None, rank=0, local_rank=0, world_size=1, model=None, optimizer=None))
        stuck = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stuck.connect(str(path))
        wait_for(lambda: transport.monitors == 1, what="accept")
        total = 20000
        for n in range(1, total + 1):
            transport.put(_step(n))  # never blocks, whatever the monitors do
            if n % 2000 == 0:
                wait_for(lambda: not transport._queue, what="drain")
        client = next(iter(transport._clients.values()))
        wait_for(lambda: not transport._queue, what="drain")
        assert len(client.lines) <= CLIENT_MAX_LINES and client.dropped > 0
        reader = Reader(path)  # a late monitor: hello, then the history (the last 2000 steps)
        reader.until(lambda ms: ms and isinstance(ms[-1], Step) and ms[-1].step == total)
        assert isinstance(reader.messages[0], Hello) and reader.messages[0].history == 2000
        assert [s.step for s in reader.of(Step)] == list(range(total - 1999, total + 1))
        # the stuck monitor, once it reads, starts with its hello even though lines were dropped
        first = protocol.decode(stuck.recv(4096).split(b"\n", 1)[0])
        assert isinstance(first, Hello) and first.history == 0  # it connected before any step
        stuck.close()
        reader.close()
    finally:
        transport.close(Bye())
    assert not path.exists()


def test_queue_is_bounded_when_the_thread_is_not_running(tmp_path):
    transport = Transport(tmp_path / "x.sock")  # never started: put() must still not grow without bound
    for n in range(10000):
        transport.put(_step(n))
    assert len(transport._queue) == transport._queue.maxlen and transport.queue_dropped == 10000 - 4096


def test_two_agents_in_two_processes(agent_dir):
    env = {**os.environ, "BATCHMON_DIR": str(agent_dir)}
    cmd = [sys.executable, str(EXAMPLES / "train_mlp.py"), "--attach", "--steps", "0", "--sleep", "0.02",
           "--hidden", "16", "--layers", "1", "--batch-size", "4", "--device", "cpu"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        paths = {p.pid: agent_dir / f"{p.pid}.sock" for p in procs}
        wait_for(lambda: all(path.exists() for path in paths.values()), what="two agent sockets")
        hellos = {}
        for pid, path in paths.items():
            reader = Reader(path)
            reader.until(lambda ms: any(isinstance(m, Step) for m in ms))
            hellos[pid] = reader.messages[0]
            reader.close()
        assert {h.pid for h in hellos.values()} == set(paths)
        assert all(any("train_mlp.py" in a for a in h.argv) for h in hellos.values())
        for p in procs:
            p.send_signal(signal.SIGINT)
        for p in procs:
            assert p.wait(30) == 130, p.stderr.read()
        assert not any(path.exists() for path in paths.values())  # removed at exit
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.mark.parametrize("problem", ["symlink", "open to others", "a file"])
def test_unusable_socket_folder_warns_once_and_training_continues(monkeypatch, tmp_path, capfd, problem):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    target = tmp_path / "dir"
    if problem == "symlink":
        target.symlink_to(real)
    elif problem == "open to others":
        target.mkdir(mode=0o700)
        os.chmod(target, 0o755)
    else:
        target.write_text("")
    monkeypatch.setenv("BATCHMON_DIR", str(target))
    model = Model()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    try:
        handle = batchmon.attach(model, opt)
        train(model, opt, 3)
        assert handle.socket_path is None and handle.socket_error
        assert [s.step for s in handle.steps] == [1, 2, 3]  # still measured, just not served
        err = capfd.readouterr().err
        assert err.count("batchmon:") == 1 and "not monitoring" in err
    finally:
        batchmon.detach()


OOM_SCRIPT = """
import sys, torch, batchmon
class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.n = 0
    def forward(self, x):
        self.n += 1
        if self.n == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB.")
        return self.lin(x)
m = M()
opt = torch.optim.SGD(m.parameters(), lr=0.1)
handle = batchmon.attach(m, opt)
print(handle.socket_path, flush=True)
for _ in range(3):
    opt.zero_grad(); m(torch.randn(2, 4)).sum().backward(); opt.step()
"""


def test_run_dying_of_oom_waits_briefly_for_a_first_monitor(agent_dir):
    proc = subprocess.Popen([sys.executable, "-c", OOM_SCRIPT], env={**os.environ, "BATCHMON_DIR": str(agent_dir)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        path = Path(proc.stdout.readline().strip())
        err = ""
        while "OutOfMemoryError" not in err:  # the traceback is printed before exit handlers run
            line = proc.stderr.readline()
            assert line, "child ended without the expected traceback"
            err += line
        reader = Reader(path)  # connected after the crash, during the agent's linger
        reader.until(lambda ms: ms and isinstance(ms[-1], Bye))
        assert [s.step for s in reader.of(Step)] == [1, 2]
        (oom,) = reader.of(Event)
        assert oom.kind == "oom" and oom.requested_bytes == 4 << 30 and oom.step == 3
        assert proc.wait(30) == 1
        assert not path.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
