#!/usr/bin/env python3
"""Where the agent's share of a training step goes, from py-spy's raw stacks (issue 14 point 1).

The paired bench (bench/agent_cost_paired.py) says how much an attached step costs more than a plain one, with an
interval as wide as the figure on the H200; a sampling profile of the attached process says which of the agent's
functions the main thread was in. Input: py-spy ``--format raw`` files of ``bench/agent_cost.py --only attached``
and ``--only plain`` (``h200_run.sh spy``) and the attached run's JSON (steps timed, main-thread CPU per step).

Counted per part: samples of the main thread inside the training loop (a frame of agent_cost.py's step function)
whose innermost batchmon frame is the leaf (the agent's own Python and the C calls it makes directly) or is
directly above a torch function that the agent called for itself (the allocator's statistics, a hook's
registration) - not above the training's own calls that a wrapper passes through (the root's ``_call_impl``,
autograd's ``backward``, the optimizer's step). Stacks py-spy read mid-call (a hook above a function it cannot
have called, e.g. the optimizer post hook above ``Adam.step``) are dropped and counted apart. µs per step: a
part's share of the loop's samples times the main thread's CPU per step (py-spy leaves idle samples out, so the
loop's samples are its CPU time).

    python3 bench/spy_agent_share.py bench/results/spy_h200_s14/spy_mlp_attached.txt.gz \
        --plain bench/results/spy_h200_s14/spy_mlp_plain.txt.gz --run bench/results/spy_h200_s14/spy_mlp_attached.json
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

#: the agent functions of each part of the step path (the innermost batchmon frame's function name)
PARTS: dict[str, tuple[str, ...]] = {
    "forward: the root's quiet _call_impl and open_quiet (input check, sample clock)": (
        "quiet_call.<locals>._call_impl", "StepMeter.open_quiet"),
    "backward wrapper (counts the backward, sees an OOM)": ("_backward",),
    "optimizer.step wrapper (sees an OOM)": ("_StepWrapper.__call__", "_StepWrapper.__self__"),
    "step end on a quiet step (post hook, finish_quiet)": ("_step_post", "StepMeter.finish_quiet", "_step_pre"),
    "allocator read (stats dict, peak reset)": ("raw_stats", "cuda_figures", "agent_reset", "agent_missed", "_index"),
    "full step end (a read's or a sample's Step, the new run, the hand-off)": (
        "StepMeter.finish", "AgentHandle._finish_step", "AgentHandle._on_step", "StepMeter.finish_carried",
        "StepMeter.new_run", "new_step", "with_added", "QuietRun.__init__", "Publisher.step", "Publisher.run",
        "StepMeter._close_step", "StepMeter.cost_sample", "StepMeter._nth_sample_due", "Transport.put",
        "StepMeter.static_components", "StepMeter.fold_group", "QuietSteps.after_carried", "QuietSteps.arm",
        "QuietSteps._set_post", "step_depth_hook", "register_pair"),
}
#: torch functions a wrapper passes the training through (time there is the training's, not the agent's)
TRAINING_CALLS = ("Module._call_impl", "backward", "Optimizer.profile_hook_step.<locals>.wrapper", ".step",
                  "maybe_fallback", "_use_grad", "Module._wrapped_call_impl")
#: callees the innermost frames cannot have called: py-spy read the stack mid-call
IMPOSSIBLE = {"_step_post": ("Adam.step", "set_grad_enabled.__init__", "graph_break", "maybe_fallback"),
              "StepMeter.finish_quiet": ("maybe_fallback",)}


def frames(path: Path) -> Iterator[tuple[list[str], int]]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:  # type: ignore[operator]
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if stack and n.isdigit():
                yield stack.split(";"), int(n)


def _name(frame: str) -> str:
    return re.sub(r" \(.*\)$", "", frame)


def _in_loop(fr: list[str]) -> bool:
    return "MainThread" in fr[0] and any(f.startswith("training_step.<locals>.step (agent_cost.py") for f in fr)


def shares(path: Path) -> dict[str, Any]:
    loop = 0
    parts: collections.Counter[str] = collections.Counter()
    functions: collections.Counter[str] = collections.Counter()
    dropped = 0
    for fr, n in frames(path):
        if not _in_loop(fr):
            continue
        loop += n
        idx = [i for i, f in enumerate(fr) if "batchmon/" in f]
        if not idx:
            continue
        i = idx[-1]
        fn = _name(fr[i])
        below = _name(fr[i + 1]) if i + 1 < len(fr) else None
        if below is not None:
            if below in IMPOSSIBLE.get(fn, ()):
                dropped += n
                continue
            if below.endswith(TRAINING_CALLS):
                continue  # the training's own call, passed through by a wrapper
        part = next((p for p, names in PARTS.items() if fn in names), "sample (counting, phases, split, probes)")
        parts[part] += n
        functions[fn + ("" if below is None else " -> " + below)] += n
    return {"loop_samples": loop, "dropped_mid_call": dropped, "agent_samples": sum(parts.values()),
            "parts": dict(parts.most_common()), "functions": dict(functions.most_common(30))}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("attached", type=Path, help="py-spy raw stacks of the attached run (.txt or .txt.gz)")
    p.add_argument("--plain", type=Path, default=None, help="the plain run's (a control: should count ~0)")
    p.add_argument("--run", type=Path, default=None, help="the attached run's agent_cost.py JSON (µs per step)")
    p.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = p.parse_args(argv)
    for path in (args.attached, args.plain, args.run):
        if path is not None and not path.is_file():
            print(f"spy_agent_share: no such file: {path}", file=sys.stderr)
            return 2
    result: dict[str, Any] = {"attached": shares(args.attached)}
    if args.plain is not None:
        result["plain"] = shares(args.plain)
    if args.run is not None:
        run = json.loads(args.run.read_text())
        cpu = run.get("main_thread_cpu_s_per_step", {}).get("attached")
        loop = result["attached"]["loop_samples"]
        if cpu and loop:  # every loop sample is an equal slice of the main thread's CPU per step
            result["main_thread_cpu_us_per_step"] = round(cpu * 1e6, 1)
            result["us_per_step"] = {k: round(v / loop * cpu * 1e6, 2) for k, v in result["attached"]["parts"].items()}
            result["agent_us_per_step"] = round(result["attached"]["agent_samples"] / loop * cpu * 1e6, 2)
    a = result["attached"]
    print(f"attached: {a['loop_samples']} loop samples, agent {a['agent_samples']} "
          f"({a['agent_samples'] / max(1, a['loop_samples']):.2%}), dropped mid-call {a['dropped_mid_call']}")
    for part, n in a["parts"].items():
        per = f"  {result['us_per_step'][part]:6.2f} us/step" if "us_per_step" in result else ""
        print(f"  {n:6d}{per}  {part}")
    if "agent_us_per_step" in result:
        print(f"  agent total {result['agent_us_per_step']} us of {result['main_thread_cpu_us_per_step']} us "
              f"main-thread CPU per step")
    if "plain" in result:
        print(f"plain (control): {result['plain']['loop_samples']} loop samples, "
              f"agent {result['plain']['agent_samples']}")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
