"""One agent's bounded step history: cheap immutable windows for snapshots, and the memory model's summary.

Two costs of the hub under load (bench/load.py: 64 agents at 10 steps/s, 4 snapshots a second) live here:

- Every snapshot showed every agent's history as a fresh 2000-step tuple, and dropped the previous one: about
  130k reference-count updates per snapshot, on objects spread over 100 MB. A StepWindow is an immutable view
  of a range of an append-only list, made without copying the steps; the list is only ever appended to, and
  replaced by a copy of its live part every COMPACT_EVERY evictions, so no window ever sees its steps change.
- A message may stand for a window of steps (protocol: ``Step.steps``, coalesced by a fast agent; its figures
  are the window's peak step's): the history counts messages, ``steps``/``covered`` count training steps, and
  ``step_rate`` is steps per second from the step numbers and times, right with windows of any size.
- The refit's summary of the history (``model_steps``: the first step, the highest-peak step at each of the
  latest batch sizes, the most recent steps) scanned the whole history. Here each append and each eviction
  updates, per batch size, a sliding-window maximum (monotonic deque), so the summary costs O(summary).

- Memory: a decoded step is ~1.1 KB (its instance dict, a components dict and ~10 int and float objects), and the
  hub keeps HISTORY_LIMIT of them per agent (16 agents: ~35 MB, most of the monitor's RSS beside them). Each step
  appended is stored compactly (``compact_step``), equal field for field to the decoded one. A step whose fields
  other than its step number, time, step time and window's step count (a coalesced agent's) equal those of a
  recently kept step (steady training: the same components, allocator figures, batch size, phases, step after
  step) is a KeptStep: those four numbers in slots, every other field read from the earlier step. Any other step
  is a plain Step whose attributes live in the class's shared-key storage, whose dicts and numbers are the
  objects an earlier step holds when equal. ~1.1 KB -> ~0.35 KB (plain) -> ~0.19 KB (KeptStep, its numbers
  included) a step, tracemalloc, 16 steady peers (bench/monitor_rss.py); every reader (the model's summary,
  views, export, record, replay) gets Steps that answer, compare, encode, copy and print as the decoded ones.

Where in the step the peak was reached (``Step.peak_phase`` / ``phase_peaks``) comes on the agent's sampled steps
only: ``StepHistory.phases()`` keeps the latest one known at the current batch size (an epoch's short last batch
sampled does not stand for the batch the run uses), else the latest at any; an unsampled step never blanks it.
"""

from __future__ import annotations

import dataclasses
import operator
from collections import deque
from collections.abc import Sequence
from itertools import islice
from typing import Any, Iterator, overload

from batchmon.protocol import ADDED_FIELDS, Step
from batchmon.snapshot import StepPhases, phase_peaks

RECENT_STEPS = 32  # model_steps: the last steps kept (the current state)
RECENT_SIZES = 32  # model_steps: the latest batch sizes kept (their highest-peak step each)
COMPACT_EVERY = 64  # evicted steps kept in the buffer before it is copied (bounded extra memory: 64 steps)
TEMPLATES = 4  # recent kept steps whose other fields a later step may share (KeptStep)
SHARED_VALUES = 1024  # distinct field values a history shares between its steps; then it starts again

_set = object.__setattr__
# a kept step's own fields: they differ on (nearly) every step (``steps``: a coalesced window's step count)
_OWN = ("step", "time", "step_seconds", "steps")
_FIELDS = tuple(f.name for f in dataclasses.fields(Step))
_COMPARED = operator.attrgetter(*(f.name for f in dataclasses.fields(Step) if f.compare))


class KeptStep(Step):
    """A Step as the history keeps it: equal to the Step it was made from in every field (and hashing alike),
    answering every attribute as that Step does, at a third of its memory. Its own four numbers live in slots;
    every other field is read (in C, through ``operator.attrgetter``) from ``_shared``, a plain Step that the
    steps with the same other fields share: steady training repeats its components, allocator figures, batch
    size and phases step after step, so a history of 2000 steps holds a handful of them. Frozen as Step is;
    ``dataclasses.replace`` on it gives a plain Step."""

    __slots__ = ("step", "time", "step_seconds", "steps", "_shared")

    def __new__(cls, *args: Any, **kwargs: Any) -> Step:  # type: ignore[misc]
        return Step(*args, **kwargs)  # Step's constructor (dataclasses.replace): a plain Step, not a KeptStep

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Step):  # Step's own __eq__ compares only the same class: equal field for field
            return bool(_COMPARED(self) == _COMPARED(other))
        return NotImplemented

    __hash__ = Step.__hash__

    def __repr__(self) -> str:
        return "Step(" + Step.__repr__(self).partition("(")[2]

    def __reduce__(self) -> tuple[Any, ...]:  # copy, deepcopy, pickle: the plain Step it stands for
        fields = {n: getattr(self, n) for n in _FIELDS if n != "type"}
        for name in ADDED_FIELDS:  # set only where they are (as the decoders and protocol.with_added do)
            if getattr(self, name) is not None:
                fields[name] = getattr(self, name)
        return (plain_step, (fields,))


