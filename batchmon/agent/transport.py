"""The agent's side of the socket: one listening unix socket, one daemon thread, bounded everything.

The training thread only calls put()/set_hello(): an append to a bounded deque (oldest dropped and counted
when full), never a lock, a syscall or an exception. The thread owns everything else: it accepts monitors,
sends each new one the latest hello and the history (last steps and events), then live lines; of what a monitor
sends it keeps only its refresh interval (a short line, parsed as data: batchmon.agent.pace picks the step window
from it), the rest is dropped; and it keeps a bounded outbound buffer per monitor, so a
monitor that never reads loses its oldest lines instead of growing memory or slowing the others.

Steps are coalesced here (batchmon.agent.coalesce): at high step rates one message stands for a window of
steps, at most about 10 a second, without losing a batch size's peak, a batch change or an event; the
training thread's put() stays an append, the windows are made on this thread. Quiet steps come as runs
(batchmon.agent.step_runs: put once, read at each poll), not one message each.

No torch here: the monitor side imports protocol only, this module only runs inside the training process.
"""

from __future__ import annotations

import dataclasses
import errno
import heapq
import os
import selectors
import socket
import stat
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Sequence

from batchmon import protocol
from batchmon.agent.coalesce import HISTORY_EVENTS, HISTORY_STEPS, StepCoalescer
from batchmon.agent.pace import MonitorLines, allocator_read_seconds, steady_window
from batchmon.agent.step_runs import QuietRun
from batchmon.protocol import Bye, Event, Hello, Step

QUEUE_MAX = 4096  # live messages waiting for the thread
CLIENT_MAX_LINES = HISTORY_STEPS + HISTORY_EVENTS + 512
CLIENT_MAX_BYTES = 16 << 20
MAX_CLIENTS = 64
POLL_SECONDS = 0.05  # how stale a live line may get before the thread picks it up
READ_DISCARD = 64 << 10
# send() on a connection the monitor closed raises SIGPIPE, which kills a process that runs with SIGPIPE at its
# default (the `signal(SIGPIPE, SIG_DFL)` CLI idiom, embedded interpreters): the flag turns it into EPIPE.
SEND_FLAGS = getattr(socket, "MSG_NOSIGNAL", 0)
ALTERNATE_NAMES = 16  # <pid>-1.sock ... when a live socket of another process (another container) has our name


class _Client:
    """One connected monitor: a non-blocking socket and its bounded outbound lines."""

    __slots__ = ("sock", "lines", "pinned", "bytes", "partial", "dropped", "sent", "hello", "history", "said")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lines: deque[bytes] = deque()
        self.pinned: set[int] = set()  # id() of hello (and bye) lines, never dropped
        self.bytes = 0
        self.partial: memoryview | None = None  # rest of a line the kernel took only part of
        self.dropped = 0
        self.sent = 0
        self.hello: bytes | None = None  # the hello line still waiting here (at most one: a new one replaces it)
        self.history: int | None = None  # that hello's history count (the burst's length), kept on replacing
        self.said = MonitorLines()  # what the monitor wrote: its refresh interval (batchmon.agent.pace)

    def push_hello(self, line: bytes, history: int | None = None) -> None:
        """Queue a hello; one still waiting is replaced in place (so re-published hellos never pile up past the
        caps: pinned lines are never dropped)."""
        old = self.hello
        self.hello = line
        self.pinned.add(id(line))
        if old is not None:
            for index, queued in enumerate(self.lines):
                if queued is old:
                    self.lines[index] = line
                    self.pinned.discard(id(old))
                    self.bytes += len(line) - len(old)
                    return
        self.history = history
        self.push(line)

    def push(self, line: bytes, pinned: bool = False) -> None:
        self.lines.append(line)
        self.bytes += len(line)
        if pinned:
            self.pinned.add(id(line))
        while (len(self.lines) > CLIENT_MAX_LINES or self.bytes > CLIENT_MAX_BYTES) and len(self.lines) > 1:
            if id(self.lines[0]) not in self.pinned:
                old = self.lines.popleft()
            else:  # keep the hello: drop the oldest line that is not one
                index = next((i for i, ln in enumerate(self.lines) if id(ln) not in self.pinned), None)
                if index is None:
                    break
                old = self.lines[index]
                del self.lines[index]
            self.bytes -= len(old)
            self.dropped += 1

    def flush(self) -> bool:
        """Send what the kernel takes now. Returns False when the monitor is gone."""
        while True:
            if self.partial is None:
                if not self.lines:
                    return True
                line = self.lines.popleft()
                self.pinned.discard(id(line))
                if line is self.hello:
                    self.hello = self.history = None
                self.bytes -= len(line)
                self.partial = memoryview(line)
            try:
                n = self.sock.send(self.partial, SEND_FLAGS)
            except (BlockingIOError, InterruptedError):
                return True
            except OSError:
                return False
            self.sent += n
            self.partial = self.partial[n:] if n < len(self.partial) else None

    @property
    def pending(self) -> bool:
        return self.partial is not None or bool(self.lines)


