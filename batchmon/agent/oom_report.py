"""The ``oom`` event of an out-of-memory error leaving a training step (split from step_meter: it reads the meter's
open step but takes no part in its state machine)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from batchmon.agent import accounting
from batchmon.agent import torch_patches as patches
from batchmon.protocol import Event

if TYPE_CHECKING:
    from batchmon.agent.step_meter import StepMeter


def oom_event(meter: "StepMeter", exc: BaseException, where: str) -> Event:
    """The ``oom`` event for an out-of-memory error leaving forward, loss, backward or the optimizer step."""
    requested = patches.take_oom_requested()
    if requested is None:
        requested = patches.requested_from_text(str(exc))
    text = " ".join(str(exc).split())
    first = text.split(". ", 1)[0][:300]
    n = meter.step + 1
    allocated, reserved, retries = meter._allocator_at_error()
    return Event(kind="oom", message=f"out of memory in {where} at step {n}: {first}",
                 components=current_components(meter), time=time.time(), step=n,
                 batch_size=meter.batch_size, requested_bytes=requested, allocated=allocated,
                 reserved=reserved, num_alloc_retries=retries)


def current_components(meter: "StepMeter") -> dict[str, int]:
    """The components so far in the open step (for an OOM event; the carried counts stay: after an OOM in
    backward the gradients are gone until the step is redone, which the steps after it must not report)."""
    kept = meter._static, meter._static_state_len, meter._recount_t
    try:
        parameters, gradients, optimizer = meter.static_components(force=True)
    finally:
        meter._static, meter._static_state_len, meter._recount_t = kept
    acts = meter._last_acts
    if meter.sampled:
        acts = max(meter._acts_max, meter.counter.bytes if meter.counter is not None else 0)
    batch = max(meter._batch_max, meter.batch.bytes if meter.batch is not None else 0)
    comps = accounting.components(parameters, gradients, optimizer, acts, batch)
    cuda = meter._cuda(meter.device, False)
    if cuda is not None:  # a sampled step's peak is reset at each phase: the closed phases' own peaks count
        comps["other"] = max(0, max(cuda.peak, meter.phases.high) - sum(comps.values()))
    return comps
