"""The hub over real unix sockets: discovery, late history, garbage, vanishing agents, stale sockets, shutdown."""

from __future__ import annotations

import dataclasses
import os
import socket
import time

import pytest

from batchmon import protocol
from batchmon.monitor.hub import Hub
from batchmon.protocol import Bye, Event
from hub_peer import FakeAgent, LivePid, make_hello, make_step, wait_for


@pytest.fixture
def sockdir(tmp_path):
    return protocol.ensure_socket_dir(tmp_path / "sock")


@pytest.fixture
def pids():
    made: list[LivePid] = []

    def new() -> LivePid:
        made.append(LivePid())
        return made[-1]

    yield new
    for p in made:
        p.kill()


@pytest.fixture
def agents():
    made: list[FakeAgent] = []

    def new(*a, **kw) -> FakeAgent:
        made.append(FakeAgent(*a, **kw))
        return made[-1]

    yield new
    for a in made:
        a.close()


@pytest.fixture
def hub_factory(sockdir):
    hubs: list[Hub] = []

    def new(**kw) -> Hub:
        kw.setdefault("interval", 0.05)
        kw.setdefault("socket_dir", sockdir)
        hubs.append(Hub(**kw))
        return hubs[-1]

    yield new
    for h in hubs:
        h.stop()


def agent_view(hub: Hub, pid: int):
    for a in hub.snapshot().agents:
        if a.hello.pid == pid:
            return a
    return None


def test_discovers_new_socket_and_late_monitor_gets_history(sockdir, pids, agents, hub_factory):
    hub = hub_factory().start()
    wait_for(lambda: hub.ticks >= 2, what="two ticks")
    assert hub.snapshot().agents == ()
    p = pids()
    agent = agents(sockdir, p.pid, history=[make_step(n) for n in range(1, 1201)])
    view = wait_for(lambda: (v := agent_view(hub, p.pid)) and len(v.history) == 1200 and v, what="history")
    assert view.key == f"{socket.gethostname()}:{p.pid}"
    assert view.last_step.step == 1200 and view.history[0].step == 1
    assert view.connected and not view.detached and view.invalid_lines == 0
    agent.send_message(make_step(1201))
    wait_for(lambda: agent_view(hub, p.pid).last_step.step == 1201, what="live step")
    agent.send_message(Event(kind="oom", message="CUDA out of memory", requested_bytes=1 << 30))
    ev = wait_for(lambda: agent_view(hub, p.pid).events, what="event")
    assert ev[-1].kind == "oom" and ev[-1].requested_bytes == 1 << 30
    agent.send_message(Bye())
    wait_for(lambda: agent_view(hub, p.pid).detached, what="bye")


def test_history_is_bounded(sockdir, pids, agents, hub_factory):
    p = pids()
    agents(sockdir, p.pid, history=[make_step(n) for n in range(1, 2501)])
    hub = hub_factory().start()
    view = wait_for(lambda: (v := agent_view(hub, p.pid)) and v.last_step and v.last_step.step == 2500 and v)
    assert len(view.history) == 2000 and view.history[0].step == 501


def test_agent_vanishing_mid_line_is_counted_not_fatal(sockdir, pids, agents, hub_factory):
    p = pids()
    agent = agents(sockdir, p.pid, history=[make_step(1)])
    hub = hub_factory().start()
    hub.GONE_GRACE_S = 0.3
    wait_for(lambda: agent_view(hub, p.pid), what="agent")
    agent.send(b'{"v":1,"type":"step","step":2,"ti')
    agent.close()  # server and connection gone: EOF in the middle of a line
    view = wait_for(lambda: (v := agent_view(hub, p.pid)) and not v.connected and v, what="disconnect")
    assert view.invalid_lines == 1
    assert view.last_step.step == 1
    warned = [w for w in hub.snapshot().warnings if str(p.pid) in w.source]
    assert len(warned) == 1 and warned[0].count == 1 and "closed mid-line" in warned[0].message
    # after the grace period (its process alive) the run is over: an ended run, "lost"; the hub keeps running
    ended = wait_for(lambda: (v := agent_view(hub, p.pid)) and v.state == "ended" and v, what="end after grace")
    assert ended.ended.how == "lost" and ended.ended.steps == 1 and hub.state.agent_keys() == []
    assert hub.running and hub.error is None


