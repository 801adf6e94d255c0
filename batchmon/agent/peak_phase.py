"""Where in a sampled step the allocator's peak was reached, and each phase's own peak (issue 16 point 4, 13).

The peak of a step is what decides whether a batch fits, and knowing its phase says which change helps: a
forward/backward peak is activations (checkpointing, a smaller micro-batch), an optimizer peak is the optimizer's
temporaries and state (a foreach/fused optimizer's scratch, an 8-bit or sharded optimizer). torch keeps one
running peak; reading it at the phase boundaries of a step, and resetting it after each reading, gives the peak
*within* each segment of the step - its own peak:

- the sampled step starts with the allocator's peak reset (so the first segment's reading is this step's alone);
- the peak is read and reset when backward starts (forward and loss done: the ``forward`` phase), when the
  gradient of the model's output arrives (``loss_backward``: the loss's backward, see below), when backward
  ends (``backward``) and read at the step's end (``optimizer``: the optimizer's step and anything after the
  last backward). With gradient accumulation every forward and backward is a segment of its own.

Why own peaks (issue 13, the LSTM language model): a phase that peaks below another at the observed batch sizes
but grows faster per sample takes the step's peak at large batches. Running-peak readings (cumulative) hide it:
the backward of the LSTM read the forward's higher peak at batch 10 and 20, so the fit could not see that the
loss's backward grows faster. With each phase's own peak the memory model fits every phase as its own line.

The backward in two (issue 13, measured on the H200 with bench/lstm_segments.py): the LSTM's backward peaked in the
model's backward at batch 10 (where the embedding's gradient is made: batch-independent bytes) and in the loss's
backward from 20 on (the logits' gradient and softmax temporaries, ~19 MiB a sample); one own peak for the whole
backward mixed the two and its line, 14.4 MiB/sample, was 22% low at batch 361. So on a followed step the root
forward's output gets a gradient hook (``follow_output``, called from the root's forward post hook): its gradient
arriving closes the ``loss_backward`` segment, the rest of the backward stays ``backward``. The phase figures are
unchanged in meaning (a segment counts for its phase, PHASE_OF); ``segments`` (Step.segment_peaks) has each
segment's own peak, set only when a backward was split. An output that never gets a gradient changes nothing. The
hook is a tensor hook registered eagerly on the output (a compiled module's too: outside the compiled graph, no
recompile), holds the tracker and not the tensor, and is removed at the step's end.

From the segments' own peaks: ``own`` (each phase's largest own peak), ``peak`` (the step's peak: the largest
of all segments - after the resets the allocator's running peak at the step's end is only the last segment's),
``peaks`` (the running peak at the end of the last segment of each phase, forward <= backward <= optimizer:
what the monitor shows, as before) and ``phase`` (the phase of the segment with the step's peak, the first one
on a tie: where the running peak last rose).

The agent's resets go through torch_patches.agent_reset, so the script's own ``max_memory_allocated()`` still sees
the whole step's peak. Cost: one allocator read (a nested dict torch builds, ~20 us) and one peak reset (a counter
store) per boundary (three per backward with the split, plus one hook registration per forward), on sampled steps
only (at most every 0.25 s with the defaults): nothing on the others. Off CUDA there is no allocator peak and
nothing is read.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple

import torch

from batchmon.protocol import SEGMENTS

#: the phase each segment belongs to (the loss's backward is part of the backward)
PHASE_OF: dict[str, str] = {"forward": "forward", "loss_backward": "backward", "backward": "backward",
                            "optimizer": "optimizer"}
#: output-gradient hooks one followed step registers at most (one per forward: gradient accumulation); a loop
#: of more forwards in one step splits its first MAX_FOLLOWED backwards only
MAX_FOLLOWED = 256


class PhaseReading(NamedTuple):
    """What a followed step's segments say (every field None when the step was not followed)."""

    phase: str | None  # where the step's peak was reached
    peaks: dict[str, int] | None  # cumulative: the running peak by the end of each phase
    own: dict[str, int] | None  # each phase's own peak
    peak: int | None  # the step's peak (the largest segment's)
    segments: dict[str, int] | None = None  # each segment's own peak (SEGMENTS), when a backward was split


