"""Record the allocations and frees of one real training step on the CPU, as the sequence a CUDA caching allocator
would be asked for (``batchmon.memory_model.step_trace.StepTrace``): every aten op's new output storage is an
allocation (a ``TorchDispatchMode`` sees the ops below autograd, forward, backward and optimizer alike), its
storage's finalizer the free. Kernel-internal scratch is not seen (it is the device's own: a CUDA kernel has
other scratch than a CPU one); what the ops return is device-independent for fp32 models like these.

Recorded at two batch sizes, each event's size is a line in the batch (checked at a third): the step at any
batch, without running it. Used by bench/ckpt_fragmentation.py to check the allocator model against the H200.
"""

from __future__ import annotations

import gc
import weakref
from typing import Any, Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from batchmon.memory_model.step_trace import FREE, StepTrace


class AllocRecorder(TorchDispatchMode):
    """(key, bytes) for each new storage an op returns, (key, FREE) when it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[int, int]] = []
        self._live: dict[int, int] = {}  # id(storage) -> key, while alive
        self._next = 0
        self.on = True

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.on:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                    self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        if id(st) in self._live or st.nbytes() == 0:
            return
        key = self._next
        self._next += 1
        self._live[id(st)] = key
        self.events.append((key, st.nbytes()))
        weakref.finalize(st, self._freed, id(st), key)

    def _freed(self, sid: int, key: int) -> None:
        if self._live.get(sid) == key:
            del self._live[sid]
            if self.on:
                self.events.append((key, FREE))


def record(step: Callable[[int], None], batch: int) -> list[tuple[int, int]]:
    """The (key, bytes | FREE) events of ``step(batch)``."""
    gc.collect()
    rec = AllocRecorder()
    with rec:
        step(batch)
        gc.collect()
    rec.on = False
    return rec.events


def scaled(persistent: list[int], runs: dict[int, list[tuple[int, int]]]) -> StepTrace:
    """A StepTrace from the same step recorded at two or more batch sizes: each event's bytes as fixed +
    per_sample x batch from the first two, checked exactly on any further one (ValueError where the sequence
    or a size differs: the step does not scale linearly)."""
    (b1, e1), (b2, e2), *rest = sorted(runs.items())
    if len(e1) != len(e2):
        raise ValueError(f"the step's sequence differs between batch {b1} and {b2} ({len(e1)} vs {len(e2)} events)")
    events: list[tuple[int, float, float]] = []
    for (k1, s1), (k2, s2) in zip(e1, e2, strict=True):
        if k1 != k2 or (s1 == FREE) != (s2 == FREE):
            raise ValueError(f"the step's sequence differs between batch {b1} and {b2} at key {k1}")
        if s1 == FREE:
            events.append((k1, FREE, 0.0))
            continue
        per = (s2 - s1) / (b2 - b1)
        events.append((k1, s1 - per * b1, per))
    trace = StepTrace(tuple(persistent), tuple(events))
    for b, e in rest:
        if [(k, s) for k, s in trace.sizes(b)] != [(k, s if s == FREE else s) for k, s in e]:
            raise ValueError(f"the step at batch {b} is not the line through {b1} and {b2}")
    return trace
