#!/usr/bin/env python3
"""A small CNN on synthetic images (SGD with momentum, nn.CrossEntropyLoss), on CPU or CUDA.

    python examples/train_cnn.py --steps 20 --batch-size 64
    batchmon run -- python examples/train_cnn.py --check --check-out cnn_check.json

The loss is a criterion module called on the model's output, the common pattern: the agent finds it after
the first forward and counts its inputs that are not model outputs (the targets) as batch. ``--check``
compares the agent's components with torch.cuda.memory_allocated() deltas in the same run (memcheck.py).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memcheck  # noqa: E402
from common import pick_device  # noqa: E402

if __name__ == "__main__":
    memcheck.prepare_allocator(sys.argv[1:])

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402


def conv_block(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class SmallCNN(nn.Module):
    def __init__(self, width: int = 32, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(conv_block(3, width, 1), conv_block(width, width, 1),
                                      conv_block(width, 2 * width, 2), conv_block(2 * width, 2 * width, 1),
                                      conv_block(2 * width, 4 * width, 2), conv_block(4 * width, 4 * width, 1))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--width", type=int, default=32, help="channels of the first block (default 32)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--attach", action="store_true", help="call batchmon.attach(model, optimizer) explicitly")
    p.add_argument("--seed", type=int, default=0)
    memcheck.add_arguments(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if args.check and args.steps < 3:
        p.error("--check needs --steps >= 3")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    meter = memcheck.Meter(device)
    model = SmallCNN(args.width, args.classes)
    before = meter.allocated()
    model.to(device)
    meter.record("parameters", before, meter.allocated())
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    criterion = nn.CrossEntropyLoss()

    handle = None
    if args.attach or args.check:
        import batchmon

        handle = batchmon.attach(model, optimizer, name="train_cnn", activation_every=1 if args.check else None)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"train_cnn: {n_params / 1e6:.2f}M parameters, device {device}, batch {args.batch_size}x3x"
          f"{args.image_size}x{args.image_size}, amp={args.amp}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)

    def make_batch() -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=gen).to(device)
        return x, torch.randint(0, args.classes, (args.batch_size,), generator=gen).to(device)

    def loss_of(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return criterion(model(x), y)  # the logits are not kept: only what backward needs stays allocated

    memcheck.run_steps(meter, optimizer, args.steps, make_batch, loss_of, amp=args.amp)

    if args.check:
        result = memcheck.compare("train_cnn", meter, handle.last_step if handle else None,
                                  {"amp": args.amp, "parameters_count": n_params,
                                   "image_size": args.image_size, "width": args.width})
        return memcheck.report(result, args.check_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
