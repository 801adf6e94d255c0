"""A/B of the monitor's cost on this machine: two checkouts of batchmon side by side, same agents, same NVML.

    python3 bench/ab_monitor.py --tree old=HEAD~3 --tree new=. --agents 1 --rate 5 --duration 40 --repeat 3
    python3 bench/ab_monitor.py --tree old=abc123 --tree new=. --agents 16 --rate 100 --coalesce --name ab_fast16

Why: on a box without a GPU, and with 2 shared cores, one monitor's CPU figure moves by 10-20% between runs;
measuring two versions at the same time, under the same load, several rounds (which one starts first
alternating), is what separates a change from noise. bench/vs_nvitop.py does the same against nvitop on the H200.

Each ``--tree NAME=REV`` is laid out as the package installs (as bench/h200_run.sh does: probes/ and tui/ copied
into batchmon/): REV ``.`` is the working tree as it is, anything else a git revision (``git archive``);
``NAME=REV+PATH,PATH`` is that revision with these files or folders taken from the working tree (one change
measured while others edit other files of the same tree). Every
tool runs the live monitor (``batchmon --interval``, the hub and the Textual app) in its own pseudo-terminal,
with NVML answered from a recorded H200 stream (``--nvml`` a tests/nvml_recording.py recording, looped; the
recorded processes kept unless --idle-gpu), and with ``--agents`` protocol peers from bench/load.py (``--serve``)
stepping at ``--rate`` in a private socket folder, coalesced as the real agent does with ``--coalesce``; with
``--gpu-agents`` they say they train on the recording's GPU and NVML lists them as its processes (the screen of
the H200's fast16 stage: 16 processes and their allocator rows, the jobs on GPU 0).

Per round and tool: CPU seconds (user + system) over the window after the warm-up, the main and the other
threads' share (schedstat), terminal bytes in the window, the largest RSS. Writes $OUT/NAME.json (default
ab_monitor) and prints a summary; exit code 0 when every tool ran the whole window.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
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


def lay_out(rev: str, dest: Path) -> Path:
    """The checkout at ``rev`` ('.' = the working tree as it is; 'REV+PATH,PATH': REV with these paths from the
    working tree) in ``dest``, laid out as the package installs."""
    rev, _, overlay = rev.partition("+")
    if rev == ".":
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", "__pycache__", "out", "*.egg-info",
                                                                   ".venv", "screenshots", "node_modules"))
    else:
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for part in filter(None, overlay.split(",")):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, dest / part, dirs_exist_ok=True)
        else:
            (dest / part).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / part)
    for part in ("probes", "tui"):
        shutil.copytree(dest / part, dest / "batchmon" / part, dirs_exist_ok=True)
    return dest


def tool_for(name: str, tree: Path, args: argparse.Namespace, script: Path) -> Tool:
    argv = [sys.executable, str(script), str(args.nvml.resolve()), f"{args.interval:g}",
            "1" if args.idle_gpu else "0", str(tree / "tests")]
    return Tool(name, argv)


def start_env(tree: Path, sockdir: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree)
    env["BATCHMON_DIR"] = str(sockdir)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def recorded_uuid(nvml: Path) -> str | None:
    """The first GPU's UUID in an NVML recording (what --gpu-agents' peers say they train on)."""
    data = json.loads(nvml.read_text())
    for part in [data.get("init", [])] + [s.get("calls", []) for s in data.get("samples", [])]:
        for call in part:
            if call.get("fn") == "nvmlDeviceGetUUID" and isinstance(call.get("value"), str):
                return call["value"]
    return None


def measure_round(tools: list[Tool], trees: dict[str, Path], sockdirs: dict[str, Path], args: argparse.Namespace,
                  order: list[int]) -> dict:
    cols, rows = args.size
    saved = dict(os.environ)
    try:
        for i in order:  # the child inherits os.environ at fork: set it per tool
            tool = tools[i]
            os.environ.clear()
            os.environ.update(saved)  # start_env copies os.environ: what this process has, with the tool's own
            os.environ.update(start_env(trees[tool.name], sockdirs[tool.name]))
            tool.start(cols, rows)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    threads: dict[str, dict] = {}  # per thread CPU ns of each tool at the window's start and end

    def mark(at: str) -> None:
        threads[at] = {tool.name: thread_cpu_ns(tool.pid) for tool in tools}

    window = run_window(tools, args.warmup, args.duration, mark)
    th0, th1 = threads["start"], threads["end"]
    out: dict = {"window_s": round(window, 3), "started_first": tools[order[0]].name, "tools": {}}
    for tool in tools:
        a, b = tool.cpu[-2:]
        steady = round(b - a, 4) if a is not None and b is not None else None
        t0n, t1n = th0[tool.name], th1[tool.name]
        threads = [round((t1n[t] - t0n.get(t, 0)) / 1e9, 4) for t in sorted(t1n)]
        out["tools"][tool.name] = {
            "cpu_seconds_steady": steady, "ran_whole_window": steady is not None,
            "threads_cpu_s": threads,  # main thread first, then hub, Textual's output and input threads ...
            "terminal_bytes_window": tool.window_bytes, "terminal_bytes_by_row": dict(sorted(tool.row_bytes.items())),
            "rss_max_mib": round(tool.rss_max / 2**20, 1),
            "exit_code_after_q": tool.exit_code, "last_line": tool.last_line() if steady is None else None}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="A/B of two batchmon checkouts' monitor cost, side by side")
    p.add_argument("--tree", action="append", required=True, metavar="NAME=REV",
                   help="a checkout to run: REV '.' (the working tree) or a git revision; give two or more")
    p.add_argument("--nvml", type=Path, default=ROOT / "tests" / "fixtures" / "nvml_h200_recording.json",
                   help="NVML recording answered to every tool (default: the H200 recording)")
    p.add_argument("--idle-gpu", action="store_true", help="drop the recorded GPU processes")
    p.add_argument("--agents", type=int, default=1, help="protocol peers (bench/load.py --serve) to watch")
    p.add_argument("--rate", type=float, default=5.0, help="steps per second per peer (default 5)")
    p.add_argument("--coalesce", action="store_true", help="peers coalesce steps as the real agent does")
    p.add_argument("--gpu-agents", action="store_true",
                   help="the peers train on the recording's GPU, as real CUDA jobs: NVML lists them as its "
                        "processes, they send allocator figures and step times that vary (bench/load.py --gpu); "
                        "the screen the H200's fast16 stage shows")
    p.add_argument("--window", action="append", default=[], metavar="NAME=SECONDS",
                   help="with --coalesce: this tree's agents coalesce over SECONDS (an older tree with the agents of "
                        "its day); trees with their own window watch their own peers, on the same box at the same time")
    p.add_argument("--prefill", type=int, default=1000, help="history steps a peer sends on connect (default 1000)")
    p.add_argument("--recorded", type=Path, default=None, metavar="FILE",
                   help="the peers send a recording's real agent messages (bench/load.py --recorded; e.g. "
                        "bench/results/fast16_rec_h200_run1.jsonl.gz, the H200's 16 fast jobs)")
    p.add_argument("--duration", type=float, default=40.0, help="measured seconds per round (default 40)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring (default 10)")
    p.add_argument("--interval", type=float, default=1.0, help="the monitors' --interval (default 1)")
    p.add_argument("--size", type=parse_size, default=(160, 48), help="terminal COLSxROWS (default 160x48)")
    p.add_argument("--repeat", type=int, default=3, help="rounds; the first tool starts first in odd rounds")
    p.add_argument("--name", default="ab_monitor", help="result file stem under $OUT (default ab_monitor)")
    args = p.parse_args(argv)
    pairs = [t.partition("=") for t in args.tree]
    if any(not name or not sep or not rev for name, sep, rev in pairs) or len({n for n, _, _ in pairs}) != len(pairs):
        print("ab_monitor: --tree takes NAME=REV, each NAME once", file=sys.stderr)
        return 2
    if not args.nvml.is_file():
        print(f"ab_monitor: no such NVML recording: {args.nvml}", file=sys.stderr)
        return 2
    windows: dict[str, float | None] = {name: None for name, _, _ in pairs}
    for spec in args.window:
        name, _, secs = spec.partition("=")
        try:
            windows[name] = float(secs) if name in windows else float("nan")
        except ValueError:
            windows[name] = float("nan")
        if name not in windows or not windows[name] > 0:
            print(f"ab_monitor: --window takes NAME=SECONDS for a --tree NAME, got {spec!r}", file=sys.stderr)
            return 2
    base = Path(tempfile.mkdtemp(prefix="bm_ab"))
    os.chmod(base, 0o700)
    groups = sorted(set(windows.values()), key=lambda w: -1.0 if w is None else w)
    folder = {w: base / f"sock{i}" for i, w in enumerate(groups)}  # one peer set per window
    sockdirs = {name: folder[w] for name, w in windows.items()}
    serves: list[subprocess.Popen] = []
    load_avg = {"start": os.getloadavg()}
    tools: list[Tool] = []
    rounds = []
    try:
        trees = {name: lay_out(rev, base / name) for name, _, rev in pairs}
        revs = {name: rev if rev != "." else "working tree" for name, _, rev in pairs}
        for name, _, rev in pairs:
            base_rev, plus, overlay = rev.partition("+")
            if base_rev != ".":
                revs[name] = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", base_rev], check=True,
                                            capture_output=True, text=True).stdout.strip() + plus + overlay
        script = base / "nvml_replay_main.py"
        script.write_text(NVML_REPLAY_MAIN)
        for w in groups:
            serve_argv = [sys.executable, str(HERE / "load.py"), "--serve", str(folder[w]), "--agents",
                          str(args.agents), "--rate", f"{args.rate:g}", "--prefill", str(args.prefill),
                          "--duration", str(int(args.repeat * (args.duration + args.warmup + 30) + 60))]
            if args.coalesce:
                serve_argv.append("--coalesce")
            if args.recorded is not None:
                serve_argv += ["--recorded", str(args.recorded.resolve())]
            if w is not None:
                serve_argv += ["--window", f"{w:g}"]
            if args.gpu_agents:
                uuid = recorded_uuid(args.nvml)
                if uuid is None:
                    print(f"ab_monitor: no GPU UUID in {args.nvml} for --gpu-agents", file=sys.stderr)
                    return 2
                serve_argv += ["--gpu", uuid]
                os.environ["BATCHMON_BENCH_GPU_AGENTS"] = "1"  # the monitors inherit it (NVML_REPLAY_MAIN)
            serve = subprocess.Popen(serve_argv, stdout=subprocess.PIPE, text=True)
            serves.append(serve)
            line = serve.stdout.readline() if serve.stdout else ""
            if not line.startswith("ready"):
                print(f"ab_monitor: the peers did not start: {line.strip()}", file=sys.stderr)
                return 1
        for r in range(args.repeat):
            tools = [tool_for(name, trees[name], args, script) for name, _, _ in pairs]
            order = list(range(len(tools))) if r % 2 == 0 else list(reversed(range(len(tools))))
            rounds.append(measure_round(tools, trees, sockdirs, args, order))
            tools = []
    finally:
        for tool in tools:  # a round cut short: no monitor outlives the bench
            if tool.pid and tool.exit_code is None:
                try:
                    os.kill(tool.pid, signal.SIGKILL)
                    os.waitpid(tool.pid, 0)
                except OSError:
                    pass
            if tool.fd >= 0:
                os.close(tool.fd)
        load_avg["end"] = os.getloadavg()
        for serve in serves:
            serve.send_signal(signal.SIGTERM)
        for serve in serves:
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
                serve.wait()
        shutil.rmtree(base, ignore_errors=True)
    names = [n for n, _, _ in pairs]
    totals = {n: round(sum(r["tools"][n]["cpu_seconds_steady"] or 0 for r in rounds), 3) for n in names}
    result = {
        "what": "the live monitor (hub + Textual app), NVML answered from a recording, fake agents (bench/load.py)",
        "trees": revs, "nvml": str(args.nvml), "idle_gpu": args.idle_gpu, "agents": args.agents,
        "recorded": str(args.recorded) if args.recorded is not None else None, "rate": args.rate,
        "coalesce": args.coalesce, "gpu_agents": args.gpu_agents, "windows": windows, "prefill": args.prefill,
        "interval_s": args.interval, "size": list(args.size), "load_average_1_5_15": load_avg,
        "warmup_s": args.warmup, "duration_s": args.duration, "rounds": rounds, "cpu_seconds_all_rounds": totals,
        "host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version(), "time": time.time(),
    }
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"ab_monitor: {', '.join(f'{n}={revs[n]}' for n in names)}; {args.agents} agents x {args.rate:g} steps/s"
          f"{' coalesced' if args.coalesce else ''}; {args.size[0]}x{args.size[1]}, interval {args.interval:g} s")
    for k, rnd in enumerate(rounds, 1):
        for n in names:
            t = rnd["tools"][n]
            if t["ran_whole_window"]:
                print(f"  round {k} {n:8s} {t['cpu_seconds_steady']:.3f} CPU s (threads "
                      f"{', '.join(f'{x:.2f}' for x in t['threads_cpu_s'])}), {t['terminal_bytes_window']} B, "
                      f"RSS {t['rss_max_mib']} MiB")
            else:
                print(f"  round {k} {n:8s} did not run the window: exit {t['exit_code_after_q']}: {t['last_line']}")
    print("  all rounds: " + ", ".join(f"{n} {totals[n]} CPU s" for n in names))
    print(f"wrote {path}")
    return 0 if all(t["ran_whole_window"] for r in rounds for t in r["tools"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
