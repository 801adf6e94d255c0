#!/usr/bin/env python3
"""A public script's own step times, plain and under ``batchmon run``, alternating (issue 14: the agent never
slows down the training, measured on code nobody here wrote).

The script prints its step times (nanoGPT: ``iter 10: loss ..., time 13.27ms``; word_language_model:
``ms/batch  7.05``); each run is parsed with ``--pattern`` (one group: milliseconds), runs alternate
plain, attached, attached, plain, ... so drift hits both modes, and the first ``--skip`` values of every run
(compilation, warm-up) are left out. The result is the ratio of the medians, attached / plain.

    python3 bench/step_time_ab.py --cwd .ext/nanoGPT --pattern 'time ([0-9.]+)ms' --skip 1 --runs 4 \\
        --out ab.json -- python3 train.py config/train_shakespeare_char.py --max_iters=200 --log_interval=10
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path


def run(argv: list[str], cwd: Path, pattern: re.Pattern[str], skip: int, timeout: float) -> dict:
    t = time.perf_counter()
    try:
        proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:  # what it printed so far still counts; the run is marked
        rc = 124
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                       for x in (exc.stdout, exc.stderr))
    values = [float(m.group(1)) for m in pattern.finditer(text)]
    return {"rc": rc, "seconds": round(time.perf_counter() - t, 1), "values_ms": values,
            "steady_ms": values[skip:], "tail": text.splitlines()[-4:]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cwd", type=Path, required=True, help="the script's folder")
    p.add_argument("--pattern", required=True, help="regex with one group: a step time in ms")
    p.add_argument("--skip", type=int, default=1, help="values left out at the start of every run (default 1)")
    p.add_argument("--runs", type=int, default=4, help="runs per mode (default 4)")
    p.add_argument("--timeout", type=float, default=240.0)
    p.add_argument("--name", default=None)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- the script's command line")
    args = p.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("give the script's command after --")
    pattern = re.compile(args.pattern)
    attached = [sys.executable, "-m", "batchmon", "run", "--", *command]
    runs: list[dict] = []
    for i in range(args.runs):
        for mode in (("plain", "attached") if i % 2 == 0 else ("attached", "plain")):
            res = run(command if mode == "plain" else attached, args.cwd, pattern, args.skip, args.timeout)
            res["mode"] = mode
            runs.append(res)
            print(f"{mode:8s} rc {res['rc']} {res['seconds']:6.1f}s  steady ms: {res['steady_ms']}", flush=True)
    steady = {m: [v for r in runs if r["mode"] == m for v in r["steady_ms"]] for m in ("plain", "attached")}
    med = {m: statistics.median(v) if v else None for m, v in steady.items()}
    ratio = med["attached"] / med["plain"] if med["attached"] and med["plain"] else None
    result = {"benchmark": "step_time_ab", "name": args.name or args.cwd.name, "command": command,
              "pattern": args.pattern, "skip": args.skip, "median_ms": med,
              "ratio": round(ratio, 4) if ratio else None, "runs": runs, "time": time.time(),
              "env": {k: v for k, v in os.environ.items() if k.startswith("BATCHMON")}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['name']}: median step {med['attached']} ms attached vs {med['plain']} ms plain, ratio {ratio}")
    return 0 if all(r["rc"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
