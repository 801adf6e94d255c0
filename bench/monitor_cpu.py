"""CPU cost of the running monitor: the real `batchmon` app in a pseudo-terminal for N seconds.

    python3 bench/monitor_cpu.py                          # live: NVML + agents on this machine, 60 s
    python3 bench/monitor_cpu.py --replay rec.jsonl       # a recording (e.g. 16 agents) replayed in the app
    python3 bench/monitor_cpu.py --duration 20 --interval 0.5 --size 160x48
    python3 bench/monitor_cpu.py --nvml-replay tests/fixtures/nvml_h200_recording.json --idle-gpu
                                                          # live hub, NVML answered from an H200 recording (loop)

Starts the monitor with Python's pty (a real terminal as far as Textual knows, window size set with
TIOCSWINSZ), keeps reading its output so it never blocks, and reads the child's CPU seconds (user + system)
with psutil: once after a warm-up (start-up, imports, first layout) and again at the end, so the steady figure
is the cost of refreshing alone. Then it sends `q` and checks the monitor exits. Needs textual on the machine.
Writes $OUT/monitor_cpu.json (OUT defaults to ./out) and prints a summary.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import pty
import select
import signal
import struct
import sys
import termios
import time
from pathlib import Path

import psutil


def set_winsize(fd: int, cols: int, rows: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


def drain(fd: int, until: float) -> int:
    """Read the terminal until the deadline; returns bytes read (the child blocks if nobody reads)."""
    total = 0
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return total
        ready, _, _ = select.select([fd], [], [], min(left, 0.2))
        if ready:
            try:
                data = os.read(fd, 65536)
            except OSError:  # EIO: the child closed the terminal
                return total
            if not data:
                return total
            total += len(data)


def thread_cpu_ns(pid: int) -> dict[int, int]:
    """Each thread's time on a CPU in ns (/proc/PID/task/TID/schedstat: ns, where cpu_times counts 10 ms ticks),
    by thread id; the lowest id is the main thread."""
    out = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[int(tid)] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return out


def cpu_seconds(proc: psutil.Process) -> tuple[float, float]:
    t = proc.cpu_times()
    return t.user, t.system


#: the live monitor with NVML answered by a recording (no GPU needed): what `batchmon --interval N` runs,
#: with NvmlProbe(backend=ReplayBackend(...)) instead of the real driver; --idle-gpu drops the recorded
#: processes (an idle GPU, as in bench/vs_nvitop.py's H200 comparison)
NVML_REPLAY_MAIN = """
import json, os, sys
from pathlib import Path
sys.path.insert(0, sys.argv[4])  # tests/: nvml_recording (test and bench tooling, not in the package)
from batchmon.monitor.hub import Hub
from batchmon.probes.nvml import NvmlProbe
from nvml_recording import ReplayBackend, load_recording
from batchmon.tui.app import run_monitor
path, interval, idle = sys.argv[1], float(sys.argv[2]), sys.argv[3] == "1"
data = load_recording(path)
if idle:
    for part in [data.get("init", [])] + [s["calls"] for s in data["samples"]]:
        for call in part:
            if "RunningProcesses" in call.get("fn", "") and isinstance(call.get("value"), list):
                call["value"] = []
if os.environ.get("BATCHMON_BENCH_GPU_AGENTS") == "1":
    # the agents in the socket folder (bench/load.py --serve --gpu) are the GPU's processes, as 16 real CUDA jobs
    # are on the H200: each uses ~850 MiB, steady (as in steady training)
    pids = sorted(int(p.stem) for p in Path(os.environ["BATCHMON_DIR"]).glob("*.sock") if p.stem.isdigit())
    for k, s in enumerate(data["samples"]):
        for call in s["calls"]:
            if call.get("fn") == "nvmlDeviceGetComputeRunningProcesses":
                call["value"] = [{"pid": pid, "usedGpuMemory": (850 + pid % 3 * 2) * 2**20,
                                  "gpuInstanceId": 4294967295, "computeInstanceId": 4294967295} for pid in pids]
hub = Hub(interval=interval, nvml_probe=NvmlProbe(backend=ReplayBackend(data, loop=True)))
try:
    sys.exit(run_monitor(hub, interval=interval, mouse=True))
finally:
    hub.stop()
"""


#: the floor: a bare Textual app in the same pty. "static": one Static, nothing changes; "ticking": the same
#: Static rewritten every interval with the time (the least a monitor that shows something new each refresh does)
BARE_MAIN = """
import sys, time
from textual.app import App
from textual.widgets import Static
mode, interval = sys.argv[1], float(sys.argv[2])
class Bare(App):
    BINDINGS = [("q", "quit", "quit")]
    def compose(self):
        yield Static("bare Textual app: " + mode, id="s")
    def on_mount(self):
        if mode == "ticking":
            self.set_interval(interval, lambda: self.query_one("#s", Static).update(time.strftime("%H:%M:%S")))
