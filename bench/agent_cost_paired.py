#!/usr/bin/env python3
"""The agent's fixed cost per step as a paired, in-one-process A/B (issue 14 point 1): short blocks of steps,
attached and plain, interleaved in one process; the median of the paired differences with a confidence interval.

Why: across processes the H200 host's main-thread CPU per step differs by +-40 us between processes of the same
mode (bench/agent_cost_procs.py: quartiles of the ABBA neighbours' difference -38..+289 us), ten times the 25 us
to show. Inside one process that level is shared, so each attached block is paired with the plain block next to
it. Pairs run in the order AB, BA, AB, ... (a drift within a pair hits both orders alike); every block begins with
``--warm`` untimed steps (attached: ``batchmon.attach(model, optimizer)`` first - its first steps are measured in
full, then the steps go quiet; plain: the same number of steps, after ``detach()``), then ``--steps`` timed steps,
each to ``loss.item()`` (a host sync, as training loops log).

Per block: the median step time and the training thread's CPU per step (``time.thread_time``: on a launch-bound
GPU step the agent's cost is main-thread CPU - it launches nothing on the device). Per pair: attached minus plain.
Result: the median of the pairs' differences with a distribution-free 95% interval (order statistics of the
sign test: no normality assumed), the mean with its 95% interval, the ratio of the medians, and per attached
block the share of its timed steps after which the agent was quiet (a sampled step and the next one are not).
Where the block's mean goes: each attached step is timed on its own too, and a step the agent was quiet before
and after is a quiet step - the quiet steps' median CPU against the plain block's median step is the fixed
cost of a steady step (``added_main_cpu_quiet_step_us``), their mean against the plain block's mean also holds
the quiet steps that read the allocator's figures (on CUDA every 50 ms: ``added_main_cpu_quiet_mean_us``); the
other steps' (a sample, the step after it) CPU beyond the quiet mean, spread over the block, is what the samples
add (``loud_steps_cpu_per_step_us``).
The run stops starting pairs after ``--budget`` seconds.

    python3 bench/agent_cost_paired.py --device cuda --out bench/results/agent_cost_paired_mlp_h200.json  # ~90 s
    python3 bench/agent_cost_paired.py --device cpu --out /tmp/paired_cpu.json                           # ~100 us steps
    python3 bench/agent_cost_paired.py --cpu-smoke --out /tmp/paired.json      # checks the script, not the cost
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
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
    p.add_argument("--pairs", type=int, default=None, help="attached/plain block pairs (default cpu 60, cuda 150)")
    p.add_argument("--steps", type=int, default=None, help="timed steps per block (default cpu 200, cuda 100)")
    p.add_argument("--warm", type=int, default=20, help="untimed steps at the start of every block (default 20)")
    p.add_argument("--budget", type=float, default=100.0, help="no new pair after this many seconds (default 100)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--optimizer", choices=("adam", "sgd"), default="adam", help="the MLP's optimizer (default adam)")
    p.add_argument("--cpu-smoke", action="store_true", help="a few tiny blocks on the CPU: checks the script")
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.device, args.pairs, args.steps, args.warm = "cpu", args.pairs or 4, args.steps or 20, min(args.warm, 12)
    args.pairs = args.pairs or (150 if args.device == "cuda" else 60)
    args.steps = args.steps or (100 if args.device == "cuda" else 200)
    if args.pairs < 2 or args.steps < 5 or args.warm < 0 or args.budget <= 0:
        p.error("--pairs >= 2, --steps >= 5, --warm >= 0, --budget > 0")
    args.seq_len = 0
    return args


def median_interval(values: list[float], level: float = 0.95) -> tuple[float | None, float | None]:
    """A distribution-free interval for the median: the k-th smallest and k-th largest values, k from the
    binomial(n, 1/2) tail (the sign test's interval); (None, None) when n is too small for ``level``."""
    n = len(values)
    if n < 6:
        return None, None
    s = sorted(values)
    alpha = (1 - level) / 2
    cum, k = 0.0, 0
    for i in range(n + 1):
        p = math.comb(n, i) / 2 ** n
        if cum + p > alpha:
            k = i
            break
        cum += p
    if k == 0:
        return None, None
    return s[k - 1], s[n - k]


def summary(diffs: list[float]) -> dict[str, float | None]:
    if not diffs:
        return {"n": 0}
    lo, hi = median_interval(diffs)
    mean = statistics.fmean(diffs)
    sem = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else None
    q = statistics.quantiles(diffs, n=4) if len(diffs) >= 2 else [diffs[0]] * 3
    r = lambda v: round(v, 2) if v is not None else None  # noqa: E731
    return {"n": len(diffs), "median": r(statistics.median(diffs)), "median_ci95": [r(lo), r(hi)],
            "mean": r(mean), "mean_ci95": [r(mean - 1.96 * sem), r(mean + 1.96 * sem)] if sem is not None else None,
            "q1": r(q[0]), "q3": r(q[2])}


def run(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(ROOT))
    from agent_cost import build, training_step  # the same models and loop as bench/agent_cost.py
    import batchmon

    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("agent_cost_paired: --device cuda but CUDA is not available")
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    model, opt, crit, batch, settings = build(args, torch, device)

    step = training_step(model, opt, crit, batch)

    clock, cpu_clock = time.perf_counter, time.thread_time

    def block(attached: bool) -> dict[str, Any]:
        handle = batchmon.attach(model, opt, name="agent_cost_paired") if attached else None
        for _ in range(args.warm):
            step()
        times: list[float] = []
        cpus: list[float] = []
        states: list[bool] = []  # quiet before and after the step (attached), one per step
        quiet = 0
        was_quiet = handle is not None and handle.quiet
        c0 = cpu_clock()
        for _ in range(args.steps):
            t, c = clock(), cpu_clock()
            step()
            cpus.append(cpu_clock() - c)
            times.append(clock() - t)
            if handle is not None:
                now_quiet = handle.quiet
                quiet += now_quiet
                states.append(was_quiet and now_quiet)
                was_quiet = now_quiet
        cpu = (cpu_clock() - c0) / args.steps
        info: dict[str, Any] = {"step_us": statistics.median(times) * 1e6, "cpu_us": cpu * 1e6,
                                "cpu_median_us": statistics.median(cpus) * 1e6}
        if handle is not None:
            info["quiet_share"] = quiet / args.steps
            quiet_cpu = [c for c, q in zip(cpus, states) if q] or cpus
            base = statistics.fmean(quiet_cpu)
            # the quiet steps' median and mean (the mean also holds the quiet steps that read the allocator's
            # figures, every ALLOCATOR_READ_SECONDS on CUDA), and what the other steps (a sample, the step after it)
            # cost beyond the quiet mean, spread over the block's steps
            info["cpu_quiet_median_us"] = statistics.median(quiet_cpu) * 1e6
            info["cpu_quiet_mean_us"] = base * 1e6
            info["loud_steps"] = float(len(cpus) - len(quiet_cpu))
            info["loud_extra_per_step_us"] = sum(c - base for c, q in zip(cpus, states) if not q) / args.steps * 1e6
            info["agent_error"] = handle.error
            batchmon.detach()
        return info

    for _ in range(args.warm if args.cpu_smoke else max(args.warm, 30)):  # the process's own warm-up
        step()
    block(True)  # attach/detach once untimed (imports, the socket thread's first start)
    start = clock()
    pairs: list[dict[str, Any]] = []
    load0 = os.getloadavg()
    for i in range(args.pairs):
        if clock() - start > args.budget:
            break
        order = (True, False) if i % 2 == 0 else (False, True)
        got = {a: block(a) for a in order}
        pairs.append({"attached": got[True], "plain": got[False], "order": "AB" if i % 2 == 0 else "BA"})
    elapsed = clock() - start
    d_cpu = [p["attached"]["cpu_us"] - p["plain"]["cpu_us"] for p in pairs]
    d_step = [p["attached"]["step_us"] - p["plain"]["step_us"] for p in pairs]
    plain_step = statistics.median(p["plain"]["step_us"] for p in pairs)
    att_step = statistics.median(p["attached"]["step_us"] for p in pairs)
    quiet = [p["attached"]["quiet_share"] for p in pairs]
    d_quiet = [p["attached"]["cpu_quiet_median_us"] - p["plain"]["cpu_median_us"] for p in pairs]
    d_quiet_mean = [p["attached"]["cpu_quiet_mean_us"] - p["plain"]["cpu_us"] for p in pairs]
    loud = [p["attached"]["loud_extra_per_step_us"] for p in pairs]
    return {"benchmark": "agent_cost_paired", "device": args.device, "model": args.model, "settings": {
                **settings, "pairs_asked": args.pairs, "pairs_run": len(pairs), "steps": args.steps,
                "warm": args.warm, "threads": args.threads, "budget_s": args.budget, "cpu_smoke": args.cpu_smoke},
            "python": platform.python_version(), "torch": torch.__version__, "time": time.time(),
            "elapsed_s": round(elapsed, 1), "load_before": load0, "load_after": os.getloadavg(),
            "plain_step_us": round(plain_step, 2), "attached_step_us": round(att_step, 2),
            "ratio": round(att_step / plain_step, 4) if plain_step else None,
            "added_main_cpu_us": summary(d_cpu), "added_step_us": summary(d_step),
            # the block mean's two parts: a quiet step's own median CPU against the plain block's median step, and
            # the not-quiet steps' (a sample and the step after it) CPU beyond the quiet median, per step of the block
            "added_main_cpu_quiet_step_us": summary(d_quiet), "added_main_cpu_quiet_mean_us": summary(d_quiet_mean),
            "loud_steps_cpu_per_step_us": summary(loud),
            "quiet_share": {"min": min(quiet), "median": statistics.median(quiet)} if quiet else None,
            "agent_errors": [p["attached"]["agent_error"] for p in pairs if p["attached"]["agent_error"]],
            "pairs": [{"order": p["order"], **{f"{m}_{k}": round(v, 2) for m in ("attached", "plain")
                                               for k, v in p[m].items() if isinstance(v, float)}} for p in pairs]}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sock_base = Path(tempfile.mkdtemp(prefix="bmp"))
    old = os.environ.get("BATCHMON_DIR")
    os.environ["BATCHMON_DIR"] = str(sock_base / "s")
    try:
        result = run(args)
    except ModuleNotFoundError as exc:
        print(f"agent_cost_paired: {args.model} needs {exc.name}, not installed here: skipped")
        return 0
    finally:
        if old is None:
            os.environ.pop("BATCHMON_DIR", None)
        else:
            os.environ["BATCHMON_DIR"] = old
        shutil.rmtree(sock_base, ignore_errors=True)
    c, s = result["added_main_cpu_us"], result["added_step_us"]
    print(f"agent_cost_paired {args.model} on {args.device}: {result['settings']['pairs_run']} pairs x "
          f"{args.steps} steps in {result['elapsed_s']} s; plain step {result['plain_step_us']} us, attached "
          f"{result['attached_step_us']} us (ratio {result['ratio']}); attached - plain, median of pairs: "
          f"main-thread CPU {c['median']:+} us a step (95% {c['median_ci95']}), step time {s['median']:+} us "
          f"(95% {s['median_ci95']}); quiet share of attached steps: {result['quiet_share']}; a quiet step's median "
          f"CPU {result['added_main_cpu_quiet_step_us']['median']:+} us (95% "
          f"{result['added_main_cpu_quiet_step_us']['median_ci95']}), mean "
          f"{result['added_main_cpu_quiet_mean_us']['median']:+} us, the other steps' beyond it "
          f"{result['loud_steps_cpu_per_step_us']['median']:+} us a step")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 1 if result["agent_errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
