"""What the user changed with keys: what-if settings per job and refresh settings. Pure, immutable, testable.

Kept apart from widgets so that every key's effect is a plain function of the old state.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from functools import lru_cache

from batchmon.memory_model import WhatIf

ACCUMULATION_STEPS: tuple[int, ...] = (1, 2, 4, 8)
#: None means "the optimizer the run uses"
OPTIMIZERS: tuple[str | None, ...] = (None, "sgd", "sgd-momentum", "adam")
INTERVALS: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
MAX_BATCH = 1 << 30


def batch_ladder(limit: int = MAX_BATCH) -> list[int]:
    """Batch sizes people actually use: 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64 ... (powers of two and x1.5)."""
    out = [1, 2]
    p = 2
    while p * 2 <= limit:
        out.append(p + p // 2)
        p *= 2
        out.append(p)
    return out


_LADDER = batch_ladder()


def next_batch(current: int, direction: int) -> int:
    """The next rung of the ladder above (direction > 0) or below (< 0) ``current``; never below 1."""
    if direction > 0:
        for b in _LADDER:
            if b > current:
                return b
        return current
    for b in reversed(_LADDER):
        if b < current:
            return b
    return 1


def cycle(values: tuple, current: object) -> object:
    """The value after ``current`` in ``values``, wrapping around; the first one when current is unknown."""
    return values[_next_index(values, current)]


def _next_index(values: tuple, current: object) -> int:
    try:
        return (values.index(current) + 1) % len(values)
    except ValueError:
        return 0


@dataclass(frozen=True)
class WhatIfState(WhatIf):
    """The what-if settings of one job: the memory model's WhatIf (its fields, one definition), plus what each
    key does to it. batch_size None: the batch size the job runs with."""

    def effective_batch(self, observed: int | None) -> int | None:
        return self.batch_size if self.batch_size is not None else observed

    def step_batch(self, direction: int, observed: int | None) -> "WhatIfState":
        base = self.effective_batch(observed) or 1
        return replace(self, batch_size=next_batch(base, direction))

    def with_batch(self, batch: int) -> "WhatIfState":
        return replace(self, batch_size=max(1, min(int(batch), MAX_BATCH)))

    def toggle_amp(self) -> "WhatIfState":
        return replace(self, amp=not self.amp)

    def toggle_checkpointing(self) -> "WhatIfState":
        return replace(self, checkpointing=not self.checkpointing)

    def cycle_accumulation(self) -> "WhatIfState":
        steps = ACCUMULATION_STEPS[_next_index(ACCUMULATION_STEPS, self.accumulation_steps)]
        return replace(self, accumulation_steps=steps)

    def cycle_optimizer(self) -> "WhatIfState":
        return replace(self, optimizer=OPTIMIZERS[_next_index(OPTIMIZERS, self.optimizer)])

    @property
    def is_default(self) -> bool:
        return self == WhatIfState()

    def to_what_if(self, observed: int | None, batch_size: int | None = None) -> WhatIf:
        """The memory model's WhatIf at this state's batch (or an explicit one, for the chart's x axis)."""
        b = batch_size if batch_size is not None else self.effective_batch(observed)
        return _what_if(self, b)

    def describe(self) -> str:
        """Short label of what differs from the observed run, e.g. 'AMP, ckpt, accum 4, sgd'."""
        parts = []
        if self.amp:
            parts.append("AMP")
        if self.checkpointing:
            parts.append("ckpt")
        if self.accumulation_steps != 1:
            parts.append(f"accum {self.accumulation_steps}")
        if self.optimizer is not None:
            parts.append(self.optimizer)
        return ", ".join(parts)


@lru_cache(maxsize=1024)
def _what_if(state: WhatIfState, batch_size: int | None) -> WhatIf:
    """The WhatIf of a state at a batch size, made once: every job's view asks for it every refresh (both frozen,
    equal in, equal out; the chart's ~100 batch sizes per what-if fit well inside the cache)."""
    return WhatIf(**{f.name: getattr(state, f.name) for f in fields(WhatIf)} | {"batch_size": batch_size})


def next_interval(current: float, direction: int) -> float:
    """The next refresh interval faster (direction < 0) or slower (> 0) than ``current``."""
    if direction > 0:
        for v in INTERVALS:
            if v > current + 1e-9:
                return v
        return INTERVALS[-1]
    for v in reversed(INTERVALS):
        if v < current - 1e-9:
            return v
    return INTERVALS[0]


def cycle_interval(current: float) -> float:
    """`i`: the next interval in INTERVALS, wrapping from the slowest back to the fastest."""
    for v in INTERVALS:
        if v > current + 1e-9:
            return v
    return INTERVALS[0]
