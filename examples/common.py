"""Helpers every example script shares; importable from the script's folder (``python examples/train_x.py``).

Torch is imported inside the functions, so importing this module before ``memcheck.prepare_allocator()``
leaves the allocator settings untouched.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def pick_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; a bare ``cuda`` gets the current index (set_device needs one).
    A device this machine lacks exits with a one-line message, not a traceback."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise SystemExit(f"--device {name}: {exc}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here (use --device cpu or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def agent_report() -> dict[str, object]:
    """What the attached agent saw, if one is attached (no import of batchmon when it is not installed)."""
    agent = sys.modules.get("batchmon.agent.handle")
    handle = agent.current() if agent is not None else None
    if handle is None:
        return {"attached": False}
    last = handle.last_step
    return {"attached": True, "pid": handle.pid, "socket": str(handle.socket_path) if handle.socket_path else None,
            "steps": len(handle.steps), "last_step": last.step if last else None,
            "batch_size": last.batch_size if last else None, "components": last.components if last else None,
            "model": type(handle.model).__name__ if handle.model is not None else None,
            "optimizer": [type(o).__name__ for o in handle.optimizers]}
