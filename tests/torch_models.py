"""Small torch models more than one test module trains (imports torch: only tests that need it import this)."""

from __future__ import annotations

import torch


class CastingMLP(torch.nn.Module):
    """Takes float32 or float64 inputs (casts them), optional keyword input: the steady-step tests' model."""

    def __init__(self, inputs: int, hidden: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(inputs, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 4))

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        out = self.net(x.float())
        return out * scale.float().mean() if scale is not None else out
