"""The seed's memory equation, fitted to measured steps: predict any batch size, the largest batch, what-ifs.

Pure: no torch, no textual. (Types are fixed here; the model implementation follows below them.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class WhatIf:
    """A hypothetical change to the observed run. Defaults mean 'as observed'."""

    batch_size: int | None = None  # None: the last observed batch size
    amp: bool = False  # mixed precision (bf16/fp16 autocast) where the run was fp32
    checkpointing: bool = False  # activation checkpointing
    accumulation_steps: int = 1  # gradient accumulation: batch_size is split into this many micro-batches
    optimizer: str | None = None  # "sgd", "sgd-momentum", "adam", "adamw"; None: as observed
    shards: int = 1  # ZeRO/FSDP-style sharding of parameters, gradients and optimizer states over N GPUs


@dataclass(frozen=True)
class Prediction:
    """Predicted breakdown at one batch size, and the largest batch that fits."""

    batch_size: int
    components: dict[str, int]  # every name in protocol.ALL_COMPONENTS
    total: int  # predicted peak device use of the process: allocator peak + cache + context
    peak_allocated: int  # predicted allocator peak
    max_batch: int | None  # largest batch that fits the device, None when unknown (no device size)
    device_total: int | None
    headroom: int | None  # device_total - margin - total at batch_size; negative: will not fit
    margin: int  # bytes kept free, derived from measured fragmentation, retries and context
    basis: str  # which observations this rests on, e.g. "3 steps at batch 16, 32 (steps 1-40)"
    what_if: WhatIf = field(default_factory=WhatIf)
