"""Helpers every example script shares; importable from the script's folder (``python examples/train_x.py``).

Torch is imported inside the functions, so importing this module before ``memcheck.prepare_allocator()``
leaves the allocator settings untouched.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def pick_device(name: str) -> torch.device:
    """``auto`` picks CUDA when available; a bare ``cuda`` gets the current index (set_device needs one)."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device
