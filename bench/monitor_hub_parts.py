"""Where the live monitor's threads spend their CPU, part by part (issue 14 point 3).

Beside 16 fast jobs on the H200 the hub thread took 9-18 ms a second (bench/results/vs_nvitop_fast16_h200_run8),
while replaying the same jobs' recorded messages through the hub's pure state costs ~3.7 ms a recorded second
(bench/hub_apply_cost.py --recording). The rest is the live path around it: socket reads and JSON decoding, the
NVML and host probes, the snapshot's hand-over to the UI, the cyclic garbage collector. This runs the live monitor
(``batchmon --interval``: the hub and the Textual app, in a pseudo-terminal) with the hub's parts timed by thread
CPU time (time.thread_time_ns around each method, in the monitor's process), and the garbage collector's passes
timed per thread and generation (gc.callbacks). Parts nest (a poll holds the reads and the ingest of what they
read; a tick holds the probes and the snapshot): each figure is inclusive, and the JSON says what holds what.

    # dev box: NVML answered from the H200 recording, 16 bench/load.py peers as GPU processes
    python3 bench/monitor_hub_parts.py --nvml-replay tests/fixtures/nvml_h200_recording.json --agents 16 \\
        --rate 100 --coalesce --gpu-agents --out bench/results/monitor_hub_parts_devbox.json
    # H200: real NVML, beside the agents already running (bench/h200_run.sh fast16's 16 jobs)
    python3 bench/monitor_hub_parts.py --agents 0 --out $OUT/monitor_hub_parts_fast16_h200.json

Per part: CPU ms per second of the window, calls per second, µs per call. Also each thread's CPU (schedstat) and
the process's largest RSS. The timing wrappers cost ~1 µs a call (a few thousand calls a second): the totals are
a little above an unwrapped monitor's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from monitor_cpu import NVML_REPLAY_MAIN, parse_size, thread_cpu_ns  # noqa: E402
from vs_nvitop import Tool, run_window  # noqa: E402

#: the monitor's process: the hub's methods wrapped with thread-CPU timers before the monitor starts; SIGUSR1
#: zeroes the counters (the window's start), SIGUSR2 writes them to $HUB_PARTS_OUT (its end)
CHILD_MAIN = r'''
import gc, json, os, signal, sys, threading, time
from batchmon.monitor import hub as hub_mod
from batchmon.monitor import agent_sockets, hub_state
from batchmon.probes import host as host_mod, nvml as nvml_mod

tt = time.thread_time_ns
parts = {}
names = {}


def wrap(owner, attr, label):
    fn = getattr(owner, attr)

    def timed(*args, **kwargs):
        t = tt()
        try:
            return fn(*args, **kwargs)
        finally:
            p = parts.get(label)
            if p is None:
                p = parts[label] = [0, 0]
            p[0] += tt() - t
            p[1] += 1

    setattr(owner, attr, timed)


def ingest_by_kind(owner):
    fn = owner.ingest

    def timed(self, record):
        t = tt()
        try:
            return fn(self, record)
        finally:
            kind = record.get("kind") if isinstance(record, dict) else "?"
            if kind == "agent":
                data = record.get("data")
                kind = "agent:" + str(data.get("type") if isinstance(data, dict) else None)
            label = "HubState.ingest[" + str(kind) + "]"
            p = parts.get(label)
            if p is None:
                p = parts[label] = [0, 0]
            p[0] += tt() - t
            p[1] += 1

    owner.ingest = timed


H = hub_mod.Hub
for attr in ("_tick", "_read_agents", "_poll", "_scan", "_reap", "_sample_nvml", "_sample_host", "_drain_injected",
             "_settled"):
    wrap(H, attr, "Hub." + attr)
wrap(agent_sockets.AgentConnection, "read", "AgentConnection.read")
wrap(agent_sockets, "line_body", "agent_sockets.line_body")
wrap(hub_state.HubState, "snapshot", "HubState.snapshot")
ingest_by_kind(hub_state.HubState)
wrap(nvml_mod.NvmlProbe, "sample", "NvmlProbe.sample")
wrap(host_mod.HostProbe, "sample", "HostProbe.sample")
wrap(host_mod.HostProbe, "memory", "HostProbe.memory")


class TimedHub(H):
    """on_snapshot (set by the app) timed as the hand-over to the UI thread."""

    @property
    def on_snapshot(self):
        return self.__dict__.get("_on_snapshot_timed")

    @on_snapshot.setter
    def on_snapshot(self, fn):
        if fn is None:
            self.__dict__["_on_snapshot_timed"] = None
            return

        def timed(snap):
            t = tt()
            try:
                return fn(snap)
            finally:
                p = parts.setdefault("Hub.on_snapshot (hand-over to the UI)", [0, 0])
                p[0] += tt() - t
                p[1] += 1

        self.__dict__["_on_snapshot_timed"] = timed


hub_mod.Hub = TimedHub

gc_open = {}


def on_gc(phase, info):
    ident = threading.get_ident()
    if phase == "start":
        gc_open[ident] = tt()
        return
    t0 = gc_open.pop(ident, None)
    if t0 is None:
        return
    who = "main" if ident == threading.main_thread().ident else names.get(ident) or threading.current_thread().name
    label = "gc[" + who + ", gen " + str(info.get("generation")) + "]"
    p = parts.get(label)
    if p is None:
        p = parts[label] = [0, 0]
    p[0] += tt() - t0
    p[1] += 1


gc.callbacks.append(on_gc)
state = {"t0": None}


def start_window(*_):
    parts.clear()
    state["t0"] = time.monotonic()


def memory():
    """Where the resident set is: each mapping's Rss summed by what is mapped (anonymous, [heap], [stack], a file),
    the kB of the largest; modules imported by top-level package; glibc malloc's totals (mallinfo2)."""
    by = {}
    name = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if not head:
                continue
            if "-" in head[0] and not head[0].endswith(":"):
                name = head[5] if len(head) > 5 else "[anon]"
            elif head[0] == "Rss:":
                by[name] = by.get(name, 0) + int(head[1])
    top = sorted(by.items(), key=lambda kv: -kv[1])[:25]
    mods = {}
    for m in sys.modules:
        root = m.split(".")[0]
        mods[root] = mods.get(root, 0) + 1
    out = {"rss_kb_by_mapping": dict(top), "rss_kb_total": sum(by.values()),
           "modules": len(sys.modules), "modules_by_package": dict(sorted(mods.items(), key=lambda kv: -kv[1])[:40])}
    try:
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]

        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = MallInfo2
        mi = libc.mallinfo2()
        out["mallinfo2"] = {n: getattr(mi, n) for n, _ in MallInfo2._fields_}
    except (OSError, AttributeError):
        pass
    return out


