"""The hub: one IO thread that hears every agent on this host, samples NVML and the host, and publishes Snapshots.

Every input becomes a record (batchmon.records) that goes through ``HubState.ingest`` and, if given, the
``recorder`` callback; so the TUI, ``--once``, ``record`` and ``stream`` all see exactly the same data.
One thread for everything: a selectors loop over agent sockets between probe ticks, no thread per refresh.
Nothing an agent or NVML sends can crash it; problems become counted Warnings in the snapshot.

Over 400 lines: the IO thread's loop is one piece (ticks, the socket folder's scan, connections, reads within a
time budget, reaping), tuned together for an idle monitor's cost; the pure parts live in hub_state and
agent_sockets.
"""

from __future__ import annotations

import os
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from batchmon import protocol, records
from batchmon.monitor.agent_sockets import (
    REFUSED,
    AgentConnection,
    ConnectResult,
    Found,
    connection_limit,
    exit_notes,
    pid_alive,
    scan,
    unlink_stale,
)
from batchmon.monitor.hub_state import HubState
from batchmon.monitor.threads import join_started, start_daemon
from batchmon.records import Record
from batchmon.snapshot import Snapshot


class Hub:
    """Live source of Snapshots. ``start()`` runs the IO thread; ``snapshot()`` is the latest one."""

    #: seconds a disconnected agent (no bye, pid alive) stays running before its run counts as ended ("lost")
    GONE_GRACE_S = 10.0
    #: how long stop() waits for the IO thread
    STOP_TIMEOUT_S = 5.0
    #: the host probe (CPU and RSS of each GPU/agent process) runs at most this often while its pid set stays
    #: the same: at --interval 0.25 with 64 agents, reading /proc for every pid 4 times a second was the
    #: largest part of the hub's own work; a CPU share over 1 s is also the steadier figure
    HOST_EVERY_S = 1.0
    #: ... and the processes' part of it at most this often (the host's memory still every HOST_EVERY_S): the
    #: monitor's screen shows a process's user, command and state, not its CPU share or RSS (--once and --json
    #: sample at once); beside 16 jobs the /proc reads of 16 processes every second were the hub thread's
    #: largest part (bench/ab_monitor.py --gpu-agents). A new or vanished pid is sampled at once.
    HOST_PROCESSES_EVERY_S = 5.0
    #: the socket folder is listed when its mtime changed, when a connection failed or dropped, while its mtime
    #: is recent (file times are coarse: a second change in the same clock tick keeps the mtime), and at least
    #: this often
    SCAN_EVERY_S = 5.0
    #: how long a launcher's exit note (``<pid>.exit``) stays in the socket folder for monitors to read
    EXIT_NOTE_KEEP_S = 60.0

    def __init__(
        self,
        *,
        interval: float = 1.0,
        socket_dir: Path | None = None,
        nvml_probe: Any = None,
        host_probe: Any = None,
        on_snapshot: Callable[[Snapshot], None] | None = None,
        recorder: Callable[[Record], None] | None = None,
        hosts: Sequence[str] = (),
    ) -> None:
        self._interval = _check_interval(interval)
        self._told = self._interval  # the interval the agents were told (set_interval may change _interval)
        self._socket_dir = Path(socket_dir) if socket_dir is not None else None
        self._nvml = nvml_probe
        self._host = host_probe
        self._own_probes: list[Any] = []
        self.on_snapshot = on_snapshot  # public: a front end given an unstarted Hub may set it before start()
        self._recorder = recorder
        self.hostname = socket.gethostname()
        self.state = HubState()  # touched only by the IO thread (or by sample_once's caller)
        self._conns: dict[int, AgentConnection] = {}
        self._disconnected: dict[int, tuple[str, float]] = {}  # pid -> (key, monotonic time of EOF)
        self._dir_problem: str | None = None
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, selectors.EVENT_READ, None)
        # Between ticks the IO thread waits on this one: the wake pipe and the connections still in their first
        # history burst. A steady agent's lines wait in its socket until the tick that shows them (snapshots are
        # built only at ticks, so they show the same steps), and a training step costs the monitor no wake-up.
        self._idle_sel = selectors.DefaultSelector()
        self._idle_sel.register(self._wake_r, selectors.EVENT_READ, None)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._closed = False
        # set by the IO thread as it leaves _run (after closing): stop(), wait(), running and _close go by it, not
        # by Thread.is_alive - a Thread.join interrupted by a signal handler's exception (the exporter's TERM
        # inside wait()) can leave is_alive() False while the thread still runs (CPython), and stop() then
        # closed the selectors under the IO thread ("I/O operation on closed epoll object", exit 1)
        self._io_done = threading.Event()
        self._last_data = time.monotonic()
        self._host_key: tuple[float, tuple[int, ...]] | None = None  # (monotonic time, pids) of the last host sample
        self._host_full: tuple[float, Any] | None = None  # (monotonic time, sample) of the last one with processes
        self._scan_key: tuple[int, float] | None = None  # (folder mtime_ns, monotonic time) of the last listing
        self._rescan = True
        self._exits_seen: set[tuple[int, float]] = set()  # exit notes already turned into records
        self._dir_seen: tuple | None = None  # the socket folder's lstat identity when its safety was last checked
        self._pending: list[Any] = []  # selector events not handled yet (a poll stopped for the next tick)
        self.error: BaseException | None = None  # what ended the IO thread early (a recorder that failed)
        self.ticks = 0
        self._injected: deque[Record] = deque()  # records from other threads (remote links), drained by the IO thread
        self._links: list[Any] = []
        if hosts:
            from batchmon.monitor.remote import RemoteLink

            self._links = [RemoteLink(h, self.inject, interval=self._interval) for h in dict.fromkeys(hosts)]
            for link in self._links:
                self.state.add_source(link.host)
        self._latest = self.state.snapshot(time.time(), self._interval)

    # ------------------------------------------------------------------------------------------ public API

    def start(self) -> "Hub":
        if self._thread is None and not self._closed:
            self.start_remotes()
            self._thread = start_daemon(self._run, "batchmon-hub")
        return self

    def start_remotes(self) -> None:
        """Start one reader thread per --host (start() does it; --once calls it before sample_once)."""
        for link in self._links:
            link.start()

    @property
    def links(self) -> list[Any]:
        return list(self._links)

    def remotes_ready(self) -> bool:
        """Every remote host sent a first NVML sample or failed an attempt (what --once waits for)."""
        return all(link.ready for link in self._links)

    def inject(self, record: Record) -> None:
        """Hand a record to the IO thread from any thread (the remote links do). Thread-safe."""
        self._injected.append(record)
        self._wake()

    def clear_ended(self) -> None:
        """Forget the ended runs (the monitor's `x`); thread-safe, recorded like every other input."""
        self.inject(records.clear_ended())

    def stop(self) -> None:
        """Stop the IO thread, remote links, agent sockets and the probes this hub opened. Idempotent."""
        for link in self._links:
            link.stop()
        self._stopping.set()
        self._wake()
        # Bounded: a driver call that hangs must not hang quitting; the daemon thread then closes on its way out.
        if self._io_running():
            self._io_done.wait(self.STOP_TIMEOUT_S)
            join_started(self._thread, 0.1)
        self._close()

    def snapshot(self) -> Snapshot:
        return self._latest

    def set_interval(self, seconds: float) -> None:
        self._interval = _check_interval(seconds)
        self._wake()

    @property
    def interval(self) -> float:
        return self._interval

    @property
    def running(self) -> bool:
        return self._thread is not None and not self._io_done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the IO thread to end (stop() or a failed recorder). True when it has ended."""
        if self._thread is None:
            return True
        return self._io_done.wait(timeout)

    def sample_once(self, max_wait: float = 0.5, quiet: float = 0.05) -> Snapshot:
        """One snapshot without a thread, for ``batchmon --once``.

        Connects to every agent socket, samples NVML, then reads until every connected agent has said hello
        and sent the history burst its hello announced (an agent that announces none: until its lines have gone
        quiet for ``quiet`` seconds), or ``max_wait`` passes; then samples the host and builds the snapshot.
        Closes everything before returning.
        """
        try:
            self._open_probes()
            self._scan()
            nvml_sample = self._sample_nvml()
            deadline = time.monotonic() + max_wait
            while self._conns:
                now = time.monotonic()
                if now >= deadline:
                    break
                received = [self.state.history_received(c.key) for c in self._conns.values()]
                if all(received):  # every agent's announced history is in: exact, no waiting for quiet
                    break
                if False not in received and now - self._last_data >= quiet:
                    break  # agents that announce no burst: their burst is over once the lines go quiet
                self._poll(min(deadline - now, quiet))
            self._sample_host(nvml_sample, always=True)
            self._drain_injected()
            snap = self.state.snapshot(time.time(), self._interval)
            self._latest = snap
            return snap
        finally:
            for link in self._links:
                link.stop()
            self._close()

    # ------------------------------------------------------------------------------------------ IO thread

    def _run(self) -> None:
        try:
            self._open_probes()
            last_tick = None
            while not self._stopping.is_set():
                now = time.monotonic()
                if self._told != self._interval:
                    self._tell_interval()
                if last_tick is None or now - last_tick >= self._interval:
                    last_tick = now
                    self._read_agents(now + min(self._interval / 2, 0.2))
                    self._tick()
                    continue
                self._poll(max(0.0, last_tick + self._interval - now), last_tick + self._interval, idle=True)
        except BaseException as exc:  # noqa: BLE001 - kept for the owner (recorder failure, broken pipe)
            self.error = exc
        finally:
            self._close()
            self._io_done.set()

    def _tell_interval(self) -> None:
        """Say the new refresh interval to every connected agent (batchmon.agent.pace: their step window)."""
        self._told = self._interval
        line = protocol.refresh_line(self._told)
        for conn in self._conns.values():
            conn.tell(line)

    def _tick(self) -> None:
        self._scan()
        self._reap()
        nvml_sample = self._sample_nvml()
        self._sample_host(nvml_sample)
        # what the agents sent while the probes ran: a step that arrived just after the tick's read would wait a
        # whole interval more (bench/load.py's latency tail: the probes' time, 64 agents' pids, is added to it)
        self._read_agents(time.monotonic() + min(self._interval / 8, 0.05))
        self._drain_injected()
        snap = self.state.snapshot(time.time(), self._interval)
        self._latest = snap
        self.ticks += 1
        self._emit(records.tick(snap.time))
        if self.on_snapshot is not None:
            try:
                self.on_snapshot(snap)
            except Exception as exc:  # noqa: BLE001 - a front-end bug must not stop monitoring
                self._warn("hub", f"on_snapshot callback failed: {type(exc).__name__}: {exc}")

    def _emit(self, record: Record) -> None:
        self.state.ingest(record)
        if self._recorder is not None:
            self._recorder(record)  # a failing recorder ends the hub (stream: the reader went away)

    def _drain_injected(self) -> None:
        while self._injected:
            self._emit(self._injected.popleft())

    def _warn(self, origin: str, message: str) -> None:
        self._emit(records.warning(origin, message))

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    # ------------------------------------------------------------------------------------------ probes

    def _open_probes(self) -> None:
        if self._nvml is None:
            try:
                from batchmon.probes.nvml import NvmlProbe

                self._nvml = NvmlProbe()
                self._own_probes.append(self._nvml)
            except Exception as exc:  # noqa: BLE001
                self._nvml = _FailedProbe(f"NVML probe could not start: {type(exc).__name__}: {exc}")
        if self._host is None:
            try:
                from batchmon.probes.host import HostProbe

                self._host = HostProbe()
                self._own_probes.append(self._host)
            except Exception as exc:  # noqa: BLE001
                self._host = _FailedProbe(f"host probe could not start: {type(exc).__name__}: {exc}")

    def _sample_nvml(self) -> Any:
        from batchmon.probes import nvml

        try:
            if isinstance(self._nvml, _FailedProbe):
                sample = nvml.NvmlSample(available=False, error=self._nvml.reason, driver=None, time=time.time())
            else:
                sample = self._nvml.sample()
            record = self._sample_record("nvml", sample, nvml.NvmlSample, nvml.sample_to_dict)
        except Exception as exc:  # noqa: BLE001 - the probe promises not to raise; we do not rely on it
            self._warn("nvml", f"probe failed: {type(exc).__name__}: {exc}")
            return None
        self._emit(record)
        return sample

    def _sample_record(self, kind: str, sample: Any, sample_type: type, to_dict: Callable[[Any], Any]) -> Record:
        """A probe sample as a hub record. With a recorder: its dict form (what is written is what is shown).
        Without one, the sample object itself rides along (HubState takes it as is): converting to a dict and
        parsing it back each tick was a good part of an idle monitor's per-second work."""
        if self._recorder is None and type(sample) is sample_type:
            return records.sample(kind, sample=sample)
        return records.sample(kind, data=to_dict(sample))

    def _sample_host(self, nvml_sample: Any, *, always: bool = False) -> None:
        from batchmon.probes import host

        pids = set(self.state.agent_pids()) | set(self._conns)
        for dev in getattr(nvml_sample, "devices", ()) or ():
            pids.update(p.pid for p in dev.processes)
        now, wanted = time.monotonic(), tuple(sorted(pids))
        last = self._host_key
        if not always and last is not None and last[1] == wanted and 0 <= now - last[0] < self.HOST_EVERY_S:
            return  # the state keeps the previous host sample
        full = self._host_full
        memory_only = (not always and full is not None and last is not None and last[1] == wanted
                       and 0 <= now - full[0] < self.HOST_PROCESSES_EVERY_S
                       and callable(getattr(self._host, "memory", None)))
        self._host_key = (now, wanted)
        try:
            if isinstance(self._host, _FailedProbe):
                sample = host.HostSample(hostname=self.hostname, memory_total=None, memory_used=None,
                                         processes={}, time=time.time())
            elif memory_only and full is not None:
                total, used = self._host.memory()  # the processes as sampled last: what the screen shows of them
                sample = replace(full[1], memory_total=total, memory_used=used, time=time.time())
            else:
                sample = self._host.sample(wanted)
                if type(sample) is host.HostSample:
                    self._host_full = (now, sample)
            record = self._sample_record("host", sample, host.HostSample, host.sample_to_dict)
        except Exception as exc:  # noqa: BLE001
            self._warn("host", f"probe failed: {type(exc).__name__}: {exc}")
            return
        self._emit(record)

    # ------------------------------------------------------------------------------------------ agents

    def _key(self, pid: int) -> str:
        return f"{self.hostname}:{pid}"

    def _scan(self) -> None:
        """Connect to new agent sockets; drop stale ones. Missing folder: no agents. Unsafe folder: a warning.

        One lstat of the folder per tick: its safety is checked again only when that changes (created, replaced,
        chmod, chown, entries added or removed), and it is listed only as SCAN_EVERY_S says. An idle monitor
        ticks once a second for days; each tick's fixed cost is most of what it costs."""
        directory = self._socket_dir or protocol.socket_dir()
        try:
            st = os.lstat(directory)
            seen: tuple = (directory, st.st_ino, st.st_mode, st.st_uid, st.st_mtime_ns)
        except OSError:
            st, seen = None, (directory, None)
        if seen != self._dir_seen:
            self._dir_seen = seen
            problem = None
            if st is not None:
                try:
                    protocol.check_socket_dir(directory)
                except protocol.SocketDirError as exc:
                    problem = str(exc)
            if problem != self._dir_problem:
                self._dir_problem = problem
                if problem:
                    self._warn("socket folder",
                               f"{problem.removeprefix('socket folder ')}; not connecting to agents there")
        if self._dir_problem or st is None:
            return
        mtime = st.st_mtime_ns  # before listing: a later change shows as a new mtime
        now, last = time.monotonic(), self._scan_key
        settled = time.time() - mtime / 1e9 > 1.0
        if (not self._rescan and settled and last is not None and last[0] == mtime
                and 0 <= now - last[1] < self.SCAN_EVERY_S):
            return  # nothing appeared or vanished since the last listing
        self._scan_key, self._rescan = (mtime, now), False
        self._read_exit_notes(directory)
        for found in scan(directory, self._conns):
            if found.pid not in self._conns and len(self._conns) >= connection_limit():
                self._warn("agents", f"more agent sockets than {connection_limit()} (the open-file limit); "
                                     "not connecting to the rest")
                break
            if found.pid not in self._conns and not self._connect(found):
                self._rescan = True  # busy listener, or stale with a live pid: look again next tick

    def _read_exit_notes(self, directory: Path) -> None:
        """`batchmon run` leaves ``<pid>.exit`` (its child's exit status) in the socket folder: each becomes one
        agent_exit record; a note older than EXIT_NOTE_KEEP_S is removed (every monitor has seen it by then)."""
        now = time.time()
        for note in exit_notes(directory):
            seen = (note.pid, note.mtime)
            if seen not in self._exits_seen:
                self._exits_seen.add(seen)
                self._emit(records.agent_exit(self._key(note.pid), note.returncode))
            if now - note.mtime > self.EXIT_NOTE_KEEP_S:
                try:
                    note.path.unlink()
                except OSError:
                    pass
                self._exits_seen.discard(seen)

    def _connect(self, found: Found) -> bool:
        conn = AgentConnection(found.pid, found.path, self._key(found.pid))
        result = conn.connect()
        if result == ConnectResult.CONNECTED:
            self._conns[found.pid] = conn
            self._disconnected.pop(found.pid, None)
            sock = conn.sock
            assert sock is not None  # connected: it has its socket
            self._sel.register(sock, selectors.EVENT_READ, conn)
            self._idle_sel.register(sock, selectors.EVENT_READ, conn)
            conn.tell(protocol.refresh_line(self._told))  # how often we refresh: the agent's step window
            return True
        if result == ConnectResult.STALE and not pid_alive(found.pid):
            unlink_stale(found.path)
        return False

    def _reap(self) -> None:
        """Remove disconnected agents whose process died or whose grace period is over."""
        now = time.monotonic()
        for pid, (key, since) in list(self._disconnected.items()):
            if pid in self._conns:
                continue
            alive = pid_alive(pid)
            if not alive or now - since >= self.GONE_GRACE_S:
                del self._disconnected[pid]
                self._emit(records.agent_gone(key, why="silent" if alive else "process ended"))

    def _read_agents(self, until: float) -> None:
        """At a tick: everything the agents sent since the last one, within a time budget (a burst's rest is
        read first at the next tick)."""
        while True:
            self._poll(0.0, until)
            if self._pending or not self._sel.select(0) or time.monotonic() >= until:
                return

    def _settled(self, conn: AgentConnection) -> None:
        """A connection whose history burst is in waits for the ticks from now on (see _idle_sel)."""
        received = self.state.history_received(conn.key)
        if received or (received is None and time.monotonic() - conn.opened > 1.0):
            if conn.sock is not None:
                try:
                    self._idle_sel.unregister(conn.sock)
                except (KeyError, ValueError, OSError):
                    pass

    def _poll(self, timeout: float, until: float | None = None, idle: bool = False) -> None:
        """Read what the agents sent. With ``until`` (the next tick, monotonic), stop between connections once
        it has passed: a burst (64 agents each sending a 2000-step history on connect) must not hold back the
        snapshots; the connections not yet read are read first next time, so none is starved."""
        events, self._pending = self._pending or (self._idle_sel if idle else self._sel).select(timeout), []
        for i, (sel_key, _) in enumerate(events):
            if until is not None and i and time.monotonic() >= until:
                self._pending = events[i:]
                return
            conn = sel_key.data
            if conn is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except OSError:
                    pass
                self._drain_injected()
                continue
            bodies = conn.read()
            if bodies:
                self._last_data = time.monotonic()
            for body in bodies:
                self._emit(records.agent(conn.key, body))
            if conn.eof:
                self._drop(conn)
            elif idle:
                self._settled(conn)

    def _drop(self, conn: AgentConnection) -> None:
        for sel in (self._sel, self._idle_sel):
            if conn.sock is not None:
                try:
                    sel.unregister(conn.sock)
                except (KeyError, ValueError, OSError):
                    pass
        conn.close()
        self._conns.pop(conn.pid, None)
        self._rescan = True  # its socket may still be there (a new listener): reconnect at the next tick
        self._disconnected[conn.pid] = (conn.key, time.monotonic())
        if conn.bytes_read == 0:  # not even a hello: the agent refuses monitors (or was ending)
            self._emit(records.warning("agents", REFUSED, f"pid {conn.pid}"))
        self._emit(records.agent_eof(conn.key))

    def _io_running(self) -> bool:
        """The IO thread was started, has not left _run, and is not the caller."""
        thread = self._thread
        return (thread is not None and thread.ident is not None and not self._io_done.is_set()
                and thread is not threading.current_thread())

    def _close(self) -> None:
        if self._io_running():
            return  # the IO thread closes on its way out
        if self._closed:
            return
        self._closed = True
        for conn in list(self._conns.values()):
            conn.close()
        self._conns.clear()
        for probe in self._own_probes:
            try:
                probe.close()
            except Exception:  # noqa: BLE001
                pass
        self._own_probes.clear()
        try:
            self._sel.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self._idle_sel.close()
        except OSError:
            pass
        for s in (self._wake_r, self._wake_w):
            s.close()


class _FailedProbe:
    """Stands in for a probe that could not be created, so the snapshot says why instead of crashing."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def close(self) -> None:
        pass


def _check_interval(seconds: float) -> float:
    seconds = float(seconds)
    if not seconds > 0 or seconds != seconds or seconds == float("inf"):
        raise ValueError(f"interval must be a positive number of seconds, got {seconds!r}")
    return max(seconds, 0.01)
