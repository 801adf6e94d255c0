"""`batchmon export --prometheus`: the hub's latest Snapshot as Prometheus gauges over HTTP.

A custom collector reads ``hub.snapshot()`` at scrape time, so a series exists exactly as long as what it
describes (an agent that ends takes its series with it; no stale labels). Its own registry: only batchmon's
gauges, no process/GC metrics. Binds loopback unless told otherwise. One box per exporter: Prometheus scrapes
each box, so ``--host`` is refused here.
"""

from __future__ import annotations

import errno
import selectors
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator

from batchmon.errors import CliError
from batchmon.monitor.threads import join_started, start_daemon
from batchmon.protocol import step_components
from batchmon.snapshot import AgentView, Snapshot

DEVICE_KINDS = ("used", "reserved", "total", "free")


def _gpu_label(agent: AgentView, snap: Snapshot) -> str:
    """The NVML index of the agent's GPU; without NVML the index in its device string; "cpu" and the like as is."""
    dev = snap.device_of(agent)
    if dev is not None:
        return str(dev.index)
    device = agent.hello.device
    kind, _, idx = device.partition(":")
    if kind == "cuda":
        return idx if idx.isdigit() else "0"
    return device


def _label(value: Any) -> str:
    return "" if value is None else str(value)


class SnapshotCollector:
    """prometheus_client collector over a snapshot function (``hub.snapshot``)."""

    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> list:
        return []  # series depend on what runs; nothing to check at register time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        snap = self._snapshot()
        device = GaugeMetricFamily("batchmon_device_memory_bytes",
                                   "GPU memory from NVML by kind (used, reserved, total, free)", labels=["gpu", "kind"])
        for dev in snap.nvml.devices:
            if dev.memory is None or dev.lost:
                continue
            for kind in DEVICE_KINDS:
                value = getattr(dev.memory, kind)
                if value is not None:
                    device.add_metric([str(dev.index), kind], float(value))
        component = GaugeMetricFamily("batchmon_component_bytes",
                                      "bytes per component of an attached training process at its last step",
                                      labels=["host", "gpu", "pid", "rank", "component"])
        max_batch = GaugeMetricFamily("batchmon_predicted_max_batch",
                                      "largest batch size predicted to fit the device",
                                      labels=["host", "pid", "rank"])
        step = GaugeMetricFamily("batchmon_step_seconds", "duration of the last training step",
                                 labels=["host", "pid", "rank"])
        for agent in snap.running:  # an ended run (kept on screen until cleared) takes its series with it
            h = agent.hello
            who = [_label(h.host), str(h.pid), _label(h.rank)]
            gpu = _gpu_label(agent, snap)
            for name, value in step_components(agent.last_step).items():
                if value is not None:
                    component.add_metric([who[0], gpu, who[1], who[2], name], float(value))
            pred = agent.prediction
            if pred is not None and pred.max_batch is not None:
                max_batch.add_metric(who, float(pred.max_batch))
            if agent.last_step is not None and agent.last_step.step_seconds is not None:
                step.add_metric(who, float(agent.last_step.step_seconds))
        yield device
        yield component
        yield max_batch
        yield step


WORKERS = 2  # threads building and writing answers; requests are read by the one listener thread
MAX_PENDING = 256  # connections still sending their request; when full, the oldest is closed for a new one
REQUEST_DEADLINE_S = 5.0  # a client has this long to send its whole request (slow or idle ones are cut off)
WRITE_TIMEOUT_S = 5.0
MAX_REQUEST_BYTES = 16 << 10


