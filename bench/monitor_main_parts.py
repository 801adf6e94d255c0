"""Where the live monitor's main (Textual) thread spends its CPU, by function (issue 14 point 3).

Beside 16 fast jobs the main thread costs ~6 ms a second on the dev box against ~2.4 for a bare Textual app
that rewrites one line a second (bench/monitor_cpu.py --bare ticking); the hub thread is measured part by part by
bench/monitor_hub_parts.py. This runs the same live monitor (the hub and the Textual app in a pseudo-terminal,
NVML answered from a recording, bench/load.py peers) with cProfile on the main thread alone, timed by the
thread's CPU clock, over the window after the warm-up (SIGUSR1 starts it, SIGUSR2 stops it and writes the
stats: Python runs signal handlers on the main thread, where cProfile's hook then lives).

    python3 bench/monitor_main_parts.py --nvml-replay tests/fixtures/nvml_h200_recording.json --agents 16 \\
        --rate 100 --coalesce --gpu-agents --out bench/results/monitor_main_parts_devbox.json

Writes the JSON (the main thread's CPU ms per second in the profiler's window, the top functions by own and by
cumulative time, each in ms per second and calls per second) and the raw .prof beside it. cProfile with a thread
clock inflates small Python calls several times over (~6x here): read its calls per second and shares, not its
milliseconds. ``--spy`` samples the main thread with py-spy instead (``pip install py-spy``; ~1000 samples a
second, the process not paused): no calls counted, no distortion; each function's figure is its share of the
main thread's samples times the thread's measured CPU (schedstat).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
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
from monitor_hub_parts import start_peers, start_tool  # noqa: E402
from vs_nvitop import Tool, run_window  # noqa: E402

#: the monitor's process: SIGUSR1 starts cProfile on the main thread (by its CPU clock), SIGUSR2 stops it and
#: dumps the stats to $MAIN_PARTS_OUT; then runs the NVML replay monitor of bench/monitor_cpu.py
CHILD_MAIN = r'''
import cProfile, os, signal, sys, time
prof = cProfile.Profile(time.thread_time)
state = {"t0": None, "c0": None}


def start_window(*_):
    state["t0"], state["c0"] = time.monotonic(), time.thread_time()
    prof.enable()


def end_window(*_):
    prof.disable()
    out = os.environ["MAIN_PARTS_OUT"]
    prof.dump_stats(out + ".prof")
    with open(out, "w") as f:
        f.write("%r %r" % (time.monotonic() - state["t0"], time.thread_time() - state["c0"]))


signal.signal(signal.SIGUSR1, start_window)
signal.signal(signal.SIGUSR2, end_window)
mode = os.environ["MAIN_PARTS_MODE"]
src = open(mode).read()
sys.argv = [mode] + sys.argv[1:]
exec(compile(src, mode, "exec"))
'''


def top(stats: pstats.Stats, secs: float, key: int, n: int) -> list[dict]:
    """The ``n`` functions with the most time at tuple index ``key`` (2: own, 3: cumulative)."""
    rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][key])[:n]  # type: ignore[attr-defined]
    out = []
    for (file, line, name), (_cc, calls, own, cum, _callers) in rows:
        where = file.split("site-packages/")[-1].split("/work/main/")[-1]
        out.append({"function": f"{where}:{line}({name})", "own_ms_per_s": round(own * 1e3 / secs, 3),
                    "cum_ms_per_s": round(cum * 1e3 / secs, 3), "calls_per_s": round(calls / secs, 1)})
    return out


def _short(frame: str) -> str:
    """``function (path:line)`` with the path from its package on."""
    for cut in ("site-packages/", "/work/main/", "lib/python3"):
        if cut in frame:
            name, _, path = frame.partition(" (")
            return f"{name} ({path.split(cut)[-1]}"
    return frame


def spied(args: argparse.Namespace, raw: Path, threads_s: list[float], window: float, tool: Tool) -> int:
    """py-spy's raw stacks of the main thread (the first thread listed by schedstat is the main one; py-spy
    names threads by their pthread id, so the main thread is the one with the most samples of asyncio's loop)
    folded into inclusive and own shares."""
    by_thread: dict[str, dict[str, int]] = {}
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or not count.isdigit():
            continue
        by_thread.setdefault(frames[0], {})[";".join(frames[1:])] = \
            by_thread.setdefault(frames[0], {}).get(";".join(frames[1:]), 0) + int(count)
    main_name = max(by_thread, key=lambda t: sum(n for s, n in by_thread[t].items() if "run_app" in s or
                                                 "_run_once" in s), default=None)
    stacks = by_thread.get(main_name or "", {})
    total = sum(stacks.values()) or 1
    main_ms = threads_s[0] * 1e3 / window if threads_s else 0.0
    own: dict[str, int] = {}
    cum: dict[str, int] = {}
    for stack, n in stacks.items():
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            cum[f] = cum.get(f, 0) + n

    def rows(d: dict[str, int]) -> list[dict]:
        return [{"function": f, "share": round(n / total, 4), "ms_per_s": round(n / total * main_ms, 3)}
                for f, n in sorted(d.items(), key=lambda kv: -kv[1])[:args.top]]

    result = {"what": __doc__.split("\n")[0] + " (py-spy samples)", "nvml": str(args.nvml_replay),
              "agents": args.agents, "rate": args.rate, "coalesce": args.coalesce, "gpu_agents": args.gpu_agents,
              "interval_s": args.interval, "size": list(args.size), "warmup_s": args.warmup, "window_s": round(window, 3),
              "host": platform.node(), "cpu_count": os.cpu_count(), "load": os.getloadavg(), "time": time.time(),
              "threads_cpu_ms_per_s": [round(t * 1e3 / window, 2) for t in threads_s], "main_samples": total,
              "spy_rate": args.spy_rate, "rss_max_mib": round(tool.rss_max / 2**20, 1),
              "top_own": rows(own), "top_cumulative": rows(cum)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    args.out.with_suffix(".stacks.txt").write_text(raw.read_text())  # the raw stacks, every thread
    print(f"main thread {main_ms:.2f} ms/s, {total} samples; threads {result['threads_cpu_ms_per_s']} ms/s")
    for row in result["top_cumulative"][:50]:
        print(f"  cum {row['share']:6.1%} {row['ms_per_s']:7.3f} ms/s  {row['function']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="the live monitor's main thread under cProfile")
    p.add_argument("--nvml-replay", type=Path, default=ROOT / "tests" / "fixtures" / "nvml_h200_recording.json")
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--rate", type=float, default=100.0)
    p.add_argument("--coalesce", action="store_true")
    p.add_argument("--gpu-agents", action="store_true", help="the peers are the replayed GPU's processes")
    p.add_argument("--prefill", type=int, default=1000)
    p.add_argument("--warmup", type=float, default=15.0)
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--interval", type=float, default=1.0)
    p.add_argument("--size", type=parse_size, default=(160, 48))
    p.add_argument("--top", type=int, default=60)
    p.add_argument("--spy", action="store_true", help="sample with py-spy instead of cProfile")
    p.add_argument("--spy-rate", type=int, default=997)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "out")) / "monitor_main_parts.json")
    args = p.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="main_parts_"))
    child = work / "child_main.py"
    child.write_text(CHILD_MAIN)
    replay = work / "nvml_replay_main.py"
    replay.write_text(NVML_REPLAY_MAIN)
    dump = work / "main.txt"
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", MAIN_PARTS_OUT=str(dump), MAIN_PARTS_MODE=str(replay))
    child_argv = [sys.executable, str(child), str(args.nvml_replay.resolve()), f"{args.interval:g}", "0",
                  str(ROOT / "tests")]
    serve = start_peers(args, work, env, "monitor_main_parts")
    if isinstance(serve, int):
        return serve
    threads: dict[str, dict[int, int]] = {}
    try:
        tool = start_tool(child_argv, env, args.size)

        spy: list[subprocess.Popen] = []

        def mark(at: str) -> None:
            threads[at] = thread_cpu_ns(tool.pid)
            if args.spy:
                if at == "start":
                    spy.append(subprocess.Popen(
                        ["py-spy", "record", "--pid", str(tool.pid), "--rate", str(args.spy_rate), "--duration",
                         f"{args.duration:.0f}", "--format", "raw", "--threads", "--nonblocking", "--function", "--output",
                         str(work / "spy.txt")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
                else:
                    spy[0].wait(60)
                return
            os.kill(tool.pid, signal.SIGUSR1 if at == "start" else signal.SIGUSR2)
            if at == "end":
                deadline = time.monotonic() + 10
                while not dump.exists() and time.monotonic() < deadline:
                    time.sleep(0.05)

        window = run_window([tool], args.warmup, args.duration, mark)
    finally:
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            serve.wait(30)
    t0, t1 = threads["start"], threads["end"]
    threads_s = [(t1[t] - t0.get(t, 0)) / 1e9 for t in sorted(t1)]
    if args.spy:
        return spied(args, work / "spy.txt", threads_s, window, tool)
    if not dump.exists():
        print("monitor_main_parts: the monitor wrote no figures", file=sys.stderr)
        return 1
    secs, main_cpu = (float(x) for x in dump.read_text().split())
    stats = pstats.Stats(str(dump) + ".prof")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prof_copy = args.out.with_suffix(".prof")
    prof_copy.write_bytes(Path(str(dump) + ".prof").read_bytes())
    result = {"what": __doc__.split("\n")[0], "nvml": str(args.nvml_replay), "agents": args.agents,
              "rate": args.rate, "coalesce": args.coalesce, "gpu_agents": args.gpu_agents,
              "interval_s": args.interval, "size": list(args.size), "warmup_s": args.warmup, "window_s": round(secs, 3),
              "host": platform.node(), "cpu_count": os.cpu_count(), "load": os.getloadavg(), "time": time.time(),
              "threads_cpu_ms_per_s_profiled": [round(t * 1e3 / window, 2) for t in threads_s],
              "main_thread_cpu_ms_per_s_profiled": round(main_cpu * 1e3 / secs, 2),
              "rss_max_mib": round(tool.rss_max / 2**20, 1),
              "top_own": top(stats, secs, 2, args.top), "top_cumulative": top(stats, secs, 3, args.top)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"main thread {result['main_thread_cpu_ms_per_s_profiled']} ms/s (profiled); threads "
          f"{result['threads_cpu_ms_per_s_profiled']} ms/s")
    for row in result["top_cumulative"][:40]:
        print(f"  cum {row['cum_ms_per_s']:7.3f} own {row['own_ms_per_s']:7.3f} ms/s {row['calls_per_s']:8.1f}/s  "
              f"{row['function']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