def test_agent_whose_process_dies_is_removed_without_waiting_for_grace(sockdir, pids, agents, hub_factory):
    p = pids()
    agent = agents(sockdir, p.pid)
    hub = hub_factory().start()
    hub.GONE_GRACE_S = 3600.0
    wait_for(lambda: agent_view(hub, p.pid), what="agent")
    p.kill()
    agent.close()
    ended = wait_for(lambda: (v := agent_view(hub, p.pid)) and v.state == "ended" and v, what="end of a dead agent")
    assert ended.ended.how == "killed" and "without a goodbye" in ended.ended.text


def test_garbage_lines_are_counted_and_dropped(sockdir, pids, agents, hub_factory):
    p = pids()
    agent = agents(sockdir, p.pid)
    hub = hub_factory().start()
    wait_for(lambda: agent_view(hub, p.pid), what="agent")
    bad = [
        b"not json at all\n",
        b"[1, 2, 3]\n",
        b'{"v": 2, "type": "step"}\n',  # wrong version
        b'{"v": 1, "type": "step", "step": 1}\n',  # missing fields
        b'{"v": 1, "type": "step", "step": 1, "time": 1.0, "components": {"parameters": -5}}\n',
        b"\xff\xfe\xfd\n",  # not UTF-8
        b"{" * 100_000 + b"\n",  # deep nesting
        b"x" * (protocol.MAX_LINE_BYTES + 10) + b"\n",  # over the 1 MiB line limit
    ]
    for line in bad:
        agent.send(line)
    agent.send(b'{"v": 1, "type": "future-kind", "x": 1}\n')  # unknown type: ignored, not counted
    agent.send_message(make_step(5))
    view = wait_for(lambda: (v := agent_view(hub, p.pid)) and v.last_step and v.invalid_lines >= len(bad) and v,
                    what="invalid lines counted")
    assert view.invalid_lines == len(bad)
    assert view.last_step.step == 5 and view.connected
    (w,) = [w for w in hub.snapshot().warnings if str(p.pid) in w.source]
    assert w.count == len(bad)
    assert hub.running and hub.error is None


def test_a_line_of_nearly_one_mib_arrives_over_many_reads(sockdir, pids, agents, hub_factory):
    """The hub reads 64 KiB per connection per wake-up (agent_sockets.READ_BUDGET, for its RSS after a history
    burst): a valid line up to the 1 MiB limit still arrives whole, and the steps around it in order."""
    from batchmon.monitor import agent_sockets

    p = pids()
    agent = agents(sockdir, p.pid)
    hub = hub_factory().start()
    wait_for(lambda: agent_view(hub, p.pid), what="agent")
    # a step's wire form padded with a field the monitor does not know (ignored by design)
    line = protocol.encode(make_step(2))[:-2] + b', "pad": "' + b"x" * (protocol.MAX_LINE_BYTES - 4096) + b'"}\n'
    assert agent_sockets.READ_BUDGET * 8 < len(line) <= protocol.MAX_LINE_BYTES
    agent.send(protocol.encode(make_step(1)) + line + protocol.encode(make_step(3)))
    view = wait_for(lambda: (v := agent_view(hub, p.pid)) and v.last_step and v.last_step.step == 3 and v,
                    what="the step after the long line")
    assert [s.step for s in view.history] == [1, 2, 3] and view.invalid_lines == 0 and view.connected


def test_socket_of_dead_pid_is_removed_and_live_refusing_one_kept(sockdir, pids, hub_factory):
    dead = pids()
    dead.kill()
    stale = protocol.socket_path(dead.pid, sockdir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(stale))  # bound, never listening, then closed: the file of an agent that died
    s.close()
    alive = pids()
    busy = protocol.socket_path(alive.pid, sockdir)
    s2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s2.bind(str(busy))  # pid alive but not accepting (an agent starting up): must be left alone
    try:
        assert stale.exists() and busy.exists()
        hub = hub_factory().start()
        wait_for(lambda: not stale.exists(), what="stale socket removal")
        first = hub.ticks
        wait_for(lambda: hub.ticks >= first + 2, what="more scans")
        assert busy.exists()
        assert hub.snapshot().agents == ()
    finally:
        s2.close()


