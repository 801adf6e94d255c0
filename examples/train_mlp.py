#!/usr/bin/env python3
"""A tiny MLP classifier on synthetic data: the CPU-friendly example (demo, tests, `batchmon run` smoke runs).

    python examples/train_mlp.py --steps 200 --batch-size 64
    batchmon run -- python examples/train_mlp.py --steps 0 --sleep 0.2     # runs until Ctrl-C, watchable

It has no batchmon code unless ``--attach`` is given; under ``batchmon run`` the agent attaches by itself.
``--report`` prints one JSON line at the end saying what the agent (if any) saw.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import agent_report, pick_device  # noqa: E402


def build_model(input_dim: int, hidden: int, layers: int, classes: int,
                activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """``layers`` hidden Linear+activation layers of width ``hidden``, then a Linear classifier."""
    mods: list[nn.Module] = []
    width = input_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), activation()]
        width = hidden
    mods.append(nn.Linear(width, classes))
    return nn.Sequential(*mods)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps; 0 runs until interrupted (default 200)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--input-dim", type=int, default=64)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--optimizer", choices=("adam", "adamw", "sgd", "sgd-momentum"), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each step (for watching)")
    p.add_argument("--vary-batch", action="store_true",
                   help="cycle the batch size through 1/4, 1/2 and 1x --batch-size (feeds the memory model)")
    p.add_argument("--attach", action="store_true", help="call batchmon.attach(model, optimizer) explicitly")
    p.add_argument("--report", action="store_true", help="print a JSON line about the agent at the end")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 0 or args.batch_size < 1 or args.layers < 1:
        p.error("--steps must be >= 0, --batch-size and --layers >= 1")
    return args


def make_optimizer(name: str, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd-momentum":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    return torch.optim.SGD(params, lr=lr)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    model = build_model(args.input_dim, args.hidden, args.layers, args.classes).to(device)
    optimizer = make_optimizer(args.optimizer, list(model.parameters()), args.lr)
    criterion = nn.CrossEntropyLoss()
    if args.attach:
        import batchmon

        batchmon.attach(model, optimizer, name="train_mlp")
    sizes = [max(1, args.batch_size // 4), max(1, args.batch_size // 2), args.batch_size] if args.vary_batch \
        else [args.batch_size]
    t0 = time.perf_counter()
    steps = itertools.count(1) if args.steps == 0 else range(1, args.steps + 1)
    try:
        for step in steps:
            b = sizes[(step - 1) % len(sizes)]
            x = torch.randn(b, args.input_dim, device=device)
            y = torch.randint(0, args.classes, (b,), device=device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            if step == 1 or step % 50 == 0:
                print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.1f}s", flush=True)
            if args.sleep > 0:
                time.sleep(args.sleep)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    finally:
        if args.report:
            print(json.dumps(agent_report()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
