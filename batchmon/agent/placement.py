"""Where a step's tensors live and what the CUDA caching allocator says about them: the device of a model or an
optimizer, a parameter's layout (device, dtype, storage address: ``.to()``/``.half()`` change it), the signature
of a forward's plain-tensor inputs (what the steady step's shortcut compares) and the allocator's figures.

Also the device's size and ``handle.suggest_batch_size()``'s answer from it. Split from batchmon.agent.step_meter
and handle (which use them) to keep those modules within the size limit.
The agent's own resets of the allocator's peak go through batchmon.agent.torch_patches, so a script's
``max_memory_allocated()`` still sees its peak.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from batchmon.agent import torch_patches as patches
from batchmon.agent.identity import cuda_index
from batchmon.protocol import Step


@dataclass(frozen=True)
class CudaFigures:
    allocated: int
    peak: int
    reserved: int
    retries: int
    ooms: int
    # the allocator's inactive-split bytes now (free bytes inside segments that hold live blocks: what a flush at
    # the limit cannot give back); sent as Step.inactive_split on sampled steps, read at their end. Not compared:
    # a carried step's figures match on what the Step shows
    inactive: int = field(default=0, compare=False)


def device_of(model: torch.nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def device_of_optimizer(optimizer: Any) -> torch.device | None:
    for group in getattr(optimizer, "param_groups", ()):
        for p in group["params"]:
            return p.device
    return None


def first_parameter(model: torch.nn.Module | None) -> torch.Tensor | None:
    if model is None:
        return None
    for p in model.parameters():
        return p
    return None


def layout_of(p: torch.Tensor | None) -> tuple[Any, ...] | None:
    """Where and how a parameter is stored: a change means .to()/.half() moved it (the Parameter object stays)."""
    return None if p is None else (p.device, p.dtype, p.data_ptr())


def signature(args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """What the batch bytes and size of a root forward depend on, when its arguments are all plain tensors:
    their shapes, dtypes and whether they live on CUDA; None otherwise (anything else is measured every step)."""
    sig = []
    for a in args:
        if type(a) is not torch.Tensor:
            return None
        sig.append((a.shape, a.dtype, a.is_cuda))
    return tuple(sig)


def cuda_figures(device: torch.device | None, reset: bool) -> CudaFigures | None:
    """The allocator's figures for the step (None off CUDA); ``reset``: start the next step's peak."""
    if device is None or device.type != "cuda":
        return None
    index = cuda_index(device)
    stats = patches.raw_stats(index)
    if not stats:  # CUDA not initialised (yet): nothing to report
        return None
    # a peak the script's own reset_peak_memory_stats() cleared during the step still counts for the step
    peak = max(int(stats["allocated_bytes"]["all"]["peak"]), patches.agent_missed(index, take=reset))
    figures = CudaFigures(int(stats["allocated_bytes"]["all"]["current"]), peak,
                          int(stats["reserved_bytes"]["all"]["current"]), int(stats.get("num_alloc_retries", 0)),
                          int(stats.get("num_ooms", 0)),
                          int(stats.get("inactive_split_bytes", {}).get("all", {}).get("current", 0)))
    if reset:
        patches.agent_reset(index, stats)
    return figures


def device_total(device: torch.device | None) -> int | None:
    """The CUDA device's memory in bytes (None off CUDA)."""
    if device is None or device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(cuda_index(device)).total_memory)


def suggested_batch(steps: list[Step], device: torch.device | None, margin: int | None,
                    optimizer: str | None) -> int | None:
    """The largest batch that fits ``device``, predicted from ``steps`` (None when unknown); ``margin``: bytes to
    keep free on top of the memory model's own margin."""
    from batchmon import memory_model

    total = device_total(device)
    if not steps or total is None:
        return None
    if margin is not None:
        total = max(0, total - int(margin))
    prediction = memory_model.predict_from_steps(steps, total, what_if=memory_model.WhatIf(), optimizer=optimizer)
    return None if prediction is None else prediction.max_batch
