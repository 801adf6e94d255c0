"""What every pattern script shares: its command line and its report (no batchmon needed to run one).

Every script takes ``--device cpu|cuda``, ``--steps N`` and ``--report FILE``; it trains as the public script
it imitates would, and at the end writes FILE: its losses (bit-exact floats), the batch size of every
optimizer step it took, and - only when a batchmon agent is attached (``batchmon run``) - what the agent saw:
its steps as protocol dicts. The agent is read in-process through ``batchmon.agent.handle.current()`` after
``detach()`` (what the atexit hook would do), so a step the loop rule ends at exit is included.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any


def parse(description: str, steps: int = 6, extra: Any = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps (loop iterations)")
    parser.add_argument("--report", help="write the JSON report here")
    if extra is not None:
        extra(parser)
    return parser.parse_args()


class Report:
    """Losses and the true batch size of each training step, as the script itself knows them."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name = name
        self.path = args.report
        self.losses: list[float] = []
        self.batch_sizes: list[int] = []
        self.batch_source: str | None = None  # what the agent must name, where the script knows it

    def step(self, loss: float, batch_size: int) -> None:
        self.losses.append(float(loss))
        self.batch_sizes.append(int(batch_size))

    def write(self) -> None:
        if not self.path:
            return
        agent: Any = None
        mod = sys.modules.get("batchmon.agent.handle")
        handle = mod.current() if mod is not None else None
        if handle is not None:
            handle.detach(reason="exit")
            agent = {"steps": [s.to_dict() for s in handle.steps], "model": type(handle.model).__name__
                     if handle.model is not None else None, "error": handle.error}
        with open(self.path, "w") as f:
            json.dump({"pattern": self.name, "losses": [repr(x) for x in self.losses],
                       "batch_sizes": self.batch_sizes, "expected_source": self.batch_source, "agent": agent}, f)


def seed(device: str) -> None:
    if device == "cuda":  # bit-identical runs need deterministic kernels (embedding backward, cuBLAS)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    import torch

    torch.manual_seed(0)
    if device == "cuda":
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.cuda.manual_seed_all(0)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
