#!/usr/bin/env python3
"""Where a steady training step's agent cost goes, part by part (issue 14 point 1): deterministic counts and
in-situ timings on a real CPU training loop.

The loop: an MLP (3 hidden layers 64 wide, batch 32), Adam, CrossEntropyLoss, one torch thread - the dev box's
~100 us-class CPU step. Two ways of attaching, each against the same loop without the agent:

- ``attach``: ``batchmon.attach(model, optimizer)`` in this process (plain steps first, then attached);
- ``run``: the loop in a child under ``python -m batchmon run --`` (auto-attach: discovery finds the model and the
  optimizer), against a plain child.

For each, on steady (unsampled) steps after a warm-up:

- **calls per step by part** (``sys.setprofile``, every Python-level call; of the steps counted, the one with the
  median total - a steady step, not a sampled one): attached minus plain, function by
  function, each function put in the part of the step path it belongs to (the table PARTS below): torch's dispatch
  of hooked modules, the root's forward hooks, the backward wrapper, the optimizer's step wrapper and hooks, the
  step's end, the hand-off to the socket thread. Deterministic: the same on any box, whatever its load;
- **bytecodes per step by part** (``sys.settrace`` with opcode events in every frame, attached minus plain): the
  Python work the agent adds, torch's dispatch of its hooks included; also deterministic;
- **time per part** (``attach`` only): every entry point of the step path wrapped with a perf_counter_ns timer
  before ``attach`` (the wrapper's own ~0.1-0.2 us per call is in each figure), the median over many steps; the
  backward and ``optimizer.step`` wrappers are timed minus what they wrap; torch's dispatch of a hooked root
  (``Module._call_impl``'s slow path, which no wrapper can time) as no-op hooks of the same kinds on the same model
  against none, interleaved, best of many;
- **a tight loop** (``attach`` only): the quiet step's forward side (``model(x)`` attached and quiet minus an identical
  plain model) and its step end (the optimizer's post hook), best of interleaved repeats.

    python3 bench/agent_step_parts.py --out bench/results/agent_step_parts_devbox.json
    python3 bench/agent_step_parts.py --cpu-smoke --out /tmp/parts.json      # a few steps: checks the script
    python3 bench/agent_step_parts.py --how counts --out counts.json         # only the deterministic counts
    python3 bench/agent_step_parts.py --how tight --old-tree /tmp/old --rounds 4 --out tight.json  # before/after
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (file, function) -> the part of the step path it belongs to; batchmon functions not listed go to "agent: other"
PARTS: dict[tuple[str, str], str] = {
    ("module.py", "inner"): "torch: hooked-module dispatch (Module._call_impl slow path)",
    ("module.py", "_call_impl"): "torch: hooked-module dispatch (Module._call_impl slow path)",
    ("__init__.py", "is_compiling"): "forward: root hook / quiet call",
    ("_jit_internal.py", "is_scripting"): "forward: root hook / quiet call",
    ("torch_patches.py", "root_pre_hook"): "forward: root hook / quiet call",
    ("quiet_steps.py", "_call_impl"): "forward: root hook / quiet call",
    ("step_meter.py", "open_quiet"): "forward: root hook / quiet call",
    ("torch_patches.py", "quiet_post_hook"): "forward: post hook",
    ("torch_patches.py", "root_post_hook"): "forward: post hook",
    ("torch_patches.py", "_backward"): "backward wrapper",
    ("torch_patches.py", "__call__"): "optimizer.step wrapper",
    ("torch_patches.py", "_step_pre"): "optimizer hooks (torch's global step hooks)",
    ("torch_patches.py", "_step_post"): "optimizer hooks (torch's global step hooks)",
    ("handle.py", "_on_step"): "step end",
    ("step_meter.py", "finish_carried"): "step end",
    ("publisher.py", "step"): "transport hand-off",
    ("transport.py", "put"): "transport hand-off",
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--how", choices=("attach", "run", "both", "tight", "counts"), default="both",
                   help="tight: only the tight loop, in child processes, ABBA with --old-tree's agent; counts: only "
                        "attach's deterministic calls and bytecodes (seconds, no timing)")
    p.add_argument("--old-tree", default=None, help="with --how tight: a checkout whose agent is the 'before'")
    p.add_argument("--rounds", type=int, default=4, help="with --how tight: processes per tree (default 4)")
    p.add_argument("--tree", default=None, help=argparse.SUPPRESS)
    p.add_argument("--steps", type=int, default=2000, help="timed steady steps (default 2000)")
    p.add_argument("--count-steps", type=int, default=20, help="steps counted by the tracers (default 20)")
    p.add_argument("--warmup", type=int, default=60, help="untimed steps after attaching (default 60)")
    p.add_argument("--cpu-smoke", action="store_true", help="a few steps of everything: checks the script")
    p.add_argument("--child", choices=("plain", "run", "tight"), default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help="JSON result file")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.steps, args.count_steps, args.warmup = 30, 3, 12
    if min(args.steps, args.count_steps, args.warmup) < 1:
        p.error("--steps, --count-steps and --warmup must be positive")
    return args


def build() -> tuple[Any, Any, Any, Any, Any, Callable[[], None]]:
    import torch
    import torch.nn as nn

    torch.set_num_threads(1)
    torch.manual_seed(0)
    mods: list[Any] = []
    for _ in range(3):
        mods += [nn.Linear(64, 64), nn.ReLU()]
    model = nn.Sequential(*mods, nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        crit(model(x), y).backward()
        opt.step()

    return model, opt, crit, x, y, step


# ------------------------------------------------------------------------------------------------ counting


def median_step(per_step: list[collections.Counter]) -> collections.Counter:
    """The step whose total is the (lower) median: a steady step, not a sampled one's larger count."""
    return sorted(per_step, key=lambda c: sum(c.values()))[(len(per_step) - 1) // 2]


def calls_by_function(step: Callable[[], None], steps: int) -> collections.Counter:
    """Python calls of one steady step (the median of ``steps``), by (file, function)."""
    per_step: list[collections.Counter] = []

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            seen[(os.path.basename(code.co_filename), code.co_name)] += 1

    for _ in range(steps):
        seen: collections.Counter = collections.Counter()
        sys.setprofile(profile)
        try:
            step()
        finally:
            sys.setprofile(None)
        per_step.append(seen)
    return median_step(per_step)


def bytecodes_by_function(step: Callable[[], None], steps: int) -> collections.Counter:
    """Bytecodes executed per step in every Python frame (batchmon's and torch's: the hooked-module slow path is
    torch's bytecode), by (file, function)."""
    per_step: list[collections.Counter] = []

    def tracer(frame: Any, event: str, arg: Any) -> Any:
        code = frame.f_code
        key = (os.path.basename(code.co_filename), code.co_name)
        frame.f_trace_opcodes = True

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                seen[key] += 1
            return local
        return local

    for _ in range(steps):
        seen: collections.Counter = collections.Counter()
        sys.settrace(tracer)
        try:
            step()
        finally:
            sys.settrace(None)
        per_step.append(seen)
    return median_step(per_step)


def by_part(attached: collections.Counter, plain: collections.Counter) -> dict[str, Any]:
    """Attached minus plain, per function and per part."""
    delta = {k: round(attached.get(k, 0) - plain.get(k, 0), 3) for k in set(attached) | set(plain)}
    delta = {k: v for k, v in delta.items() if v}
    parts: dict[str, float] = collections.defaultdict(float)
    functions: dict[str, dict[str, float]] = collections.defaultdict(dict)
    for (file, fn), n in sorted(delta.items()):
        part = PARTS.get((file, fn))
        if part is None:
            part = "agent: other" if file in AGENT_FILES else "torch/other: " + file
        parts[part] += n
        functions[part][f"{file}:{fn}"] = n
    return {"total": round(sum(delta.values()), 3), "parts": {k: round(v, 3) for k, v in sorted(parts.items())},
            "functions": {k: dict(v) for k, v in sorted(functions.items())}}


AGENT_FILES = {"handle.py", "step_meter.py", "torch_patches.py", "quiet_steps.py", "publisher.py", "transport.py",
               "placement.py", "accounting.py", "batch_dim.py", "module_watch.py", "peak_phase.py", "coalesce.py",
               "saved_kinds.py", "handle_views.py"}


def counts(step: Callable[[], None], n: int) -> dict[str, Any]:
    return {"calls": calls_by_function(step, n), "bytecodes": bytecodes_by_function(step, n)}


# ------------------------------------------------------------------------------------------------ timing


class Timer:
    """perf_counter_ns around one callable; ns per step is read by the caller between steps."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self.ns = 0
        self.calls = 0
        clock = time.perf_counter_ns
        timer = self

        def timed(*a: Any, **k: Any) -> Any:
            t = clock()
            try:
                return fn(*a, **k)
            finally:
                timer.ns += clock() - t
                timer.calls += 1

        self.timed = timed


def torch_dispatch_ns(model: Any, x: Any, kinds: tuple[str, ...], rounds: int) -> float:
    """torch's own cost of no-op hooks of ``kinds`` on ``model`` (no agent): its Module._call_impl slow path,
    as the best of interleaved repeats of a no-grad forward with and without them (ns per call)."""
    import timeit

    import torch

    def pre(m: Any, a: Any, k: Any) -> None:
        return None

    def post(m: Any, a: Any, k: Any, r: Any) -> None:
        return None

    best = {"none": float("inf"), "hooks": float("inf")}
    with torch.no_grad():
        for _ in range(rounds):
            for mode in ("none", "hooks"):
                handles = []
                if mode == "hooks":
                    if "pre" in kinds:
                        handles.append(model.register_forward_pre_hook(pre, with_kwargs=True))
                    if "post" in kinds:
                        handles.append(model.register_forward_hook(post, with_kwargs=True, always_call=True))
                best[mode] = min(best[mode], min(timeit.repeat(lambda: model(x), number=200, repeat=3)) / 200 * 1e9)
                for h in handles:
                    h.remove()
    return best["hooks"] - best["none"]


def timed_parts(args: argparse.Namespace) -> dict[str, Any]:
    """The entry points of the step path wrapped with timers before attach; median ns per steady step each."""
    import torch

    import batchmon
    from batchmon.agent import torch_patches as tp

    model, opt, crit, x, y, step = build()
    for _ in range(args.warmup):
        step()
    inner_backward = Timer(torch.autograd.backward)  # what the agent's backward wrapper wraps (installed below)
    torch.autograd.backward = inner_backward.timed
    inner_step = Timer(type(opt).step)  # what the optimizer.step wrapper calls (the optimizer hooks are inside)
    type(opt).step = inner_step.timed
    timers: dict[str, Timer] = {}
    originals: list[tuple[Any, str, Any]] = []

    def wrap(owner: Any, attr: str, part: str) -> None:
        fn = getattr(owner, attr, None)
        if fn is None:
            return
        timers[part] = Timer(fn)
        originals.append((owner, attr, fn))
        setattr(owner, attr, timers[part].timed)

    # module-level hooks, wrapped where attach and the quiet switch look them up (the wrappers count as the agent's
    # hooks: a quiet step takes the root off torch's hooked path only when it has no other hooks)
    for name in ("root_pre_hook", "quiet_post_hook", "root_post_hook", "_step_post", "_step_pre"):
        wrap(tp, name, "hook " + name)
    agent_hooks = tp.AGENT_HOOKS
    tp.AGENT_HOOKS = agent_hooks | {timers[n].timed for n in ("hook root_pre_hook", "hook quiet_post_hook",
                                                              "hook root_post_hook") if n in timers}
    originals.append((tp, "AGENT_HOOKS", agent_hooks))
    try:
        from batchmon.agent import quiet_steps as qs
    except ImportError:
        qs = None  # type: ignore[assignment]  # (an older tree has no quiet_steps)
    if qs is not None and hasattr(qs, "quiet_call"):  # the root's quiet _call_impl, and the forward inside it
        factory = qs.quiet_call
        timers["quiet _call_impl (with the forward)"] = closure = Timer(lambda *a, **k: None)

        def timed_factory(*a: Any, **k: Any) -> Any:
            closure.fn = inner = factory(*a, **k)
            clock = time.perf_counter_ns

            def timed(*args: Any, **kwargs: Any) -> Any:
                t = clock()
                try:
                    return inner(*args, **kwargs)
                finally:
                    closure.ns += clock() - t
                    closure.calls += 1
            timed.batchmon_quiet_call = True  # type: ignore[attr-defined]
            return timed

        qs.quiet_call = timed_factory
        originals.append((qs, "quiet_call", factory))
        wrap(qs, "_MODULE_CALL_IMPL", "torch's _call_impl inside it (the forward)")
    wrap(tp, "_backward", "backward wrapper (with backward)")
    step_wrapper = getattr(tp, "_StepWrapper", None)
    if step_wrapper is not None:
        wrap(step_wrapper, "__call__", "optimizer.step wrapper (with the step)")
    handle = batchmon.attach(model, opt, name="agent_step_parts")
    try:
        for _ in range(args.warmup):
            step()
        meter = handle._meter
        wrap(meter, "finish_carried", "step end: finish_carried")
        wrap(handle._out, "step", "transport hand-off")
        if hasattr(handle, "_open_quiet"):
            wrap(handle, "_open_quiet", "open_quiet")
        per_step: dict[str, list[int]] = collections.defaultdict(list)
        every = [*timers.items(), ("inner backward", inner_backward), ("inner optimizer step", inner_step)]
        quiet = 0
        for _ in range(args.steps):
            before = {name: t.ns for name, t in every}
            step()
            quiet += bool(getattr(handle, "quiet", False))
            for name, t in every:
                per_step[name].append(t.ns - before[name])
        hooks_now = sorted(type(fn).__name__ + ":" + getattr(fn, "__name__", "?")
                           for table in (model._forward_pre_hooks, model._forward_hooks) for fn in table.values())
        call_impl = type(model.__dict__.get("_call_impl")).__name__ if "_call_impl" in model.__dict__ else None
    finally:
        handle.detach()
        for owner, attr, fn in reversed(originals):
            setattr(owner, attr, fn)
        torch.autograd.backward = inner_backward.fn
        type(opt).step = inner_step.fn
    # the best step of each part too: on a shared box the median holds other jobs' preemptions and cache misses
    best = {name: round(min(x for x in v if x) / 1e3, 3) for name, v in per_step.items() if any(v)}
    med = {name: statistics.median(v) for name, v in per_step.items()}
    out = {name: round(v / 1e3, 3) for name, v in med.items()}
    if "backward wrapper (with backward)" in med:
        out["backward wrapper (own)"] = round((med["backward wrapper (with backward)"] - med["inner backward"]) / 1e3, 3)
    if "quiet _call_impl (with the forward)" in med:
        out["quiet _call_impl (own)"] = round((med["quiet _call_impl (with the forward)"]
                                               - med["torch's _call_impl inside it (the forward)"]) / 1e3, 3)
    if "optimizer.step wrapper (with the step)" in med:
        out["optimizer.step wrapper (own)"] = round(
            (med["optimizer.step wrapper (with the step)"] - med["inner optimizer step"]) / 1e3, 3)
    kinds = ("pre", "post") if any(k.startswith("hook root_pre_hook") or k.startswith("hook quiet_post_hook")
                                   for k, v in med.items() if v) else ()
    dispatch = {"pre": round(torch_dispatch_ns(model, x, ("pre",), 15 if args.steps > 100 else 2) / 1e3, 3),
                "pre+post": round(torch_dispatch_ns(model, x, ("pre", "post"), 15 if args.steps > 100 else 2) / 1e3,
                                  3)}
    for own, whole, inner in (("backward wrapper (own)", "backward wrapper (with backward)", "inner backward"),
                              ("quiet _call_impl (own)", "quiet _call_impl (with the forward)",
                               "torch's _call_impl inside it (the forward)"),
                              ("optimizer.step wrapper (own)", "optimizer.step wrapper (with the step)",
                               "inner optimizer step")):
        if whole in med and inner in med:  # the step whose whole was least, minus its inner part
            i = min(range(len(per_step[whole])), key=per_step[whole].__getitem__)
            best[own] = round((per_step[whole][i] - per_step[inner][i]) / 1e3, 3)
    return {"median_us_per_step": out, "best_us_per_step": best, "calls_per_step": {n: round(t.calls / args.steps, 3) for n, t in every},
            "quiet_steps": quiet, "steps": args.steps, "root_hooks_at_end": hooks_now,
            "instance_call_impl_at_end": call_impl, "hooked_kinds_seen": list(kinds),
            "torch_dispatch_us_of_noop_root_hooks": dispatch}


def tight_loop(args: argparse.Namespace) -> dict[str, float]:
    """The forward side and the step end of a quiet step in a tight loop, best of interleaved repeats (the least
    noisy clock figure on a shared box: preemptions only lengthen a repeat, the best one has none). Forward side:
    ``model(x)`` of the attached, quiet model (its step reopened each call) minus the same call of an identical
    plain model; step end: the optimizer's post hook on a carried step (finish_carried, the hand-off)."""
    import timeit

    import torch

    import batchmon
    from batchmon.agent import torch_patches as tp

    def tiny() -> tuple[Any, Any, Any]:  # the agent's per-call work does not depend on the model's size
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 4))
        return m, torch.optim.Adam(m.parameters(), lr=1e-3), torch.randn(2, 4)

    model, opt, x = tiny()
    plain, _, _ = tiny()
    y = torch.randint(0, 4, (2,))
    crit = torch.nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        crit(model(x), y).backward()
        opt.step()

    handle = batchmon.attach(model, opt, name="agent_step_parts_loop")
    try:
        for _ in range(args.warmup):
            step()
        meter = handle._meter
        meter.activation_every = 10 ** 9  # no sampled step inside the loop (its step number moves with end())
        for _ in range(50):  # quiet before the loop starts
            if getattr(handle, "quiet", False):
                break
            step()
        carried_bytes = meter._carried_batch[1] if meter._carried_batch is not None else 0
        none: dict[str, Any] = {}

        def forward() -> None:
            model(x)
            meter.step_open = meter.batch_carried = False
            meter.forwards = 0

        def end() -> None:
            meter.step_open = meter.batch_carried = True
            meter.forwards = meter.backwards = 1
            meter._batch_max = carried_bytes  # (as the step's forward set it: the carried step's end)
            tp._step_post(opt, (), none)

        number = 2000 if args.steps > 100 else 20
        best = {"forward": float("inf"), "plain": float("inf"), "end": float("inf")}
        quiet = bool(getattr(handle, "quiet", False))
        calling = bool(getattr(getattr(handle, "_hooks", None), "calling", False))
        with torch.enable_grad():
            for _ in range(15 if args.steps > 100 else 2):
                best["forward"] = min(best["forward"], min(timeit.repeat(forward, number=number, repeat=3)) / number)
                best["plain"] = min(best["plain"], min(timeit.repeat(lambda: plain(x), number=number, repeat=3)) / number)
                best["end"] = min(best["end"], min(timeit.repeat(end, number=number, repeat=3)) / number)
        quiet_after = bool(getattr(handle, "quiet", False))
    finally:
        handle.detach()
    return {"forward_side_added_us": round((best["forward"] - best["plain"]) * 1e6, 3),
            "plain_forward_us": round(best["plain"] * 1e6, 3), "step_end_us": round(best["end"] * 1e6, 3),
            "quiet": quiet and quiet_after, "quiet_call": calling}