def test_two_agents(sockdir, pids, agents, hub_factory):
    p1, p2 = pids(), pids()
    agents(sockdir, p1.pid, make_hello(p1.pid, rank=1, world_size=2), [make_step(n, 8) for n in range(1, 4)])
    agents(sockdir, p2.pid, make_hello(p2.pid, rank=0, world_size=2), [make_step(n, 8) for n in range(1, 6)])
    hub = hub_factory().start()
    snap = wait_for(lambda: (s := hub.snapshot()) and len(s.agents) == 2 and all(len(a.history) >= 3
                    for a in s.agents) and s, what="both agents")
    by_pid = {a.hello.pid: a for a in snap.agents}
    assert set(by_pid) == {p1.pid, p2.pid}
    assert len(by_pid[p1.pid].history) == 3
    wait_for(lambda: len(agent_view(hub, p2.pid).history) == 5)
    assert [a.hello.rank for a in hub.snapshot().agents] == [0, 1]  # same job: ordered by rank
    assert len({a.key for a in hub.snapshot().agents}) == 2


def test_snapshots_are_immutable_and_independent(sockdir, pids, agents, hub_factory):
    p = pids()
    agent = agents(sockdir, p.pid, history=[make_step(1), make_step(2)])
    seen = []
    hub = hub_factory(on_snapshot=seen.append).start()
    old = wait_for(lambda: (s := hub.snapshot()) and s.agents and len(s.agents[0].history) == 2 and s)
    agent.send_message(make_step(3))
    wait_for(lambda: agent_view(hub, p.pid).last_step.step == 3)
    assert len(old.agents[0].history) == 2 and old.agents[0].last_step.step == 2
    assert [s.step for s in old.agents[0].history] == [1, 2] and old.agents[0].history[-1:] == (make_step(2),)
    assert isinstance(old.agents, tuple)
    history = old.agents[0].history  # a tuple or an immutable window that behaves like one
    assert history == (make_step(1), make_step(2)) and not hasattr(history, "append")
    with pytest.raises(TypeError):
        history[0] = make_step(9)  # type: ignore[index]
    assert isinstance(old.warnings, tuple) and isinstance(old.nvml.devices, tuple)
    with pytest.raises(dataclasses.FrozenInstanceError):
        old.agents[0].connected = False  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        old.time = 0.0  # type: ignore[misc]
    assert seen and seen[-1] is not old and all(a.time <= b.time for a, b in zip(seen, seen[1:]))


def test_stop_joins_thread_and_closes_sockets(sockdir, pids, agents, hub_factory):
    p = pids()
    agent = agents(sockdir, p.pid)
    hub = hub_factory().start()
    wait_for(lambda: agent.accepted == 1 and agent_view(hub, p.pid), what="connection")
    hub.stop()
    assert not hub.running
    wait_for(agent.client_closed, what="monitor side closed")
    hub.stop()  # idempotent


def test_set_interval_changes_tick_rate(hub_factory):
    hub = hub_factory(interval=5.0).start()
    wait_for(lambda: hub.ticks >= 1)
    hub.set_interval(0.02)
    wait_for(lambda: hub.ticks >= 5, timeout=5, what="faster ticks after set_interval")
    assert hub.snapshot().interval == 0.02
    with pytest.raises(ValueError):
        hub.set_interval(0)


def test_missing_socket_folder_means_no_agents_and_no_warning(tmp_path):
    hub = Hub(interval=0.05, socket_dir=tmp_path / "nowhere").start()
    try:
        wait_for(lambda: hub.ticks >= 2)
        snap = hub.snapshot()
        assert snap.agents == ()
        assert not [w for w in snap.warnings if w.source == "socket folder"]
    finally:
        hub.stop()


def test_unsafe_socket_folder_is_a_warning_and_not_used(tmp_path, pids, agents):
    unsafe = tmp_path / "open"
    unsafe.mkdir()
    os.chmod(unsafe, 0o755)
    p = pids()
    agents(unsafe, p.pid)
    hub = Hub(interval=0.05, socket_dir=unsafe).start()
    try:
        wait_for(lambda: hub.ticks >= 3)
        snap = hub.snapshot()
        (w,) = [w for w in snap.warnings if w.source == "socket folder"]
        assert "open to other users" in w.message and w.count == 1  # reported once, not once per scan
        assert snap.agents == ()
    finally:
        hub.stop()


