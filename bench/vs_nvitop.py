"""CPU cost of batchmon's monitor against nvitop, side by side, same terminal size and refresh interval (issue 7, point 5).

    python3 bench/vs_nvitop.py                       # 60 s measured after 10 s warm-up, --interval 1, 160x48
    python3 bench/vs_nvitop.py --duration 20 --interval 2
    python3 bench/vs_nvitop.py --repeat 3              # three rounds, each tool freshly started

Each tool runs at the same time in its own pseudo-terminal (Python's pty, window size set with TIOCSWINSZ, TERM
xterm-256color); both terminals are read continuously so neither blocks. CPU seconds (user + system) of each
process tree (the process, its live children, and children it has reaped) are read with psutil after the
warm-up and at the end; the difference is the steady cost. Then `q` is sent to each and the exit is checked.
nvitop is started as `python -m nvitop --interval SEC` (needs the nvitop wheel); batchmon as
`python -m batchmon --interval SEC`. A tool that exits early (nvitop on a machine without an NVIDIA driver)
is recorded with its exit code and its terminal output's last line, and the comparison is then not made.

With the two, by default, two floors run the same way (--no-floors leaves them out): a bare Textual app with
one Static that never changes (Textual's own idle cost) and the same Static rewritten every interval (the least
a Textual app that shows something new each refresh costs); see bench/monitor_cpu.py --bare.

--repeat N measures N rounds, each with freshly started tools (a single 60 s figure moves by 10-20% between
runs on the same box); the verdict holds only if it holds in every round.

Writes $OUT/vs_nvitop.json (OUT defaults to ./out) and prints a summary. Exit code 0 when both ran the whole
window and batchmon's CPU seconds ≤ nvitop's (in every round); 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import pty
import re
import select
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from monitor_cpu import BARE_MAIN, parse_size, set_winsize, thread_cpu_ns  # noqa: E402  (the pty helpers of the monitor CPU bench)


_MOVE = re.compile(rb"\x1b\[(\d+);\d+H")
DUMP_LIMIT = 1 << 20  # --dump keeps at most this many window bytes per tool


@dataclass
class Tool:
    name: str
    argv: list[str]
    pid: int = 0
    fd: int = -1
    out_bytes: int = 0
    tail: bytes = b""
    exit_code: int | None = None
    cpu: list[float] = field(default_factory=list)
    rss_max: int = 0  # the process tree's largest resident set seen in the window (bytes)
    window_bytes: int = 0  # terminal bytes written during the measured window only
    in_window: bool = False
    row_bytes: dict[int, int] = field(default_factory=dict)  # window bytes by the screen row they were written at
    _row: int = 0  # the row of the last absolute cursor move seen (ESC[row;colH)
    dump: bytearray | None = None  # the window's raw terminal bytes (with --dump), up to DUMP_LIMIT

    def count_rows(self, data: bytes) -> None:
        """Window bytes by screen row: each piece goes to the row of the cursor move before it (a move split
        between two reads counts toward the row before: a few bytes)."""
        pos = 0
        for m in _MOVE.finditer(data):
            self.row_bytes[self._row] = self.row_bytes.get(self._row, 0) + m.start() - pos
            self._row, pos = int(m.group(1)), m.start()
        self.row_bytes[self._row] = self.row_bytes.get(self._row, 0) + len(data) - pos

    def sample_rss(self) -> None:
        try:
            proc = psutil.Process(self.pid)
            rss = proc.memory_info().rss
            for child in proc.children(recursive=True):
                try:
                    rss += child.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        self.rss_max = max(self.rss_max, rss)

    def start(self, cols: int, rows: int) -> None:
        pid, fd = pty.fork()
        if pid == 0:
            os.environ["TERM"] = "xterm-256color"
            os.environ.pop("COLUMNS", None)
            os.environ.pop("LINES", None)
            try:
                os.execv(self.argv[0], self.argv)
            finally:
                os._exit(127)
        self.pid, self.fd = pid, fd
        set_winsize(fd, cols, rows)
        os.kill(pid, signal.SIGWINCH)

    def alive(self) -> bool:
        if self.exit_code is not None:
            return False
        done, status = os.waitpid(self.pid, os.WNOHANG)
        if done:
            self.exit_code = os.waitstatus_to_exitcode(status)
            return False
        return True

    def cpu_seconds(self) -> float | None:
        """User + system seconds of the process tree: itself, reaped children, live children."""
        try:
            proc = psutil.Process(self.pid)
            t = proc.cpu_times()
            total = t.user + t.system + t.children_user + t.children_system
            for child in proc.children(recursive=True):
                try:
                    c = child.cpu_times()
                    total += c.user + c.system
                except psutil.Error:
                    pass
            return total
        except psutil.Error:
            return None

    def last_line(self) -> str:
        text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07|\x1b[()][A-Z0-9]|\r", b"", self.tail)
        lines = [ln.strip() for ln in text.decode("utf-8", "replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if "rror" in ln or "NVIDIA" in ln or "NVML" in ln]
        return (errors or lines or [""])[-1][:300]


def drain(tools: list[Tool], until: float) -> None:
    """Read every terminal until the deadline (a child whose terminal is not read blocks)."""
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        fds = {t.fd: t for t in tools if t.fd >= 0}
        if not fds:
            time.sleep(min(left, 0.2))
            continue
        ready, _, _ = select.select(list(fds), [], [], min(left, 0.2))
        for fd in ready:
            tool = fds[fd]
            try:
                data = os.read(fd, 65536)
            except OSError:
                data = b""
            if not data:
                os.close(fd)
                tool.fd = -1
                continue
            tool.out_bytes += len(data)
            tool.tail = (tool.tail + data)[-8192:]
            if tool.in_window:
                tool.count_rows(data)
                if tool.dump is not None and len(tool.dump) < DUMP_LIMIT:
                    tool.dump += data[: DUMP_LIMIT - len(tool.dump)]


def quit_tool(tool: Tool, others: list[Tool]) -> None:
    if tool.fd >= 0 and tool.alive():
        try:
            os.write(tool.fd, b"q")
        except OSError:
            pass
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and tool.alive():
        drain(others, time.monotonic() + 0.1)
    if tool.alive():
        os.kill(tool.pid, signal.SIGKILL)
        _, status = os.waitpid(tool.pid, 0)
        tool.exit_code = os.waitstatus_to_exitcode(status)
    if tool.fd >= 0:
        os.close(tool.fd)
        tool.fd = -1


def run_window(tools: list[Tool], warmup: float, duration: float,
               mark: Callable[[str], None] | None = None) -> float:
    """Tools already started: warm up, then one measured window side by side - each tool's CPU seconds and
    terminal bytes at both ends (``tool.cpu``, ``tool.window_bytes``), RSS sampled every second - then every tool
    quit. ``mark("start")``/``mark("end")`` run at the window's ends (other per-tool readings). Returns the
    window's length in seconds."""
    drain(tools, time.monotonic() + warmup)
    for tool in tools:
        tool.cpu.append(tool.cpu_seconds() if tool.alive() else None)
    if mark is not None:
        mark("start")
    start_bytes = {t.name: t.out_bytes for t in tools}
    for tool in tools:
        tool.in_window = True
    t0 = time.monotonic()
    end = t0 + duration
    while time.monotonic() < end and any(t.fd >= 0 for t in tools):
        drain(tools, min(end, time.monotonic() + 1.0))
        for tool in tools:
            tool.sample_rss()
    window = time.monotonic() - t0
    for tool in tools:
        tool.in_window = False
        tool.window_bytes = tool.out_bytes - start_bytes[tool.name]
        tool.cpu.append(tool.cpu_seconds() if tool.alive() else None)
    if mark is not None:
        mark("end")
    for i, tool in enumerate(tools):
        quit_tool(tool, [t for j, t in enumerate(tools) if j != i])
    return window


