"""Mixed precision with autocast and a GradScaler (the AMP recipe): scale, backward, unscale, clip, step,
update; one step's gradients overflow (inf input) so the scaler skips its optimizer step - still a step."""

from __future__ import annotations

import torch
import torch.nn as nn

from pattern_common import Report, parse, seed


def main() -> None:
    args = parse(__doc__, steps=6)
    seed(args.device)
    report = Report("amp_scaler", args)
    dtype = torch.float16 if args.device == "cuda" else torch.bfloat16
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 4)).to(args.device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    scaler = torch.amp.GradScaler(args.device, init_scale=2.0 ** 10)
    criterion = nn.CrossEntropyLoss()
    for step in range(args.steps):
        x = torch.randn(16, 32, device=args.device)
        if step == 3:
            x[0, 0] = float("inf")  # overflow: the scaler skips this optimizer step
        y = torch.randint(0, 4, (16,), device=args.device)
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device_type=args.device, dtype=dtype):
            loss = criterion(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        report.step(loss.item(), 16)
    report.write()


if __name__ == "__main__":
    main()
