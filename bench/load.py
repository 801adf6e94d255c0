"""Load on one monitor: N protocol-v1 agents at R steps/s for D seconds against one Hub (issue 7, point 3).

    python3 bench/load.py                                # 64 agents, 10 steps/s, 600 s, --interval 0.25
    python3 bench/load.py --agents 8 --duration 20       # smoke test

The agents are lightweight protocol peers (no torch): a few worker processes (multiprocessing) each listen on
``<pid>.sock`` for their share of the agents (the pids are real ``sleep`` children, so the hub's liveness checks
see live processes) and send a hello, then one step every 1/R s with ``time`` = the send time. The Hub runs in
this process with its real NVML and host probes, exactly as the monitor uses it.

Measured (the hub keeps the last 2000 steps per agent, so RSS grows until that history is full, 200 s at
10 steps/s; the default warm-up waits for that, so a 600 s run judges flatness over the last ~390 s):
- monitor RSS (this process: the Hub plus fixed-size bookkeeping - latencies go into a fixed histogram) every
  second; "flat" = the largest RSS after warm-up is at most +10% over the RSS at the end of warm-up;
- dropped connections: monitor connections the peers saw closed before the end, plus agents the hub showed
  disconnected or reconnected;
- step-to-screen latency: for every step, the time from its ``time`` field to the first snapshot that contains
  it (``Hub(on_snapshot=...)``). Snapshots are built once per interval, so the latency includes up to one
  interval of waiting: measure at ``--interval 0.25`` (the UI's fastest redraw) for the ≤ 500 ms target;
- steps lost: sent by the peers but never seen in any snapshot's history (after the load, the hub gets up to
  15 s to read any backlog before it is stopped).

Writes $OUT/load.json (OUT defaults to ./out) and prints a summary. Exit code 0 when all targets hold.

    python3 bench/load.py --serve DIR --agents 16 --rate 100 --coalesce --duration 120
                                                         # only the peers, in socket folder DIR, for a monitor
                                                         # started elsewhere (bench/ab_monitor.py) to watch

--serve runs no hub: it prints "ready" once every peer listens and serves until --duration ends or it gets
SIGTERM/SIGINT, then stops its workers (and their ``sleep`` children) before it exits.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import random
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batchmon import protocol  # noqa: E402
from batchmon.agent.coalesce import STEADY_DEFAULT  # noqa: E402
from batchmon.agent.pace import MonitorLines, steady_window  # noqa: E402
from batchmon.agent.coalesce import WINDOW_SECONDS as COALESCE_WINDOW_S  # noqa: E402
from batchmon.agent.coalesce import StepCoalescer  # noqa: E402  (torch-free: the agent's window rule)
from batchmon.protocol import COMPONENTS, Hello, ModelInfo, Step  # noqa: E402

FAST16_ARGV = ("examples/train_mlp.py", "--device", "cuda", "--steps", "0", "--sleep", "0.004", "--batch-size", "256",
               "--hidden", "512", "--layers", "8")  # bench/h200_run.sh's fast16 stage, as the agent reports it
BIN_MS = 1  # latency histogram: 1 ms bins up to 20 s, then one overflow bin
BINS = 20_000


# ---------------------------------------------------------------------------------------------- the peers


class _Agent:
    def __init__(self, directory: Path, index: int, duration: float, prefill: int = 0, rate: float = 10.0,
                 gpu: str | None = None) -> None:
        self.gpu = gpu  # --gpu UUID: the peer says it trains on that GPU (cuda:0) and sends allocator figures
        self.jitter = random.Random(index)
        self.sleeper = subprocess.Popen(["sleep", str(int(duration) + 300)])
        self.pid = self.sleeper.pid
        self.index = index
        self.path = protocol.socket_path(self.pid, directory)
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(self.path))
        os.chmod(self.path, 0o600)
        self.server.listen(4)
        self.server.setblocking(False)
        self.clients: dict[int, tuple[socket.socket, bytearray]] = {}
        self.step = 0
        self.coalescer: StepCoalescer | None = None  # --coalesce: the agent's own window rule
        self.said: dict[int, MonitorLines] | None = None  # per monitor, its refresh interval (when paced)
        # --gpu: the command line of the H200's fast16 jobs (sys.argv of examples/train_mlp.py under `batchmon run`):
        # longer than a compact panel's title has room for, as the real one is (the title must leave the step its room)
        argv = FAST16_ARGV if gpu else ("bench/load.py", f"--agent={index}")
        self.hello = protocol.encode(Hello(
            pid=self.pid, host=socket.gethostname(), argv=argv, python="3",
            torch="none", device="cuda:0" if gpu else "cpu", nvml_uuid=gpu, rank=0, local_rank=0, world_size=1,
            model=ModelInfo("LoadPeer", 1_000_000, 4_000_000), optimizer="Adam", time=time.time()))
        # --prefill: a history burst right after the hello, as a real agent sends on connect; its steps are
        # stamped in the past (before the hub started), so Watch does not count them as live steps
        start = time.time() - prefill / rate
        self.hello += b"".join(self.step_line(rate, start + i / rate) for i in range(prefill))

    def pace(self) -> None:
        """The agent's rule (batchmon.agent.pace): the steady window while every monitor refreshes slowly."""
        if self.said is not None and self.coalescer is not None:
            self.coalescer.set_steady(steady_window(m.interval for m in self.said.values()))

    def make_step(self, rate: float, when: float | None = None) -> Step:
        self.step += 1
        comps = {name: 4_000_000 * (i + 1) + (self.step % 7) * 4096 for i, name in enumerate(COMPONENTS)}
        if self.gpu:  # a real job's memory figures at one batch size are the same step after step (H200 MLPs)
            comps = {name: 4_000_000 * (i + 1) for i, name in enumerate(COMPONENTS)}
        else:
            return Step(step=self.step, time=time.time() if when is None else when, step_seconds=1.0 / rate,
                        batch_size=16, components=comps)
        # like a real CUDA job (examples/train_mlp.py on the H200): step times that vary by a few percent,
        # allocator figures at the peak (the components sum to it), the peak's phase on every 16th (sampled) step
        peak = sum(comps.values())
        sampled = self.step % 16 == 0
        return Step(step=self.step, time=time.time() if when is None else when,
                    step_seconds=self.jitter.uniform(0.97, 1.03) / rate, batch_size=256, components=comps,
                    allocated=peak - comps["activations"], peak_allocated=peak, reserved=(peak // 2**21 + 8) * 2**21,
                    device_used=(peak // 2**21 + 8) * 2**21 + 500 * 2**20, batch_source="input dim 0",
                    micro_batches=1, peak_phase="optimizer" if sampled else None,
                    phase_peaks={"forward": peak - 10 * 2**20, "backward": peak - 6 * 2**20, "optimizer": peak}
                    if sampled else None)

    def step_line(self, rate: float, when: float | None = None) -> bytes:
        return protocol.encode(self.make_step(rate, when))

    def lines(self, rate: float, now: float) -> bytes:
        """One step's messages: the step itself, or with --coalesce what the agent's coalescer sends now."""
        if self.coalescer is None:
            return self.step_line(rate)
        return b"".join(protocol.encode(m) for m in self.coalescer.add(self.make_step(rate), now))

    def due_lines(self, now: float) -> bytes:
        """A window that waited its time (the agent's socket thread checks on every poll)."""
        if self.coalescer is None or not self.coalescer.due(now):
            return b""
        return b"".join(protocol.encode(m) for m in self.coalescer.flush(now))


def load_recorded(path: str) -> list[tuple[dict, list[dict], list[dict]]]:
    """A `batchmon record` recording's local agents (gzip or plain): per agent its hello, its history burst (the
    step messages its hello announced) and its live messages after it, in order."""
    import gzip
    import json

    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return agents_of_records(json.loads(line) for line in f)


def agents_of_records(records: Iterable[dict]) -> list[tuple[dict, list[dict], list[dict]]]:
    """load_recorded's split of a recording's records (an iterable of dicts) into agents: per agent its hello, its
    history burst and its live step messages, in order."""
    agents: dict[str, list] = {}
    for rec in records:
        data = rec.get("data")
        if rec.get("kind") != "agent" or not isinstance(data, dict):
            continue
        if data.get("type") == "hello":
            agents[rec["key"]] = [data, [], []]
        elif data.get("type") == "step" and rec.get("key") in agents:
            hello, burst, live = agents[rec["key"]]
            (burst if len(burst) < int(hello.get("history") or 0) and not live else live).append(data)
    return [tuple(v) for v in agents.values() if v[2]]  # type: ignore[misc]


class _RecordedAgent(_Agent):
    """A peer that sends one recorded real agent's messages (--recorded): its hello (this peer's pid, now), its
    history burst stamped before now, then its live messages at their recorded pace (by their ``time``), looped
    with step numbers and times moved on. The monitor reads what a real fast job sends (the H200's fast16 jobs:
    windows every 0.2 s, sampled ones with phases, own peaks and saved splits), not bench/load.py's model of it."""

    def __init__(self, directory: Path, index: int, duration: float, recorded: tuple[dict, list[dict], list[dict]],
                 gpu: str | None = None) -> None:
        super().__init__(directory, index, duration, 0, 10.0, gpu)
        import json

        self._dumps = json.JSONEncoder(separators=(",", ":")).encode
        hello, burst, live = recorded
        now = time.time()
        self.live = live
        self.first_time = live[0]["time"]
        self.span_time = live[-1]["time"] - self.first_time + 0.2
        self.span_steps = live[-1]["step"] - live[0]["step"] + int(live[-1].get("steps") or 1)
        self.shift = now - self.first_time  # a recorded time + shift: when it is sent
        self.next = 0
        self.loop = 0
        head = dict(hello, pid=self.pid, host=socket.gethostname(), time=now - 1.0)
        if gpu is not None:
            head["nvml_uuid"] = gpu
        self.hello = self._line(head) + b"".join(self._line(dict(m, time=m["time"] + self.shift - 0.5))
                                                for m in burst)

    def _line(self, data: dict) -> bytes:
        return self._dumps(data).encode() + b"\n"

    def lines(self, rate: float, now: float) -> bytes:
        wall = time.time()
        out = []
        while True:
            m = self.live[self.next]
            when = m["time"] + self.shift + self.loop * self.span_time
            if when > wall:
                break
            out.append(self._line(dict(m, time=when, step=m["step"] + self.loop * self.span_steps)))
            self.step = m["step"] + self.loop * self.span_steps
            self.next += 1
            if self.next == len(self.live):
                self.next, self.loop = 0, self.loop + 1
        return b"".join(out)

    def due_lines(self, now: float) -> bytes:
        return b""


def _peer(directory: str, first: int, count: int, rate: float, duration: float, ready: "mp.Queue",
          results: "mp.Queue", stop: "mp.synchronize.Event", close: "mp.synchronize.Event", prefill: int = 0,
          coalesce: bool = False, gpu: str | None = None, window: float | None = None,
          steady: float | None = None, recorded: str | None = None) -> None:
    """One worker process: `count` agents, each stepping at `rate`; reports what it sent and saw. With
    ``recorded`` each sends a recorded agent's messages instead (agent i: the recording's i-th, cycling); ``rate``
    is then only how often it looks for the next one due."""
    if recorded:
        sources = load_recorded(recorded)
        agents: list[_Agent] = [_RecordedAgent(Path(directory), first + i, duration,
                                               sources[(first + i) % len(sources)], gpu) for i in range(count)]
    else:
        agents = [_Agent(Path(directory), first + i, duration, prefill, rate, gpu) for i in range(count)]
    if coalesce and not recorded:
        for a in agents:
            # --window (an older tree's agents): that window always; else the agent's rule, its steady window
            # --steady-window (0: none)
            a.coalescer = (StepCoalescer(interval=window, steady_interval=None) if window is not None else
                           StepCoalescer() if steady is None else StepCoalescer(steady_interval=steady or None))
            if window is None and steady is None:
                a.said = {}  # the agent's rule: the window follows what the monitors say (batchmon.agent.pace)
    messages = 0
    sel = selectors.DefaultSelector()
    for a in agents:
        sel.register(a.server, selectors.EVENT_READ, ("listen", a))
    ready.put([a.pid for a in agents])
    accepted = closed_early = send_errors = 0
    period = 1.0 / rate
    start = time.time()
    due = [start + period * (i / max(1, count)) for i in range(count)]  # staggered
    sent = [0] * count
    try:
        while True:
            now = time.time()
            if close.is_set():
                break
            stopping = stop.is_set()  # no more steps; keep serving until the monitor has stopped
            nxt = min(due) if not stopping else now + 0.05
            for key, mask in sel.select(max(0.0, min(nxt - now, 0.05))):
                kind, obj = key.data
                if kind == "listen":
                    try:
                        conn, _ = obj.server.accept()
                    except OSError:
                        continue
                    conn.setblocking(False)
                    obj.clients[conn.fileno()] = (conn, bytearray(obj.hello))
                    if obj.said is not None:
                        obj.said[conn.fileno()] = MonitorLines()
                        obj.pace()
                    accepted += 1
                    sel.register(conn, selectors.EVENT_READ | selectors.EVENT_WRITE, ("client", (obj, conn)))
                else:
                    a, conn = obj
                    entry = a.clients.get(conn.fileno())
                    if entry is None:
                        continue
                    if mask & selectors.EVENT_READ:
                        try:
                            data = conn.recv(65536)
                        except BlockingIOError:
                            data = None
                        except OSError:
                            data = b""
                        if data == b"":
                            closed_early += 0 if stopping else 1
                            sel.unregister(conn)
                            a.clients.pop(conn.fileno(), None)
                            if a.said is not None:
                                a.said.pop(conn.fileno(), None)
                                a.pace()
                            conn.close()
                            continue
                        if data and a.said is not None and a.said[conn.fileno()].feed(data):
                            a.pace()
                    if mask & selectors.EVENT_WRITE:
                        _flush(sel, a, conn, entry[1])
            now = time.time()
            mono = time.monotonic()
            for i, a in enumerate(agents):
                line = b""
                if not stopping and now >= due[i]:
                    due[i] += period
                    if now - due[i] > 1.0:  # this process fell behind: skip, never burst
                        due[i] = now + period
                    line = a.lines(rate, mono)
                    if a.clients:  # a step counts as sent once a monitor is there to get it
                        sent[i] += 1
                elif a.coalescer is not None:
                    line = a.due_lines(mono) if not stopping else b"".join(
                        protocol.encode(m) for m in a.coalescer.flush(mono))
                if not line:
                    continue
                messages += line.count(b"\n")
                for conn, buf in list(a.clients.values()):
                    buf += line
                    if not _flush(sel, a, conn, buf):
                        send_errors += 1
    finally:
        results.put({"pids": [a.pid for a in agents], "steps": sent, "last": [a.step for a in agents],
                     "messages": messages, "accepted": accepted,
                     "closed_early": closed_early, "send_errors": send_errors})
        for a in agents:
            for conn, _ in a.clients.values():
                conn.close()
            a.server.close()
            try:
                a.path.unlink()
            except OSError:
                pass
            a.sleeper.kill()
            a.sleeper.wait()


def _flush(sel: selectors.BaseSelector, a: _Agent, conn: socket.socket, buf: bytearray) -> bool:
    try:
        n = conn.send(buf)
        del buf[:n]
    except BlockingIOError:
        pass
    except OSError:
        return False
    events = selectors.EVENT_READ | (selectors.EVENT_WRITE if buf else 0)
    try:
        if sel.get_key(conn).events != events:
            sel.modify(conn, events, ("client", (a, conn)))
    except (KeyError, ValueError):
        pass
    return True


# ---------------------------------------------------------------------------------------------- the monitor


class Watch:
    """on_snapshot callback: per-step latency into a fixed histogram, connection bookkeeping. Constant memory."""

    def __init__(self, since: float = 0.0) -> None:
        self.since = since  # steps stamped before this (a --prefill history burst) are not live steps
        self.hist = [0] * (BINS + 1)
        self.warm_hist = [0] * (BINS + 1)  # the same, only for steps stamped after warm_since (steady state)
        self.warm_since: float | None = None
        self.seen: dict[str, int] = {}  # agent key -> highest step seen
        self.steps_seen = 0
        self.gaps = 0
        self.snapshots = 0
        self.connected = 0
        self.disconnect_events = 0
        self._was_connected: dict[str, bool] = {}
        self.max_latency = 0.0
        self.last_call: float | None = None
        self.max_gap = 0.0  # longest time between two snapshots: a slow tick shows here
        self.gap_sum = 0.0

    def __call__(self, snap) -> None:
        now = time.time()
        if self.last_call is not None:
            self.max_gap = max(self.max_gap, now - self.last_call)
            self.gap_sum += now - self.last_call
        self.last_call = now
        self.snapshots += 1
        connected = 0
        for agent in snap.agents:
            if agent.connected:
                connected += 1
            was = self._was_connected.get(agent.key)
            if was and not agent.connected:
                self.disconnect_events += 1
            self._was_connected[agent.key] = agent.connected
            last = self.seen.get(agent.key, 0)
            top = last
            for step in reversed(agent.history):
                if step.step <= last:
                    break
                top = max(top, step.step)
                if step.time < self.since:
                    continue
                lat = max(0.0, now - step.time)
                self.max_latency = max(self.max_latency, lat)
                self.hist[min(BINS, int(lat * 1000 / BIN_MS))] += 1
                if self.warm_since is not None and step.time >= self.warm_since:
                    self.warm_hist[min(BINS, int(lat * 1000 / BIN_MS))] += 1
                self.steps_seen += getattr(step, "steps", 1)  # a coalesced message stands for its window
            first_new = agent.history[0] if agent.history else None
            if first_new is not None and last and first_new.step - getattr(first_new, "steps", 1) > last:
                self.gaps += first_new.step - getattr(first_new, "steps", 1) - last
            self.seen[agent.key] = top
        self.connected = connected

    def percentile(self, q: float, hist: list[int] | None = None) -> float | None:
        hist = self.hist if hist is None else hist
        total = sum(hist)
        if not total:
            return None
        want = q * total
        run = 0
        for i, n in enumerate(hist):
            run += n
            if run >= want:
                return (i + 1) * BIN_MS / 1000.0
        return None


def serve(args: argparse.Namespace) -> int:
    """--serve DIR: the peers alone, listening in DIR, until the duration ends or a signal; no hub here."""
    sockdir = protocol.ensure_socket_dir(Path(args.serve))
    workers = args.workers or min(8, args.agents)
    ctx = mp.get_context("fork")
    ready, results = ctx.Queue(), ctx.Queue()
    stop, close = ctx.Event(), ctx.Event()
    procs = []
    ended = {"signal": False}

    def on_signal(signum: int, frame: object) -> None:
        ended["signal"] = True

    old = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    share = [args.agents // workers + (1 if i < args.agents % workers else 0) for i in range(workers)]
    try:
        first = 0
        for n in share:
            if n:
                p = ctx.Process(target=_peer, args=(str(sockdir), first, n, args.rate, args.duration, ready,
                                                     results, stop, close, args.prefill, args.coalesce, args.gpu,
                                                     args.window, args.steady_window, args.recorded),
                               daemon=True)
                p.start()
                procs.append(p)
                first += n
        pids = [pid for _ in procs for pid in ready.get(timeout=60)]
        print(f"ready {len(pids)} agents in {sockdir}: {' '.join(map(str, pids))}", flush=True)
        end = time.monotonic() + args.duration
        while not ended["signal"] and time.monotonic() < end:
            time.sleep(0.1)
    finally:
        stop.set()
        close.set()
        sent = 0
        for _ in procs:
            try:
                sent += sum(results.get(timeout=30)["steps"])
            except Exception:  # noqa: BLE001 - a worker that died reports nothing; it is joined below
                pass
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        for sig, handler in old.items():
            signal.signal(sig, handler)
    print(f"served {args.agents} agents, {sent} steps sent", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--agents", type=int, default=64)
    ap.add_argument("--rate", type=float, default=10.0, help="steps per second per agent")
    ap.add_argument("--duration", type=float, default=600.0, help="seconds of load (after the agents connected)")
    ap.add_argument("--interval", type=float, default=0.25, help="the hub's snapshot interval")
    ap.add_argument("--workers", type=int, default=0, help="peer processes (default: min(8, agents))")
    ap.add_argument("--prefill", type=int, default=0,
                    help="steps of history each peer sends right after its hello (a real agent sends its recent "
                         "history on connect); with HISTORY_LIMIT the hub's history is full at once, so a short "
                         "run sees the steady state (these steps are not counted as live steps)")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before the RSS baseline (default: until the hub's per-agent history is full, "
                         "HISTORY_LIMIT/rate + 10 s, at most half the duration)")
    ap.add_argument("--coalesce", action="store_true",
                    help="the peers send what the real agent sends: windows of steps (batchmon.agent.coalesce), "
                         "not one message per step (issue 14: 64 agents at 1000 steps/s)")
    ap.add_argument("--p99", type=float, default=0.5, help="the step-to-snapshot p99 target in seconds (default 0.5)")
    ap.add_argument("--window", type=float, default=None,
                    help="with --coalesce: the coalescing window in seconds (default: the agent's WINDOW_SECONDS; "
                         "bench/ab_monitor.py --window gives an older tree the agents of its day)")
    ap.add_argument("--steady-window", type=float, default=None, metavar="SECONDS",
                    help="with --coalesce and no --window: a steady agent's window (default: the agent's "
                         "STEADY_DEFAULT, none; 0: none, the short window always)")
    ap.add_argument("--gpu", metavar="UUID",
                    help="with --serve: the peers say they train on this GPU (an NVML recording's UUID, e.g. in "
                         "bench/ab_monitor.py --gpu-agents) and send allocator figures and varying step times")
    ap.add_argument("--recorded", metavar="FILE",
                    help="with --serve: each peer sends a recorded real agent's messages (a `batchmon record` "
                         "recording, .gz or not, e.g. bench/results/fast16_rec_h200_run1.jsonl.gz: the H200's "
                         "16 fast jobs), looped at their recorded pace; --rate is then how often a peer looks")
    ap.add_argument("--serve", metavar="DIR",
                    help="run only the peers, listening in socket folder DIR, for a monitor started elsewhere")
    args = ap.parse_args(argv)
    if args.agents < 1 or args.rate <= 0 or args.duration <= 0:
        print("load.py: --agents, --rate and --duration must be positive", file=sys.stderr)
        return 2
    if args.recorded and not args.serve:
        print("load.py: --recorded goes with --serve", file=sys.stderr)
        return 2
    if args.serve:
        return serve(args)
    from batchmon.monitor.hub import Hub

    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    workers = args.workers or min(8, args.agents)
    from batchmon.agent.coalesce import WINDOW_SECONDS
    from batchmon.monitor.hub_state import HISTORY_LIMIT

    # The hub keeps the last HISTORY_LIMIT steps per agent by design (bounded), so RSS rises until that is full
    # (200 s at 10 steps/s); "flat" is judged after that.
    per_s = min(args.rate, 1.0 / WINDOW_SECONDS) if args.coalesce else args.rate  # history entries a second
    warmup = args.warmup if args.warmup is not None else min(args.duration / 2, HISTORY_LIMIT / per_s + 10.0)
    base = Path(tempfile.mkdtemp(prefix="bml"))
    sockdir = protocol.ensure_socket_dir(base / "s")
    ctx = mp.get_context("fork")
    ready, results = ctx.Queue(), ctx.Queue()
    setup_s = 30.0
    stop, close = ctx.Event(), ctx.Event()
    procs = []
    share = [args.agents // workers + (1 if i < args.agents % workers else 0) for i in range(workers)]
    first = 0
    for n in share:
        if n:
            p = ctx.Process(target=_peer, args=(str(sockdir), first, n, args.rate, args.duration, ready, results,
                                                 stop, close, args.prefill, args.coalesce, None, args.window,
                                                 args.steady_window),
                            daemon=True)
            p.start()
            procs.append(p)
            first += n
    for _ in procs:
        ready.get(timeout=60)
    watch = Watch(since=time.time())
    me = psutil.Process()
    hub = Hub(interval=args.interval, socket_dir=sockdir, on_snapshot=watch).start()
    t0 = time.monotonic()
    deadline = t0 + setup_s
    while watch.connected < args.agents and time.monotonic() < deadline:
        time.sleep(0.05)
    all_connected_s = time.monotonic() - t0
    # the load phase: from now until the peers stop
    end = time.monotonic() + args.duration
    load_start = time.monotonic()
    watch.warm_since = time.time() + warmup
    rss: list[tuple[float, int]] = []
    connected_min = args.agents
    cpu0 = me.cpu_times()
    while time.monotonic() < end:
        rss.append((round(time.monotonic() - load_start, 2), me.memory_info().rss))
        connected_min = min(connected_min, watch.connected)
        time.sleep(min(1.0, max(0.0, end - time.monotonic())))
    cpu1 = me.cpu_times()
    stop.set()
    # drain: let the hub read what was sent (a lagging hub has a backlog) until nothing new for 1 s (max 15 s)
    drain_end, seen, quiet_since = time.monotonic() + 15, -1, time.monotonic()
    while time.monotonic() < drain_end and time.monotonic() - quiet_since < max(1.0, 3 * args.interval):
        if watch.steps_seen != seen:
            seen, quiet_since = watch.steps_seen, time.monotonic()
        time.sleep(0.05)
    hub.stop()
    close.set()
    peer_results = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    shutil.rmtree(base, ignore_errors=True)
    if os.environ.get("LOAD_DEBUG"):
        last = {pid: st for r in peer_results for pid, st in zip(r["pids"], r["last"])}
        print({k: (v, last.get(int(k.rsplit(":", 1)[1]))) for k, v in watch.seen.items()})

    after = [r for t, r in rss if t >= warmup]
    at_warm = after[0] if after else None
    growth = (max(after) / at_warm - 1.0) * 100 if after else None
    sent = sum(sum(r["steps"]) for r in peer_results)
    messages = sum(r["messages"] for r in peer_results)
    accepted = sum(r["accepted"] for r in peer_results)
    closed_early = sum(r["closed_early"] for r in peer_results)
    dropped = closed_early + watch.disconnect_events + max(0, accepted - args.agents)
    p99 = watch.percentile(0.99)
    result = {
        "config": {"agents": args.agents, "rate": args.rate, "duration": args.duration, "interval": args.interval,
                   "workers": len(procs), "warmup": warmup, "prefill": args.prefill, "coalesce": args.coalesce,
                   "window_s": args.window if args.window is not None else COALESCE_WINDOW_S,
                   "steady_window_s": None if args.window is not None or args.steady_window == 0 else
                   (args.steady_window or STEADY_DEFAULT)},
        "machine": {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "all_connected_after_s": round(all_connected_s, 3),
        "connected_min_during_load": connected_min,
        "rss_bytes": {"at_warmup": at_warm, "max_after_warmup": max(after) if after else None,
                      "first": rss[0][1] if rss else None, "last": rss[-1][1] if rss else None,
                      "growth_pct_after_warmup": round(growth, 2) if growth is not None else None,
                      "history_full_after_s": HISTORY_LIMIT / args.rate,
                      "series_every_5s": rss[::5]},
        "monitor_cpu_seconds": round((cpu1.user + cpu1.system) - (cpu0.user + cpu0.system), 2),
        "connections": {"accepted": accepted, "closed_early": closed_early,
                        "hub_disconnects": watch.disconnect_events, "dropped": dropped},
        "messages_sent": messages,
        "steps": {"sent": sent, "seen": watch.steps_seen, "lost": max(0, sent - watch.steps_seen),
                  "history_gaps": watch.gaps},
        "latency_s": {"p50": watch.percentile(0.50), "p90": watch.percentile(0.90), "p99": p99,
                      "max": round(watch.max_latency, 4)},
        # the same over the steps sent after warm-up (the start - connecting, a --prefill burst - left out)
        "latency_after_warmup_s": {"p50": watch.percentile(0.50, watch.warm_hist),
                                   "p90": watch.percentile(0.90, watch.warm_hist),
                                   "p99": watch.percentile(0.99, watch.warm_hist),
                                   "steps": sum(watch.warm_hist)},
        "snapshots": watch.snapshots,
        "snapshot_gap_s": {"mean": round(watch.gap_sum / max(1, watch.snapshots - 1), 4),
                           "max": round(watch.max_gap, 4)},
    }
    checks = {
        "rss_flat": growth is not None and growth <= 10.0,
        "no_dropped_connections": dropped == 0 and connected_min == args.agents,
        f"latency_p99_le_{args.p99 * 1000:g}ms": p99 is not None and p99 <= args.p99,
        "no_steps_lost": sent - watch.steps_seen <= 0,
    }
    result["checks"] = checks
    (out / "load.json").write_text(json.dumps(result, indent=1))
    print(f"load: {args.agents} agents x {args.rate:g} steps/s for {args.duration:g} s, interval {args.interval:g} s")
    rb = result["rss_bytes"]
    print(f"  monitor RSS {rb['at_warmup'] / 2**20:.1f} MiB after warm-up -> max {rb['max_after_warmup'] / 2**20:.1f} MiB"
          f" ({rb['growth_pct_after_warmup']:+.1f}%)" if after else "  monitor RSS: no samples after warm-up")
    print(f"  connections: {accepted} accepted, dropped {dropped}; min connected {connected_min}/{args.agents}")
    print(f"  steps: sent {sent} in {messages} messages, seen {watch.steps_seen}, lost {result['steps']['lost']}")
    lat = result["latency_s"]
    print(f"  step-to-snapshot latency p50 {lat['p50']} s, p90 {lat['p90']} s, p99 {lat['p99']} s, max {lat['max']} s")
    wl = result["latency_after_warmup_s"]
    print(f"  after warm-up ({wl['steps']} steps): p50 {wl['p50']} s, p90 {wl['p90']} s, p99 {wl['p99']} s")
    gap = result["snapshot_gap_s"]
    print(f"  {watch.snapshots} snapshots, {gap['mean']} s apart on average (max {gap['max']} s)")
    print(f"  monitor CPU {result['monitor_cpu_seconds']} s; checks: {checks}")
    print(f"  wrote {out / 'load.json'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