NOT_FOLLOWED = PhaseReading(None, None, None, None)


def output_tensor(result: Any) -> torch.Tensor | None:
    """The tensor of a root forward's result whose gradient ends the loss's backward: the result itself; a
    tuple's/list's first tensor; a dict's (an HF ModelOutput's) ``logits``, else its first tensor value. None
    when there is none."""
    if isinstance(result, torch.Tensor):
        return result
    if isinstance(result, dict):
        logits = result.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        values: Iterable[Any] = result.values()
    elif isinstance(result, (tuple, list)):
        values = result
    else:
        return None
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


class PhaseTracker:
    """Own peaks of the segments of one sampled step (training thread; the output-gradient hook runs on the
    autograd engine's thread while the training thread waits in backward).

    ``read_and_reset()`` returns the allocator's peak in bytes since its last reset and starts a new one (None if
    unknown): each call closes one segment."""

    __slots__ = ("_read", "_marks", "_handles", "active")

    def __init__(self, read_and_reset: Callable[[], int | None]) -> None:
        self._read = read_and_reset
        self._marks: list[tuple[str, int]] = []
        self._handles: list[Any] = []  # the followed step's output-gradient hooks (RemovableHandle)
        self.active = False

    def start(self) -> None:
        """A sampled step begins (its allocator peak was just reset)."""
        self._drop_hooks()
        self._marks = []
        self.active = True

    def stop(self) -> None:
        self._drop_hooks()
        self._marks = []
        self.active = False

    def mark(self, phase: str) -> None:
        """The segment ``phase`` (a name in SEGMENTS) just ended: read its own peak and start the next one's."""
        if not self.active:
            return
        value = self._read()
        if value is not None:
            self._marks.append((phase, value))

    def follow_output(self, result: Any) -> None:
        """A root forward of the followed step returned ``result``: when its output tensor (``output_tensor``)
        requires grad, the backward that reaches it is split where its gradient arrives - the loss's backward
        (``loss_backward``: the logits' gradient, softmax temporaries) apart from the model's. The hook holds the
        tracker, never the tensor; its handle is dropped at the step's end. Never raises."""
        if not self.active or len(self._handles) >= MAX_FOLLOWED:
            return
        try:
            tensor = output_tensor(result)
            if tensor is not None and tensor.requires_grad:
                self._handles.append(tensor.register_hook(self._output_grad))
        except Exception:  # noqa: BLE001 - a tensor subclass refusing hooks costs the split, never the training
            return

    @torch.utils.hooks.unserializable_hook  # torch.save of the output mid-step: no warning about this hook
    def _output_grad(self, grad: Any) -> None:
        """The model output's gradient arrived: close the loss's backward. Only inside a backward whose start was
        marked and not yet split (an output reached twice in one backward, or through autograd.grad outside a
        marked backward, splits nothing). Returns None: the gradient is left as it is."""
        try:
            marks = self._marks
            if self.active and marks and marks[-1][0] == "forward":
                self.mark("loss_backward")
        except Exception:  # noqa: BLE001 - never raise into the backward
            pass

    def _drop_hooks(self) -> None:
        handles, self._handles = self._handles, []
        for handle in handles:
            try:
                handle.remove()
            except Exception:  # noqa: BLE001
                pass

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
    """The reading from each segment's own peak, in order (names outside SEGMENTS are skipped). A segment counts
    for its phase (PHASE_OF: the loss's backward for the backward), so the phase figures mean what they meant
    before the split; ``segments`` (each segment's own peak) only when a backward was split."""
    phase: str | None = None
    high = -1
    peaks: dict[str, int] = {}
    own: dict[str, int] = {}
    by_segment: dict[str, int] = {}
    for name, value in segments:
        of = PHASE_OF.get(name)
        if of is None:
            continue
        if value > high:
            phase, high = of, value
        own[of] = max(value, own.get(of, 0))
        peaks[of] = high
        by_segment[name] = max(value, by_segment.get(name, 0))
    if not own:
        return NOT_FOLLOWED
    split = {name: by_segment[name] for name in SEGMENTS if name in by_segment} \
        if "loss_backward" in by_segment else None
    return PhaseReading(phase, peaks, own, high, split)
