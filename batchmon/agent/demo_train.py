"""`batchmon demo`'s training run: a small MLP classifier on synthetic data, inside the package so the demo
works from an installed wheel (examples/ ships only with a checkout).

    python -m batchmon.agent.demo_train --steps 0 --sleep 0.2 --vary-batch    # until stopped

No batchmon code: `batchmon demo` starts it under `batchmon run`, which attaches the agent by itself. It lives
under agent/ because it imports torch (nothing outside agent/ may). SIGTERM, SIGHUP and Ctrl-C end it cleanly.
"""

from __future__ import annotations

import argparse
import itertools
import signal
import sys
import time
from typing import Any

import torch
import torch.nn as nn


def build_model(input_dim: int, hidden: int, layers: int, classes: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    width = input_dim
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ReLU()]
        width = hidden
    mods.append(nn.Linear(width, classes))
    return nn.Sequential(*mods)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="batchmon.agent.demo_train", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps; 0 runs until stopped (default 200)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each step (for watching)")
    p.add_argument("--vary-batch", action="store_true", help="cycle the batch through 1/4, 1/2 and 1x")
    args = p.parse_args(argv)
    if args.steps < 0 or args.batch_size < 1 or not 0 <= args.sleep < 3600:
        p.error("--steps must be >= 0, --batch-size >= 1, --sleep in [0, 3600)")
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SystemExit(f"--device {name}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here")
    return device


def _stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _stop)
    torch.manual_seed(0)
    device = pick_device(args.device)
    model = build_model(64, 256, 4, 10).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    sizes = [max(1, args.batch_size // 4), max(1, args.batch_size // 2), args.batch_size] if args.vary_batch \
        else [args.batch_size]
    t0 = time.perf_counter()
    steps = itertools.count(1) if args.steps == 0 else range(1, args.steps + 1)
    try:
        for step in steps:
            b = sizes[(step - 1) % len(sizes)]
            x = torch.randn(b, 64, device=device)
            y = torch.randint(0, 10, (b,), device=device)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            if step == 1 or step % 50 == 0:
                print(f"step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - t0:.1f}s", flush=True)
            if args.sleep > 0:
                time.sleep(args.sleep)
    except KeyboardInterrupt:
        print("stopped", flush=True)
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
