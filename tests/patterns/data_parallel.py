"""ImageNet-style: a small CNN wrapped in nn.DataParallel (a passthrough on one device or on the CPU), a
DataLoader with a short last batch, SGD with momentum and weight decay, an LR scheduler, eval under no_grad."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from pattern_common import Report, parse, seed


def main() -> None:
    args = parse(__doc__, steps=5)
    seed(args.device)
    report = Report("data_parallel", args)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    model = nn.DataParallel(net).to(args.device)
    n = 16 * (args.steps - 1) + 6  # the last batch is short
    loader = DataLoader(TensorDataset(torch.randn(n, 3, 16, 16), torch.randint(0, 10, (n,))), batch_size=16)
    criterion = nn.CrossEntropyLoss().to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), 0.1, momentum=0.9, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model.train()
    for images, target in loader:
        images, target = images.to(args.device), target.to(args.device)
        output = model(images)
        loss = criterion(output, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        report.step(loss.item(), images.shape[0])
    model.eval()
    with torch.no_grad():
        model(torch.randn(32, 3, 16, 16, device=args.device))
    report.write()


if __name__ == "__main__":
    main()
