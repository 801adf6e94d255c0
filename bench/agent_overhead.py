#!/usr/bin/env python3
"""What the agent costs a training step: the GPT example with and without the agent, interleaved.

One process, one model: after a warm-up, rounds alternate (A B B A A B ...) between the agent attached
(``batchmon.attach(model, optimizer)`` with default settings, ``detach()`` at the end of the round) and not
attached. Every step is timed to ``loss.item()`` (a host sync, as training loops log), so the time covers the
GPU work. The result is the ratio of the median attached step time to the median plain step time; the target
is <= 1.01 with the defaults (activations counted on sampled steps, agent.DEFAULT_ACTIVATION_EVERY).

    python3 bench/agent_overhead.py                      # H200: GPT example defaults, 6+6 rounds of 40 steps
    python3 bench/agent_overhead.py --tiny --device cpu  # smoke test

Writes $OUT/agent_overhead.json (OUT defaults to ./out) and prints a summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_example():  # noqa: ANN201 - the module
    spec = importlib.util.spec_from_file_location("train_gpt", ROOT / "examples" / "train_gpt.py")
    assert spec is not None and spec.loader is not None
    sys.path.insert(0, str(ROOT / "examples"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt"] = module  # dataclasses look their module up while the class is created
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=6, help="rounds per mode (default 6)")
    p.add_argument("--steps", type=int, default=40, help="timed steps per round (default 40)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first (default 10)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--activation-every", type=int, default=None, help="agent setting (default: the agent's)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tiny", action="store_true", help="tiny model, few steps: a CPU smoke test")
    p.add_argument("--target", type=float, default=1.01)
    args = p.parse_args(argv)
    if args.tiny:
        args.rounds = min(args.rounds, 2)
        args.steps = min(args.steps, 4)
        args.warmup = min(args.warmup, 2)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    gpt = load_example()
    import torch

    import batchmon
    from batchmon.agent import handle as agent_mod

    torch.manual_seed(0)
    device = gpt.pick_device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)  # steadier timings on a shared CPU
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = gpt.TINY if args.tiny else gpt.GPTConfig()
    seq_len = args.seq_len or cfg.block_size
    model = gpt.GPT(cfg).to(device)
    optimizer = gpt.make_optimizer(model)
    gen = torch.Generator().manual_seed(0)

    def step() -> float:
        t = time.perf_counter()
        x, y = gpt.make_batch(cfg, args.batch_size, seq_len, device, gen)
        optimizer.zero_grad(set_to_none=True)
        with gpt.autocast(device, args.amp):
            loss = model(x, y)
        loss.backward()
        optimizer.step()
        loss.item()
        return time.perf_counter() - t

    for _ in range(args.warmup):
        step()
    times: dict[str, list[float]] = {"attached": [], "plain": []}
    rounds: list[dict[str, object]] = []
    order = [("attached", "plain") if i % 2 == 0 else ("plain", "attached") for i in range(args.rounds)]
    agent_steps = 0
    for pair in order:
        for mode in pair:
            handle = None
            if mode == "attached":
                handle = batchmon.attach(model, optimizer, name="agent_overhead",
                                         activation_every=args.activation_every)
            round_times = [step() for _ in range(args.steps)]
            if handle is not None:
                agent_steps += len(handle.steps)
                handle.detach()
            times[mode].extend(round_times)
            rounds.append({"mode": mode, "median_s": statistics.median(round_times)})

    med_a = statistics.median(times["attached"])
    med_p = statistics.median(times["plain"])
    ratio = med_a / med_p
    result = {
        "benchmark": "agent_overhead",
        "ratio": round(ratio, 5),
        "target": args.target,
        "ok": ratio <= args.target,
        "median_step_s": {"attached": med_a, "plain": med_p},
        "mean_step_s": {k: statistics.fmean(v) for k, v in times.items()},
        "steps_per_mode": {k: len(v) for k, v in times.items()},
        "agent_steps_seen": agent_steps,
        "rounds": rounds,
        "settings": {"rounds": args.rounds, "steps": args.steps, "warmup": args.warmup,
                     "batch_size": args.batch_size, "seq_len": seq_len, "amp": args.amp, "tiny": args.tiny,
                     "activation_every": args.activation_every or agent_mod.DEFAULT_ACTIVATION_EVERY,
                     "config": dict(cfg.__dict__), "parameters": gpt.param_count(model)},
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "time": time.time(),
    }
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "agent_overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"agent overhead: median step {med_a * 1e3:.2f} ms attached vs {med_p * 1e3:.2f} ms plain, "
          f"ratio {ratio:.4f} (target <= {args.target}) -> {'OK' if result['ok'] else 'OVER'}; "
          f"{len(times['attached'])}+{len(times['plain'])} steps, agent saw {agent_steps}; "
          f"wrote {out / 'agent_overhead.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
