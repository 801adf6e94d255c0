"""A changed content row of a widget, made as Textual made that row last time with the new content line inside.

Why: Textual renders a widget's rows through ``StylesCache.render_widget``, which first gathers the widget's
backgrounds (a walk up its ancestors), its regions, opacity, theme and border titles, then frames each dirty row
(border, padding, the content line cut or padded to the content width) and runs the line filters over it. Beside
16 fast jobs the monitor repaints ~12 one-row changes a second (the clock, a GPU's figures, each visible job's step
counter), each in a different widget: that gathering and framing was ~15% of the main thread, where the content
line itself (tui/line_strip.py) is a third of it.

A row's frame (left border and padding, right padding and border) does not change while Textual's own cache of
the widget's rows stands: Textual clears it on any change of style, size, focus, width or a full refresh, and
reuses the rows it holds until then. So a dirty content row is the frame Textual drew around an earlier row and
the new content line, then the same filters with the same background, as Textual would apply them. The frame is
taken from a row Textual drew, once per cache, and kept only if that row is exactly frame + its content line
(segment for segment) and nothing Textual applies per row is in force (tint, opacity, text opacity, hatch,
outline, link hover styles); otherwise every row goes Textual's way until the cache is cleared again.

It reads Textual internals (``StylesCache._cache``, ``_dirty_lines``, ``_width``; ``Widget._size``); where they are
not there, nothing changes. The frame is kept inside Textual's cache under a key no row uses, so whatever clears
the cache drops it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from rich.segment import Segment
from rich.style import Style as RichStyle
from textual.color import Color
from textual.filter import ANSIToTruecolor, LineFilter
from textual.geometry import Region, Size
from textual.strip import Strip

if TYPE_CHECKING:
    from textual.widget import Widget

_KEY = "batchmon.row_splice"  # StylesCache._cache's keys are row numbers: this one is the frame's


@dataclass(frozen=True)
class Frame:
    """Around every content row of a widget while Textual's cache stands: what is left and right of the content
    line, the content's place and width, the style Textual pads a short line with, the filters' background."""

    size: Size  # the widget's outer size (rows are ``size.width`` cells)
    top: int  # rows above the content (border, padding)
    rows: int  # content rows
    content_width: int
    left: tuple[Segment, ...]
    right: tuple[Segment, ...]
    pad_style: RichStyle
    background: Color


_NO_FRAME = Frame(Size(0, 0), 0, 0, 0, (), (), RichStyle(), Color(0, 0, 0))  # this cache: Textual's way


def _styles_cache(widget: Any) -> Any:
    cache = getattr(widget, "_styles_cache", None)
    if cache is None or not isinstance(getattr(cache, "_cache", None), dict) or not hasattr(cache, "_dirty_lines"):
        return None
    return cache


def spliced_lines(widget: Widget, crop: Region, content_line: Callable[[int], Strip]) -> list[Strip] | None:
    """``widget.render_lines(crop)`` as Textual would render it, its dirty rows spliced into the kept frame; None
    where that cannot be promised (no frame, a dirty row outside the content, a row never drawn): Textual's way."""
    sc = _styles_cache(widget)
    if sc is None:
        return None
    rows: dict = sc._cache
    frame: Frame | None = rows.get(_KEY)
    if frame is None or frame is _NO_FRAME or frame.size != widget._size or sc._width != frame.size.width:
        return None
    if widget.auto_links and widget.hover_style._link_id:
        return None  # Textual restyles a hovered link on every render: left to it
    dirty = sc._dirty_lines
    top, count = frame.top, frame.rows
    lines = crop.line_range
    for y in lines:
        if y not in rows or (y in dirty and not 0 <= y - top < count):
            return None
    filters = widget.app.get_line_filters()
    width = frame.size.width
    head, tail, pad, cw, bg = frame.left, frame.right, frame.pad_style, frame.content_width, frame.background
    strips: list[Strip] = []
    for y in lines:
        if y in dirty:
            content = content_line(y - top).adjust_cell_length(cw, pad)
            strip = rows[y] = Strip([*head, *content._segments, *tail], width)
        else:
            strip = rows[y]
        for line_filter in filters:
            strip = _apply_filter(strip, line_filter, bg)
        strips.append(strip)
    dirty.difference_update(lines)
    if crop.column_span != (0, width):
        x1, x2 = crop.column_span
        strips = [strip.crop(x1, x2) for strip in strips]
    return strips


_TRUECOLOR: dict[tuple[LineFilter, Color], dict[RichStyle, RichStyle]] = {}  # (filter, background): style -> style


