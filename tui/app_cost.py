"""What the running monitor costs the machine, as a part of the App (BatchmonApp derives from CostApp): its
partial screen updates cropped to where lines changed (tui/driver.py: CroppedChopsUpdate) and rendered only on the
lines that changed (rows_partial_update), and Python's cyclic garbage collector settled once the first screen is up.

Why only the changed lines: Textual's partial update renders every widget that overlaps the bounding box of the
changed regions, each over its whole visible area (its cached lines, each through the line filters again), and
then keeps the changed lines only. Beside 16 jobs the clock (row 1) and the step counters (down to row 45) make
that box the whole screen: ~19 widgets, ~700 lines a second, for ~12 changed lines; that was ~40% of the main
thread. Here each widget renders just the rows of it that a changed region touches, front to back as Textual does.

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
import types
from typing import Any

from textual.app import App
from textual.geometry import Region

from batchmon.tui.driver import ChopsUpdate, cropped

GC_THRESHOLD = 7000  # allocations between young collections (Python's default: 700)


def settle_gc() -> None:
    """Freeze what is alive now (after a collection: its garbage is not frozen with it) and collect less often.
    Once per process: a second call would freeze the objects of the first screen's refreshes too (harmless)."""
    gc.collect()
    gc.freeze()
    threshold = gc.get_threshold()
    if threshold[0] < GC_THRESHOLD:
        gc.set_threshold(GC_THRESHOLD, *threshold[1:])


def rows_partial_update(compositor: Any) -> Any:
    """Textual's ``Compositor.render_partial_update`` (the same ChopsUpdate for the same changed regions), with
    each widget rendered only on the rows where a changed region overlaps it, not over its whole visible area."""
    update_regions = compositor._dirty_regions.copy()
    compositor._dirty_regions.clear()
    if not update_regions:
        return None
    spans = list(compositor._regions_to_spans(update_regions))
    on_row: dict[int, list[tuple[int, int]]] = {}
    for y, x1, x2 in spans:
        on_row.setdefault(y, []).append((x1, x2))
    rows = sorted(on_row)
    cuts = compositor.cuts
    # chops and chop ends only for the rows with a changed span: the update (and the driver) reads no other row,
    # and making them for all 48 rows each refresh was ~2% of the main thread beside 16 fast jobs
    chops: list[dict[int, Any]] = [_NO_CHOPS] * len(cuts)
    chop_ends: list[Any] = [()] * len(cuts)
    for y in rows:
        chops[y] = dict.fromkeys(cuts[y][:-1])
        chop_ends[y] = cuts[y][1:]
    intersection = Region.intersection
    for widget, (region, clip) in compositor.visible_widgets.items():  # front to back
        vx, vy, vw, vh = intersection(region, clip)
        if not vw or not vh:
            continue
        vx2 = vx + vw
        wanted = [y for y in rows if vy <= y < vy + vh and _uncovered(chops[y], cuts[y], vx, vx2, on_row[y])]
        start = 0
        while start < len(wanted):  # contiguous runs of wanted rows: one render each
            end = start + 1
            while end < len(wanted) and wanted[end] == wanted[end - 1] + 1:
                end += 1
            y0, height = wanted[start], end - start
            strips = widget.render_lines(Region(vx - region.x, y0 - region.y, vw, height))
            for y, strip in zip(range(y0, y0 + height), strips):
                chops_line = chops[y]
                final_cuts = [cut for cut in cuts[y] if vx2 >= cut >= vx]
                for cut, piece in zip(final_cuts, strip.divide([cut - vx for cut in final_cuts[1:]])):
                    if chops_line.get(cut) is None:  # painted front to back: the first one wins
                        chops_line[cut] = piece
            start = end
    return ChopsUpdate(chops, spans, chop_ends)


_NO_CHOPS: dict[int, Any] = {}  # a row without a changed span: never read, never written


def _uncovered(chops_line: dict[int, Any], row_cuts: list[int], x0: int, x1: int,
               spans: list[tuple[int, int]]) -> bool:
    """Whether a widget over columns [x0, x1) of a row would paint a piece of a changed span that no widget in
    front of it painted: a chop [cut, next cut) in its columns, overlapping a span, still empty. The screen and
    the columns behind the panels are mostly covered: they are not rendered for nothing."""
    for i in range(len(row_cuts) - 1):
        cut, end = row_cuts[i], row_cuts[i + 1]
        if cut >= x1:
            break
        if cut >= x0 and chops_line.get(cut) is None and any(a < end and b > cut for a, b in spans):
            return True
    return False


def use_rows_partial_update(compositor: Any) -> bool:
    """Make ``compositor`` (a screen's) render partial updates by rows; False where Textual's internals it reads
    are not there (its own update is kept)."""
    needed = ("_dirty_regions", "_regions_to_spans", "cuts", "visible_widgets", "render_partial_update")
    if ChopsUpdate is None or not all(hasattr(compositor, name) for name in needed):
        return False
    compositor.render_partial_update = types.MethodType(lambda self: rows_partial_update(self), compositor)
    return True


class CostApp(App[int]):
    """Cropped partial updates rendered by rows and a settled collector; the rest is Textual's."""

    _gc_settled = False

    def _on_mount(self) -> None:
        # Textual calls the (_)on_mount of every class of the app (BatchmonApp's own too); after the first refresh
        # the screen is built
        use_rows_partial_update(getattr(self.screen, "_compositor", None))
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
