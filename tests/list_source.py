"""ListSource: plays a fixed list of Snapshots with the same interface as the hub and the replay source.

Used by tests, the screenshot script and the tmux check, where a deterministic input matters more than a
live one. It is a real source: its own thread, the same start/stop/snapshot/set_interval calls.
"""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from batchmon.monitor.threads import join_started, start_daemon
from batchmon.snapshot import Snapshot


class ListSource:
    """Delivers ``snapshots`` one per interval, then keeps the last one (loop=True starts over)."""

    def __init__(self, snapshots: Sequence[Snapshot], *, interval: float = 1.0, loop: bool = False,
                 on_snapshot: Callable[[Snapshot], None] | None = None) -> None:
        if not snapshots:
            raise ValueError("ListSource needs at least one snapshot")
        self.snapshots = list(snapshots)
        self.interval = interval
        self.loop = loop
        self.on_snapshot = on_snapshot
        self._index = 0
        self._current: Snapshot | None = None
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = start_daemon(self._run, "batchmon-list-source")

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        join_started(self._thread, 2)

    def snapshot(self) -> Snapshot | None:
        return self._current

    def set_interval(self, seconds: float) -> None:
        self.interval = float(seconds)
        self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._index < len(self.snapshots):
                self._current = self.snapshots[self._index]
                self._index += 1
                if self.loop and self._index >= len(self.snapshots):
                    self._index = 0
                cb = self.on_snapshot
                if cb is not None:
                    cb(self._current)
            self._wake.wait(self.interval)
            self._wake.clear()