def _apply_filter(strip: Strip, line_filter: LineFilter, background: Color) -> Strip:
    """``strip.apply_filter(line_filter, background)``; Textual's colour filter (ANSIToTruecolor, on in every
    terminal Textual does not leave its ANSI colours to) looks each segment's style up in an lru_cache keyed by the
    style and the background, hashed and compared field by field: half of a spliced row's cost (~15 us for a
    13-segment row). Its answer depends on the style alone, and a monitor's rows reuse the same style objects
    second after second: here each is looked up in a dict of this filter and background (found by identity). The
    result is kept in the strip's filter cache, as Textual's is."""
    if type(line_filter) is not ANSIToTruecolor:
        return strip.apply_filter(line_filter, background)
    cache = strip._filter_cache
    key = (line_filter, background)
    found = cache.get(key)
    if found is not None:
        return found  # type: ignore[no-any-return]
    styles = _TRUECOLOR.get(key)
    if styles is None or len(styles) > 4096:
        if len(_TRUECOLOR) > 16:
            _TRUECOLOR.clear()
        styles = _TRUECOLOR[key] = {}
    rich_background = background.rich_color
    truecolor = line_filter.truecolor_style
    segments = []
    for text, style, _ in strip._segments:
        if style is not None:
            out = styles.get(style)
            if out is None:
                out = styles[style] = truecolor(style, rich_background)
            style = out
        segments.append(Segment(text, style, None))
    found = cache[key] = Strip(segments, strip._cell_length)
    return found


def keep_frame(widget: Widget, crop: Region, content_line: Callable[[int], Strip]) -> None:
    """After Textual rendered ``crop``: where its cache has no frame yet, take one from a content row it drew
    (checked: that row must be exactly the frame around its content line), or mark the cache as Textual's."""
    sc = _styles_cache(widget)
    if sc is None or _KEY in sc._cache:
        return
    frame = _frame(widget, sc, crop, content_line)
    if frame is not None:
        sc._cache[_KEY] = frame


def rows(widget: Widget, crop: Region, textual: Callable[[Region], list[Strip]]) -> list[Strip]:
    """A widget's ``render_lines``: its dirty content rows spliced (``spliced_lines``), else Textual's own
    (``textual``: the widget's ``super().render_lines``), whose frame is then kept for the next ones."""
    strips = spliced_lines(widget, crop, widget.render_line)
    if strips is None:
        strips = textual(crop)
        keep_frame(widget, crop, widget.render_line)
    return strips


def _frame(widget: Any, sc: Any, crop: Region, content_line: Callable[[int], Strip]) -> Frame | None:
    """The frame from a drawn content row in ``crop``; _NO_FRAME where Textual applies more than a frame; None
    where no content row was drawn yet (try again next render)."""
    styles = widget.styles
    try:
        if (styles.tint.a or widget.opacity != 1.0 or styles.text_opacity != 1.0 or styles.has_rule("hatch")
                or any(edge for edge, _ in styles.outline) or widget.auto_links and widget.hover_style._link_id):
            return _NO_FRAME
        gutter = styles.gutter
        size = widget._size
        base, background = widget.background_colors
        inner = sc.get_inner_outer(base, background)[0].rich_style
        content_size = widget.content_region.size
    except Exception:  # noqa: BLE001 - a Textual whose pieces differ: its own way, always
        return _NO_FRAME
    if sc._width != size.width or not content_size.width:
        return None
    count = content_size.height
    for y in crop.line_range:
        row = sc._cache.get(y)
        if row is None or y in sc._dirty_lines or not 0 <= y - gutter.top < count:
            continue
        content = content_line(y - gutter.top).adjust_cell_length(content_size.width, inner)
        segments = row._segments
        n_left = _cells_prefix(segments, gutter.left)
        n_right = _cells_prefix(segments[::-1], gutter.right)
        if n_left is None or n_right is None:
            return _NO_FRAME
        left, right = tuple(segments[:n_left]), tuple(segments[len(segments) - n_right:])
        if [*left, *content._segments, *right] != segments or row.cell_length != size.width:
            return _NO_FRAME
        return Frame(size, gutter.top, count, content_size.width, left, right, inner, background)
    return None


def _cells_prefix(segments: list[Segment], cells: int) -> int | None:
    """How many leading segments make exactly ``cells`` cells (None where a segment straddles the edge)."""
    total = 0
    for i, segment in enumerate(segments):
        if total == cells:
            return i
        total += segment.cell_length
        if total > cells:
            return None
    return len(segments) if total == cells else None
