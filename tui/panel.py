"""Base for panels that draw themselves as lines of Rich Text at whatever width they get (each line cleaned of
control characters: see fmt.clean_line)."""

from __future__ import annotations

from rich.cells import cell_len
from rich.text import Text
from textual.geometry import Region, Size
from textual.strip import Strip
from textual.visual import Visual, visualize
from textual.widget import Widget

from batchmon.tui.fmt import clean_line
from batchmon.tui.line_strip import LineStrips
from batchmon.tui.repaint import KeptScreen, repaint
from batchmon.tui.row_splice import rows
from batchmon.tui.messages import PanelFocused


def changed_cells(old: Text | str, new: Text | str, width: int) -> tuple[int, int]:
    """Columns [x0, x1) of a line drawn ``width`` cells wide where ``new`` can differ from ``old``: the start and,
    at equal lengths, the end they share (text and styles) are left out. The whole width when in doubt (wide
    characters, styles split differently); of a line longer than ``width``, the cells that show (an empty span,
    ``(width, width)``, when none changed). Two strings: lines in one style (the text alone decides).

    A repaint of only these columns is what reaches the terminal: the clock's seconds or a GPU's watts, not the
    whole line (a full-width line with its colours is over a kilobyte of escape codes)."""
    a, b = _plain(old), _plain(new)
    if _style(old) != _style(new) or cell_len(a) != len(a) or cell_len(b) != len(b):
        return 0, width
    if len(a) > width or len(b) > width:
        # a line longer than its panel is cut at the panel's edge: what shows is its first ``width`` cells (and
        # the cut); a change beyond them (a step counter pushed off by a long command) shows nothing
        n = min(len(a), len(b), width)
        i = 0
        while i < n and a[i] == b[i]:
            i += 1
        if not _same_styles(old, new, 0, i, 0, i):
            return 0, width
        if i >= width and len(a) > width and len(b) > width:
            return width, width  # nothing that shows changed
        return min(i, width - 1), width
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    if not _same_styles(old, new, 0, i, 0, i):
        return 0, width
    if len(a) != len(b):  # the rest moved: everything from i to the longer end (the other is blank there)
        return (i, max(len(a), len(b))) if i < max(len(a), len(b)) else (0, width)
    j = 0
    while j < n - i and a[-1 - j] == b[-1 - j]:
        j += 1
    if j and not _same_styles(old, new, len(a) - j, len(a), len(b) - j, len(b)):
        return 0, width
    return (i, len(a) - j) if i < len(a) - j else (0, width)


SPLIT_GAP = 8  # unchanged cells between two changes that make them two repaints (a cursor move costs ~8 bytes)


def changed_runs(old: Text | str, new: Text | str, width: int) -> list[tuple[int, int]]:
    """``changed_cells``, split where ``SPLIT_GAP`` or more cells between two changes read the same (text and
    styles): the host memory and the clock of the header, a GPU's watts and its utilization, are repainted as
    two short pieces rather than one span over the whole line between them. Two strings: as two Texts of one
    style, without making them (a compact panel's step text, ~10 a second)."""
    x0, x1 = changed_cells(old, new, width)
    if x0 >= x1:
        return []  # nothing that shows changed (a line longer than the panel, changed beyond its edge)
    a, b = _plain(old), _plain(new)
    if (len(a) != len(b) or x1 - x0 <= 2 * SPLIT_GAP or x1 > len(a) or len(a) > width
            or a[x0] == b[x0] or a[x1 - 1] == b[x1 - 1]):
        return [(x0, x1)]  # no split where changed_cells was in doubt (a cut line, styles): the whole span
    runs = []
    start = x0
    i = x0
    while i < x1:
        if a[i] != b[i]:
            i += 1
            continue
        j = i
        while j < x1 and a[j] == b[j]:
            j += 1
        if j - i >= SPLIT_GAP and j < x1 and _same_styles(old, new, i, j, i, j):
            runs.append((start, i))
            start = j
        i = j
    runs.append((start, x1))
    return runs


def _plain(line: Text | str) -> str:
    return line if isinstance(line, str) else line.plain


def _style(line: Text | str) -> object:
    return "" if isinstance(line, str) else line.style


