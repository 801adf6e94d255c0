"""Monitor side of the agent socket: find agent sockets, connect without blocking, turn bytes into hub records.

The agent talks, the monitor listens: a connection yields the agent's hello, its recent history and then live
lines. Everything here is defensive: an agent may send garbage, stop mid-line, or vanish; none of it raises
past this module except as a value the hub turns into a record.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container

from batchmon import protocol
from batchmon.probes.procfs import is_zombie

RECV_BYTES = 64 * 1024
UNIX_PATH_MAX = 108  # sun_path's size on Linux: Python's connect refuses a path of this length or more
READ_BUDGET = 64 * 1024  # per connection per wake-up, so one chatty agent cannot starve the others; and a history
# burst (16 agents x 2000 steps on connect) is read, decoded and kept ~70 lines at a time, not ~2 MB of lines and
# their decoded objects per agent at once: the monitor's RSS after 16 full bursts, dev box, 2 runs each: 73.8/71.6
# MiB at 4 MiB, 66.7/69.5 at 256 KiB. A read's transients (its lines, their JSON and Step objects) take fresh pools
# of Python's allocator while the kept steps fill others; what stays is arenas of empty pools, resident: the hub
# beside 16 peers x 1000 steps (bench/monitor_rss.py --rss-only) grew 8.5 MiB at 256 KiB, 4.7 at 64 KiB, 4.4 at 32
# KiB (Python's arenas 17 -> 13-14 MiB, the same 12.4 MB in use). A 1 MiB line still arrives, over 16 reads.

# an agent that closed its end makes send() raise SIGPIPE, fatal where the monitor runs with SIGPIPE at its default
# (the `signal(SIGPIPE, SIG_DFL)` idiom of CLIs piped into head): the flag turns it into EPIPE
SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)

_local = threading.local()


def _recv_buffer() -> memoryview:
    """One receive buffer per reading thread, reused: sock.recv(RECV_BYTES) allocated (and gave back) its size
    for every read, mostly to hold a line or two."""
    buf = getattr(_local, "buf", None)
    if buf is None:
        buf = _local.buf = memoryview(bytearray(RECV_BYTES))
    return buf


def connection_limit() -> int:
    """How many agents one monitor connects to at most: half the open-file limit left after a margin for
    everything else it opens (NVML, pipes, the terminal, ssh), at most 1024. 2000 agent sockets exhausted the
    monitor's file descriptors at the usual limit of 1024 (--once traceback, record stopped)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 256
    if soft == resource.RLIM_INFINITY:
        return 1024
    return max(8, min(1024, (soft - 128) // 2))


REFUSED = "an agent closed the connection without a word (it may already serve its 64 monitors)"


@dataclass(frozen=True)
class Found:
    pid: int
    path: Path


@dataclass(frozen=True)
class ExitNote:
    """``<pid>.exit``: the exit status `batchmon run` wrote when its child ended (Popen's returncode: -N for
    signal N), which no agent can report (its goodbye comes before the exit)."""

    pid: int
    returncode: int
    path: Path
    mtime: float


EXIT_NOTE_BYTES = 64


def exit_notes(directory: Path) -> list[ExitNote]:
    """The ``<pid>.exit`` files in the socket folder (regular files owned by us, a small integer inside)."""
    notes: list[ExitNote] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return notes
    uid = os.getuid()
    for entry in entries:
        stem, dot, ext = entry.name.partition(".")
        if ext != "exit" or not dot or not stem.isdigit():
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != uid or st.st_size > EXIT_NOTE_BYTES:
                continue
            fd = os.open(entry.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
            try:
                text = os.read(fd, EXIT_NOTE_BYTES).decode("ascii", "replace").strip()
            finally:
                os.close(fd)
            code = int(text)
        except (OSError, ValueError):
            continue
        if -256 < code < 256:
            notes.append(ExitNote(int(stem), code, Path(entry.path), st.st_mtime))
    return notes


def scan(directory: Path, known: Container[int] = ()) -> list[Found]:
    """Agent sockets (``<pid>.sock``, a socket, owned by us) in the folder, by pid, but for the pids in ``known``
    (the hub's connected agents: not looked at, the listing beside 16 agents was ~0.2 ms). Missing folder: none."""
    found: list[Found] = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    uid = os.getuid()
    for entry in entries:
        pid = protocol.pid_of_socket(entry.name)
        if pid is None or pid in known:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        if stat.S_ISSOCK(st.st_mode) and st.st_uid == uid:
            found.append(Found(pid, Path(entry.path)))
    found.sort(key=lambda f: f.pid)
    return found


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists and is not a zombie."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return not is_zombie(pid)  # unsure (None): the kill(0) answer stands (probes/procfs.py: /proc, not psutil's RSS)


class ConnectResult:
    CONNECTED = "connected"
    RETRY = "retry"  # listener busy (backlog full) or transient: try at the next scan
    STALE = "stale"  # nothing listens there (refused)
    GONE = "gone"  # the socket file vanished


class AgentConnection:
    """One non-blocking connection to one agent socket, with its line framing."""

    def __init__(self, pid: int, path: Path, key: str) -> None:
        self.pid = pid
        self.path = path
        self.key = key
        self.opened = time.monotonic()
        self.sock: socket.socket | None = None
        self.lines = protocol.LineBuffer(protocol.MAX_LINE_BYTES)
        self._oversized_seen = 0
        self.bytes_read = 0
        self.eof = False

    def connect(self) -> str:
        """Try to connect; returns a ConnectResult value. Never raises."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError:
            return ConnectResult.RETRY
        sock.setblocking(False)
        folder = -1
        try:
            address = str(self.path)
            if len(os.fsencode(address)) >= UNIX_PATH_MAX:
                # too long for a socket address (the agent binds a shorter staging name and links it into place,
                # so such a path exists in a deep TMPDIR): reach it through the folder's descriptor instead
                folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
                address = f"/proc/self/fd/{folder}/{self.path.name}"
            sock.connect(address)
        except BlockingIOError:
            sock.close()
            return ConnectResult.RETRY
        except OSError as exc:
            sock.close()
            if exc.errno in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ENOTSOCK):
                return ConnectResult.STALE
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                return ConnectResult.GONE
            return ConnectResult.RETRY
        finally:
            if folder >= 0:
                os.close(folder)
        self.sock = sock
        return ConnectResult.CONNECTED

    def fileno(self) -> int:
        return self.sock.fileno() if self.sock is not None else -1

    def read(self) -> list[dict[str, Any]]:
        """Drain what is readable now; returns record bodies ``{"data"[, "error"]}``, one per complete line.

        Sets ``eof`` when the agent closed (or reset) the connection; an unfinished line at that point is
        returned as an invalid line, so it is counted, not silently lost.
        """
        out: list[dict[str, Any]] = []
        if self.sock is None or self.eof:
            return out
        budget = READ_BUDGET
        buf = _recv_buffer()
        while budget > 0:
            try:
                data = bytes(buf[:self.sock.recv_into(buf)])
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                data = b""
            if not data:
                self.eof = True
                break
            budget -= len(data)
            self.bytes_read += len(data)
            for line in self.lines.feed(data):
                out.append(line_body(line))
            if self.lines.oversized > self._oversized_seen:
                for _ in range(self.lines.oversized - self._oversized_seen):
                    out.append({"data": None, "error": f"line exceeds {protocol.MAX_LINE_BYTES} bytes"})
                self._oversized_seen = self.lines.oversized
        if self.eof and self.lines.pending:
            out.append({"data": None, "error": f"connection closed mid-line ({self.lines.pending} bytes dropped)"})
            self.lines = protocol.LineBuffer(protocol.MAX_LINE_BYTES)
        return out

    def tell(self, line: bytes) -> bool:
        """Write one short line to the agent (the monitor's refresh interval) without blocking; False when it
        could not go whole now (a full socket buffer: the agent is not reading), never raises."""
        if self.sock is None or self.eof:
            return False
        try:
            return self.sock.send(line, SEND_FLAGS) == len(line)
        except OSError:  # BlockingIOError included: the agent keeps its short window, as with an older monitor
            return False

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def line_body(line: bytes) -> dict[str, Any]:
    """A raw line as a record body: the JSON object it holds, or null data with the reason it is invalid."""
    if not line.strip():
        return {"data": None, "error": "empty line"}
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return {"data": None, "error": "line is not JSON"}
    if not isinstance(obj, dict):
        return {"data": None, "error": "line is not a JSON object"}
    return {"data": obj}


def unlink_stale(path: Path) -> bool:
    """Remove a socket file nobody listens on, if it is ours. True when removed."""
    try:
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid():
            return False
        os.unlink(path)
        return True
    except OSError:
        return False
