#!/usr/bin/env python3
"""The agent's fixed cost per step on a noisy box (issue 14 point 1): many short processes, plain and attached
interleaved, the median of per-process medians with their spread.

One process measures one mode: after ``--warmup`` steps it times ``--seconds`` of steady steps (each to
``loss.item()``, a host sync as training loops log) and reports its median step time and the training thread's
CPU time per step (``time.thread_time``: on a launch-bound GPU step the agent's cost is main-thread CPU - it
launches nothing on the device - and this figure moves less than the wall clock). Processes run one at a time in
the order plain, attached, attached, plain, ... (ABBA), so a drift of the box hits both modes alike; a process's
own level (the H200 host's main-thread CPU swings by +-40 us between processes of the same mode) is averaged out
over many processes instead of being paired with one neighbour.

Modes: ``plain``; ``attached`` (``batchmon.attach(model, optimizer)``, defaults); ``armed`` (``--armed``: attached
with quiet steady steps off - every hook on every step, what the quiet steps save); ``old`` (``--old-tree PATH``:
attached with the batchmon of another checkout, e.g. ``git archive <commit>`` unpacked - before/after in one run).
``--reader``: a monitor-like process reads every agent's socket, as a ``batchmon`` beside the job would.

Result: per mode the per-process medians (step time, main-thread CPU per step) and 10th-percentile step times
(on a loaded box its preemptions stay above it), their median, quartiles and range; attached minus plain as the
difference of the medians and as the median of the ABBA neighbours' differences; the ratio of the medians.

    python3 bench/agent_cost_procs.py --device cpu --out bench/results/agent_cost_procs_cpu_devbox.json
    python3 bench/agent_cost_procs.py --device cuda --procs 16 --armed --out agent_cost_procs_mlp_h200.json
    python3 bench/agent_cost_procs.py --device cuda --model resnet18 --procs 10 --out agent_cost_procs_rn18_h200.json
    python3 bench/agent_cost_procs.py --cpu-smoke --out /tmp/procs.json      # checks the script, not the cost
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--model", choices=("mlp", "resnet18"), default="mlp")
    p.add_argument("--procs", type=int, default=12, help="processes per mode (default 12)")
    p.add_argument("--seconds", type=float, default=None, help="timed seconds per process (default cpu 1.0, cuda 2.0)")
    p.add_argument("--warmup", type=int, default=60, help="untimed steps per process after attaching (default 60)")
    p.add_argument("--armed", action="store_true", help="a third mode: attached, quiet steady steps off")
    p.add_argument("--reader", action="store_true", help="a monitor-like process reads the agents' sockets")
    p.add_argument("--old-tree", default=None, help="a mode 'old': attached with this checkout's batchmon")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads per process (default 1)")
    p.add_argument("--cpu-smoke", action="store_true", help="2 tiny processes per mode: checks the script")
    p.add_argument("--child", choices=("plain", "attached", "armed", "old"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.model, args.procs, args.seconds, args.warmup = "cpu", "mlp", 2, 0.2, 10
    if args.seconds is None:
        args.seconds = 1.0 if args.device == "cpu" else 2.0
    if args.procs < 1 or args.seconds <= 0 or args.warmup < 1 or args.threads < 1:
        p.error("--procs, --seconds, --warmup and --threads must be positive")
    return args


# ------------------------------------------------------------------------------------------------ one process


def child(args: argparse.Namespace) -> int:
    import torch
    import torch.nn as nn

    if args.device == "cuda" and not torch.cuda.is_available():
        print("agent_cost_procs: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    gen = torch.Generator().manual_seed(0)
    if args.model == "mlp":
        cpu = device.type == "cpu"
        width, layers, batch = (64, 3, 32) if cpu else (512, 8, 256)
        mods: list[Any] = []
        for _ in range(layers):
            mods += [nn.Linear(width, width), nn.ReLU()]
        model = nn.Sequential(*mods, nn.Linear(width, 10)).to(device)
        opt: Any = torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(batch, width, generator=gen).to(device)
    else:
        import torchvision

        batch = 128 if device.type == "cuda" else 8
        model = torchvision.models.resnet18(num_classes=10).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
    y = torch.randint(0, 10, (batch,), generator=gen).to(device)
    crit = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        loss.item()

    for _ in range(10):
        step()
    handle = None
    if args.child != "plain":
        import batchmon

        if args.child == "armed":  # quiet steady steps off: every hook on every step
            from batchmon.agent.quiet_steps import QuietSteps

            QuietSteps.after_carried = lambda self, forwards: None  # type: ignore[method-assign]
        handle = batchmon.attach(model, opt, name="agent_cost_procs")
    for _ in range(args.warmup):
        step()
    times: list[float] = []
    clock = time.perf_counter
    end = clock() + args.seconds
    quiet_after: list[bool] = []  # after each timed step: was the agent quiet (an end snapshot alone can miss)
    record = quiet_after.append if handle is not None else None
    c0 = time.thread_time()
    while True:
        t = clock()
        step()
        t1 = clock()
        times.append(t1 - t)
        if record is not None:
            record(handle is not None and handle.quiet)
        if t1 >= end:
            break
    cpu = (time.thread_time() - c0) / len(times)
    times_sorted = sorted(times)
    info: dict[str, Any] = {"mode": args.child, "steps": len(times), "median_s": statistics.median(times),
                            "p10_s": times_sorted[len(times) // 10],  # (a loaded box's preemptions stay above it)
                            "main_cpu_s_per_step": cpu, "pid": os.getpid()}
    if handle is not None:
        info["quiet"] = bool(getattr(handle, "quiet", False))
        # the share of timed steps after which the agent was quiet; a sampled step and the one after it are not
        # (on CUDA a sampled step follows its phases: the next step is measured in full before the carried one)
        info["quiet_share"] = round(sum(quiet_after) / len(quiet_after), 4) if quiet_after else None
        info["not_quiet_runs"] = _runs_of_false(quiet_after)
        info["quiet_call"] = bool(getattr(getattr(handle, "_hooks", None), "calling", False))
        info["batchmon"] = str(Path(batchmon.__file__).resolve().parent)
        info["agent_steps"] = handle.last_step.step if handle.last_step is not None else 0
        info["agent_error"] = handle.error
        handle.detach()
    print(json.dumps(info))
    return 0


def _runs_of_false(flags: list[bool]) -> dict[str, int]:
    """How many stretches of not-quiet steps, and the longest (a transient after each sample vs never quiet)."""
    runs, longest, cur = 0, 0, 0
    for f in flags:
        if not f:
            cur += 1
            runs += cur == 1
            longest = max(longest, cur)
        else:
            cur = 0
    return {"stretches": runs, "longest": longest}


# ------------------------------------------------------------------------------------------------ the runs


def spread(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"median": None, "q1": None, "q3": None, "min": None, "max": None}
    q = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return {"median": statistics.median(values), "q1": q[0], "q3": q[2], "min": min(values), "max": max(values)}


def us(d: dict[str, float | None]) -> dict[str, float | None]:
    return {k: (round(v * 1e6, 2) if v is not None else None) for k, v in d.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child(args)
    modes = ["plain", "attached"] + (["armed"] if args.armed else []) + (["old"] if args.old_tree else [])
    if args.old_tree and not (Path(args.old_tree) / "batchmon" / "agent").is_dir():
        print(f"agent_cost_procs: --old-tree {args.old_tree} has no batchmon/agent", file=sys.stderr)
        return 2
    sock_base = Path(tempfile.mkdtemp(prefix="bmq"))
    sock_dir = sock_base / "s"
    env = {**os.environ, "BATCHMON_DIR": str(sock_dir),
           "PYTHONPATH": str(ROOT) + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")}
    reader = None
    if args.reader:
        sys.path.insert(0, str(ROOT / "bench"))
        from agent_cost import READER  # the same monitor-like reader as agent_cost.py

        sock_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        reader = subprocess.Popen([sys.executable, "-c", READER, str(sock_dir)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
    load0 = os.getloadavg()
    runs: list[dict[str, Any]] = []
    failed: list[str] = []
    for i in range(args.procs):
        order = modes if i % 2 == 0 else list(reversed(modes))
        for mode in order:
            argv_child = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--device", args.device,
                          "--model", args.model, "--seconds", str(args.seconds), "--warmup", str(args.warmup),
                          "--threads", str(args.threads)]
            child_env = env if mode != "old" else {**env, "PYTHONPATH": str(Path(args.old_tree).resolve())}
            proc = subprocess.run(argv_child, capture_output=True, text=True, env=child_env, timeout=600, cwd=ROOT)
            if proc.returncode != 0:
                failed.append(f"{mode}: rc {proc.returncode}: {proc.stderr.strip()[-300:]}")
                print(f"agent_cost_procs: a {mode} process failed (rc {proc.returncode})", file=sys.stderr)
                continue
            info = json.loads(proc.stdout.strip().splitlines()[-1])
            info["index"] = i
            runs.append(info)
            print(f"  {i:3d} {mode:9s} median {info['median_s'] * 1e6:9.1f} us  main CPU "
                  f"{info['main_cpu_s_per_step'] * 1e6:9.1f} us/step  ({info['steps']} steps"
                  + (f", quiet={info.get('quiet')}" if mode != "plain" else "") + ")", flush=True)
    if reader is not None:
        reader.terminate()
        reader.wait(timeout=10)
    shutil.rmtree(sock_base, ignore_errors=True)
    by_mode = {m: [r for r in runs if r["mode"] == m] for m in modes}
    result: dict[str, Any] = {"benchmark": "agent_cost_procs", "device": args.device, "model": args.model,
                              "settings": {k: getattr(args, k) for k in ("procs", "seconds", "warmup", "threads",
                                                                          "armed", "reader", "cpu_smoke")},
                              "python": platform.python_version(), "time": time.time(),
                              "load_before": load0, "load_after": os.getloadavg(), "failed": failed, "modes": {}}
    for m in modes:
        result["modes"][m] = {"processes": len(by_mode[m]),
                              "step_us": us(spread([r["median_s"] for r in by_mode[m]])),
                              "step_p10_us": us(spread([r["p10_s"] for r in by_mode[m]])),
                              "main_cpu_us": us(spread([r["main_cpu_s_per_step"] for r in by_mode[m]])),
                              "quiet_processes": sum(1 for r in by_mode[m] if r.get("quiet")),
                              "quiet_share": [r.get("quiet_share") for r in by_mode[m]]}
    plain = result["modes"]["plain"]
    for m in modes[1:]:
        mine = result["modes"][m]
        # each process against the plain process of the same index (its ABBA neighbour)
        pairs = [(a, p) for a in by_mode[m] for p in by_mode["plain"] if p["index"] == a["index"]]
        d_step = [(a["median_s"] - p["median_s"]) * 1e6 for a, p in pairs]
        d_cpu = [(a["main_cpu_s_per_step"] - p["main_cpu_s_per_step"]) * 1e6 for a, p in pairs]
        if plain["step_us"]["median"] and mine["step_us"]["median"]:
            mine["ratio"] = round(mine["step_us"]["median"] / plain["step_us"]["median"], 4)
            mine["added_step_us"] = round(mine["step_us"]["median"] - plain["step_us"]["median"], 2)
            mine["added_main_cpu_us"] = round(mine["main_cpu_us"]["median"] - plain["main_cpu_us"]["median"], 2)
        mine["paired_added_step_us"] = {k: (round(v, 2) if v is not None else None) for k, v in spread(d_step).items()}
        d_p10 = [(a["p10_s"] - p["p10_s"]) * 1e6 for a, p in pairs]
        mine["paired_added_step_p10_us"] = {k: (round(v, 2) if v is not None else None) for k, v in spread(d_p10).items()}
        if plain["step_p10_us"]["median"] and mine["step_p10_us"]["median"]:
            mine["added_step_p10_us"] = round(mine["step_p10_us"]["median"] - plain["step_p10_us"]["median"], 2)
        mine["paired_added_main_cpu_us"] = {k: (round(v, 2) if v is not None else None)
                                            for k, v in spread(d_cpu).items()}
    result["runs"] = runs
    for m in modes[1:]:
        r = result["modes"][m]
        if "ratio" not in r:
            continue
        print(f"agent_cost_procs {args.model} on {args.device}, {m} vs plain, {r['processes']} + {plain['processes']}"
              f" processes: median step {r['step_us']['median']} vs {plain['step_us']['median']} us, ratio "
              f"{r['ratio']} ({r['added_step_us']:+} us; ABBA neighbours' median {r['paired_added_step_us']['median']:+}"
              f" us, quartiles {r['paired_added_step_us']['q1']}..{r['paired_added_step_us']['q3']}); main-thread CPU "
              f"{r['added_main_cpu_us']:+} us a step (neighbours' median {r['paired_added_main_cpu_us']['median']:+}, "
              f"quartiles {r['paired_added_main_cpu_us']['q1']}..{r['paired_added_main_cpu_us']['q3']}); "
              f"quiet in {r['quiet_processes']} of {r['processes']}; the processes' 10th-percentile step "
              f"{r.get('added_step_p10_us')} us (neighbours' median {r['paired_added_step_p10_us']['median']})")
    if failed:
        print(f"agent_cost_procs: {len(failed)} process(es) failed: {failed[0]}", file=sys.stderr)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
