"""Gradient accumulation: ACCUM micro-batches, each loss divided by ACCUM and backpropagated, one optimizer
step (and zero_grad) per ACCUM micro-batches - one training step of micro-batch size."""

from __future__ import annotations

import torch
import torch.nn as nn

from pattern_common import Report, parse, seed

ACCUM, MICRO = 4, 8


def main() -> None:
    args = parse(__doc__, steps=5)
    seed(args.device)
    report = Report("grad_accum", args)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 10)).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    data = [(torch.randn(MICRO, 16), torch.randint(0, 10, (MICRO,))) for _ in range(ACCUM * args.steps)]
    optimizer.zero_grad()
    total = 0.0
    for i, (x, y) in enumerate(data):
        x, y = x.to(args.device), y.to(args.device)
        loss = criterion(model(x), y) / ACCUM
        loss.backward()
        total += loss.item()
        if (i + 1) % ACCUM == 0:
            optimizer.step()
            optimizer.zero_grad()
            report.step(total, MICRO)
            total = 0.0
    report.write()


if __name__ == "__main__":
    main()
