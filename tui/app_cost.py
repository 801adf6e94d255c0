"""What the running monitor costs the machine, as a part of the App (BatchmonApp derives from CostApp): its
partial screen updates cropped to where lines changed (tui/driver.py: CroppedChopsUpdate), and Python's cyclic
garbage collector settled once the first screen is up.

Why the collector: a full collection walks every tracked object, and the monitor holds many that never die (the
modules, Textual's classes and styles, the widgets) beside the hub's step histories (HISTORY_LIMIT steps per
agent). Beside one job on the 2-core dev box a full collection took ~80 ms of CPU and ran every ~20 s, beside 16
fast agents ~190 ms and more often: a large part of an idle monitor's cost. Once the first screen is drawn the
objects alive then are frozen (gc.freeze: never walked again), and young objects are collected after
GC_THRESHOLD allocations instead of 700, so the older generations (and the full walk) come ten times less often.
The garbage in cycles the monitor makes (Textual's strips and their caches, ~300 objects a second) waits a little
longer; nothing else changes.
"""

from __future__ import annotations

import gc

from textual.app import App

from batchmon.tui.driver import cropped

GC_THRESHOLD = 7000  # allocations between young collections (Python's default: 700)


def settle_gc() -> None:
    """Freeze what is alive now (after a collection: its garbage is not frozen with it) and collect less often.
    Once per process: a second call would freeze the objects of the first screen's refreshes too (harmless)."""
    gc.collect()
    gc.freeze()
    threshold = gc.get_threshold()
    if threshold[0] < GC_THRESHOLD:
        gc.set_threshold(GC_THRESHOLD, *threshold[1:])


class CostApp(App[int]):
    """Cropped partial updates and a settled collector; the rest is Textual's."""

    _gc_settled = False

    def _on_mount(self) -> None:
        # Textual calls the (_)on_mount of every class of the app (BatchmonApp's own too); after the first refresh
        # the screen is built
        self.call_after_refresh(self._settle_gc)

    def _settle_gc(self) -> None:
        if not CostApp._gc_settled and self._settles_gc():
            CostApp._gc_settled = True
            settle_gc()

    def _settles_gc(self) -> bool:
        """Only in a terminal: the tests run many apps headless in one process, and leave its collector alone."""
        return not self.is_headless

    def _display(self, screen: object, renderable: object) -> None:
        """Textual's ``_display`` (an internal: if it goes away, this is never called and the output is Textual's,
        uncropped) with a partial update cropped to where the lines changed."""
        super()._display(screen, cropped(renderable))  # type: ignore[misc, arg-type]