def _same_styles(old: Text | str, new: Text | str, a0: int, a1: int, b0: int, b1: int) -> bool:
    """Whether old's styles over [a0, a1) are new's over [b0, b1); strings have none. Two Texts with the same
    spans have the same styles over the same columns: said without cutting them (the header's clock, a GPU's
    watts: the spans stay where they were while the digits change; cutting both lists was ~40% of the diff)."""
    if isinstance(old, str):
        if isinstance(new, str):
            return True
    elif a0 == b0 and a1 == b1 and not isinstance(new, str) and old._spans == new._spans:
        return True
    return _styles(_text(old), a0, a1) == _styles(_text(new), b0, b1)


def _text(line: Text | str) -> Text:
    return Text(line) if isinstance(line, str) else line


def _styles(text: Text, lo: int, hi: int) -> list[tuple[int, int, object]]:
    """The text's style spans cut to [lo, hi), relative to lo (cheaper than slicing the Text)."""
    return [(max(sp.start, lo) - lo, min(sp.end, hi) - lo, sp.style) for sp in text.spans
            if sp.start < hi and sp.end > lo and sp.start < sp.end]


_FORGOTTEN = object()  # a signature no update equals


class LinesPanel(KeptScreen):
    """A focusable panel whose content is ``build(width) -> list[Text]``; height follows the line count."""

    can_focus = True

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._cache: tuple[int, int, list[Text]] | None = None
        self._version = 0
        # one rendered Strip per line of the cache, kept across updates for the lines that read the same
        self._strips: list[Strip | None] = []
        self._strips_key: tuple | None = None  # (width, version, visual style) the strips were made for
        self._line_strips = LineStrips()  # Textual's strip for a line, its styles remembered (line_strip.py)
        self._stale = False  # new data not built yet (off screen): lines() builds it when asked

    def build(self, width: int) -> list[Text]:  # pragma: no cover - abstract
        raise NotImplementedError

    def changed(self) -> None:
        """New data: drop the cached lines and re-layout (the height may change with them)."""
        self._version += 1
        self._cache = None
        self.refresh(layout=True)

    def update_if_changed(self, signature: object) -> bool:
        """Repaint unless ``signature`` equals the last one: identical data costs no render.

        New data repaints only the lines that read differently; a layout pass (and a repaint of the whole
        panel) only when the height may change: the line count differs, or there is nothing laid out to
        compare with. Re-laying out the screen every refresh was most of the monitor's CPU time.
        """
        if signature == getattr(self, "_signature", None):
            return False
        self._signature = signature
        old = self._cache
        width, off_screen = self._place()
        if old is None or width <= 0 or old[0] != width or old[1] != self._version or not self.is_mounted:
            self.changed()
            return True
        if self.fixed_line_count() == len(old[2]) and off_screen:
            # scrolled out of its column and its height known without building it (16 compact job panels, half
            # below the fold): not built now - its lines are built when it shows or at the next layout
            self._stale = True
            self._strips_key = None
            self._set_dirty()
            return True
        self._version += 1
        self._cache = None
        new = self.lines(width)
        if len(new) != len(old[2]):
            self.refresh(layout=True)
            return True
        runs = [None if a is b or a == b else changed_runs(a, b, width) for a, b in zip(old[2], new)]
        same = [not r for r in runs]  # equal, or changed only beyond the panel's edge (nothing to repaint)
        if not all(same) and off_screen:
            # scrolled out of its column: nothing to draw now. Its rendered lines are dropped, so it draws the new
            # ones when it shows; a refresh here would make Textual lay the whole screen out again at the next
            # look-up of any widget's place (16 job panels: half of them below the fold, every refresh)
            self._strips_key = None
            self._set_dirty()
            return True
        if self._strips_key is not None and self._strips_key[:2] == (width, self._version - 1):
            # unchanged lines keep their rendered strips; only the others are rendered again
            self._strips = [s if keep else None for s, keep in zip(self._strips, same)]
            self._strips_key = (width, self._version, self._strips_key[2])
        dirty = [Region(x0, y, x1 - x0, 1) for y, r in enumerate(runs) if r for x0, x1 in r]
        if dirty:
            self.repaint_regions(*dirty)
        return True

    def waits_off_screen(self) -> bool:
        """Whether new data needs nothing now: the panel was left off screen with its lines to be built when it
        shows (``_stale``), not built since, and its height is known without building. Beside 16 jobs ~7 compact
        panels below the fold took LinesPanel's road every second (a signature made and compared, a screen
        look-up, the widget's rows dropped again: ~40 us each) to end where they were. Its next build reads the
        data it has then; the signature is forgotten, so the first update after that build compares lines."""
        cache = self._cache
        if not self._stale or cache is None or self.fixed_line_count() != len(cache[2]):
            return False
        self._signature = _FORGOTTEN
        return True

    def repaint_regions(self, *regions: Region) -> None:
        """Repaint these regions (``refresh(*regions)`` without the widget's own message round trip:
        tui/repaint.py)."""
        repaint(self, *regions)

    def _place(self) -> tuple[int, bool]:
        """The content width and ``_off_screen()``, from one look-up of the screen (Textual's ``region`` and
        ``content_size`` each walk up to the screen and find the widget again: 16 job panels a refresh, ~4 times
        each, were a tenth of the main thread beside 16 jobs)."""
        try:
            find = self.screen.find_widget
            mine = find(self).region
        except Exception:  # noqa: BLE001 - no screen, not laid out: nothing to compare with
            return 0, False
        width = mine.shrink(self.styles.gutter).width
        parent = self.parent
        if not isinstance(parent, Widget) or not callable(getattr(self, "_set_dirty", None)):
            return width, False
        try:
            shown = find(parent).region
        except Exception:  # noqa: BLE001 - the column not laid out: draw as usual
            return width, False
        return width, bool(mine) and bool(shown) and not mine.overlaps(shown)

    def _off_screen(self) -> bool:
        """Laid out wholly outside the region its parent (a scrolling column) shows. False when in doubt."""
        parent = self.parent
        if not isinstance(parent, Widget) or not callable(getattr(self, "_set_dirty", None)):
            return False
        try:
            mine, shown = self.region, parent.region
        except Exception:  # noqa: BLE001 - no screen, not laid out: draw as usual
            return False
        return bool(mine) and bool(shown) and not mine.overlaps(shown)

    def fixed_line_count(self) -> int | None:
        """The line count the next build will have, where the panel knows it without building (else None)."""
        return None

    def lines(self, width: int) -> list[Text]:
        width = max(1, width)
        if self._stale:
            self._stale = False
            self._version += 1
            self._cache = None
        if self._cache is None or self._cache[0] != width or self._cache[1] != self._version:
            built = [clean_line(line) for line in self.build(width)]
            for line in built:
                line.no_wrap = True
                line.overflow = "ellipsis"
                line.end = ""
            self._cache = (width, self._version, built)
        return self._cache[2]

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return max(1, len(self.lines(width)))

    def render(self) -> Text:
        lines = self.lines(self.content_size.width)
        text = Text("\n").join(lines)
        text.no_wrap = True
        text.overflow = "ellipsis"
        return text

    def render_line(self, y: int) -> Strip:
        """One content line, rendered as Textual renders the whole panel (same visual style, no wrap,
        ellipsis), once per distinct line: a repaint after update_if_changed renders only the lines that
        changed, where Textual's default renders every line of the panel again."""
        width = self.content_size.width
        lines = self.lines(width)
        style = self.visual_style
        key = (width, self._version, style)
        if self._strips_key != key or len(self._strips) != len(lines):
            self._strips = [None] * len(lines)
            self._strips_key = key
        self._dirty_regions.clear()  # what Widget._render_content would clear: nothing else reads it here
        if not 0 <= y < len(lines):
            return Strip.blank(width, style.rich_style)
        strip = self._strips[y]
        if strip is None:
            strip = self._line_strips.strip(self, lines[y], width, style)
            if strip is None:  # a line the fast path does not promise to render as Textual does
                visual = visualize(self, lines[y], markup=False)
                strips = Visual.to_strips(self, visual, width, 1, style)
                strip = strips[0] if strips else Strip.blank(width, style.rich_style)
            self._strips[y] = strip
        return strip

    def render_lines(self, crop: Region) -> list[Strip]:
        """Textual's rows; a dirty content row made as the row Textual drew there with the new line in it
        (tui/row_splice.py: the same strips, without Textual's per-widget gathering and framing)."""
        return rows(self, crop, super().render_lines)

    def selection_updated(self, selection: object) -> None:
        self._strips_key = None  # selected text is drawn into the strips
        super().selection_updated(selection)  # type: ignore[arg-type]

    def on_resize(self) -> None:
        self.refresh(layout=True)
        if self.has_focus:  # it grew on focus: show all of it at its new size (the app's own scroll after the
            # focus can run before this layout and leave a static screen scrolled to where the panel was)
            self.call_after_refresh(self.scroll_visible, animate=False)

    def on_focus(self) -> None:
        self.changed()
        self.post_message(PanelFocused())

    def on_blur(self) -> None:
        self.changed()
        self.post_message(PanelFocused())
