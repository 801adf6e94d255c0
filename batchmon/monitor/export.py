"""`batchmon export --prometheus`: the hub's latest Snapshot as Prometheus gauges over HTTP.

A custom collector reads ``hub.snapshot()`` at scrape time, so a series exists exactly as long as what it
describes (an agent that ends takes its series with it; no stale labels). Its own registry: only batchmon's
gauges, no process/GC metrics. Binds loopback unless told otherwise. One box per exporter: Prometheus scrapes
each box, so ``--host`` is refused here.
"""

from __future__ import annotations

import errno
import signal
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any, Callable, Iterator

from batchmon.errors import CliError
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
        for agent in snap.agents:
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


WORKERS = 4  # requests served at once
QUEUED = 16  # accepted connections waiting for a worker; beyond that a connection is closed at once
REQUEST_DEADLINE_S = 10.0  # a client has this long to send its request (slow or idle ones are cut off)
MAX_REQUEST_BYTES = 64 << 10


class _DeadlineReader:
    """The request side of a connection with one deadline for all of it (the request line and every header):
    a client that sends a byte every few seconds cannot hold a worker longer than REQUEST_DEADLINE_S."""

    def __init__(self, sock: socket.socket, seconds: float) -> None:
        self._sock = sock
        self._deadline = time.monotonic() + seconds
        self._buf = b""
        self._total = 0

    def _fill(self) -> bool:
        left = self._deadline - time.monotonic()
        if left <= 0 or self._total > MAX_REQUEST_BYTES:
            raise TimeoutError("request too slow or too large")
        self._sock.settimeout(left)
        chunk = self._sock.recv(4096)
        self._total += len(chunk)
        self._buf += chunk
        return bool(chunk)

    def readline(self, limit: int = -1) -> bytes:
        while b"\n" not in self._buf and (limit < 0 or len(self._buf) < limit):
            if not self._fill():
                break
        end = self._buf.find(b"\n") + 1 or len(self._buf)
        if limit >= 0:
            end = min(end, limit)
        line, self._buf = self._buf[:end], self._buf[end:]
        return line

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self._buf) < n:
            if not self._fill():
                break
        data, self._buf = (self._buf, b"") if n < 0 else (self._buf[:n], self._buf[n:])
        return data

    def close(self) -> None:
        pass


class _MetricsHandler(BaseHTTPRequestHandler):
    """GET /metrics (or /): the registry in Prometheus text format. Nothing is logged per request."""

    registry: Any = None
    protocol_version = "HTTP/1.0"  # one request per connection: a worker is never parked on a kept-alive socket

    def setup(self) -> None:
        super().setup()
        self.rfile = _DeadlineReader(self.connection, REQUEST_DEADLINE_S)  # type: ignore[assignment]
        self.connection.settimeout(REQUEST_DEADLINE_S)  # and for writing the answer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        if self.path.split("?", 1)[0] not in ("/metrics", "/"):
            self.send_error(404, "only /metrics is served here")
            return
        body = generate_latest(self.registry)
        self.send_response(200)
        self.send_header("Content-Type", CONTENT_TYPE_LATEST)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        pass


class BoundedHTTPServer(HTTPServer):
    """An HTTP server with a fixed pool of worker threads and a bounded queue of connections.

    prometheus_client's server starts a thread per connection and waits on each without a timeout: at the
    usual open-file limit (1024) slow or idle connections took it down (no /metrics, 100% CPU). Here a
    connection over WORKERS + QUEUED is closed at once, and each has REQUEST_DEADLINE_S to send its request."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def __init__(self, address: tuple[str, int], registry: Any) -> None:
        handler = type("Handler", (_MetricsHandler,), {"registry": registry})
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.address_family = family
        super().__init__(address, handler)
        self._pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="batchmon-export")
        self._slots = threading.BoundedSemaphore(WORKERS + QUEUED)
        self.refused = 0

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            self.shutdown_request(request)  # busy: the fd is freed now, not when a thread gets to it
            return
        try:
            self._pool.submit(self._work, request, client_address)
        except RuntimeError:  # shutting down
            self._slots.release()
            self.shutdown_request(request)

    def _work(self, request: Any, client_address: Any) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # noqa: BLE001 - a client that vanished or timed out is not the exporter's problem
            pass
        finally:
            self.shutdown_request(request)
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # never a traceback on stderr for one bad connection

    def server_close(self) -> None:
        super().server_close()
        self._pool.shutdown(wait=False, cancel_futures=True)


def start_server(bind: str, port: int, registry: Any) -> BoundedHTTPServer:
    """Listen on bind:port and serve on a daemon thread. Raises OSError when it cannot listen."""
    server = BoundedHTTPServer((bind, port), registry)
    threading.Thread(target=server.serve_forever, name="batchmon-export-accept", daemon=True).start()
    return server


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
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        hub.start()
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