# ------------------------------------------------------------------------------------------------ modes


def child(args: argparse.Namespace) -> int:
    """The loop alone (plain) or under `batchmon run` (the agent attached itself at torch's import)."""
    model, opt, crit, x, y, step = build()
    for _ in range(args.warmup):
        step()
    c = counts(step, args.count_steps)
    extra: dict[str, Any] = {}
    if args.child == "run":
        from batchmon.agent import handle as agent

        h = agent.current()
        extra = {"attached": h is not None and h.model is model, "quiet": bool(getattr(h, "quiet", False)),
                 "steps_seen": h.last_step.step if h is not None and h.last_step is not None else None}
    print(json.dumps({"calls": [[*k, v] for k, v in c["calls"].items()],
                      "bytecodes": [[*k, v] for k, v in c["bytecodes"].items()], **extra}))
    return 0


def run_child(mode: str, args: argparse.Namespace) -> dict[str, Any]:
    me = [sys.executable, str(Path(__file__).resolve()), "--child", mode, "--warmup", str(args.warmup),
          "--count-steps", str(args.count_steps)]
    argv = [sys.executable, "-m", "batchmon", "run", "--", *me] if mode == "run" else me
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "BATCHMON_DIR": tempfile.mkdtemp(prefix="bmp") + "/s"}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} child failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["calls"] = collections.Counter({(f, n): v for f, n, v in data["calls"]})
    data["bytecodes"] = collections.Counter({(f, n): v for f, n, v in data["bytecodes"]})
    return data


