"""What torch itself charges for hooks in the places the agent puts them, beside what the agent costs (issue 14).

The agent measures a step through hooks: a forward pre/post hook pair on the model's root and on the loss module
(with kwargs; the post hooks always called), a global optimizer step pre/post hook and a wrapper around
``Tensor.backward``. This bench registers exactly those as no-op hooks and times the same step three ways, in
interleaved rounds in one process: plain, no-op hooks, and ``batchmon.attach``. The no-op row is the floor any
hook-based measurement pays on that step (torch's ``Module._call_impl`` slow path for hooked modules, the
optimizer's hook dispatch, one more Python frame around backward); attached − no-op is the agent's own share.

    python3 bench/hook_floor.py [--device cpu|cuda] [--rounds 8] [--steps 400] [--breakdown] --out F.json

A fourth mode, ``noop_quiet``, puts in place only what a quiet steady step keeps (batchmon.agent.quiet_steps: the
root's instance ``_call_impl`` - a no-op one that calls torch's, the root on its fast path - the optimizer's hooks,
the backward wrapper; no forward hooks): the floor a quiet step pays. ``--hooked-quiet`` makes it the quiet steps'
hooked form instead (the root's pre and post hooks: a root with hooks of its own, or one seen under torch.compile).

``--breakdown`` adds one mode per hook kind alone (root pre, root post, loss pre, loss post, optimizer pre,
optimizer post, the backward wrapper): which of them makes the floor (on the H200 the whole floor was ~10x the
dev box CPU's, so it is not the hooks' Python).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

KINDS = frozenset({"root_pre", "root_post", "loss_pre", "loss_post", "opt_pre", "opt_post", "backward_wrap"})
# what a quiet steady step keeps (batchmon.agent.quiet_steps): the root's instance _call_impl, the optimizer's hooks,
# backward's wrapper (HOOKED_QUIET_KINDS: its hooked form, the root's pre and post hooks instead of the _call_impl)
QUIET_KINDS = frozenset({"root_call", "opt_pre", "opt_post", "backward_wrap"})
HOOKED_QUIET_KINDS = frozenset({"root_pre", "root_post", "opt_pre", "opt_post", "backward_wrap"})


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds per mode, interleaved (default 8)")
    ap.add_argument("--steps", type=int, default=400, help="timed steps per round (default 400)")
    ap.add_argument("--width", type=int, default=64, help="MLP width (default 64: a step of ~0.1-1 ms on a CPU)")
    ap.add_argument("--breakdown", action="store_true", help="also time each hook kind alone")
    ap.add_argument("--hooked-quiet", action="store_true",
                    help="noop_quiet as the quiet steps' hooked form (root pre and post hooks, no _call_impl)")
    ap.add_argument("--out", required=True, help="JSON result file")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.steps < 1 or args.width < 1:
        print("hook_floor: --rounds, --steps and --width must be positive", file=sys.stderr)
        return 2

    import torch
    import torch.nn as nn
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    import batchmon

    if args.device == "cuda" and not torch.cuda.is_available():
        print("hook_floor: no CUDA device", file=sys.stderr)
        return 2
    dev = torch.device(args.device)
    torch.manual_seed(0)
    torch.set_num_threads(1)
    w = args.width
    model = nn.Sequential(nn.Linear(w, w), nn.ReLU(), nn.Linear(w, w), nn.ReLU(), nn.Linear(w, 10)).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    x, y = torch.randn(32, w, device=dev), torch.randint(0, 10, (32,), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def step() -> None:
        opt.zero_grad()
        crit(model(x), y).backward()
        opt.step()

    cpu_of: dict[str, list[float]] = {}  # mode -> main-thread CPU seconds per step, per round
    p10_of: dict[str, list[float]] = {}  # mode -> each round's 10th-percentile step (a loaded box's preemptions: above)

    def timed_round(n: int, mode: str | None = None) -> float:
        times = []
        c = time.thread_time()
        for _ in range(n):
            t = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - t)
        if mode is not None:
            cpu_of.setdefault(mode, []).append((time.thread_time() - c) / n)
            p10_of.setdefault(mode, []).append(sorted(times)[n // 10])
        return statistics.median(times)

    def noop_hooks(kinds: frozenset[str] = KINDS) -> Callable[[], None]:
        def pre(m: Any, a: Any, k: Any) -> None:
            return None

        def post(m: Any, a: Any, k: Any, r: Any) -> None:
            return None

        register = {"root_pre": lambda: model.register_forward_pre_hook(pre, with_kwargs=True),
                    "root_post": lambda: model.register_forward_hook(post, with_kwargs=True, always_call=True),
                    "loss_pre": lambda: crit.register_forward_pre_hook(pre, with_kwargs=True),
                    "loss_post": lambda: crit.register_forward_hook(post, with_kwargs=True, always_call=True),
                    "opt_pre": lambda: register_optimizer_step_pre_hook(lambda o, a, k: None),
                    "opt_post": lambda: register_optimizer_step_post_hook(lambda o, a, k: None)}
        handles = [register[k]() for k in sorted(kinds) if k in register]
        original = torch.Tensor.backward

        def backward(self: Any, *a: Any, **k: Any) -> Any:
            return original(self, *a, **k)

        if "backward_wrap" in kinds:
            torch.Tensor.backward = backward  # type: ignore[method-assign]
        call_impl = nn.Module._call_impl

        def root_call(*a: Any, **k: Any) -> Any:  # the instance _call_impl of a quiet step, doing nothing
            return call_impl(model, *a, **k)

        if "root_call" in kinds:
            model.__dict__["_call_impl"] = root_call

        def undo() -> None:
            for h in handles:
                h.remove()
            torch.Tensor.backward = original  # type: ignore[method-assign]
            model.__dict__.pop("_call_impl", None)
        return undo

    for _ in range(300):
        step()
    rounds: dict[str, list[float]] = {"plain": [], "noop_hooks": [], "noop_quiet": [], "attached": []}
    alone = sorted(KINDS) if args.breakdown else []
    for kind in alone:
        rounds["only_" + kind] = []
    for _ in range(args.rounds):
        rounds["plain"].append(timed_round(args.steps, "plain"))
        for kind in alone:
            undo = noop_hooks(frozenset([kind]))
            timed_round(30)
            rounds["only_" + kind].append(timed_round(args.steps, "only_" + kind))
            undo()
        undo = noop_hooks()
        timed_round(30)
        rounds["noop_hooks"].append(timed_round(args.steps, "noop_hooks"))
        undo()
        undo = noop_hooks(HOOKED_QUIET_KINDS if args.hooked_quiet else QUIET_KINDS)
        timed_round(30)
        rounds["noop_quiet"].append(timed_round(args.steps, "noop_quiet"))
        undo()
        handle = batchmon.attach(model, opt, name="hook_floor")
        timed_round(30)
        rounds["attached"].append(timed_round(args.steps, "attached"))
        quiet_seen = bool(getattr(handle, "quiet", False))  # (the agent before quiet steps has no such flag)
        calling_seen = bool(getattr(getattr(handle, "_hooks", None), "calling", False))
        handle.detach()
    med = {k: statistics.median(v) for k, v in rounds.items()}
    out = {"benchmark": "hook_floor", "device": str(dev), "width": w, "batch": 32, "optimizer": "Adam",
           "torch": torch.__version__, "python": platform.python_version(),
           "median_step_us": {k: round(v * 1e6, 1) for k, v in med.items()},
           "noop_hooks_added_us": round((med["noop_hooks"] - med["plain"]) * 1e6, 1),
           "attached_added_us": round((med["attached"] - med["plain"]) * 1e6, 1),
           "agent_share_us": round((med["attached"] - med["noop_hooks"]) * 1e6, 1),
           "noop_quiet_added_us": round((med["noop_quiet"] - med["plain"]) * 1e6, 1),
           "agent_share_over_quiet_floor_us": round((med["attached"] - med["noop_quiet"]) * 1e6, 1),
           "quiet_steps": quiet_seen, "quiet_call": calling_seen, "hooked_quiet": args.hooked_quiet,
           "alone_added_us": {k: round((med["only_" + k] - med["plain"]) * 1e6, 1) for k in alone},
           "rounds_s": {k: [round(t * 1e6, 1) for t in v] for k, v in rounds.items()},
           # the training thread's CPU per step, added over plain: steadier than a GPU step's wall clock (the
           # hooks and the agent launch nothing on the device; on a launch-bound step their cost is this)
           "main_thread_cpu_added_us": {k: round((statistics.median(v) - statistics.median(cpu_of["plain"])) * 1e6, 1)
                                        for k, v in cpu_of.items() if k != "plain"},
           "p10_added_us": {k: round((statistics.median(v) - statistics.median(p10_of["plain"])) * 1e6, 1)
                            for k, v in p10_of.items() if k != "plain"},
           "load": os.getloadavg(),
           "settings": {"rounds": args.rounds, "steps": args.steps}}
    Path(args.out).write_text(json.dumps(out, indent=1))
    if alone:
        print("each hook kind alone: " + ", ".join(f"{k} +{v} us" for k, v in out["alone_added_us"].items()))
    print("  main-thread CPU added per step: " + ", ".join(f"{k} +{v} us"
                                                        for k, v in out["main_thread_cpu_added_us"].items()))
    print("  10th-percentile step added: " + ", ".join(f"{k} +{v} us" for k, v in out["p10_added_us"].items()))
    print(f"  no-op hooks in a quiet step's places only +{out['noop_quiet_added_us']} us; the agent ran quiet "
          f"steps: {quiet_seen}")
    print(f"hook_floor on {dev}: plain {out['median_step_us']['plain']} us; no-op hooks +{out['noop_hooks_added_us']} us; "
          f"attached +{out['attached_added_us']} us (the agent's share +{out['agent_share_us']} us); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
