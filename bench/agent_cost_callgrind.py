#!/usr/bin/env python3
"""The agent's fixed cost per step in machine instructions (issue 14 point 1): callgrind counts the training
thread's instructions per step, plain and attached, and with each part of a quiet step's path replaced by a
minimal stand-in - a figure that does not move with the box's load (the wall clock of a 2-core box shared with
other jobs swings by more than the agent costs).

One process under ``valgrind --tool=callgrind`` (instrumentation off until the measured steps: torch's import runs
uninstrumented), the dev box's CPU loop (bench/agent_cost.py's MLP: 3 x 64, batch 32, Adam, one thread), with
``PYTHONHASHSEED=0`` and the cyclic GC off during the measured steps (a collection landing in one variant's window
and not another's would add millions of instructions). Variants, each ``--steps`` steps after 30 of warm-up:

- ``plain``: no agent; ``attached``: ``batchmon.attach(model, opt, activation_every=100000)`` (quiet steps only:
  no sample in the window) with its socket thread not started (under valgrind that thread's 50 ms poll lands on
  nearly every step, which it does not on a real box; what it costs is the paired bench's to show);
- one part replaced at a time (attached minus the variant = what that part costs beyond a trivial hook in its
  place): ``forward`` (the root's quiet ``_call_impl`` closure and ``open_quiet`` -> a closure that only opens the
  step), ``end`` (the step's end: the optimizer hook's agent side -> only closing the step), ``backward`` (the
  ``torch.autograd.backward`` wrapper -> one that only counts), ``step_wrapper`` (``optimizer.step``'s instance
  wrapper -> none), ``all`` (all four: what the hook points themselves cost).

Instructions are not time: a miss in the caches costs more than its instructions, and a real step's torch work
evicts the agent's data between steps (bench/agent_cost_paired.py measures the time). The counts say which part
does how much work, before and after a change, deterministically (+-1-3k instructions a step between processes).

    python3 bench/agent_cost_callgrind.py --out bench/results/agent_cost_callgrind_devbox.json
    python3 bench/agent_cost_callgrind.py --tree /tmp/old --out old.json     # another tree's batchmon (before/after)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("plain", "attached", "forward", "end", "backward", "step_wrapper", "all", "plain")
HELPER = r"""
#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_ZERO_STATS; CALLGRIND_START_INSTRUMENTATION; }
void cg_dump(const char *s) { CALLGRIND_DUMP_STATS_AT(s); CALLGRIND_STOP_INSTRUMENTATION; }
"""


def inner(tree: Path, helper: str, steps: int, variants: list[str]) -> None:
    """Runs under valgrind: the variants, one dump each."""
    sys.path.insert(0, str(ROOT / "bench"))
    sys.path.insert(0, str(tree))
    import gc

    import torch
    from agent_cost import build, training_step

    import batchmon
    from batchmon.agent import publisher
    from batchmon.agent import torch_patches as patches

    cg = ctypes.CDLL(helper)
    args = argparse.Namespace(model="mlp", width=None, layers=None, batch_size=None, cpu_smoke=False, seq_len=0)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, opt, crit, batch, _ = build(args, torch, torch.device("cpu"))
    call_impl = torch.nn.Module._call_impl

    step = training_step(model, opt, crit, batch)

    def no_socket(self: Any) -> None:
        self.socket_error = "not started (bench/agent_cost_callgrind.py)"

    for _ in range(30):
        step()
    for variant in variants:
        publisher.Publisher.ensure = no_socket  # type: ignore[method-assign]
        handle = None if variant == "plain" else batchmon.attach(model, opt, activation_every=100000)
        for _ in range(30):
            step()
        if handle is not None:
            assert handle.quiet, variant
            meter = handle._meter
            if variant in ("end", "all"):
                def closed(*_: Any) -> bool:
                    meter.step_open = meter.batch_carried = False
                    meter.backwards = meter.forwards = 0
                    return True

                handle._on_step = closed  # type: ignore[method-assign]
                meter.finish_quiet = closed  # type: ignore[method-assign]  # (trees without it: never looked up)
            if variant in ("forward", "all"):
                def opened(*a: Any, **k: Any) -> Any:
                    meter.step_open = meter.batch_carried = True
                    meter.forwards = 1
                    return call_impl(model, *a, **k)

                model.__dict__["_call_impl"] = handle._hooks._call = opened
            if variant in ("backward", "all"):
                backward = patches._originals["backward"]

                def counted(*a: Any, **k: Any) -> Any:
                    result = backward(*a, **k)
                    meter.backwards += 1
                    return result

                torch.autograd.backward = counted  # type: ignore[assignment]
            if variant in ("step_wrapper", "all"):
                opt.__dict__.pop("step", None)
        gc.collect()
        gc.disable()
        cg.cg_start()
        for _ in range(steps):
            step()
        cg.cg_dump(variant.encode())
        gc.enable()
        if handle is not None:
            torch.autograd.backward = patches._backward  # type: ignore[assignment]
            batchmon.detach()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default=str(ROOT), help="the tree whose batchmon is measured (default: this one)")
    p.add_argument("--steps", type=int, default=60, help="measured steps per variant (default 60)")
    p.add_argument("--out", default=None)
    p.add_argument("--inner", default=None, help=argparse.SUPPRESS)
    p.add_argument("--variants", default=",".join(VARIANTS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.inner:
        inner(Path(args.tree), args.inner, args.steps, args.variants.split(","))
        return 0
    if shutil.which("valgrind") is None or shutil.which("cc") is None \
            or not Path("/usr/include/valgrind/callgrind.h").exists():
        print("agent_cost_callgrind: needs valgrind, its callgrind.h and a C compiler: skipped")
        return 0
    work = Path(tempfile.mkdtemp(prefix="bmcg"))
    try:
        (work / "cg.c").write_text(HELPER)
        subprocess.run(["cc", "-O2", "-shared", "-fPIC", "-o", str(work / "cg.so"), str(work / "cg.c")], check=True)
        env = dict(os.environ, PYTHONHASHSEED="0", BATCHMON_DIR=str(work / "s"))
        t0 = time.time()
        subprocess.run(["valgrind", "--tool=callgrind", "--instr-atstart=no", "--separate-threads=yes",
                        f"--callgrind-out-file={work}/cg.out", sys.executable, str(Path(__file__).resolve()),
                        "--inner", str(work / "cg.so"), "--tree", args.tree, "--steps", str(args.steps),
                        "--variants", args.variants], cwd=work, env=env, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        per_step: list[tuple[str, int]] = []
        dumps = sorted(work.glob("cg.out.*-01"), key=lambda f: int(re.findall(r"\.(\d+)-01$", f.name)[0]))
        for f in dumps:  # the training thread's file of each dump, in dump order
            text = f.read_text(errors="replace")
            name = re.search(r"^desc: Trigger: Client Request: (\S+)", text, re.M)
            total = re.search(r"^summary: (\d+)", text, re.M)
            if name and total:
                per_step.append((name.group(1), int(total.group(1)) // args.steps))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    plain = [n for v, n in per_step if v == "plain"]
    base = sum(plain) / len(plain)
    got = {v: n for v, n in per_step if v != "plain"}
    attached = got.get("attached")
    result: dict[str, Any] = {
        "benchmark": "agent_cost_callgrind", "tree": args.tree, "steps": args.steps, "python": platform.python_version(),
        "time": time.time(), "elapsed_s": round(time.time() - t0, 1),
        "instructions_per_step": [[v, n] for v, n in per_step],  # in the order run
        "plain_runs": plain,
        "added_over_plain": {v: round(n - base) for v, n in got.items()},
        "part_beyond_a_trivial_hook": {v: round(attached - n) for v, n in got.items()
                                       if attached is not None and v != "attached"},
    }
    print(json.dumps({k: result[k] for k in ("added_over_plain", "part_beyond_a_trivial_hook", "plain_runs")}))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