def end_window(*_):
    out = {"memory": memory(), "seconds": time.monotonic() - (state["t0"] or time.monotonic()),
           "parts": {k: {"cpu_ns": v[0], "calls": v[1]} for k, v in parts.items()},
           "threads": {t.ident: t.name for t in threading.enumerate()},
           "gc_threshold": gc.get_threshold(), "gc_frozen": gc.get_freeze_count(), "gc_count": gc.get_count(),
           "python": sys.version.split()[0]}
    with open(os.environ["HUB_PARTS_OUT"], "w") as f:
        json.dump(out, f)


signal.signal(signal.SIGUSR1, start_window)
signal.signal(signal.SIGUSR2, end_window)
mode = os.environ.get("HUB_PARTS_MODE", "live")
if mode == "live":
    sys.argv = ["batchmon", "--interval", os.environ.get("HUB_PARTS_INTERVAL", "1")]
    from batchmon.cli.main import main

    sys.exit(main(sys.argv[1:]))
else:  # the NVML replay monitor of bench/monitor_cpu.py, its argv after ours
    src = open(mode).read()
    sys.argv = [mode] + sys.argv[1:]
    exec(compile(src, mode, "exec"))
'''


def summarize(raw: dict, threads_s: list[float]) -> dict:
    secs = raw["seconds"] or 1.0
    rows = {}
    for name, v in sorted(raw["parts"].items(), key=lambda kv: -kv[1]["cpu_ns"]):
        rows[name] = {"ms_per_s": round(v["cpu_ns"] / 1e6 / secs, 3), "calls_per_s": round(v["calls"] / secs, 2),
                      "us_per_call": round(v["cpu_ns"] / 1e3 / v["calls"], 1) if v["calls"] else None}
    return {"window_s": round(secs, 3), "threads_cpu_ms_per_s": [round(t * 1e3 / secs, 2) for t in threads_s],
            "parts": rows, "memory": raw.get("memory"), "gc_threshold": raw["gc_threshold"], "gc_frozen": raw["gc_frozen"],
            "monitor_python": raw["python"]}


def _tree() -> str | None:
    """The checkout's commit (with '+changes' when the working tree differs), where git can tell."""
    try:
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "batchmon", "tui", "probes"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("+changes" if dirty else "")) or None


def start_peers(args: argparse.Namespace, work: Path, env: dict[str, str], name: str) -> "subprocess.Popen[str] | int | None":
    """bench/load.py peers for the monitor to watch (``--agents``; 0: the agents already running), their socket
    folder set in ``env``: the started server, None without peers, or an exit status after a one-line error
    (``name``: whose). Shared by monitor_hub_parts and monitor_main_parts."""
    if not args.agents:
        return None
    sock = work / "sock"
    sock.mkdir(mode=0o700)
    env["BATCHMON_DIR"] = str(sock)
    serve_argv = [sys.executable, str(HERE / "load.py"), "--serve", str(sock), "--agents", str(args.agents),
                  "--rate", f"{args.rate:g}", "--prefill", str(args.prefill),
                  "--duration", str(int(args.warmup + args.duration + 60))]
    if args.coalesce:
        serve_argv.append("--coalesce")
    recorded = getattr(args, "recorded", None)
    if recorded is not None:
        serve_argv += ["--recorded", str(recorded.resolve())]
    if args.gpu_agents:
        from ab_monitor import recorded_uuid

        uuid = recorded_uuid(args.nvml_replay) if args.nvml_replay is not None else None
        if uuid is None:
            print(f"{name}: --gpu-agents needs --nvml-replay with a GPU UUID", file=sys.stderr)
            return 2
        serve_argv += ["--gpu", uuid]
        env["BATCHMON_BENCH_GPU_AGENTS"] = "1"
    serve = subprocess.Popen(serve_argv, stdout=subprocess.PIPE, text=True)
    line = serve.stdout.readline() if serve.stdout else ""
    if not line.startswith("ready"):
        print(f"{name}: the peers did not start: {line.strip()}", file=sys.stderr)
        serve.send_signal(signal.SIGTERM)
        serve.wait(30)
        return 1
    return serve


def start_tool(child_argv: list[str], env: dict[str, str], size: tuple[int, int]) -> Tool:
    """The monitor (``child_argv``) started in a pseudo-terminal under ``env``; this process's environment as it
    was afterwards."""
    saved = dict(os.environ)
    tool = Tool("batchmon", child_argv)
    try:
        os.environ.clear()
        os.environ.update(env)
        tool.start(*size)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return tool


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the live monitor's hub thread, part by part")
    p.add_argument("--nvml-replay", type=Path, default=None,
                   help="answer NVML from this recording (tests/nvml_recording.py format; default: the real NVML)")
    p.add_argument("--agents", type=int, default=16, help="bench/load.py peers to start (0: watch the agents "
                                                          "already running, in the usual socket folder)")
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--coalesce", action="store_true")
    p.add_argument("--gpu-agents", action="store_true", help="the peers are the replayed GPU's processes")
    p.add_argument("--prefill", type=int, default=1000)
    p.add_argument("--recorded", type=Path, default=None, metavar="FILE",
                   help="the peers send a recording's real agent messages (bench/load.py --recorded; e.g. "
                        "bench/results/fast16_rec_h200_run1.jsonl.gz, the H200's 16 fast jobs)")
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--size", type=parse_size, default=(160, 48))
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "monitor_hub_parts.json")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="hub_parts_"))
    child = work / "child_main.py"
    child.write_text(CHILD_MAIN)
    dump = work / "parts.json"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", HUB_PARTS_OUT=str(dump),
               HUB_PARTS_INTERVAL=f"{args.interval:g}")
    # batchmon as this environment imports it (the editable install here; PYTHONPATH=/tmp/bm on the H200 box)
    child_argv = [sys.executable, str(child)]
    if args.nvml_replay is not None:
        replay = work / "nvml_replay_main.py"
        replay.write_text(NVML_REPLAY_MAIN)
        env["HUB_PARTS_MODE"] = str(replay)
        child_argv += [str(args.nvml_replay.resolve()), f"{args.interval:g}", "0", str(ROOT / "tests")]
    serve = start_peers(args, work, env, "monitor_hub_parts")
    if isinstance(serve, int):
        return serve
    threads: dict[str, dict[int, int]] = {}
    try:
        tool = start_tool(child_argv, env, args.size)

        def mark(at: str) -> None:
            threads[at] = thread_cpu_ns(tool.pid)
            os.kill(tool.pid, signal.SIGUSR1 if at == "start" else signal.SIGUSR2)
            if at == "end":
                deadline = time.monotonic() + 5
                while not dump.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)

        window = run_window([tool], args.warmup, args.duration, mark)
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
    if not dump.exists():
        print("monitor_hub_parts: the monitor wrote no figures", file=sys.stderr)
        return 1
    t0, t1 = threads["start"], threads["end"]
    threads_s = [(t1[t] - t0.get(t, 0)) / 1e9 for t in sorted(t1)]
    raw = json.loads(dump.read_text())
    result = {"what": __doc__.split("\n")[0], "nvml": str(args.nvml_replay) if args.nvml_replay else "real",
              "agents": args.agents, "rate": args.rate,
              "recorded": str(args.recorded) if args.recorded is not None else None, "coalesce": args.coalesce, "gpu_agents": args.gpu_agents,
              "interval_s": args.interval, "size": list(args.size), "warmup_s": args.warmup, "host": platform.node(),
              "cpu_count": os.cpu_count(), "load": os.getloadavg(), "time": time.time(), "tree": _tree(),
              "rss_max_mib": round(tool.rss_max / 2**20, 1), "window_outer_s": round(window, 3),
              "nesting": {"Hub._tick": "the probes, a short read, HubState.snapshot, on_snapshot",
                          "Hub._read_agents": "Hub._poll (tick reads)", "Hub._poll": "AgentConnection.read + "
                          "HubState.ingest of what it read (idle polls too)", "AgentConnection.read":
                          "recv + line split + agent_sockets.line_body (JSON decode)",
                          "Hub._sample_nvml": "NvmlProbe.sample + its ingest", "Hub._sample_host":
                          "HostProbe.sample/memory + its ingest", "HubState.snapshot": "views, fits, jobs"},
              **summarize(raw, threads_s)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"threads ms/s {result['threads_cpu_ms_per_s']}, RSS {result['rss_max_mib']} MiB")
    for name, row in result["parts"].items():
        print(f"  {name:48s} {row['ms_per_s']:7.3f} ms/s  {row['calls_per_s']:8.2f}/s  {row['us_per_call']} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
