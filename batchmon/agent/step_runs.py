"""Quiet steps as runs, not Step objects (issue 14 point 1): what a quiet step records, and the views made of it.

A quiet step (batchmon.agent.quiet_steps) reports exactly what the last Step reported - its counts, activations,
batch, allocator figures: the template - with its own number and times. Building a Step for each (a new object,
its fields, a components dict, two deque appends, and the socket thread's coalescing of it) was the largest part of
a quiet step's end. So a stretch of quiet steps is one ``QuietRun``: the template, the number of its first step,
and each step's end (``perf_counter``) in an ``array('d')`` - the only thing a quiet step's end writes
(``StepMeter.finish_quiet``). Everything else is made from it when asked:

- ``handle.steps`` / ``last_step`` (``StepHistory``): each quiet step as its own Step, equal field for field to what
  ``StepMeter.finish_carried`` made for it before (``time`` is the step's end on the run's clock: ``perf_counter``
  plus ``time.time() - perf_counter()`` read once when the run began);
- the socket thread (batchmon.agent.transport): a run is put on its queue once, when it begins; at each poll the
  thread takes the steps added since its last look as one message of ``steps`` = their number (``window``), which
  the coalescer folds like any window (batchmon.agent.coalesce): the same peak, batch size and step count a window
  of the Steps would have given, the mean step time from the first and last end.

A run ends when any Step is published (a sampled step, a changed input, an event's step, a full run): the next
quiet steps begin a new run. Only the training thread appends to a run's ``ends``; other threads read its length
and the values below it (an array append is atomic under the GIL; a run's ``ends`` never shrink).
"""

from __future__ import annotations

import time
from array import array
from collections import deque
from typing import Any, Union

from batchmon.protocol import Step

RUN_MAX = 2000  # steps in one run (then a Step is published and a new run begins): bounds a run's array
_new_object = object.__new__


class QuietRun:
    """Consecutive quiet steps: ``template`` repeated from step ``first`` on, each with its own end time."""

    __slots__ = ("template", "first", "start", "offset", "ends")

    def __init__(self, template: Step, first: int, start: float) -> None:
        self.template = template
        self.first = first  # the number of the run's first step
        self.start = start  # perf_counter at the end of the step before the run (the first step's start)
        self.offset = time.time() - time.perf_counter()  # perf_counter -> unix time, for the steps' ``time``
        self.ends: array[float] = array("d")  # perf_counter at each quiet step's end (StepMeter.finish_quiet)

    def __len__(self) -> int:
        return len(self.ends)

    def _made(self, index: int, seconds: float, **more: Any) -> Step:
        step = _new_object(Step)  # as finish_carried made it: the template's fields, its own number and times
        template = self.template
        step.__dict__.update(template.__dict__, step=self.first + index, time=self.offset + self.ends[index],
                             step_seconds=seconds, components=template.components.copy(), **more)
        return step

    def steps(self, lo: int, hi: int) -> list[Step]:
        """Steps ``lo`` .. ``hi - 1`` of the run, each its own Step."""
        ends = self.ends
        return [self._made(i, ends[i] - (ends[i - 1] if i > 0 else self.start)) for i in range(lo, hi)]

    def window(self, lo: int, hi: int) -> Step:
        """Steps ``lo`` .. ``hi - 1`` as one message standing for ``hi - lo`` steps (their mean step time), as the
        coalescer would have folded them (they share every figure but the times)."""
        ends = self.ends
        before = ends[lo - 1] if lo > 0 else self.start
        return self._made(hi - 1, (ends[hi - 1] - before) / (hi - lo), steps=hi - lo)


Item = Union[Step, QuietRun]


class StepHistory:
    """``handle.steps``: the last ``limit`` steps, oldest first, held as Steps and quiet runs. Appended to on the
    training thread; read from any thread."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._items: deque[Item] = deque()
        self._closed = 0  # steps held by every item but a run at the end (which may still grow)

    def append(self, item: Item) -> None:
        items = self._items
        if items and type(items[-1]) is QuietRun:  # it ended: its length is final
            if len(items[-1]):
                self._closed += len(items[-1])
            else:
                items.pop()  # a run no quiet step joined
        items.append(item)
        if type(item) is not QuietRun:
            self._closed += 1
        while len(items) > 1 and self._closed - _size(items[0]) >= self.limit:
            self._closed -= _size(items.popleft())

    def _snapshot(self) -> list[Item]:
        for _ in range(100):
            try:
                return list(self._items)
            except RuntimeError:  # mutated during iteration (another thread appended)
                continue
        return []

    def steps(self) -> list[Step]:
        """The last ``limit`` steps as Step values, oldest first."""
        out: list[Step] = []
        need = self.limit
        for item in reversed(self._snapshot()):
            if type(item) is QuietRun:
                hi = len(item)
                lo = max(0, hi - need)
                out.extend(reversed(item.steps(lo, hi)))
                need -= hi - lo
            else:
                out.append(item)  # type: ignore[arg-type]  # (a Step)
                need -= 1
            if need <= 0:
                break
        out.reverse()
        return out

    def last(self) -> Step | None:
        for item in reversed(self._snapshot()):
            if type(item) is not QuietRun:
                return item  # type: ignore[return-value]  # (a Step)
            n = len(item)
            if n:
                return item.steps(n - 1, n)[0]
        return None


def _size(item: Item) -> int:
    return len(item) if type(item) is QuietRun else 1
