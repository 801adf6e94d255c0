"""What the host probe reads about the host and its processes, from Linux's /proc (psutil where there is none).

Why not psutil everywhere: importing it costs the monitor ~2 MiB of RSS (measured: 2.07 MiB on the dev box),
and beside 16 jobs the monitor's RSS stood at nvitop's + 19-21 MiB against the issue's + 20 (issue 14 point 3);
the probe needs five small files per process, read with os.read (not buffered file objects). psutil stays the
fallback where /proc is missing (macOS), imported only then. Figures are psutil's definitions, so screens and
recordings read the same:

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
    """Reads /proc directly. Raises Gone or Denied; never imports psutil.

    Read with os.open/os.read on string paths, not open() on Paths, and the user names kept by uid: beside 16 jobs
    the host probe was ~0.7 ms of the hub thread's second, and a buffered file object and three Path joins a file
    were most of each read's Python cost (dev box: /proc/meminfo 66 -> ~20 us, a process's times 50 -> ~20 us)."""

    def __init__(self) -> None:
        self._users: dict[int, str] = {}

    def memory(self) -> tuple[int, int]:
        text = _read_path("/proc/meminfo", None)
        total, free = _meminfo(text, b"MemTotal:"), _meminfo(text, b"MemFree:")
        if total is None or free is None:
            raise KeyError("MemTotal" if total is None else "MemFree")
        # MemAvailable 0 or missing (an old kernel, or a kernel bug): free's estimate
        avail = _meminfo(text, b"MemAvailable:") or (
            free + (_meminfo(text, b"Buffers:") or 0) + (_meminfo(text, b"Cached:") or 0)
            + (_meminfo(text, b"SReclaimable:") or 0))
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
                user = self._users.get(uid)
                if user is None:
                    try:
                        user = pwd.getpwuid(uid).pw_name
                    except KeyError:
                        user = str(uid)
                    if len(self._users) < 1024:
                        self._users[uid] = user
                break
        try:
            args = [a.decode(errors="replace") for a in _read(pid, "cmdline").split(b"\0") if a]
        except Denied:
            args = []
        command = " ".join(args) if args else _read(pid, "comm").strip().decode(errors="replace") or None
        return user, command


def _meminfo(text: bytes, name: bytes) -> int | None:
    """One /proc/meminfo figure in bytes (its line ``Name:   N kB``), None when the kernel does not say it."""
    at = text.find(name)
    while at > 0 and text[at - 1] != 10:  # not at a line's start: a longer name ending in this one
        at = text.find(name, at + 1)
    if at < 0:
        return None
    parts = text[at + len(name): text.find(b"\n", at)].split()
    return int(parts[0]) * 1024 if parts else None


def _stat_fields(stat: bytes) -> list[bytes]:
    """/proc/PID/stat's fields from the state (field 3) on: the name (field 2) is in parentheses and may hold spaces
    or ')', so they start after the last ')'."""
    return stat[stat.rindex(b")") + 2:].split()


def _read(pid: int, name: str) -> bytes:
    return _read_path(f"/proc/{pid}/{name}", pid)


def _read_path(path: str, pid: int | None) -> bytes:
    """A /proc file's whole content (one read for the short ones); Gone or Denied for a process's file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        raise Gone(pid) from None
    except PermissionError:
        raise Denied(pid) from None
    except OSError as exc:
        raise Gone(pid) from exc
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    except PermissionError:
        raise Denied(pid) from None
    except OSError as exc:  # ESRCH while reading a file of a process that just exited
        raise Gone(pid) from exc
    finally:
        os.close(fd)


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