def plain_step(fields: dict[str, Any]) -> Step:
    """A plain Step with these field values (as protocol.new_step and with_saved_split make one)."""
    out = object.__new__(Step)
    out.__dict__.update(fields)
    return out


for _name in (*_FIELDS, *ADDED_FIELDS):
    if _name not in _OWN and _name != "type":
        setattr(KeptStep, _name, property(operator.attrgetter("_shared." + _name)))


def compact_step(step: Step, shared: dict[Any, Any], templates: list[tuple[tuple, Step]] | None = None) -> Step:
    """``step`` kept smaller, equal to it in every field. When its fields other than its step number, time, step
    time and window's step count equal those of a step kept recently (``templates``: the latest TEMPLATES such
    steps, latest first), a KeptStep: those four in slots, the rest read from that step. Else a plain Step whose
    fields are set one by one (no instance dict of its own: the class's shared-key storage) and whose field values
    are the equal objects ``shared`` already holds (steady training repeats its components and allocator figures); it
    becomes a template. Steps are frozen and nothing changes a step's dicts, so sharing them is safe. Every field
    the step has is kept, whatever fields protocol.Step gains (a step with a field KeptStep does not know is
    kept plain)."""
    fields = step.__dict__ if type(step) is Step else {n: getattr(step, n) for n in _FIELDS if n != "type"}
    if type(step) is not Step:
        for name in ADDED_FIELDS:
            if getattr(step, name) is not None:
                fields[name] = getattr(step, name)
    if templates is not None and fields.keys() <= _KNOWN:
        values = tuple(map(fields.get, _REST))
        for i, (known, template) in enumerate(templates):
            if known == values and all(map(_same_type, known, values)):
                kept = object.__new__(KeptStep)
                _set(kept, "step", step.step)
                _set(kept, "time", step.time)
                _set(kept, "step_seconds", step.step_seconds)
                _set(kept, "steps", step.steps)
                _set(kept, "_shared", template)
                if i:  # the latest used first: steady training finds its template at the first compare
                    templates.insert(0, templates.pop(i))
                return kept
    out = object.__new__(Step)
    for name, value in fields.items():
        if value is not None and name not in _OWN:
            key = tuple(value.items()) if type(value) is dict else value
            try:
                seen = shared.get(key)
            except TypeError:  # a value holding a dict or a list (saved_split's block_seq): kept, not shared
                _set(out, name, value)
                continue
            if seen is None:
                if len(shared) >= SHARED_VALUES:
                    shared.clear()
                shared[key] = value
            elif type(seen) is type(value):  # 1, 1.0 and True are one key: only the same type is shared
                value = seen
        _set(out, name, value)
    if templates is not None and fields.keys() <= _KNOWN:
        templates.insert(0, (_REST_OF(out), out))
        del templates[TEMPLATES:]
    return out


def _same_type(a: Any, b: Any) -> bool:
    return type(a) is type(b)


_REST = tuple(n for n in (*_FIELDS, *ADDED_FIELDS) if n not in _OWN and n != "type")  # KeptStep reads from _shared
_KNOWN = frozenset((*_OWN, *_REST))
_REST_OF = operator.attrgetter(*_REST)  # a step's other fields, as the tuple compact_step compares


def summary_key(steps: Sequence[Step]) -> tuple:
    """What these steps hold apart from each one's own step number, time, step time and window's step count, as a
    tuple of objects: the step a KeptStep reads its other fields from, else the step itself. Equal keys mean steps
    equal field for field but for those four, so what reads only the other fields answers alike for both (the hub's
    refit test, memory_model.fit.fit_figures: ~90 us for a fast agent's summary of ~65 steps, the largest part of
    a snapshot beside 16 such agents, where comparing keys is mostly identity checks)."""
    return tuple(map(_template_of, steps))


