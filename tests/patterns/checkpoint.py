"""Checkpoints every N steps: ``torch.save`` of a dict with the model's and optimizer's state_dicts (and the
whole model object, as some scripts do), then a resume check that loads the latest one back."""

from __future__ import annotations

import os
import tempfile

import torch
import torch.nn as nn

from pattern_common import Report, parse, seed


def main() -> None:
    args = parse(__doc__, steps=6, extra=lambda p: p.add_argument("--every", type=int, default=2))
    seed(args.device)
    report = Report("checkpoint", args)
    model = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, 2)).to(args.device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(1, args.steps + 1):
            x, y = torch.randn(9, 12, device=args.device), torch.randint(0, 2, (9,), device=args.device)
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            report.step(loss.item(), 9)
            if step % args.every == 0:
                path = os.path.join(tmp, f"ckpt_{step}.pt")
                torch.save({"step": step, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                            "model_object": model}, path)
        ckpt = torch.load(path, weights_only=False)
        fresh = nn.Sequential(nn.Linear(12, 48), nn.ReLU(), nn.Dropout(0.1), nn.Linear(48, 2)).to(args.device)
        fresh.load_state_dict(ckpt["model"])
        torch.optim.Adam(fresh.parameters(), lr=1e-3).load_state_dict(ckpt["optimizer"])
        assert list(ckpt["model_object"].state_dict()) == list(model.state_dict())
    report.write()


if __name__ == "__main__":
    main()
