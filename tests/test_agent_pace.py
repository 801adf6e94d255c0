"""The monitor -> agent ``refresh`` line and the step window it allows (batchmon.agent.pace), over real sockets."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from batchmon import protocol
from batchmon.agent.coalesce import STEADY_WINDOW_SECONDS, WINDOW_SECONDS, StepCoalescer
from batchmon.agent.pace import (READ_SECONDS, READ_STEADY_SECONDS, STEADY_MIN_INTERVAL, MonitorLines,
                                 steady_window)
from batchmon.agent.transport import Transport
from batchmon.monitor.hub import Hub
from batchmon.protocol import Bye, Hello, Step
from agent_helpers import Reader, agent_dir, wait_for  # noqa: F401 - fixture


def _hello() -> Hello:
    return Hello(pid=os.getpid(), host="h", argv=(), python="3", torch=None, device="cpu", nvml_uuid=None, rank=0,
                 local_rank=0, world_size=1, model=None, optimizer=None)


def _step(n: int) -> Step:
    return Step(step=n, time=time.time(), step_seconds=0.005, batch_size=32,
                components=dict.fromkeys(protocol.COMPONENTS, 1 << 20))


def test_refresh_line_round_trips_and_anything_else_reads_as_nothing():
    assert protocol.decode_refresh(protocol.refresh_line(1.0).rstrip(b"\n")) == 1.0
    assert protocol.decode_refresh(protocol.refresh_line(0.25)) == 0.25
    for bad in (b'{"v":1,"type":"refresh","interval":0}', b'{"v":1,"type":"refresh","interval":true}',
                b'{"v":2,"type":"refresh","interval":1}', b'{"v":1,"type":"hello","interval":1}',
                b'{"v":1,"type":"refresh","interval":"1"}', b"[1]", b"not json", b"",
                b'{"v":1,"type":"refresh","interval":1,"pad":"' + b"x" * 300 + b'"}'):
        assert protocol.decode_refresh(bad) is None, bad


def test_monitor_lines_keep_the_latest_valid_interval_across_split_reads():
    said = MonitorLines()
    line = protocol.refresh_line(2.0)
    assert not said.feed(line[:5]) and said.interval is None  # half a line says nothing yet
    assert said.feed(line[5:]) and said.interval == 2.0
    assert not said.feed(b"garbage\n" + b'{"v":1,"type":"refresh","interval":-1}\n') and said.interval == 2.0
    # a line longer than a refresh line is skipped to its newline, without being kept; the next line counts
    assert not said.feed(b"y" * 100_000) and said.interval == 2.0
    assert not said.feed(b"y" * 100_000 + b"\n" + protocol.refresh_line(0.5)[:-1])
    assert said.feed(b"\n") and said.interval == 0.5


def test_steady_window_only_while_every_connected_monitor_refreshes_slowly():
    assert steady_window([]) is None  # nobody watching: the history a later monitor gets is as before
    assert steady_window([None]) is None  # an older monitor (or one that has not said yet)
    assert steady_window([STEADY_MIN_INTERVAL]) == STEADY_WINDOW_SECONDS
    assert steady_window([5.0, 1.0]) == STEADY_WINDOW_SECONDS
    assert steady_window([1.0, 0.25]) is None
    assert steady_window([1.0, None]) is None


def test_turning_the_steady_window_off_brings_the_short_window_back_at_once():
    c = StepCoalescer()
    c.set_steady(STEADY_WINDOW_SECONDS)
    t, n, sent = 0.0, 0, []
    while len(sent) < 30:  # steps every 10 ms until the window has stretched for a while
        n, t = n + 1, t + 0.01
        sent += [t for _ in c.add(_step(n), t)]
    assert c._window >= 0.8 * STEADY_WINDOW_SECONDS
    c.set_steady(None)
    assert c._window == WINDOW_SECONDS
    assert StepCoalescer(interval=0).steady_interval is None
    off = StepCoalescer(interval=0)
    off.set_steady(STEADY_WINDOW_SECONDS)  # no coalescing asked: nothing to stretch
    assert off.steady_interval is None


def test_transport_follows_what_its_connected_monitors_say(tmp_path):
    path = Path(f"/tmp/bmt-pace-{os.getpid()}.sock")
    transport = Transport(path, window_seconds=WINDOW_SECONDS)
    transport.start()
    try:
        transport.set_hello(_hello())
        slow = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        slow.connect(str(path))
        wait_for(lambda: transport.monitors == 1, what="accept")
        assert transport.coalescer.steady_interval is None  # it has not said how often it refreshes
        slow.sendall(protocol.refresh_line(1.0))
        wait_for(lambda: transport.coalescer.steady_interval == STEADY_WINDOW_SECONDS, what="steady")
        other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        other.connect(str(path))  # an older monitor: never says anything
        wait_for(lambda: transport.coalescer.steady_interval is None, what="short window for a silent monitor")
        other.sendall(protocol.refresh_line(0.25))
        other.sendall(protocol.refresh_line(1.5)[:7])  # half a line: the 0.25 stands
        assert transport.coalescer.steady_interval is None
        other.sendall(protocol.refresh_line(1.5)[7:])
        wait_for(lambda: transport.coalescer.steady_interval == STEADY_WINDOW_SECONDS, what="both slow")
        fast = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        fast.connect(str(path))
        fast.sendall(protocol.refresh_line(0.25))
        wait_for(lambda: transport.monitors == 3 and transport.coalescer.steady_interval is None, what="fast one")
        fast.close()
        wait_for(lambda: transport.monitors == 2 and transport.coalescer.steady_interval == STEADY_WINDOW_SECONDS,
                 what="fast one gone")
        slow.close()
        other.close()
        wait_for(lambda: transport.monitors == 0 and transport.coalescer.steady_interval is None, what="none left")
    finally:
        transport.close(Bye())


def _gaps(reader: Reader) -> list[float]:
    times = [m.time for m in reader.of(Step)]
    return [b - a for a, b in zip(times, times[1:])]


def test_a_slow_monitor_gets_about_one_window_a_second_and_a_fast_one_brings_the_short_window_back():
    path = Path(f"/tmp/bmt-pace2-{os.getpid()}.sock")
    transport = Transport(path, window_seconds=WINDOW_SECONDS)
    transport.start()
    try:
        transport.set_hello(_hello())
        reader = Reader(path)
        reader.sock.sendall(protocol.refresh_line(1.0))
        n = 0

        def step_until(done, what: str) -> None:
            nonlocal n
            deadline = time.monotonic() + 60
            while not done():
                assert time.monotonic() < deadline, what
                n += 1
                transport.put(_step(n))
                reader.pump()  # waits up to 50 ms for lines: the steps' pace

        # steady: once STEADY_AFTER short windows went on time, windows of 0.8-1.0 s
        step_until(lambda: len(_gaps(reader)) > 15 and max(_gaps(reader)[-3:]) >= 0.75, "windows stretch")
        assert all(0.75 <= g <= STEADY_WINDOW_SECONDS + 0.25 for g in _gaps(reader)[-2:])
        seen = len(reader.of(Step))
        reader.sock.sendall(protocol.refresh_line(0.25))  # the user pressed a key: refresh 4 times a second
        step_until(lambda: len(reader.of(Step)) > seen + 8, "short windows again")
        assert max(_gaps(reader)[-6:]) < 0.5
        steps = reader.of(Step)
        assert sum(s.steps for s in steps) == steps[-1].step  # windows lose no step
        reader.close()
    finally:
        transport.close(Bye())


def test_the_hub_says_its_interval_on_connecting_and_when_it_changes(agent_dir):
    agent_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    transport = Transport(protocol.socket_path(os.getpid(), agent_dir), window_seconds=WINDOW_SECONDS)
    transport.start()
    hub = Hub(interval=1.0, socket_dir=agent_dir)
    try:
        transport.set_hello(_hello())
        hub.start()
        wait_for(lambda: transport.monitors == 1 and transport.coalescer.steady_interval == STEADY_WINDOW_SECONDS,
                 what="hub at 1 s: steady")
        hub.set_interval(0.25)
        wait_for(lambda: transport.coalescer.steady_interval is None, what="hub at 0.25 s: short window")
        hub.set_interval(2.0)
        wait_for(lambda: transport.coalescer.steady_interval == STEADY_WINDOW_SECONDS, what="hub at 2 s: steady")
    finally:
        hub.stop()
        transport.close(Bye())


TELL_CLOSED = r'''
import signal, socket, sys
from pathlib import Path
from batchmon.monitor.agent_sockets import AgentConnection
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a CLI piped into head runs: a SIGPIPE would kill it
path = Path(sys.argv[1])
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(str(path))
server.listen(1)
conn = AgentConnection(1, path, "k")
assert conn.connect() == "connected"
peer, _ = server.accept()
peer.close()  # the agent went away
results = [conn.tell(b'{"v":1,"type":"refresh","interval":1.0}\n') for _ in range(3)]
print("alive", results)
'''


def test_telling_an_agent_that_closed_its_end_neither_raises_nor_kills_the_monitor(tmp_path):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", TELL_CLOSED, str(tmp_path / "a.sock")], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("alive") and "False" in out.stdout


def test_the_allocator_reads_follow_the_monitors_refresh(tmp_path):
    """How often the training thread reads the allocator's figures: what the socket thread tells it (on_pace) from
    its monitors' refresh lines - often while one refreshes faster than once a second or has not said, else half a
    steady window; with no monitor connected, the latter."""
    assert READ_SECONDS < READ_STEADY_SECONDS <= STEADY_WINDOW_SECONDS
    told: list[float] = []
    path = Path(f"/tmp/bmt-pace3-{os.getpid()}.sock")
    transport = Transport(path, window_seconds=WINDOW_SECONDS, on_pace=told.append)
    transport.start()
    try:
        transport.set_hello(_hello())
        wait_for(lambda: told == [READ_STEADY_SECONDS], what="no monitor: the steady reads")
        mon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mon.connect(str(path))
        wait_for(lambda: told[-1] == READ_SECONDS, what="a monitor that has not said")
        mon.sendall(protocol.refresh_line(STEADY_MIN_INTERVAL))
        wait_for(lambda: told[-1] == READ_STEADY_SECONDS, what="a monitor at once a second")
        mon.sendall(protocol.refresh_line(0.25))
        wait_for(lambda: told[-1] == READ_SECONDS, what="a monitor at 0.25 s")
        mon.close()
        wait_for(lambda: transport.monitors == 0 and told[-1] == READ_STEADY_SECONDS, what="none left")
    finally:
        transport.close(Bye())


def test_an_attached_agent_reads_the_allocator_as_its_socket_says(agent_dir):
    """The agent's meter takes the socket thread's figure (the handle wires the publisher's pace to it)."""
    import torch

    import batchmon

    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, socket_dir=agent_dir)
    try:
        for _ in range(2):
            model(torch.randn(3, 4)).sum().backward()
            opt.step()
            opt.zero_grad()
        wait_for(lambda: handle._meter.read_seconds == READ_STEADY_SECONDS, what="no monitor: the steady reads")
        mon = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        mon.connect(str(handle.socket_path))
        wait_for(lambda: handle._meter.read_seconds == READ_SECONDS, what="a monitor that has not said")
        mon.close()
    finally:
        handle.detach()