def _template_of(step: Step) -> Step:
    return step._shared if type(step) is KeptStep else step  # type: ignore[attr-defined]


def step_peak(step: Step) -> int:
    """What the model ranks a step's memory by: the measured peak, else the sum of the components."""
    return step.peak_allocated if step.peak_allocated is not None else sum(step.components.values())


def model_steps(history: tuple[Step, ...], recent: int = RECENT_STEPS, sizes: int = RECENT_SIZES) -> list[Step]:
    """What the memory model needs from a long history, bounded: the first step (the baseline of cumulative
    counters such as alloc retries), the step with the highest peak at each of the latest `sizes` batch sizes
    (the model keeps one point per batch size, its largest peak), and the last `recent` steps (the current
    state: optimizer, reserved growth). In history order; a short history is returned whole.

    The reference definition, O(history); the hub uses StepHistory.model_steps, which keeps the same answer
    up to date on every append."""
    if len(history) <= 1 + recent + sizes:
        return list(history)
    keep = {0, *range(len(history) - recent, len(history))}
    best: dict[int | None, int] = {}
    for i, step in enumerate(history):
        j = best.pop(step.batch_size, None)  # re-inserted: the most recently seen sizes come last
        best[step.batch_size] = i if j is None or step_peak(step) >= step_peak(history[j]) else j
    keep.update(list(best.values())[-sizes:])
    return [history[i] for i in sorted(keep)]


class StepWindow(Sequence):
    """An immutable sequence of steps, oldest first, that behaves like the tuple it stands for.

    Equal to a tuple (or window) of the same steps, hashes like it, slices to tuples. Its range of the
    underlying list is fixed at creation and the list is only appended to, so its contents never change.
    """

    __slots__ = ("_buf", "_start", "_stop", "_summary")

    def __init__(self, buf: list[Step], start: int, stop: int, summary: list[Step] | None = None) -> None:
        self._buf, self._start, self._stop = buf, start, stop
        self._summary = tuple(summary) if summary is not None else None

    def model_steps(self) -> list[Step]:
        """The memory model's bounded summary of these steps (StepHistory.model_steps when the window was
        made): what the hub fits its prediction on, so the UI's what-ifs fit the same steps without a rescan."""
        if self._summary is not None:
            return list(self._summary)
        return model_steps(tuple(self))  # the reference definition, O(history)

    def __len__(self) -> int:
        return self._stop - self._start

    @overload
    def __getitem__(self, index: int) -> Step: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[Step, ...]: ...

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            start, stop, stride = index.indices(self._stop - self._start)
            if stride == 1:
                return tuple(self._buf[self._start + start: self._start + max(start, stop)])
            return tuple(self._buf[self._start: self._stop][index])
        n = self._stop - self._start
        i = index.__index__()
        if i < 0:
            i += n
        if not 0 <= i < n:
            raise IndexError("StepWindow index out of range")
        return self._buf[self._start + i]

    def __iter__(self) -> Iterator[Step]:
        return map(self._buf.__getitem__, range(self._start, self._stop))

    def __reversed__(self) -> Iterator[Step]:
        return map(self._buf.__getitem__, range(self._stop - 1, self._start - 1, -1))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, StepWindow):
            if other._buf is self._buf and (other._start, other._stop) == (self._start, self._stop):
                return True
            return len(other) == len(self) and tuple(self) == tuple(other)
        if isinstance(other, tuple):
            return len(other) == len(self) and tuple(self) == other
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __add__(self, other: Any) -> tuple[Step, ...]:
        return tuple(self) + tuple(other) if isinstance(other, (tuple, StepWindow)) else NotImplemented

    def __radd__(self, other: Any) -> tuple[Step, ...]:
        return tuple(other) + tuple(self) if isinstance(other, tuple) else NotImplemented

    def __repr__(self) -> str:
        return repr(tuple(self))


