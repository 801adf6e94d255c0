"""Where in a sampled step the allocator's peak was reached, and each phase's own peak (issue 16 point 4, 13).

The peak of a step is what decides whether a batch fits, and knowing its phase says which change helps: a
forward/backward peak is activations (checkpointing, a smaller micro-batch), an optimizer peak is the optimizer's
temporaries and state (a foreach/fused optimizer's scratch, an 8-bit or sharded optimizer). torch keeps one
running peak; reading it at the phase boundaries of a step, and resetting it after each reading, gives the peak
*within* each segment of the step - its own peak:

- the sampled step starts with the allocator's peak reset (so the first segment's reading is this step's alone);
- the peak is read and reset when backward starts (forward and loss done: the ``forward`` phase), when backward
  ends (``backward``) and read at the step's end (``optimizer``: the optimizer's step and anything after the
  last backward). With gradient accumulation every forward and backward is a segment of its own.

Why own peaks (issue 13, the LSTM language model): a phase that peaks below another at the observed batch sizes
but grows faster per sample takes the step's peak at large batches. Running-peak readings (cumulative) hide it:
the backward of the LSTM read the forward's higher peak at batch 10 and 20, so the fit could not see that the
loss's backward grows faster. With each phase's own peak the memory model fits every phase as its own line.

From the segments' own peaks: ``own`` (each phase's largest own peak), ``peak`` (the step's peak: the largest
of all segments - after the resets the allocator's running peak at the step's end is only the last segment's),
``peaks`` (the running peak at the end of the last segment of each phase, forward <= backward <= optimizer:
what the monitor shows, as before) and ``phase`` (the phase of the segment with the step's peak, the first one
on a tie: where the running peak last rose).

The agent's resets go through torch_patches.agent_reset, so the script's own ``max_memory_allocated()`` still
sees the whole step's peak. Cost: one allocator read (a nested dict torch builds, ~20 us) and one peak reset
(a counter store) per boundary, on sampled steps only (at most every 0.25 s with the defaults): nothing on the
others. Off CUDA there is no allocator peak and nothing is read.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

from batchmon.protocol import PHASES


class PhaseReading(NamedTuple):
    """What a followed step's segments say (every field None when the step was not followed)."""

    phase: str | None  # where the step's peak was reached
    peaks: dict[str, int] | None  # cumulative: the running peak by the end of each phase
    own: dict[str, int] | None  # each phase's own peak
    peak: int | None  # the step's peak (the largest segment's)


NOT_FOLLOWED = PhaseReading(None, None, None, None)


class PhaseTracker:
    """Own peaks of the segments of one sampled step (training thread).

    ``read_and_reset()`` returns the allocator's peak in bytes since its last reset and starts a new one (None if
    unknown): each call closes one segment."""

    __slots__ = ("_read", "_marks", "active")

    def __init__(self, read_and_reset: Callable[[], int | None]) -> None:
        self._read = read_and_reset
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
        """The phase ``phase`` just ended: read its segment's own peak and start the next segment's."""
        if not self.active:
            return
        value = self._read()
        if value is not None:
            self._marks.append((phase, value))

    @property
    def high(self) -> int:
        """The largest own peak of the segments closed so far in the followed step (0: none): what a reading of
        the allocator's running peak mid-step (an OOM event's) misses since the resets."""
        return max((v for _, v in self._marks), default=0) if self.active else 0

    def finish(self, last_peak: int | None) -> PhaseReading:
        """The step ended; ``last_peak`` is the allocator's peak since the last mark (the last segment's own peak,
        read at the step's end). NOT_FOLLOWED when the step was not followed (not sampled, off CUDA, no
        reading at a boundary)."""
        marks, active = self._marks, self.active
        self.stop()
        if not active or last_peak is None or not marks:
            return NOT_FOLLOWED
        return phases_of([*marks, ("optimizer", last_peak)])


def phases_of(segments: list[tuple[str, int]]) -> PhaseReading:
    """The reading from each segment's own peak, in order (names outside PHASES are skipped)."""
    phase: str | None = None
    high = -1
    peaks: dict[str, int] = {}
    own: dict[str, int] = {}
    for name, value in segments:
        if name not in PHASES:
            continue
        if value > high:
            phase, high = name, value
        own[name] = max(value, own.get(name, 0))
        peaks[name] = high
    if not own:
        return NOT_FOLLOWED
    return PhaseReading(phase, peaks, own, high)
