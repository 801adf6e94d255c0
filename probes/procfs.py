"""What the host probe reads about the host and its processes, from Linux's /proc (psutil where there is none).

Why not psutil everywhere: importing it costs the monitor ~2 MiB of RSS (measured: 2.07 MiB on the dev box),
and beside 16 jobs the monitor's RSS stood at nvitop's + 19-21 MiB against the issue's + 20 (issue 14 point 3);
the probe needs five small files per process. psutil stays the fallback where /proc is missing (macOS), imported
only then. Figures are psutil's definitions, so screens and recordings read the same:

- memory: total ``MemTotal``; used ``MemTotal - MemAvailable`` (free's "available"; without it free + buffers +
  cached + reclaimable slab), as ``psutil.virtual_memory().used`` since psutil 6;
- a process's CPU time: ``utime + stime`` of ``/proc/PID/stat`` in seconds; its start (``starttime``, clock ticks
  since boot) tells a reused pid from the process first seen, as ``psutil.Process.is_running`` does;
- RSS: ``/proc/PID/statm``'s resident pages x the page size; user: the real uid's name (the uid itself when it has
  no name); command: ``/proc/PID/cmdline``'s arguments joined by spaces, else the process name (``comm``).
"""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

PROC = Path("/proc")
_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class Gone(Exception):
    """The process does not exist (any more), or is a zombie."""


class Denied(Exception):
    """The process exists but this user may not read it."""


@dataclass(frozen=True)
class ProcessTimes:
    cpu_seconds: float  # user + system
    start: float  # when it started, in the backend's own unit (only compared for equality)
    rss: int | None


class Reader(Protocol):
    """One way of reading the host (procfs, or psutil where there is no /proc)."""

    def memory(self) -> tuple[int, int]: ...
    def times(self, pid: int) -> ProcessTimes: ...
    def identity(self, pid: int) -> tuple[str | None, str | None]: ...


def reader() -> Reader:
    """/proc's reader on Linux, psutil's elsewhere."""
    return ProcReader() if (PROC / "self" / "stat").exists() else PsutilReader()


class ProcReader:
    """Reads /proc directly. Raises Gone or Denied; never imports psutil."""

    def memory(self) -> tuple[int, int]:
        fields: dict[str, int] = {}
        with open(PROC / "meminfo", "rb") as f:
            for line in f:
                name, _, rest = line.partition(b":")
                parts = rest.split()
                if parts:
                    fields[name.decode()] = int(parts[0]) * 1024
        total, free = fields["MemTotal"], fields["MemFree"]
        avail = fields.get("MemAvailable") or (  # (0 or missing: an old kernel's, or a kernel bug: free's estimate)
            free + fields.get("Buffers", 0) + fields.get("Cached", 0) + fields.get("SReclaimable", 0))
        if avail > total:  # a container's distorted figures: psutil and procps fall back to the free memory
            avail = free
        return total, total - max(0, avail)

    def times(self, pid: int) -> ProcessTimes:
        rest = _stat_fields(_read(pid, "stat"))
        if rest[0] in (b"Z", b"X"):  # a zombie (or dead): gone for us, as for the monitor
            raise Gone(pid)
        ticks = int(rest[11]) + int(rest[12])  # utime, stime (fields 14 and 15)
        start = float(rest[19])  # starttime (field 22)
        try:
            rss: int | None = int(_read(pid, "statm").split()[1]) * _PAGE
        except Denied:
            rss = None
        return ProcessTimes(ticks / _TICKS, start, rss)

    def identity(self, pid: int) -> tuple[str | None, str | None]:
        user = None
        for line in _read(pid, "status").splitlines():
            if line.startswith(b"Uid:"):
                uid = int(line.split()[1])  # the real uid, as psutil's username()
                try:
                    user = pwd.getpwuid(uid).pw_name
                except KeyError:
                    user = str(uid)
                break
        try:
            args = [a.decode(errors="replace") for a in _read(pid, "cmdline").split(b"\0") if a]
        except Denied:
            args = []
        command = " ".join(args) if args else _read(pid, "comm").strip().decode(errors="replace") or None
        return user, command


def _stat_fields(stat: bytes) -> list[bytes]:
    """/proc/PID/stat's fields from the state (field 3) on: the name (field 2) is in parentheses and may hold spaces
    or ')', so they start after the last ')'."""
    return stat[stat.rindex(b")") + 2:].split()


def _read(pid: int, name: str) -> bytes:
    try:
        with open(PROC / str(pid) / name, "rb") as f:
            return f.read()
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        raise Gone(pid) from None
    except PermissionError:
        raise Denied(pid) from None
    except OSError as exc:  # ESRCH while reading a file of a process that just exited
        raise Gone(pid) from exc


class PsutilReader:
    """psutil's view, where there is no /proc (imported here only)."""

    def __init__(self) -> None:
        import psutil

        self._psutil: Any = psutil

    def memory(self) -> tuple[int, int]:
        vm = self._psutil.virtual_memory()
        return int(vm.total), int(vm.used)

    def _call(self, pid: int, fn: Any) -> Any:
        ps = self._psutil
        try:
            return fn(ps.Process(pid))
        except (ps.NoSuchProcess, ProcessLookupError):  # ZombieProcess included
            raise Gone(pid) from None
        except ps.AccessDenied:
            raise Denied(pid) from None

    def times(self, pid: int) -> ProcessTimes:
        ps = self._psutil

        def read(p: Any) -> ProcessTimes:
            with p.oneshot():
                if p.status() == ps.STATUS_ZOMBIE:
                    raise ps.ZombieProcess(pid)
                t = p.cpu_times()
                return ProcessTimes(t.user + t.system, p.create_time(), int(p.memory_info().rss))

        return self._call(pid, read)

    def identity(self, pid: int) -> tuple[str | None, str | None]:
        def read(p: Any) -> tuple[str | None, str | None]:
            cmdline = p.cmdline()
            return p.username(), " ".join(cmdline) if cmdline else p.name()

        return self._call(pid, read)


def is_zombie(pid: int) -> bool | None:
    """Whether the process is a zombie: /proc's state, psutil's where there is no /proc (imported then); None when
    neither can tell (gone meanwhile, unreadable, no psutil)."""
    if (PROC / "self" / "stat").exists():
        try:
            return _stat_fields(_read(pid, "stat"))[0] == b"Z"
        except (Gone, Denied, ValueError, IndexError):
            return None
    try:
        import psutil

        return bool(psutil.Process(pid).status() == psutil.STATUS_ZOMBIE)
    except Exception:  # noqa: BLE001 - psutil missing or unsure
        return None
