#!/usr/bin/env python3
"""A long CIFAR-sized run with a common slow leak, for the timeline view's recordings (issue 16 point 4).

torchvision's ResNet-18 at 32x32, SGD with momentum, cross-entropy. Like many training scripts that compute an
epoch metric at the end of the epoch, it keeps every step's logits on the GPU (``epoch_logits.append(logits)``,
not detached, not moved to the CPU) and drops them when the "epoch" ends: memory creeps within each epoch and
falls back at its end, a sawtooth a per-step timeline must show. ``--no-leak`` keeps ``.item()`` only.

    python3 bench/long_run.py --steps 1600 --epoch 400            # H200
    python3 bench/long_run.py --device cpu --steps 20 --epoch 5 --width 8   # smoke test
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn as nn


def build(width: int, classes: int) -> nn.Module:
    try:
        import torchvision

        return torchvision.models.resnet18(num_classes=classes)
    except ImportError:  # the smoke test on a box without torchvision: a small CNN of the same shape of loop
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(width, classes))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--epoch", type=int, default=400, help="steps per epoch (the leak is dropped at its end)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-leak", action="store_true")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each step")
    args = p.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    model = build(args.width, args.classes).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    epoch_logits: list[torch.Tensor] = []
    t0 = time.time()
    for step in range(1, args.steps + 1):
        x = torch.randn(args.batch_size, 3, 32, 32, device=dev)
        y = torch.randint(0, args.classes, (args.batch_size,), device=dev)
        logits = model(x)
        loss = loss_fn(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if not args.no_leak:
            epoch_logits.append(logits)
        if step % args.epoch == 0:
            acc = (torch.cat(epoch_logits).argmax(1) >= 0).float().mean().item() if epoch_logits else 0.0
            print(f"epoch {step // args.epoch}: step {step} loss {loss.item():.4f} kept {len(epoch_logits)} "
                  f"({acc:.2f}) {time.time() - t0:.1f} s", flush=True)
            epoch_logits.clear()
        if args.sleep:
            time.sleep(args.sleep)


if __name__ == "__main__":
    main()
