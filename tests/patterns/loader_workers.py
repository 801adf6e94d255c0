"""A DataLoader with worker processes started by fork or spawn (``--start-method``), pinned memory and a
dataset defined in the script: the workers import torch too, and must neither attach nor disturb training."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset

from pattern_common import Report, parse, seed


class Noise(Dataset):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(i)
        return torch.randn(20, generator=g), int(torch.randint(0, 5, (1,), generator=g))


def main() -> None:
    def extra(p) -> None:
        p.add_argument("--start-method", choices=["fork", "spawn"], default="fork")
        p.add_argument("--workers", type=int, default=2, help="DataLoader workers (each spawned one imports torch)")

    args = parse(__doc__, steps=5, extra=extra)
    seed(args.device)
    report = Report(f"loader_workers_{args.start_method}", args)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 5)).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(Noise(10 * args.steps), batch_size=10, num_workers=args.workers,
                        pin_memory=args.device == "cuda", multiprocessing_context=args.start_method)
    for x, y in loader:
        x, y = x.to(args.device), y.to(args.device)
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        report.step(loss.item(), x.shape[0])
    report.write()


if __name__ == "__main__":
    main()
