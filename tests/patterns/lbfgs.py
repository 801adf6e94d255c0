"""LBFGS with a closure (as in style-transfer and curve-fitting scripts): each optimizer step runs the closure
several times - zero_grad, forward, loss, backward - and is one training step."""

from __future__ import annotations

import torch
import torch.nn as nn

from pattern_common import Report, parse, seed


def main() -> None:
    args = parse(__doc__, steps=4)
    seed(args.device)
    report = Report("lbfgs", args)
    model = nn.Sequential(nn.Linear(1, 32), nn.Tanh(), nn.Linear(32, 1)).to(args.device)
    optimizer = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=5, history_size=10)
    x = torch.linspace(-2, 2, 64, device=args.device).unsqueeze(1)
    y = torch.sin(3 * x)
    criterion = nn.MSELoss()
    for step in range(args.steps):
        def closure():
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward()
            return loss

        loss = optimizer.step(closure)
        report.step(loss.item(), x.shape[0])
    report.write()


if __name__ == "__main__":
    main()
