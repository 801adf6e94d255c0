"""`batchmon export --prometheus`: the hub's latest Snapshot as Prometheus gauges over HTTP.

A custom collector reads ``hub.snapshot()`` at scrape time, so a series exists exactly as long as what it
describes (an agent that ends takes its series with it; no stale labels). Its own registry: only batchmon's
gauges, no process/GC metrics. Binds loopback unless told otherwise. One box per exporter: Prometheus scrapes
each box, so ``--host`` is refused here.
"""

from __future__ import annotations

import errno
import signal
from typing import Any, Callable, Iterator

from batchmon.errors import CliError
from batchmon.monitor.render import step_components
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


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def main(args: Any) -> int:
    try:
        from prometheus_client import CollectorRegistry, start_http_server
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
                server, _ = start_http_server(args.port, addr=args.bind, registry=registry)
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
