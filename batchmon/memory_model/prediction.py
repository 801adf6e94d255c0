"""What a prediction says: the what-if asked, the structured basis, the band, the breakdown (no logic)."""

from __future__ import annotations

from dataclasses import dataclass, field


#: how the basis names a deciding segment of the backward (fitted per segment)
SEGMENT_TEXT = {"loss_backward": "the loss's backward", "backward": "the model's backward"}


@dataclass(frozen=True)
class WhatIf:
    """A hypothetical change to the observed run. Defaults mean 'as observed'."""

    batch_size: int | None = None  # None: the last observed batch size
    amp: bool = False  # mixed precision (bf16/fp16 autocast) where the run was fp32
    checkpointing: bool = False  # activation checkpointing
    accumulation_steps: int = 1  # gradient accumulation: batch_size is split into this many micro-batches
    optimizer: str | None = None  # "sgd", "sgd-momentum", "adam", "adamw"; None: as observed
    shards: int = 1  # ZeRO/FSDP-style sharding of parameters, gradients and optimizer states over N GPUs
    checkpoint_layers: int | None = None  # blocks wrapped in checkpoints; None: 12 assumed


@dataclass(frozen=True)
class Basis:
    """What a prediction rests on, as fields: front ends format them (``text``), never parse them."""

    steps: int  # observed steps the model was fitted on
    batch_sizes: tuple[int, ...]  # distinct observed batch sizes, ascending
    step_range: tuple[int, int]  # first and last fitted step
    notes: tuple[str, ...] = ()  # assumptions of the fit (one batch size, optimizer state not yet seen, ...)
    what_if: tuple[str, ...] = ()  # assumptions of each what-if applied
    extrapolation: float | None = None  # the largest batch / the largest observed batch size (None: unknown)
    conservative: bool = False  # the largest batch comes from the band's high side, not the central fit
    conservative_why: tuple[str, ...] = ()  # why the observations cannot support the central extrapolation
    margin_source: str = "measured"  # "measured" (fragmentation, growth, retries) or "given" (an override)
    # fitted per phase: the phase whose own peak decides the step's peak at decided_at (the largest batch when
    # known, else the batch asked), e.g. "backward"; None when the peak was fitted as one line
    deciding_phase: str | None = None
    decided_at: int | None = None  # that (micro-)batch
    # fitted per segment: the segment that decides ("loss_backward": the loss's backward, up to the model
    # output's gradient; "backward": the model's backward after it); None when not fitted per segment
    deciding_segment: str | None = None

    @property
    def largest_observed(self) -> int:
        return self.batch_sizes[-1] if self.batch_sizes else 0

    def observed_text(self, *, step_range: bool = True) -> str:
        """'3 steps at batch 16, 32 (steps 1-40)'; without the step range for a display that must not move."""
        sizes = ", ".join(str(b) for b in self.batch_sizes)
        text = f"{self.steps} step{'s' if self.steps != 1 else ''} at batch {sizes}"
        if step_range:
            lo, hi = self.step_range
            text += f" (step {lo})" if lo == hi else f" (steps {lo}-{hi})"
        return text

    def text(self, *, step_range: bool = True) -> str:
        """The whole basis on one line (--once, --json): observations; fit notes; conservative; what-ifs."""
        parts = [self.observed_text(step_range=step_range), *self.notes]
        if self.deciding_phase is not None:
            where = SEGMENT_TEXT.get(self.deciding_segment or "", self.deciding_phase)
            parts.append(f"peak in {where} at batch {self.decided_at}")
        if self.conservative:
            parts.append("largest batch conservative: " + ", ".join(self.conservative_why))
        parts.extend(f"what-if: {n}" for n in self.what_if)
        if self.margin_source != "measured":
            parts.append(f"margin {self.margin_source}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Band:
    """Low and high predicted device use (bytes) at one batch size: what the observations can support."""

    low: int
    high: int


@dataclass(frozen=True)
class Prediction:
    """Predicted breakdown at one batch size, and the largest batch that fits."""

    batch_size: int
    components: dict[str, int]  # every name in protocol.ALL_COMPONENTS (the central fit)
    total: int  # predicted peak device use of the process: allocator peak + cache + context (central)
    peak_allocated: int  # predicted allocator peak (central)
    max_batch: int | None  # largest batch that fits the device (from the band's high side), None when unknown
    device_total: int | None
    headroom: int | None  # device_total - margin - band.high at batch_size; negative: will not fit
    margin: int  # bytes kept free beyond the cache: measured reserved growth and retries (the fragmentation kept free
    # at the limit is in components["cache"]), or the margin given
    basis_fields: Basis  # which observations this rests on, and every assumption made
    band: Band | None = None  # total's low/high at batch_size; None: low == high == total
    max_batch_central: int | None = None  # the largest batch of the central fit (>= max_batch)
    what_if: WhatIf = field(default_factory=WhatIf)
    micro_batch: int | None = None  # batch per forward pass (differs from batch_size with accumulation)

    @property
    def basis(self) -> str:
        """The basis as one line, e.g. '3 steps at batch 16, 32 (steps 1-40); what-if: amp ...'."""
        return self.basis_fields.text()
