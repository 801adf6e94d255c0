"""A CPU stand-in for the CUDA allocator's peak statistic: live tensor bytes, tracked at dispatch.

Every tensor an op returns is counted by its storage until the storage is freed (a weakref finalizer), so
``peak`` is the high-water mark of live bytes since ``reset_peak`` - what ``torch.cuda.max_memory_allocated``
reports on a GPU, without the 512-byte rounding. Tensors created outside the mode (parameters) are added
with ``add_existing``. Test helper only (tests/test_memory_model_lstm.py, bench --cpu-smoke).
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveBytes(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _track(self, t: Any) -> None:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key == 0 or key in self.live:
            return
        size = storage.nbytes()
        self.live[key] = size
        self.current += size
        weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.current)

    def _freed(self, key: int) -> None:
        size = self.live.pop(key, None)
        if size is not None:
            self.current -= size

    def add_existing(self, tensors: Iterable[torch.Tensor]) -> None:
        for t in tensors:
            self._track(t)

    def reset_peak(self) -> None:
        self.peak = self.current

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            self._track(t)
        return out
