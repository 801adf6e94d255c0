"""The host probe: host memory and, for each GPU process, who runs it and what it costs the host.

(Types are fixed here; the probe implementation follows below them; what it reads, and how, is probes/procfs.py:
Linux's /proc, psutil only where there is none.)
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from batchmon.probes.procfs import Denied, Gone, ProcessTimes, Reader, reader


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    user: str | None
    command: str | None
    cpu_percent: float | None
    rss: int | None
    state: str = "ok"  # "ok", "gone" (vanished), "denied" (cannot be read)


@dataclass(frozen=True)
class HostSample:
    hostname: str
    memory_total: int | None
    memory_used: int | None
    processes: dict[int, ProcessInfo] = field(default_factory=dict)
    time: float = 0.0


# ----------------------------------------------------------------------------------------------- the probe


class HostProbe:
    """Host memory and, for the pids asked about, who runs them and what they cost the host. Never raises.

    Each pid's CPU time and start are kept between samples (only for pids still asked about), so cpu_percent is
    the share of one CPU since the previous sample (psutil's ``cpu_percent()``: it may exceed 100); on a process's
    first sample - or a reused pid's, told by its start time - it is None, not a meaningless 0.0. A process's user
    and command line are read again only every STATIC_EVERY_S (the hub samples every pid each tick: re-reading
    /proc/<pid>/status and cmdline each time was most of the probe's cost; a command line changes rarely, e.g.
    setproctitle); CPU and RSS are read every sample.
    """

    STATIC_EVERY_S = 10.0

    def __init__(self) -> None:
        self._reader: Reader | None = None
        self._last: dict[int, tuple[ProcessTimes, float]] = {}  # pid -> (its times, monotonic time read)
        # pid -> (user, command, denied, monotonic time read)
        self._static: dict[int, tuple[str | None, str | None, bool, float]] = {}
        self._hostname = _hostname()

    def _read(self) -> Reader:
        if self._reader is None:
            self._reader = reader()
        return self._reader

    def close(self) -> None:
        """Forget the kept per-process readings (the probe stays usable)."""
        self._last.clear()
        self._static.clear()

    def memory(self) -> tuple[int | None, int | None]:
        """The host's (total, used) memory alone (the hub refreshes it between samples of the processes)."""
        try:
            return self._read().memory()
        except Exception:
            return None, None

    def sample(self, pids: Iterable[int] = ()) -> HostSample:
        memory_total, memory_used = self.memory()
        wanted = sorted({int(p) for p in pids if isinstance(p, int) and not isinstance(p, bool) and p > 0})
        processes = {pid: self._process(pid) for pid in wanted}
        for pid in [p for p in self._last if p not in processes]:
            del self._last[pid]  # forget processes nobody asks about any more
            self._static.pop(pid, None)
        return HostSample(hostname=self._hostname, memory_total=memory_total, memory_used=memory_used,
                          processes=processes, time=time.time())

    def _process(self, pid: int) -> ProcessInfo:
        try:
            read = self._read()
            times = read.times(pid)
            now = time.monotonic()
            last = self._last.get(pid)
            first = last is None or last[0].start != times.start  # never seen, or a new process with this pid
            self._last[pid] = (times, now)
            static = None if first else self._static.get(pid)
            if static is None or now - static[3] >= self.STATIC_EVERY_S:
                try:
                    user, command = read.identity(pid)
                    static = (user, command, False, now)
                except Denied:
                    static = (None, None, True, now)
                self._static[pid] = static
        except Gone:
            self._forget(pid)
            return ProcessInfo(pid, None, None, None, None, state="gone")
        except Denied:
            self._forget(pid)
            return ProcessInfo(pid, None, None, None, None, state="denied")
        except Exception:
            self._forget(pid)
            return ProcessInfo(pid, None, None, None, None, state="gone")
        user, command, denied, _ = static
        cpu = None
        if not first and last is not None and now > last[1]:
            cpu = round(max(0.0, times.cpu_seconds - last[0].cpu_seconds) / (now - last[1]) * 100, 1)
        return ProcessInfo(pid=pid, user=user, command=command or None, cpu_percent=cpu, rss=times.rss,
                           state="denied" if denied or times.rss is None else "ok")

    def _forget(self, pid: int) -> None:
        self._last.pop(pid, None)
        self._static.pop(pid, None)


def _hostname() -> str:
    try:
        return socket.gethostname() or "localhost"
    except Exception:
        return "localhost"


# ----------------------------------------------------------------------------------------------- dict form

_STATES = ("ok", "gone", "denied")


def sample_to_dict(sample: HostSample) -> dict[str, Any]:
    """JSON-able form of a host sample; processes as a list ordered by pid."""
    return {
        "hostname": sample.hostname,
        "memory_total": sample.memory_total,
        "memory_used": sample.memory_used,
        "time": sample.time,
        "processes": [
            {"pid": p.pid, "user": p.user, "command": p.command, "cpu_percent": p.cpu_percent, "rss": p.rss,
             "state": p.state}
            for _, p in sorted(sample.processes.items())
        ],
    }


def _field(d: Mapping[str, Any], key: str, where: str, kinds: tuple[type, ...], *, nullable: bool = True) -> Any:
    value = d.get(key)
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{where}{key}: missing")
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{where}{key}: expected {kinds[0].__name__}, got {type(value).__name__}")
    if isinstance(value, (int, float)) and not (0 <= value <= MAX_NUMBER):
        # as the agent protocol caps its sizes: a JSON integer >= 2**1024 made float() raise OverflowError later
        raise ValueError(f"{where}{key}: {_short(value)} out of range")
    return value


MAX_NUMBER = 1 << 62  # protocol.MAX_SIZE: no byte count, pid, CPU share or time a sample holds is larger


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


def sample_from_dict(d: Any) -> HostSample:
    """Parse sample_to_dict's output (processes as a list, or an object keyed by pid). Raises ValueError."""
    if not isinstance(d, Mapping):
        raise ValueError(f"host sample: expected an object, got {type(d).__name__}")
    raw = d.get("processes") or []
    if isinstance(raw, Mapping):
        raw = [{"pid": int(k) if str(k).isdigit() else k, **v} if isinstance(v, Mapping) else v
               for k, v in raw.items()]
    if not isinstance(raw, list):
        raise ValueError("host sample processes: expected a list")
    processes: dict[int, ProcessInfo] = {}
    for i, p in enumerate(raw):
        where = f"host processes[{i}]."
        if not isinstance(p, Mapping):
            raise ValueError(f"host processes[{i}]: expected an object")
        state = _field(p, "state", where, (str,)) or "ok"
        if state not in _STATES:
            raise ValueError(f"{where}state: {state!r} is not one of {', '.join(_STATES)}")
        cpu = _field(p, "cpu_percent", where, (float, int))
        info = ProcessInfo(pid=_field(p, "pid", where, (int,), nullable=False), user=_field(p, "user", where, (str,)),
                           command=_field(p, "command", where, (str,)),
                           cpu_percent=None if cpu is None else float(cpu), rss=_field(p, "rss", where, (int,)),
                           state=state)
        processes[info.pid] = info
    hostname = d.get("hostname")
    if not isinstance(hostname, str):
        raise ValueError("host sample hostname: expected a string")
    t = _field(d, "time", "host sample ", (float, int))
    return HostSample(hostname=hostname, memory_total=_field(d, "memory_total", "host sample ", (int,)),
                      memory_used=_field(d, "memory_used", "host sample ", (int,)), processes=processes,
                      time=0.0 if t is None else float(t))