def test_sample_once_waits_for_hello_and_history_burst(sockdir, pids, agents):
    p1, p2 = pids(), pids()
    # p1 announces its burst in its hello, as the agent does (sample_once waits for exactly that many lines);
    # p2 is an older agent that announces none (sample_once waits until its lines go quiet). A 1000-step burst
    # without the announcement made the test depend on the peer thread never pausing 50 ms under load (980 of 1000
    # seen once on a loaded box).
    agents(sockdir, p1.pid, hello=dataclasses.replace(make_hello(p1.pid), history=1000),
           history=[make_step(n) for n in range(1, 1001)])
    agents(sockdir, p2.pid, history=[make_step(n) for n in range(1, 11)])
    t0 = time.monotonic()
    snap = Hub(socket_dir=sockdir).sample_once(max_wait=5.0)
    elapsed = time.monotonic() - t0
    by_pid = {a.hello.pid: a for a in snap.agents}
    assert len(by_pid[p1.pid].history) == 1000 and len(by_pid[p2.pid].history) == 10
    assert elapsed < 4.0  # returned on quiescence, not at the deadline


def test_sample_once_is_bounded_by_the_deadline(sockdir, pids, agents):
    p = pids()
    agents(sockdir, p.pid, greeting=b"")  # connects but never says hello
    t0 = time.monotonic()
    snap = Hub(socket_dir=sockdir).sample_once(max_wait=0.3)
    assert 0.25 <= time.monotonic() - t0 < 3.0
    assert snap.agents == ()


def test_recorder_gets_every_record_in_order(sockdir, pids, agents, hub_factory):
    p = pids()
    agents(sockdir, p.pid, history=[make_step(1)])
    records = []
    hub = hub_factory(recorder=records.append).start()
    wait_for(lambda: agent_view(hub, p.pid) and agent_view(hub, p.pid).last_step and hub.ticks >= 2)
    hub.stop()
    kinds = [r["kind"] for r in records]
    assert {"nvml", "host", "tick", "agent"} <= set(kinds)
    agent_msgs = [r["data"]["type"] for r in records if r["kind"] == "agent"]
    assert agent_msgs[:2] == ["hello", "step"]
    assert all(r["source"] == "local" and isinstance(r["t"], float) for r in records)
    assert [r["t"] for r in records] == sorted(r["t"] for r in records)


def test_a_failing_on_snapshot_callback_is_a_warning(hub_factory):
    def boom(snap):
        raise RuntimeError("front end bug")

    hub = hub_factory(on_snapshot=boom).start()
    wait_for(lambda: hub.ticks >= 3)
    (w,) = [w for w in hub.snapshot().warnings if "on_snapshot" in w.message]
    assert w.count >= 2 and hub.running


class CountingHostProbe:
    """The real HostProbe, counting its samples and the pids asked for."""

    def __init__(self) -> None:
        from batchmon.probes.host import HostProbe

        self.probe = HostProbe()
        self.calls: list[tuple[float, tuple[int, ...]]] = []

    def sample(self, pids=()):
        self.calls.append((time.monotonic(), tuple(pids)))
        return self.probe.sample(pids)

    def close(self) -> None:
        self.probe.close()


def test_host_probe_runs_once_a_second_while_its_pids_stay_and_at_once_for_a_new_pid(sockdir, pids, agents,
                                                                                     hub_factory):
    host = CountingHostProbe()
    hub = hub_factory(host_probe=host).start()
    p1 = pids()
    agents(sockdir, p1.pid, history=[make_step(1)])
    wait_for(lambda: any(p1.pid in c[1] for c in host.calls), what="the first agent's pid sampled")
    first = next(i for i, c in enumerate(host.calls) if p1.pid in c[1])
    ticks0 = hub.ticks
    wait_for(lambda: hub.ticks >= ticks0 + 30, what="30 ticks (1.5 s at 0.05 s)")
    same = [c for c in host.calls[first:] if c[1] == host.calls[first][1]]
    gaps = [b[0] - a[0] for a, b in zip(same, same[1:])]
    assert 1 <= len(same) <= 3 and all(g >= hub.HOST_EVERY_S - 0.01 for g in gaps), same  # not 30 samples
    assert hub.snapshot().process(p1.pid) is not None  # the snapshot still shows the last sample
    p2 = pids()
    agents(sockdir, p2.pid, history=[make_step(1)])
    seen = time.monotonic()
    wait_for(lambda: agent_view(hub, p2.pid) is not None, what="the second agent")
    t2 = wait_for(lambda: next((c[0] for c in host.calls if p2.pid in c[1]), None), what="the new pid sampled")
    assert t2 - seen < hub.HOST_EVERY_S / 2 + 0.3  # a new pid does not wait for the second to pass
    assert hub.snapshot().process(p2.pid) is not None


