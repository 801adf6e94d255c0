#!/usr/bin/env python3
"""What the agent costs at start-up (issue 14 point 4): ``batchmon run`` around ``import torch``, and attach().

Three commands, run alternately (plain, run, bootstrap-only, plain, ...), ``--rounds`` times each, wall time of
each run, medians:

- plain: ``python -c "import torch"``;
- run: ``batchmon run -- python -c "import torch"`` (the console script next to this Python if there is one,
  else ``python -m batchmon``): the launcher, the child's bootstrap, the agent's auto-attach after torch;
- bootstrap: the child alone with the bootstrap on (``BATCHMON_AUTO=1``, the bootstrap folder on PYTHONPATH),
  no launcher: what the agent adds inside the training process.

Then ``attach()`` in a fresh process that imported torch and built a small model and optimizer (on the GPU when
there is one: then attach also reads NVML's uuid for the device): the first call (the agent's modules imported,
hooks installed, socket opened) and the time to the first step's end, medians
over ``--rounds`` processes. Targets: run within 100 ms of plain, attach() within 50 ms.

    python3 bench/startup.py --out bench/results/startup_devbox.json
    python3 bench/startup.py --rounds 3     # quicker
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

ATTACH = r"""
import json, sys, time
import torch
import torch.nn as nn
device = "cuda" if torch.cuda.is_available() else "cpu"
model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)).to(device)
opt = torch.optim.Adam(model.parameters())
x = torch.randn(8, 32, device=device)
if device == "cuda":
    torch.cuda.synchronize()  # CUDA's own start-up is the script's, not the agent's
t0 = time.perf_counter()
import batchmon
handle = batchmon.attach(model, opt)
t1 = time.perf_counter()
loss = model(x).square().mean()
loss.backward()
opt.step()
loss.item()
t2 = time.perf_counter()
ok = handle.last_step is not None and handle.socket_path is not None
handle.detach()
print(json.dumps({"attach_s": t1 - t0, "first_step_s": t2 - t1, "ok": ok, "device": device}))
"""


def launcher() -> list[str]:
    script = Path(sys.executable).with_name("batchmon")
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "batchmon"]


def timed(cmd: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the processes it started)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - t
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        raise SystemExit(f"startup: {' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return elapsed, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="runs of each command (default 10)")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--no-compile", action="store_true", help="do not byte-compile batchmon first")
    args = p.parse_args(argv)
    if args.rounds < 1:
        print("startup: --rounds must be >= 1", file=sys.stderr)
        return 2

    import batchmon
    from batchmon.agent.bootstrap import ENV_FLAG, FOLDER

    if not args.no_compile:
        # what an install does (pip byte-compiles); a checkout run with PYTHONDONTWRITEBYTECODE=1 would compile
        # batchmon's modules from source in every process, ~100 ms that no installed batchmon pays
        import compileall

        compileall.compile_dir(str(Path(batchmon.__file__).parent), quiet=1)

    sock = Path(tempfile.mkdtemp(prefix="bms")) / "s"
    env = dict(os.environ, BATCHMON_DIR=str(sock))
    env.pop(ENV_FLAG, None)
    boot_env = dict(env, **{ENV_FLAG: "1"})
    boot_env["PYTHONPATH"] = os.pathsep.join(x for x in (FOLDER, env.get("PYTHONPATH")) if x)
    py = [sys.executable, "-c", "import torch"]
    commands = {"plain": (py, env), "run": (launcher() + ["run", "--"] + py, env), "bootstrap": (py, boot_env)}

    timed(py, env)  # warm the file cache once
    walls: dict[str, list[float]] = {name: [] for name in commands}
    cpus: dict[str, list[float]] = {name: [] for name in commands}
    for i in range(args.rounds):
        order = list(commands) if i % 2 == 0 else list(reversed(commands))
        for name in order:
            cmd, e = commands[name]
            wall, cpu = timed(cmd, e)
            walls[name].append(wall)
            cpus[name].append(cpu)

    attach: list[dict[str, float]] = []
    for _ in range(args.rounds):
        out = subprocess.run([sys.executable, "-c", ATTACH], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"startup: attach run failed: {out.stderr.strip()[-500:]}")
        attach.append(json.loads(out.stdout.strip().splitlines()[-1]))

    med = {name: statistics.median(v) for name, v in walls.items()}
    cpu_med = {name: statistics.median(v) for name, v in cpus.items()}
    att = statistics.median(a["attach_s"] for a in attach)
    first = statistics.median(a["first_step_s"] for a in attach)
    result = {
        "benchmark": "startup",
        "median_s": med,
        "run_minus_plain_ms": round((med["run"] - med["plain"]) * 1e3, 1),
        "bootstrap_minus_plain_ms": round((med["bootstrap"] - med["plain"]) * 1e3, 1),
        "cpu_median_s": cpu_med,
        "run_minus_plain_cpu_ms": round((cpu_med["run"] - cpu_med["plain"]) * 1e3, 1),
        "bootstrap_minus_plain_cpu_ms": round((cpu_med["bootstrap"] - cpu_med["plain"]) * 1e3, 1),
        "attach_ms": round(att * 1e3, 2),
        "first_step_after_attach_ms": round(first * 1e3, 2),
        "targets": {"run_minus_plain_ms": 100, "attach_ms": 50},
        "ok": (med["run"] - med["plain"]) * 1e3 <= 100 and att * 1e3 <= 50 and all(a["ok"] for a in attach),
        "runs": walls, "cpu_runs": cpus, "attach_runs": attach, "byte_compiled": not args.no_compile,
        "launcher": launcher(), "rounds": args.rounds,
        "python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "time": time.time(),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"startup: import torch {med['plain'] * 1e3:.0f} ms plain, {med['run'] * 1e3:.0f} ms under batchmon run "
          f"(+{result['run_minus_plain_ms']} ms; bootstrap alone +{result['bootstrap_minus_plain_ms']} ms; "
          f"CPU +{result['run_minus_plain_cpu_ms']} / +{result['bootstrap_minus_plain_cpu_ms']} ms); "
          f"attach() {result['attach_ms']} ms, first step after it {result['first_step_after_attach_ms']} ms "
          f"-> {'OK' if result['ok'] else 'OVER'} (targets +100 ms, 50 ms); medians of {args.rounds}"
          + (f"; wrote {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
