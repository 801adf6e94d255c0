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
    owners = _chop_owners(compositor)
    wanted: dict[int, list[int]] = {}  # widget's place front to back -> its rows to render
    for y in rows:
        chops[y] = dict.fromkeys(cuts[y][:-1])
        chop_ends[y] = cuts[y][1:]
        row_spans = on_row[y]
        for cut, end, owner in owners[y]:
            if owner >= 0 and any(a < end and b > cut for a, b in row_spans):
                found = wanted.setdefault(owner, [])
                if not found or found[-1] != y:
                    found.append(y)
    layout = owners.layout
    for index in sorted(wanted):  # front to back
        widget, vx, vx2, region = layout[index]
        rows_of = wanted[index]
        start = 0
        while start < len(rows_of):  # contiguous runs of wanted rows: one render each
            end = start + 1
            while end < len(rows_of) and rows_of[end] == rows_of[end - 1] + 1:
                end += 1
            y0, height = rows_of[start], end - start
            strips = widget.render_lines(Region(vx - region.x, y0 - region.y, vx2 - vx, height))
            for y, strip in zip(range(y0, y0 + height), strips):
                chops_line = chops[y]
                final_cuts = [cut for cut in cuts[y] if vx2 >= cut >= vx]
                for cut, piece in zip(final_cuts, strip.divide([cut - vx for cut in final_cuts[1:]])):
                    if chops_line.get(cut) is None:  # painted front to back: the first one wins
                        chops_line[cut] = piece
            start = end
    return ChopsUpdate(chops, spans, chop_ends)


_NO_CHOPS: dict[int, Any] = {}  # a row without a changed span: never read, never written


class _Owners(list):
    """Per row, (cut, next cut, the place front to back of the widget that paints that chop, -1 for none), and
    ``layout``: per place, (widget, its visible columns [x0, x1), its region); for one layout (visible widgets and
    cuts), kept on the compositor until Textual lays out again."""

    layout: list[tuple[Any, int, int, Region]]
    made_for: tuple[object, object]


def _chop_owners(compositor: Any) -> _Owners:
    """Which widget paints each chop of each row: the first one front to back whose visible area holds it (the
    one Textual's update keeps). Made once per layout: rendering a widget only on the rows where it paints a
    changed chop is then a look-up per chop, where finding it widget by widget each refresh was ~10% of the
    compositor's pass beside 16 fast jobs."""
    visible, cuts = compositor.visible_widgets, compositor.cuts
    kept = getattr(compositor, "_batchmon_owners", None)
    if kept is not None and kept.made_for[0] is visible and kept.made_for[1] is cuts:
        return kept
    intersection = Region.intersection
    layout: list[tuple[Any, int, int, Region]] = []
    owner_rows: list[list[int]] = [[-1] * (len(row) - 1) for row in cuts]
    for widget, (region, clip) in visible.items():  # front to back
        vx, vy, vw, vh = intersection(region, clip)
        if not vw or not vh:
            continue
        index = len(layout)
        layout.append((widget, vx, vx + vw, region))
        vx2 = vx + vw
        for y in range(max(0, vy), min(len(cuts), vy + vh)):
            row, owned = cuts[y], owner_rows[y]
            for i in range(len(row) - 1):
                if owned[i] < 0 and vx <= row[i] < vx2:
                    owned[i] = index
    owners = _Owners([list(zip(row[:-1], row[1:], owned)) for row, owned in zip(cuts, owner_rows)])
    owners.layout = layout
    owners.made_for = (visible, cuts)
    compositor._batchmon_owners = owners
    return owners


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