class Transport:
    """Listening socket + daemon thread. Create, start() (may raise OSError/SocketDirError), put(), close()."""

    def __init__(self, path: Path, *, on_error: Callable[[BaseException], None] | None = None,
                 tick: Callable[[], None] | None = None, tick_seconds: float = 1.0,
                 window_seconds: float = 0.0, on_pace: Callable[[float], None] | None = None) -> None:
        """``window_seconds``: coalesce steps into windows of at least this long (batchmon.agent.coalesce;
        the agent uses coalesce.WINDOW_SECONDS); 0 sends every step as it comes. ``on_pace``: called (on this
        thread) with how often the allocator's figures are worth reading for the connected monitors
        (pace.allocator_read_seconds), at the start and whenever a monitor comes, goes or changes its refresh."""
        self.path = path
        self._on_error = on_error
        self._on_pace = on_pace
        self._tick = tick
        self._tick_seconds = tick_seconds
        self._queue: deque[Step | Event | QuietRun] = deque(maxlen=QUEUE_MAX)
        self._open_run: QuietRun | None = None  # the quiet steps being added to (batchmon.agent.step_runs)
        self._run_taken = 0  # how many of them were taken
        self._new_hello: Hello | None = None
        self._hello: Hello | None = None
        self._hello_line: bytes | None = None
        self._steps: deque[tuple[float, bytes]] = deque(maxlen=HISTORY_STEPS)
        self._events: deque[tuple[float, bytes]] = deque(maxlen=HISTORY_EVENTS)
        self._clients: dict[int, _Client] = {}
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._linger_until = 0.0
        self._bye: Bye | None = None
        self.queue_dropped = 0
        self.client_dropped = 0  # lines dropped for monitors that did not keep up (closed ones included)
        self.encode_errors = 0
        self.connections = 0
        self.coalescer = StepCoalescer(window_seconds)

    # ------------------------------------------------------------------ training thread side (never blocks)

    def set_hello(self, hello: Hello) -> None:
        self._new_hello = hello

    def put(self, message: Step | Event | QuietRun) -> None:
        queue = self._queue
        if len(queue) >= QUEUE_MAX:
            self.queue_dropped += 1
        queue.append(message)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Bind ``path`` (0600) and start the thread. Raises OSError when the socket cannot be created.

        A socket already at ``path`` is replaced only when nothing listens on it (a dead process that had our
        pid); a live one belongs to another process with our pid (containers sharing the folder): we take
        ``<pid>-1.sock``, ``<pid>-2.sock``, ... instead and ``path`` says which."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        base = self.path
        # Bind under a name monitors ignore (no longer than the final one, so every folder that fits the final
        # name fits it), listen, then link it into place: a monitor that sees <pid>.sock can connect at once
        # (never "refused" between bind and listen), and link() never replaces what is there (rename would).
        staging = base.with_name(f".{base.stem}.t")
        try:
            try:
                os.unlink(staging)
            except FileNotFoundError:
                pass
            sock.bind(str(staging))
            os.chmod(staging, 0o600)
            sock.listen(16)
            sock.setblocking(False)
            for n in range(ALTERNATE_NAMES + 1):
                path = base if n == 0 else base.with_name(f"{base.stem}-{n}{base.suffix}")
                if _place(staging, path):
                    break
            else:
                raise OSError(errno.EADDRINUSE, f"{base} and {ALTERNATE_NAMES} other names are taken by live sockets")
            os.unlink(staging)
            st = os.stat(path)
        except BaseException:
            sock.close()
            try:
                os.unlink(staging)
            except OSError:
                pass
            raise
        self.path = path
        self._inode = (st.st_dev, st.st_ino)
        self._listener = sock
        self._thread = threading.Thread(target=self._run, name="batchmon-agent", daemon=True)
        self._thread.start()

    def close(self, bye: Bye | None = None, timeout: float = 1.0, linger: float = 0.0) -> None:
        """Send bye to every monitor (briefly waiting for slow ones), close, remove the socket file.

        ``linger``: when no monitor ever connected, keep listening up to this long for one to come and
        collect the history (used at exit after an OOM, so a monitor scanning for sockets still sees it).
        """
        self._bye = bye
        self._linger_until = time.monotonic() + linger if linger > 0 and self.connections == 0 else 0.0
        self._stop.set()
        thread = self._thread
        if thread is not None and thread.is_alive() and thread is not threading.current_thread():
            thread.join(timeout + max(0.0, linger))
        self._cleanup()

    def forget(self) -> None:
        """In a forked child: drop the parent's sockets without touching the parent's socket file."""
        self._stop.set()
        self._inode = None
        for client in list(self._clients.values()):
            _close_quietly(client.sock)
        self._clients.clear()
        if self._listener is not None:
            _close_quietly(self._listener)
            self._listener = None

    @property
    def monitors(self) -> int:
        return len(self._clients)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ------------------------------------------------------------------ the thread

    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        try:
            sel.register(self._listener, selectors.EVENT_READ, None)  # type: ignore[arg-type]
            self._pace()  # no monitor yet
            next_tick = 0.0
            while not self._stop.is_set() or (self.connections == 0 and time.monotonic() < self._linger_until):
                try:
                    for key, mask in sel.select(POLL_SECONDS):
                        if key.data is None:
                            self._accept(sel)
                        else:
                            self._service(sel, key.data, mask)
                    self._drain(sel)
                    if self.coalescer.due(time.monotonic()):
                        self._emit(sel, self.coalescer.flush(time.monotonic()))
                    if self._tick is not None and time.monotonic() >= next_tick:
                        next_tick = time.monotonic() + self._tick_seconds
                        self._tick()
                except Exception as exc:  # noqa: BLE001 - report once, then stop serving
                    if self._on_error is not None and not self._stop.is_set():  # not a shutdown race
                        self._on_error(exc)
                    self._drain(sel)
                    break
            self._final_flush(sel)
        finally:
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if len(self._clients) >= MAX_CLIENTS:
                _close_quietly(conn)
                continue
            conn.setblocking(False)
            self._drain(sel)  # live lines so far go to the existing monitors and into the history
            self._emit(sel, self.coalescer.flush(time.monotonic()))  # with the open window: the history is complete
            client = _Client(conn)
            if self._hello is not None:  # this monitor's hello says how long its history burst is
                history = len(self._steps) + len(self._events)
                line = self._encode(dataclasses.replace(self._hello, history=history)) or self._hello_line
                if line is not None:
                    client.push_hello(line, history)
            for _, line in heapq.merge(self._steps, self._events, key=lambda item: item[0]):
                client.push(line)
            self._clients[conn.fileno()] = client
            self.connections += 1
            self._pace()  # it has not said its refresh yet: the short window until it does
            sel.register(conn, selectors.EVENT_READ, client)
            self._send(sel, client)

    def _service(self, sel: selectors.BaseSelector, client: _Client, mask: int) -> None:
        if mask & selectors.EVENT_READ:
            try:
                data = client.sock.recv(READ_DISCARD)  # only a refresh line is taken from it; the rest is dropped
            except (BlockingIOError, InterruptedError):
                data = None
            except OSError:
                data = b""
            if data == b"":
                self._drop_client(sel, client)
                return
            if data and client.said.feed(data):
                self._pace()
        if mask & selectors.EVENT_WRITE:
            self._send(sel, client)

    def _send(self, sel: selectors.BaseSelector, client: _Client) -> None:
        if not client.flush():
            self._drop_client(sel, client)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.pending else 0)
        try:
            if sel.get_key(client.sock).events != events:
                sel.modify(client.sock, events, client)
        except (KeyError, ValueError, OSError):
            self._drop_client(sel, client)

    def _drop_client(self, sel: selectors.BaseSelector, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        try:
            sel.unregister(client.sock)
        except (KeyError, ValueError, OSError):
            pass
        self.client_dropped += client.dropped
        _close_quietly(client.sock)
        self._pace()

    def _pace(self) -> None:
        """The step window and the allocator reads the connected monitors' refresh intervals allow
        (batchmon.agent.pace)."""
        self.coalescer.set_steady(steady_window(c.said.interval for c in self._clients.values()))
        if self._on_pace is not None:
            self._on_pace(allocator_read_seconds(c.said.interval for c in self._clients.values()))

    def _encode(self, message: Hello | Step | Event | Bye) -> bytes | None:
        try:
            return protocol.encode(message)
        except (protocol.ProtocolError, TypeError, ValueError):
            self.encode_errors += 1
            return None

    def _drain(self, sel: selectors.BaseSelector) -> None:
        """Move new messages from the queue into the history and every monitor's buffer."""
        hello, self._new_hello = self._new_hello, None
        touched = False
        if hello is not None:
            line = self._encode(hello)
            if line is not None:
                self._hello, self._hello_line = hello, line
                for client in self._clients.values():
                    if client.hello is not None and client.history is not None:  # its burst hello not sent yet
                        burst = self._encode(dataclasses.replace(hello, history=client.history))
                        client.push_hello(burst or line)
                    else:
                        client.push_hello(line)
                touched = True
        queue = self._queue
        coalescer = self.coalescer
        now = time.monotonic()
        while True:
            try:
                message = queue.popleft()
            except IndexError:
                break
            if self._open_run is not None:  # the run's steps so far come before the message (its steps, or a new run)
                touched = self._take_run(now) or touched
                if type(message) is not Event:
                    self._open_run = None  # ended: a Step or a new run was published after its last step
            if isinstance(message, QuietRun):
                self._open_run, self._run_taken = message, 0
            elif isinstance(message, Step):
                touched = self._queue_lines(coalescer.add(message, now)) or touched
            else:  # an event: the open window of steps goes first
                touched = self._queue_lines([*coalescer.flush(now), message]) or touched
        if self._open_run is not None:
            touched = self._take_run(now) or touched
        if touched:
            for client in list(self._clients.values()):
                self._send(sel, client)

    def _take_run(self, now: float) -> bool:
        """The quiet steps added to the open run since the last look, as one window for the coalescer."""
        run = self._open_run
        assert run is not None
        taken, n = self._run_taken, len(run)
        if n <= taken:
            return False
        self._run_taken = n
        return self._queue_lines(self.coalescer.add(run.window(taken, n), now))

    def _emit(self, sel: selectors.BaseSelector, messages: Sequence[Step | Event]) -> None:
        if self._queue_lines(messages):
            for client in list(self._clients.values()):
                self._send(sel, client)

    def _queue_lines(self, messages: Sequence[Step | Event]) -> bool:
        """Encode, keep in the history, queue for every monitor; True when something was queued."""
        queued = False
        for message in messages:
            line = self._encode(message)
            if line is None:
                continue
            stamp = message.time if message.time is not None else time.time()
            (self._steps if isinstance(message, Step) else self._events).append((stamp, line))
            for client in self._clients.values():
                client.push(line)
            queued = True
        return queued

    def _final_flush(self, sel: selectors.BaseSelector) -> None:
        self._drain(sel)
        self._queue_lines(self.coalescer.flush(time.monotonic()))  # the last window before bye
        bye = self._encode(self._bye) if self._bye is not None else None
        for client in self._clients.values():
            if bye is not None:
                client.push(bye, pinned=True)
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            waiting = [c for c in list(self._clients.values()) if c.pending]
            if not waiting:
                break
            for client in waiting:
                if not client.flush():
                    self._drop_client(sel, client)
            if any(c.pending for c in self._clients.values()):
                time.sleep(0.01)

    def _cleanup(self) -> None:
        for client in list(self._clients.values()):
            self.client_dropped += client.dropped
            _close_quietly(client.sock)
        self._clients.clear()
        if self._listener is not None:
            _close_quietly(self._listener)
            self._listener = None
        inode, self._inode = self._inode, None
        if inode is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == inode:  # only our own socket, never a successor's
                    os.unlink(self.path)
            except OSError:
                pass


def _place(staging: Path, path: Path) -> bool:
    """Link the bound socket at ``staging`` to ``path``. False when a live socket is there (never touched);
    a stale socket there (nobody listens) is removed first. Raises OSError for anything else in the way."""
    for _ in range(3):
        try:
            os.link(staging, path)
            return True
        except FileExistsError:
            pass
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; not replacing it")
        if _listening(path):
            return False
        try:
            os.unlink(path)  # a stale socket of a dead process that had our pid
        except FileNotFoundError:
            pass
    return False


def _listening(path: Path) -> bool:
    """Whether a process accepts connections on the unix socket at path (a full backlog counts as live)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        probe.connect(str(path))
        return True
    except (BlockingIOError, InterruptedError):
        return True
    except OSError as exc:
        return exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK)
    finally:
        probe.close()


def _close_quietly(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
