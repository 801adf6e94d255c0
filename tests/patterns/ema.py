"""An exponential moving average of the weights kept in a ``copy.deepcopy`` of the model (timm-style
ModelEmaV2), updated after every optimizer step and evaluated under no_grad."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

from pattern_common import Report, parse, seed


class ModelEma(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.9) -> None:
        super().__init__()
        self.module = copy.deepcopy(model)
        self.module.eval()
        self.decay = decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for e, m in zip(self.module.state_dict().values(), model.state_dict().values()):
            e.copy_(self.decay * e + (1.0 - self.decay) * m if e.is_floating_point() else m)


def main() -> None:
    args = parse(__doc__, steps=5)
    seed(args.device)
    report = Report("ema", args)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(4)).to(args.device)
    model(torch.randn(2, 3, 10, 10, device=args.device))  # materialise the lazy layer (train mode, with grad)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    ema = ModelEma(model)
    for step in range(args.steps):
        x, y = torch.randn(7, 3, 10, 10, device=args.device), torch.randint(0, 4, (7,), device=args.device)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        ema.update(model)
        with torch.no_grad():
            ema.module(x)
        report.step(loss.item(), 7)
    report.write()


if __name__ == "__main__":
    main()