Bare().run()
"""


def monitor_argv(args: argparse.Namespace) -> list[str]:
    py = [sys.executable] + (["-m", "cProfile", "-o", str(args.profile)] if args.profile else [])
    if args.bare:
        script = Path(os.environ.get("TMPDIR", "/tmp")) / "batchmon_monitor_cpu_bare.py"
        script.write_text(BARE_MAIN)
        return py + [str(script), args.bare, str(args.interval)]
    if args.nvml_replay:
        script = Path(os.environ.get("TMPDIR", "/tmp")) / "batchmon_monitor_cpu_nvml_replay.py"
        script.write_text(NVML_REPLAY_MAIN)
        return py + [str(script), str(args.nvml_replay.resolve()), str(args.interval), "1" if args.idle_gpu else "0",
                     str(Path(__file__).resolve().parents[1] / "tests")]
    if args.replay:
        return py + ["-m", "batchmon", "replay", str(args.replay), "--speed", str(args.speed)]
    return py + ["-m", "batchmon", "--interval", str(args.interval)]


def run(args: argparse.Namespace) -> dict:
    cols, rows = args.size
    argv = monitor_argv(args)
    pid, fd = pty.fork()
    if pid == 0:  # child: becomes the monitor, its terminal is the pty
        os.environ["TERM"] = "xterm-256color"
        os.environ.pop("COLUMNS", None)
        os.environ.pop("LINES", None)
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    set_winsize(fd, cols, rows)
    os.kill(pid, signal.SIGWINCH)
    proc = psutil.Process(pid)
    t_start = time.monotonic()
    out_bytes = drain(fd, t_start + args.warmup)
    if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
        _, status = os.waitpid(pid, 0)
        raise SystemExit(f"monitor_cpu: the monitor exited during warm-up (status {status}); run `{' '.join(argv)}` by hand")
    u0, s0 = cpu_seconds(proc)
    th0 = thread_cpu_ns(pid)
    t0 = time.monotonic()
    out_bytes_steady = drain(fd, t0 + args.duration)
    u1, s1 = cpu_seconds(proc)
    th1 = thread_cpu_ns(pid)
    t1 = time.monotonic()
    out_bytes += out_bytes_steady

    os.write(fd, b"q")
    deadline = time.monotonic() + 10
    exit_code = None
    while time.monotonic() < deadline:
        drain(fd, time.monotonic() + 0.1)
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            exit_code = os.waitstatus_to_exitcode(status)
            break
    if exit_code is None:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    os.close(fd)

    steady = (u1 - u0) + (s1 - s0)
    window = t1 - t0
    try:
        import textual

        textual_version = getattr(textual, "__version__", None)
    except ImportError:
        textual_version = None
    return {
        "mode": (f"bare Textual app ({args.bare})" if args.bare else "replay" if args.replay
                 else "live, NVML replayed" if args.nvml_replay else "live"),
        "recording": str(args.replay or args.nvml_replay or "") or None,
        "idle_gpu": bool(args.idle_gpu) if args.nvml_replay else None,
        "speed": args.speed if args.replay else None,
        "interval_s": args.interval,
        "size": [cols, rows],
        "warmup_s": args.warmup,
        "window_s": round(window, 3),
        "cpu_seconds_steady": round(steady, 4),
        "cpu_user_steady": round(u1 - u0, 4),
        "cpu_system_steady": round(s1 - s0, 4),
        "cpu_percent_steady": round(100 * steady / window, 3) if window > 0 else None,
        # per thread (ns clock, finer than the ticks above), in thread id order: main first, then the threads
        # in the order they started (for the monitor: hub, Textual's output and input threads)
        "threads_cpu_s": [round((th1[t] - th0.get(t, 0)) / 1e9, 4) for t in sorted(th1)],
        "cpu_seconds_total": round(u1 + s1, 4),
        "terminal_bytes_steady": out_bytes_steady,
        "terminal_bytes_per_s": round(out_bytes_steady / window, 1) if window > 0 else None,
        "exit_code_after_q": exit_code,
        "argv": argv,
        "host": platform.node(),
        "python": platform.python_version(),
        "textual": textual_version,
        "cpu_count": os.cpu_count(),
        "time": time.time(),
    }


def parse_size(text: str) -> tuple[int, int]:
    cols, _, rows = text.partition("x")
    return int(cols), int(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CPU seconds of the batchmon monitor in a pseudo-terminal")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds after warm-up (default 60)")
    p.add_argument("--warmup", type=float, default=5.0, help="seconds before measuring (default 5)")
    p.add_argument("--interval", type=float, default=1.0, help="live refresh interval (default 1.0)")
    p.add_argument("--replay", type=Path, help="replay this recording instead of the live hub")
    p.add_argument("--speed", type=float, default=1.0, help="replay speed (default 1)")
    p.add_argument("--nvml-replay", type=Path, help="live monitor, NVML answered from this NVML recording "
                                                     "(tests/nvml_recording.py format), looped")
    p.add_argument("--idle-gpu", action="store_true", help="with --nvml-replay: drop the recorded GPU processes")
    p.add_argument("--bare", choices=("static", "ticking"),
                   help="measure a bare Textual app instead (the floor): one Static, unchanged or rewritten every "
                        "--interval")
    p.add_argument("--size", type=parse_size, default=(160, 48), help="terminal COLSxROWS (default 160x48)")
    p.add_argument("--profile", type=Path, help="run the monitor under cProfile, stats to this file (inflates CPU)")
    p.add_argument("--name", default="monitor_cpu", help="result file stem (default monitor_cpu)")
    args = p.parse_args(argv)
    for rec in (args.replay, args.nvml_replay):
        if rec and not rec.is_file():
            print(f"monitor_cpu: no such recording: {rec}", file=sys.stderr)
            return 1
    if args.replay and args.nvml_replay:
        print("monitor_cpu: --replay and --nvml-replay exclude each other", file=sys.stderr)
        return 2
    result = run(args)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"monitor ({result['mode']}, {args.size[0]}x{args.size[1]}): {result['cpu_seconds_steady']:.3f} CPU s over "
          f"{result['window_s']:.1f} s = {result['cpu_percent_steady']:.2f}% of one core; "
          f"{result['terminal_bytes_per_s']:.0f} B/s to the terminal; q -> exit {result['exit_code_after_q']}")
    print("  per thread (main first): " + ", ".join(f"{t:.3f}" for t in result["threads_cpu_s"]) + " s")
    print(f"wrote {path}")
    return 0 if result["exit_code_after_q"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