class BoundedHTTPServer:
    """A minimal HTTP/1.0 server for GET /metrics with bounded threads and file descriptors.

    prometheus_client's server starts a thread per connection and waits on each without a timeout: at the
    usual open-file limit (1024) slow or idle connections took it down (/metrics unanswered, 100% CPU). Here
    one thread reads every request without blocking (at most MAX_PENDING connections, each with
    REQUEST_DEADLINE_S for its whole request; when full, the oldest is dropped, so a scraper always gets in),
    and WORKERS threads answer complete requests. Threads and fds stay bounded whatever clients do."""

    def __init__(self, bind: str, port: int, render: Callable[[], tuple[bytes, str]]) -> None:
        infos = socket.getaddrinfo(bind, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, address = infos[0]
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(address)
            self._listener.listen(128)
            self._listener.setblocking(False)
        except OSError:
            self._listener.close()
            raise
        self.port = self._listener.getsockname()[1]
        self._render = render
        self._pending: dict[socket.socket, tuple[float, bytearray]] = {}  # insertion order: oldest first
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="batchmon-export")
        self._answering = threading.BoundedSemaphore(WORKERS * 4)
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self.dropped = 0  # connections closed unanswered (too slow, too many, too large)
        self._thread = start_daemon(self._serve, "batchmon-export")

    def shutdown(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        join_started(self._thread, 5.0)

    def server_close(self) -> None:
        self.shutdown()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for sock in (self._listener, self._wake_r, self._wake_w, *self._pending):
            try:
                sock.close()
            except OSError:
                pass
        self._pending.clear()

    # ------------------------------------------------------------------------------------------ listener thread

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ, "listen")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stop.is_set():
                for key, _ in sel.select(0.5):
                    if key.data == "listen":
                        self._accept(sel)
                    elif key.data == "wake":
                        pass
                    else:
                        self._read(sel, key.fileobj)  # type: ignore[arg-type]
                self._expire(sel)
        finally:
            sel.close()

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(64):
            try:
                conn, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # EMFILE and the like: the pending ones are dropped below as they expire
                return
            if len(self._pending) >= MAX_PENDING:
                self._drop(sel, next(iter(self._pending)))
            conn.setblocking(False)
            self._pending[conn] = (time.monotonic() + REQUEST_DEADLINE_S, bytearray())
            sel.register(conn, selectors.EVENT_READ, "conn")

    def _read(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        entry = self._pending.get(conn)
        if entry is None:
            return
        try:
            data = conn.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        buf = entry[1]
        buf += data
        if not data or len(buf) > MAX_REQUEST_BYTES:
            self._drop(sel, conn)
            return
        if b"\r\n\r\n" in buf or b"\n\n" in buf:  # the whole request is in
            sel.unregister(conn)
            del self._pending[conn]
            if not self._answering.acquire(blocking=False):  # every worker busy and a queue behind them
                self.dropped += 1
                _close(conn)
                return
            self._pool.submit(self._answer, conn, bytes(buf))

    def _expire(self, sel: selectors.BaseSelector) -> None:
        now = time.monotonic()
        for conn, (deadline, _) in list(self._pending.items()):
            if deadline > now:
                break  # oldest first: the rest are younger
            self._drop(sel, conn)

    def _drop(self, sel: selectors.BaseSelector, conn: socket.socket) -> None:
        self._pending.pop(conn, None)
        try:
            sel.unregister(conn)
        except (KeyError, ValueError):
            pass
        self.dropped += 1
        _close(conn)

    # ------------------------------------------------------------------------------------------ workers

    def _answer(self, conn: socket.socket, request: bytes) -> None:
        try:
            parts = request.split(b"\n", 1)[0].split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
            if method not in (b"GET", b"HEAD"):
                status, body, ctype = "405 Method Not Allowed", b"only GET\n", "text/plain"
            elif path.split(b"?", 1)[0] not in (b"/metrics", b"/"):
                status, body, ctype = "404 Not Found", b"only /metrics is served here\n", "text/plain"
            else:
                body, ctype = self._render()
                status = "200 OK"
            head = (f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                    "Connection: close\r\n\r\n").encode()
            conn.setblocking(True)
            conn.settimeout(WRITE_TIMEOUT_S)
            conn.sendall(head + (b"" if method == b"HEAD" else body))
        except Exception:  # noqa: BLE001 - a client that vanished is not the exporter's problem
            self.dropped += 1
        finally:
            _close(conn)
            self._answering.release()


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass


def start_server(bind: str, port: int, registry: Any) -> BoundedHTTPServer:
    """Listen on bind:port and serve the registry. Raises OSError when it cannot listen."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    return BoundedHTTPServer(bind, port, lambda: (generate_latest(registry), CONTENT_TYPE_LATEST))


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def main(args: Any) -> int:
    try:
        from prometheus_client import CollectorRegistry
    except ImportError:
        raise CliError('prometheus-client is not installed; install it with: '
                       'pip install "batchmon[prometheus]"') from None
    if not 0 < args.port < 65536:
        raise CliError(f"--port must be 1..65535, got {args.port}", code=2)
    from batchmon.monitor.hub import Hub

    hub = Hub(interval=args.interval)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SnapshotCollector(hub.snapshot))
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _raise_stop)
        except (ValueError, OSError):
            pass
    server = None
    # A stop as soon as the first scrape answers (a script, a test) is a clean exit that has said where it
    # served: Ctrl-C, TERM and HUP wait (blocked) from before the server is up until that line is out, then
    # land inside the try. Unblocked, a Ctrl-C there exited 130 silently and a TERM left without the line.
    stops = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
    try:
        mask = signal.pthread_sigmask(signal.SIG_BLOCK, stops)
        try:
            try:
                server = start_server(args.bind, args.port, registry)
            except socket.gaierror as exc:
                raise CliError(f"cannot listen on {args.bind}:{args.port}: {exc.strerror or exc}") from None
            except OSError as exc:
                why = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
                raise CliError(f"cannot listen on {args.bind}:{args.port}: {why}") from None
            print(f"batchmon: serving Prometheus metrics on http://{args.bind}:{args.port}/metrics", flush=True)
            # the hub's IO thread starts with the stops blocked too: a stop landing inside Hub.start (the thread
            # running, Hub._thread not yet set) made stop() close the selectors under it ("I/O operation on
            # closed epoll object", exit 1); the thread inherits the mask, so the stops go to this thread
            hub.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        while hub.running:
            hub.wait(0.5)
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        hub.stop()
        if server is not None:
            server.shutdown()
            server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if hub.error is not None:
        raise CliError(f"monitoring stopped: {hub.error}")
    return 0