class StepHistory:
    """The last ``limit`` steps, oldest first, plus what ``model_steps`` needs. Only ``append`` changes it."""

    __slots__ = ("limit", "_buf", "_start", "_first", "_sizes", "_order", "_window", "appended", "covered", "steps",
                 "_phases", "_shared", "_templates")

    def __init__(self, limit: int) -> None:
        self.limit = max(1, int(limit))
        self._buf: list[Step] = []  # append-only; the history is _buf[_start:]
        self._start = 0
        self._first = 0  # global index (steps ever appended before it) of the oldest step kept
        # batch size -> deque of (global index, peak), peaks strictly decreasing: the front is the window's
        # highest peak at that size, the latest such step on ties (as model_steps picks it)
        self._sizes: dict[int | None, deque[tuple[int, int]]] = {}
        self._order: dict[int | None, None] = {}  # batch sizes in order of their latest step, latest last
        self._window: StepWindow | None = None
        self.appended = 0  # messages ever appended: changes exactly when the history does
        self.covered = 0  # training steps those messages stood for (a coalesced window counts its steps)
        self.steps = 0  # training steps the kept messages stand for
        # batch size -> its latest sampled step's phases (kept past the step's eviction), latest size last
        self._phases: dict[int | None, StepPhases] = {}
        self._shared: dict[Any, Any] = {}  # compact_step's shared field values
        self._templates: list[tuple[tuple, Step]] = []  # compact_step's steps that KeptSteps share

    def __len__(self) -> int:
        return len(self._buf) - self._start

    def __iter__(self) -> Iterator[Step]:
        return map(self._buf.__getitem__, range(self._start, len(self._buf)))

    @property
    def last(self) -> Step | None:
        return self._buf[-1] if len(self._buf) > self._start else None

    def append(self, step: Step) -> Step:
        """Keep ``step`` (stored compactly: ``compact_step``); returns the Step kept, equal to ``step``."""
        index = self._first + len(self)
        step = compact_step(step, self._shared, self._templates)
        self._buf.append(step)
        self.appended += 1
        self.covered += step.steps
        self.steps += step.steps
        self._window = None
        if step.peak_phase is not None or step.phase_peaks:  # a sampled step; the others cost only this test
            self._phases.pop(step.batch_size, None)
            self._phases[step.batch_size] = StepPhases(step.step, step.time, step.batch_size, step.peak_phase,
                                                       phase_peaks(step))
            if len(self._phases) > RECENT_SIZES:
                del self._phases[next(iter(self._phases))]
        peak = step_peak(step)
        best = self._sizes.get(step.batch_size)
        if best is None:
            best = self._sizes[step.batch_size] = deque()
        while best and best[-1][1] <= peak:
            best.pop()
        best.append((index, peak))
        self._order.pop(step.batch_size, None)
        self._order[step.batch_size] = None
        if len(self) > self.limit:
            self._evict()
        return step

    def _evict(self) -> None:
        old = self._buf[self._start]
        self.steps -= old.steps
        best = self._sizes[old.batch_size]
        if best and best[0][0] == self._first:
            best.popleft()
        if not best:  # the size's latest step is always in its deque: empty means no step of it is left
            del self._sizes[old.batch_size]
            del self._order[old.batch_size]
        self._first += 1
        self._start += 1
        if self._start >= COMPACT_EVERY:
            # a new list: windows on the old one keep seeing exactly their steps
            self._buf = self._buf[self._start:]
            self._start = 0

    def phases(self) -> StepPhases | None:
        """Where the peak was reached in the latest sampled step at the last step's batch size, else in the latest
        sampled step; None before any step was sampled."""
        last = self.last
        if last is not None and last.batch_size in self._phases:
            return self._phases[last.batch_size]
        return next(reversed(self._phases.values()), None)

    def window(self) -> StepWindow:
        """The steps now, as an immutable sequence carrying their model summary (O(summary), not O(history);
        the same object until the next append)."""
        if self._window is None:
            self._window = StepWindow(self._buf, self._start, len(self._buf), self.model_steps())
        return self._window

    def step_rate(self) -> float | None:
        """Training steps per second over the kept history (None with fewer than two messages or no time
        between them): from the step numbers, so a message that stands for 50 steps counts as 50."""
        n = len(self)
        if n < 2:
            return None
        first, last = self._buf[self._start], self._buf[-1]
        seconds = last.time - first.time
        return (last.step - first.step) / seconds if seconds > 0 and last.step > first.step else None

    def batch_sizes(self) -> frozenset:
        return frozenset(self._order)

    def model_steps(self, recent: int = RECENT_STEPS, sizes: int = RECENT_SIZES) -> list[Step]:
        """Exactly ``model_steps(tuple(self), recent, sizes)``, in O(recent + batch sizes)."""
        n = len(self)
        if n <= 1 + recent + sizes:
            return self._buf[self._start:]
        first = self._first
        keep = {first, *range(first + n - recent, first + n)}
        latest = list(islice(reversed(self._order), sizes))
        keep.update(self._sizes[size][0][0] for size in latest)
        offset = self._start - first
        return [self._buf[i + offset] for i in sorted(keep)]
