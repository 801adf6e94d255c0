"""Where in a sampled step the allocator's peak was reached: forward, backward or optimizer (issue 16 point 4).

The peak of a step is what decides whether a batch fits, and knowing its phase says which change helps: a
forward/backward peak is activations (checkpointing, a smaller micro-batch), an optimizer peak is the optimizer's
temporaries and state (a foreach/fused optimizer's scratch, an 8-bit or sharded optimizer). torch keeps one
running peak; reading it at the phase boundaries of a step gives the peak *by the end of* each phase:

- the sampled step starts with the allocator's peak reset (so the readings are this step's alone);
- the peak is read when backward starts (forward and loss done: the ``forward`` phase), when backward ends
  (``backward``) and at the step's end (``optimizer``: the optimizer's step and anything after the last
  backward). With gradient accumulation every forward and backward is a segment of its own.

The phase of the step's peak is the phase of the segment in which the running peak last rose. ``phase_peaks``
holds the running peak at the end of the last segment of each phase, so forward <= backward <= optimizer.

Cost: one allocator read (a nested dict torch builds, ~20 us) per boundary, on sampled steps only (at most
every 0.25 s with the defaults): nothing on the others. Off CUDA there is no allocator peak and nothing is read.
"""

from __future__ import annotations

from typing import Callable

from batchmon.protocol import PHASES


class PhaseTracker:
    """Readings of the running allocator peak at the phase boundaries of one sampled step (training thread).

    ``read_peak()`` returns the allocator's running peak in bytes (None if unknown)."""

    __slots__ = ("_read", "_marks", "active")

    def __init__(self, read_peak: Callable[[], int | None]) -> None:
        self._read = read_peak
        self._marks: list[tuple[str, int]] = []
        self.active = False

    def start(self) -> None:
        """A sampled step begins (its allocator peak was just reset)."""
        self._marks = []
        self.active = True

    def stop(self) -> None:
        self._marks = []
        self.active = False

    def mark(self, phase: str) -> None:
        """The phase ``phase`` just ended: read the running peak."""
        if not self.active:
            return
        value = self._read()
        if value is not None:
            self._marks.append((phase, value))

    def finish(self, final_peak: int | None) -> tuple[str | None, dict[str, int] | None]:
        """The step ended with ``final_peak`` (the allocator's running peak): (peak_phase, phase_peaks), or
        (None, None) when the step was not followed (not sampled, off CUDA, no reading)."""
        marks, active = self._marks, self.active
        self.stop()
        if not active or final_peak is None or not marks:
            return None, None
        return phase_of_peak([*marks, ("optimizer", final_peak)])


def phase_of_peak(segments: list[tuple[str, int]]) -> tuple[str | None, dict[str, int] | None]:
    """(phase, peaks) from the running peak read at the end of each segment, in order.

    The phase is that of the segment in which the running peak last rose (the first segment holds whatever the
    step started with); peaks maps each phase to the running peak at the end of its last segment."""
    phase: str | None = None
    high = -1
    peaks: dict[str, int] = {}
    for name, value in segments:
        if name not in PHASES:
            continue
        if value > high:
            phase, high = name, value
        peaks[name] = max(value, max(peaks.values(), default=0))
    return phase, (peaks or None)
