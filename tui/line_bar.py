"""A one-line bar (the header, the replay's position bar) that repaints only the cells that changed, its row made
as Textual makes it but without Textual's per-line work.

Why: such a bar changes every second (the clock, the replay's position) and Textual's own road for a changed
line - ``Widget.render_line`` through ``Content`` and ``Visual.to_strips``, then ``StylesCache.render_widget``
gathering the widget's backgrounds and framing the row - cost ~15% of the main thread beside 16 fast jobs on a
replay, for one line. The line's strip comes from line_strip.LineStrips (Textual's strip, its styles remembered)
and the row from row_splice.rows (Textual's frame kept); both fall back to Textual's way where they cannot promise
the same strip.
"""

from __future__ import annotations

from rich.text import Text
from textual.geometry import Region
from textual.strip import Strip

from batchmon.tui.line_strip import LineStrips
from batchmon.tui.panel import changed_runs
from batchmon.tui.repaint import KeptScreen, repaint
from batchmon.tui.row_splice import rows


class LineBar(KeptScreen):
    """One line of Rich Text, ``line()``; ``repaint_changed()`` repaints the cells that read differently from
    the line last drawn."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self._shown: Text | None = None  # the line last drawn
        self._line_strips = LineStrips()
        self._strip: tuple[tuple, Strip] | None = None  # ((line, width, style), its strip)

    def line(self) -> Text:  # pragma: no cover - abstract
        raise NotImplementedError

    def repaint_changed(self) -> None:
        """Repaint the columns whose text changed since the last render, or nothing; the whole line when it was
        never drawn at this width."""
        shown = self._shown
        width = self.content_size.width
        if shown is None or width <= 0 or not self.is_mounted:
            self.refresh()
            return
        new = self.line()
        if new is shown or new == shown and new.style == shown.style:
            return
        runs = changed_runs(shown, new, width)
        if runs:  # (none: changed only beyond the edge of a line longer than the bar)
            repaint(self, *(Region(x0, 0, x1 - x0, 1) for x0, x1 in runs))

    def render(self) -> Text:
        self._shown = self.line()
        return self._shown

    def render_lines(self, crop: Region) -> list[Strip]:
        """Textual's rows, a changed row made as in tui/row_splice.py."""
        return rows(self, crop, super().render_lines)

    def render_line(self, y: int) -> Strip:
        """The line as Textual renders it, through line_strip.LineStrips (once per line, width and style)."""
        if y == 0:
            text = self.line()
            key = (text, self.size.width, self.visual_style)
            made = self._strip
            if made is not None and made[0][0] is text and made[0][1:] == key[1:]:
                self._dirty_regions.clear()
                self._shown = text
                return made[1]
            strip = self._line_strips.strip(self, text, key[1], key[2])
            if strip is not None:
                self._strip = (key, strip)
                self._dirty_regions.clear()  # what Widget.render_line's full render would clear
                self._shown = text
                return strip
        return super().render_line(y)
