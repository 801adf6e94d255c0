"""Helpers every example script shares; importable from the script's folder (``python examples/train_x.py``).

Torch is imported inside the functions, so importing this module before ``memcheck.prepare_allocator()``
leaves the allocator settings untouched.
"""

from __future__ import annotations

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