def _thread_seconds(threads: dict[str, dict[str, dict[int, int]]], name: str) -> list[float]:
    """A tool's threads' CPU seconds between the window's marks, by thread id (threads that ended are missing)."""
    start, end = threads.get("start", {}).get(name, {}), threads.get("end", {}).get(name, {})
    return [round((end[t] - start.get(t, 0)) / 1e9, 4) for t in sorted(end)]


def measure_round(args: argparse.Namespace, floors: bool) -> dict:
    """One side-by-side window: every tool started together, warmed up, measured, quit."""
    cols, rows = args.size
    interval = f"{args.interval:g}"
    tools = [Tool("batchmon", [sys.executable, "-m", "batchmon", "--interval", interval]),
             Tool("nvitop", [sys.executable, "-m", "nvitop", "--interval", interval])]
    if floors:
        bare = Path(os.environ.get("TMPDIR", "/tmp")) / "batchmon_vs_nvitop_bare.py"
        bare.write_text(BARE_MAIN)
        tools += [Tool(f"textual_bare_{mode}", [sys.executable, str(bare), mode, interval])
                  for mode in ("static", "ticking")]
    for tool in tools:
        if args.dump:
            tool.dump = bytearray()
        tool.start(cols, rows)
    threads: dict[str, dict[str, dict[int, int]]] = {}  # per tool, per thread: CPU ns at the window's ends

    def mark(at: str) -> None:
        threads[at] = {tool.name: thread_cpu_ns(tool.pid) for tool in tools}

    window = run_window(tools, args.warmup, args.duration, mark)
    if args.dump:  # what each tool wrote in the window, byte for byte: which lines it repaints, and how
        out_dir = Path(os.environ.get("OUT", "out"))
        out_dir.mkdir(parents=True, exist_ok=True)
        for tool in tools:
            (out_dir / f"{args.name}_{tool.name}_window.bin").write_bytes(bytes(tool.dump or b""))
    out: dict = {"window_s": round(window, 3), "tools": {}}
    for tool in tools:
        a, b = tool.cpu
        steady = round(b - a, 4) if a is not None and b is not None else None
        out["tools"][tool.name] = {
            "argv": tool.argv, "cpu_seconds_steady": steady,
            "cpu_percent_steady": round(100 * steady / window, 3) if steady is not None and window > 0 else None,
            "ran_whole_window": steady is not None, "exit_code_after_q": tool.exit_code,
            "terminal_bytes": tool.out_bytes, "terminal_bytes_window": tool.window_bytes,
            # where the window's bytes went: screen row (1-based; 0 before the first absolute cursor move, and
            # all of a tool that moves the cursor otherwise, as curses may) -> bytes
            "terminal_bytes_by_row": dict(sorted(tool.row_bytes.items())),
            "rss_max_mib": round(tool.rss_max / 2**20, 1),
            # each thread's CPU seconds in the window, by thread id (the main thread first; batchmon's next ones:
            # Textual's output and input threads and the hub's IO thread, in the order they started)
            "threads_cpu_s": _thread_seconds(threads, tool.name),
            "last_line": tool.last_line() if steady is None else None}
    bm, nv = (out["tools"][n]["cpu_seconds_steady"] for n in ("batchmon", "nvitop"))
    out["batchmon_le_nvitop"] = bm <= nv if bm is not None and nv is not None else None
    if bm is not None and nv:
        b, n = out["tools"]["batchmon"], out["tools"]["nvitop"]
        out["ratios"] = {"cpu": round(bm / nv, 3),
                         "terminal_bytes_window": round(b["terminal_bytes_window"] / max(1, n["terminal_bytes_window"]), 3),
                         "rss_minus_nvitop_mib": round(b["rss_max_mib"] - n["rss_max_mib"], 1)}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="CPU seconds of batchmon vs nvitop in pseudo-terminals")
    p.add_argument("--duration", type=float, default=60.0, help="measured seconds after warm-up (default 60)")
    p.add_argument("--warmup", type=float, default=10.0, help="seconds before measuring (default 10)")
    p.add_argument("--interval", type=float, default=1.0, help="refresh interval of both tools (default 1.0)")
    p.add_argument("--size", type=parse_size, default=(160, 48), help="terminal COLSxROWS (default 160x48)")
    p.add_argument("--no-floors", action="store_true", help="leave out the bare Textual app floors")
    p.add_argument("--name", default="vs_nvitop", help="result file stem under $OUT (default vs_nvitop)")
    p.add_argument("--repeat", type=int, default=1,
                   help="measure this many rounds, each with freshly started tools (default 1; floors in the "
                        "first only): one round can be luck, the verdict is every round's")
    p.add_argument("--dump", action="store_true",
                   help="also write each tool's raw terminal bytes of the window (up to 1 MiB) to "
                        "$OUT/NAME_TOOL_window.bin (the last round's)")
    args = p.parse_args(argv)
    if args.duration <= 0 or args.interval <= 0 or args.warmup < 0 or args.repeat < 1:
        print("vs_nvitop: --duration and --interval must be positive, --repeat at least 1", file=sys.stderr)
        return 2
    cols, rows = args.size
    rounds = [measure_round(args, floors=not args.no_floors and r == 0) for r in range(args.repeat)]
    first = rounds[0]
    result: dict = {"interval_s": args.interval, "size": [cols, rows], "warmup_s": args.warmup,
                    "window_s": first["window_s"], "host": platform.node(), "cpu_count": os.cpu_count(),
                    "python": platform.python_version(), "time": time.time(),
                    "tools": first["tools"],  # round 1 (with the floors), as single-round results have it
                    "rounds": rounds}
    try:
        from importlib.metadata import version

        result["versions"] = {name: version(name) for name in ("nvitop", "textual", "nvidia-ml-py")}
    except Exception:  # noqa: BLE001 - a missing package is recorded, not fatal
        result["versions"] = None
    verdicts = [r["batchmon_le_nvitop"] for r in rounds]
    result["batchmon_le_nvitop"] = all(verdicts) if None not in verdicts else None
    totals = {}
    for name in ("batchmon", "nvitop"):
        figures = [r["tools"][name]["cpu_seconds_steady"] for r in rounds]
        totals[name] = round(sum(figures), 4) if None not in figures else None
    result["cpu_seconds_all_rounds"] = totals
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"vs_nvitop: {cols}x{rows}, interval {args.interval:g} s, {len(rounds)} round(s) of "
          f"{args.duration:g} s measured after {args.warmup:g} s warm-up")
    for k, rnd in enumerate(rounds, 1):
        for name, r in rnd["tools"].items():
            if r["ran_whole_window"]:
                print(f"  round {k} {name:22s} {r['cpu_seconds_steady']:.3f} CPU s "
                      f"({r['cpu_percent_steady']:.2f}% of one core), RSS {r['rss_max_mib']} MiB, "
                      f"{r['terminal_bytes_window']} terminal bytes; threads "
                      f"{', '.join(f'{x:.2f}' for x in r['threads_cpu_s'][:4])}; q -> exit {r['exit_code_after_q']}")
            else:
                print(f"  round {k} {name:22s} did not run the window: exit {r['exit_code_after_q']}: {r['last_line']}")
    print(f"  all rounds: batchmon {totals['batchmon']} vs nvitop {totals['nvitop']} CPU s; "
          f"batchmon <= nvitop in every round: {result['batchmon_le_nvitop']}")
    for k, rnd in enumerate(rounds, 1):
        if "ratios" in rnd:
            print(f"  round {k} batchmon/nvitop: CPU {rnd['ratios']['cpu']}, terminal bytes "
                  f"{rnd['ratios']['terminal_bytes_window']}, RSS {rnd['ratios']['rss_minus_nvitop_mib']:+} MiB")
    print(f"wrote {path}")
    return 0 if result["batchmon_le_nvitop"] else 1


if __name__ == "__main__":
    sys.exit(main())