class CountingMemoryHostProbe(CountingHostProbe):
    """The real HostProbe with its memory-only read, both counted."""

    def __init__(self) -> None:
        super().__init__()
        self.memory_calls: list[float] = []

    def memory(self):
        self.memory_calls.append(time.monotonic())
        return self.probe.memory()


def test_host_processes_are_read_every_few_seconds_the_host_memory_every_second(sockdir, pids, agents,
                                                                                hub_factory):
    """The screen shows a process's user, command and state, not its CPU share: while the pids stay the same the
    processes are read every HOST_PROCESSES_EVERY_S, the host's memory every HOST_EVERY_S, the snapshot keeping
    the processes of the last full sample; a new pid is sampled in full at once."""
    host = CountingMemoryHostProbe()
    hub = hub_factory(host_probe=host).start()
    p1 = pids()
    agents(sockdir, p1.pid, history=[make_step(1)])
    wait_for(lambda: any(p1.pid in c[1] for c in host.calls), what="the first agent's pid sampled")
    start = time.monotonic()
    full0, mem0 = len(host.calls), len(host.memory_calls)
    wait_for(lambda: len(host.memory_calls) >= mem0 + 3, timeout=10, what="three memory-only samples")
    took = time.monotonic() - start
    assert len(host.calls) - full0 <= 1 + took / hub.HOST_PROCESSES_EVERY_S  # not one a second
    snap = hub.snapshot()
    assert snap.process(p1.pid) is not None and snap.host.memory_total  # processes kept, memory fresh
    assert abs(snap.host.time - time.time()) < 2 * hub.HOST_EVERY_S + 0.5
    p2 = pids()
    agents(sockdir, p2.pid, history=[make_step(1)])
    seen = time.monotonic()
    t2 = wait_for(lambda: next((c[0] for c in host.calls if p2.pid in c[1]), None), what="the new pid sampled")
    assert t2 - seen < hub.HOST_EVERY_S / 2 + 0.5
    wait_for(lambda: hub.snapshot().process(p2.pid) is not None, what="the new pid in the snapshot")


def test_scan_skips_an_unchanged_folder_but_finds_an_agent_added_right_after_a_listing(sockdir, pids, agents,
                                                                                      hub_factory):
    """The folder is listed again only when it changes (or a connection failed); an agent whose socket appears
    within the same coarse file-time tick as the hub's last listing is still found."""
    import batchmon.monitor.hub as hub_module

    listings = []
    real_scan = hub_module.scan

    def counting_scan(directory, *known):
        listings.append(time.monotonic())
        return real_scan(directory, *known)

    hub_module.scan = counting_scan
    try:
        p1 = pids()
        agents(sockdir, p1.pid, history=[make_step(1)])
        hub = hub_factory().start()
        wait_for(lambda: agent_view(hub, p1.pid) is not None, what="the first agent")
        old = time.time() - 5  # the folder's last change looks settled: later ticks need not list it
        os.utime(sockdir, (old, old))
        n0, ticks0 = len(listings), hub.ticks
        wait_for(lambda: hub.ticks >= ticks0 + 20, what="20 ticks")
        assert len(listings) - n0 <= 2, "an unchanged folder was listed on every tick"
        for _ in range(3):  # new sockets, each found within a few ticks
            p = pids()
            agents(sockdir, p.pid, history=[make_step(1)])
            wait_for(lambda: agent_view(hub, p.pid) is not None, timeout=3, what="an agent added later")
    finally:
        hub_module.scan = real_scan
