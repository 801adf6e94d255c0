"""nanoGPT-style ``model = torch.compile(model)`` of a GELU MLP block stack, AdamW, (on CUDA) bf16 autocast;
``--compile-after-attach`` attaches in the script first (``batchmon.attach(model, optimizer)``), then
compiles, the order that used to hide activations and batch from the agent."""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from pattern_common import Report, parse, seed


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.gelu = nn.GELU()
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.proj(self.gelu(self.fc(self.ln(x))))


def main() -> None:
    def extra(p):
        p.add_argument("--compile-after-attach", action="store_true")
        p.add_argument("--backend", default="inductor", help="torch.compile's backend (default inductor, as nanoGPT)")

    args = parse(__doc__, steps=4, extra=extra)
    seed(args.device)
    report = Report("compiled" + ("_after_attach" if args.compile_after_attach else ""), args)
    model = nn.Sequential(*[Block(32) for _ in range(2)], nn.Linear(32, 8)).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    if args.compile_after_attach and os.environ.get("BATCHMON_AUTO"):  # under batchmon run; plain runs stay plain
        import batchmon

        batchmon.attach(model, optimizer)
    model = torch.compile(model, backend=args.backend)
    for step in range(args.steps):
        x, y = torch.randn(12, 32, device=args.device), torch.randint(0, 8, (12,), device=args.device)
        with torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.device == "cuda"):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        report.step(loss.item(), 12)
    report.write()


if __name__ == "__main__":
    main()
