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


class _LMBlock(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm, self.fc, self.act, self.drop = (torch.nn.LayerNorm(16), torch.nn.Linear(16, 16), torch.nn.GELU(),
                                                   torch.nn.Dropout(0.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.act(self.fc(self.norm(x))))


class TinyLM(torch.nn.Module):
    """nanoGPT's shape for the compile tests: the loss computed inside the model (so the agent's global loss-search
    hooks stay on for the first forwards and meet every module), more module types than dynamo's recompile limit
    (8); ``forward(idx, targets)`` returns the logits and the loss."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.blocks = torch.nn.ModuleList([_LMBlock() for _ in range(2)])
        self.tail = torch.nn.Sequential(torch.nn.LayerNorm(16), torch.nn.Sigmoid(), torch.nn.Tanh(), torch.nn.ReLU())
        self.head = torch.nn.Linear(16, 50)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.emb(idx)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.tail(x))
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, 50), targets.view(-1))
