"""Replay of a multi-GB recording in bounded memory (issue 17, C7).

    python3 bench/replay_big.py --size-gb 5 --out bench/results/replay_5gb.json   # the acceptance run
    python3 bench/replay_big.py --size-gb 0.05 --out /tmp/replay_smoke.json       # smoke (seconds)

Builds a recording of the requested size from the real 16-agent H200 fixture (its records repeated, times
shifted so the replay moves forward), then runs `batchmon replay FILE --once --json` in a child and reports its
peak RSS (getrusage of the only child), wall time and throughput, and the final snapshot's agent count. The
recording is written to --dir (default: a temporary folder; needs --size-gb of free disk) and removed at the end
unless --keep. Exit code 0 when the replay succeeded and its peak RSS stayed under --limit-mb (default 150).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tui_h200_16_agents.jsonl"
T_FIELD = re.compile(rb'"t":(\d+(?:\.\d+)?)')


def build(path: Path, size: int) -> tuple[int, int]:
    """Write ``size`` bytes of recording to path; returns (bytes, repetitions of the fixture)."""
    lines = FIXTURE.read_bytes().splitlines(keepends=True)
    head, body = lines[0], b"".join(lines[1:])
    times = [float(m.group(1)) for m in T_FIELD.finditer(body)]
    span = (max(times) - min(times) + 1.0) if times else 1.0
    written, reps = len(head), 0
    with open(path, "wb", buffering=16 << 20) as f:
        f.write(head)
        while written < size:
            shift = span * reps
            chunk = body if reps == 0 else T_FIELD.sub(
                lambda m: b'"t":' + repr(float(m.group(1)) + shift).encode(), body)
            f.write(chunk)
            written += len(chunk)
            reps += 1
    return written, reps


def measure(path: Path) -> dict:
    code = ("import resource, subprocess, sys, time\n"
            "t = time.monotonic()\n"
            "r = subprocess.run([sys.executable, '-m', 'batchmon', 'replay', sys.argv[1], '--once', '--json'],"
            " capture_output=True)\n"
            "import json\n"
            "agents = len(json.loads(r.stdout)['agents']) if r.returncode == 0 else None\n"
            "print(json.dumps({'rc': r.returncode, 'seconds': time.monotonic() - t, 'agents': agents,"
            " 'peak_rss_kb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,"
            " 'stderr': r.stderr.decode()[-500:]}))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    return json.loads(proc.stdout)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size-gb", type=float, default=5.0)
    p.add_argument("--limit-mb", type=float, default=150.0)
    p.add_argument("--dir", default=None, help="where to write the recording (default: a temporary folder)")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    args = p.parse_args()
    folder = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bm-replay-big-"))
    path = folder / "big.jsonl"
    try:
        t0 = time.monotonic()
        size, reps = build(path, int(args.size_gb * (1 << 30)))
        built = time.monotonic() - t0
        result = measure(path)
    finally:
        if not args.keep:
            path.unlink(missing_ok=True)
            if not args.dir:
                folder.rmdir()
    result.update({"bytes": size, "fixture_repetitions": reps, "build_seconds": round(built, 1),
                   "peak_rss_mb": round(result["peak_rss_kb"] / 1024, 1),
                   "mb_per_second": round(size / 2**20 / result["seconds"], 1), "limit_mb": args.limit_mb,
                   "cpu_count": os.cpu_count(), "python": sys.version.split()[0]})
    result["ok"] = result["rc"] == 0 and result["peak_rss_mb"] < args.limit_mb
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