def tight_abba(args: argparse.Namespace) -> dict[str, Any]:
    """The tight loop in one process per round and tree, ABBA (this checkout, then --old-tree's, ...)."""
    trees = [("now", str(ROOT))] + ([("before", str(Path(args.old_tree).resolve()))] if args.old_tree else [])
    runs: list[dict[str, Any]] = []
    for i in range(args.rounds):
        for name, tree in (trees if i % 2 == 0 else list(reversed(trees))):
            argv = [sys.executable, str(Path(__file__).resolve()), "--child", "tight", "--tree", tree,
                    "--warmup", str(args.warmup), "--steps", str(args.steps)]
            env = {**os.environ, "BATCHMON_DIR": tempfile.mkdtemp(prefix="bmp") + "/s", "PYTHONPATH": tree}
            proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300, cwd=tree)
            if proc.returncode != 0:
                raise RuntimeError(f"tight loop child failed: {proc.stderr.strip()[-400:]}")
            run = {"tree": name, "load": os.getloadavg()[0], **json.loads(proc.stdout.strip().splitlines()[-1])}
            runs.append(run)
            print(f"  {name:7s} forward side +{run['forward_side_added_us']:.2f} us (plain forward "
                  f"{run['plain_forward_us']:.2f} us), step end {run['step_end_us']:.2f} us, quiet {run['quiet']}, "
                  f"quiet call {run['quiet_call']}, load {run['load']:.1f}", flush=True)
    summary = {name: {k: statistics.median(r[k] for r in runs if r["tree"] == name)
                      for k in ("forward_side_added_us", "plain_forward_us", "step_end_us")} for name, _ in trees}
    return {"runs": runs, "median": summary}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child == "tight":
        sys.path.insert(0, args.tree or str(ROOT))
        print(json.dumps(tight_loop(args)))
        return 0
    if args.child:
        return child(args)
    if args.how == "tight":
        tight: dict[str, Any] = {"benchmark": "agent_step_parts", "how": "tight", "python": platform.python_version(),
                  "time": time.time(), "load_before": os.getloadavg(), **tight_abba(args),
                  "load_after": os.getloadavg()}
        print(f"medians: {tight['median']}")
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(tight, indent=1) + "\n")
            print(f"wrote {args.out}")
        return 0
    result: dict[str, Any] = {"benchmark": "agent_step_parts", "model": "MLP 3x64, batch 32, Adam, CPU, 1 thread",
                              "python": platform.python_version(), "time": time.time(),
                              "load_before": os.getloadavg()}
    if args.how in ("attach", "both", "counts"):
        import batchmon

        model, opt, crit, x, y, step = build()
        for _ in range(args.warmup):
            step()
        plain = counts(step, args.count_steps)
        os.environ.setdefault("BATCHMON_DIR", tempfile.mkdtemp(prefix="bmp") + "/s")
        handle = batchmon.attach(model, opt, name="agent_step_parts")
        for _ in range(args.warmup):
            step()
        attached = counts(step, args.count_steps)
        quiet = bool(getattr(handle, "quiet", False))
        handle.detach()
        result["attach"] = {"quiet": quiet, "calls": by_part(attached["calls"], plain["calls"]),
                            "bytecodes": by_part(attached["bytecodes"], plain["bytecodes"])}
        if args.how != "counts":
            result["attach"]["timed"] = timed_parts(args)
            result["attach"]["tight_loop"] = tight_loop(args)
    if args.how in ("run", "both"):
        plain_c, run_c = run_child("plain", args), run_child("run", args)
        result["run"] = {"attached": run_c.get("attached"), "quiet": run_c.get("quiet"),
                         "calls": by_part(run_c["calls"], plain_c["calls"]),
                         "bytecodes": by_part(run_c["bytecodes"], plain_c["bytecodes"])}
    result["load_after"] = os.getloadavg()
    for how in ("attach", "run"):
        r = result.get(how)
        if r is None:
            continue
        print(f"{how}: quiet={r['quiet']}; Python calls added per steady step {r['calls']['total']:g}, "
              f"bytecodes {r['bytecodes']['total']:g}")
        for part, n in r["calls"]["parts"].items():
            print(f"    {part:<62} {n:6g} calls  {r['bytecodes']['parts'].get(part, 0):6g} bytecodes")
        if "timed" in r:
            print(f"  median us per steady step (timers add ~0.1-0.2 us per call; load {result['load_before'][0]:.1f}):")
            print(f"    {'part':<62} {'median':>8} {'best':>8}")
            for name, us in r["timed"]["median_us_per_step"].items():
                print(f"    {name:<62} {us:8.3f} {r['timed']['best_us_per_step'].get(name, float('nan')):8.3f}")
            print(f"    torch's dispatch of no-op root hooks (best of interleaved): "
                  f"{r['timed']['torch_dispatch_us_of_noop_root_hooks']}")
            print(f"  tight loop, best of interleaved repeats: {r['tight_loop']}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
