"""One line of Rich Text as the Strip Textual would render for it, at a fraction of the cost.

Why: beside a training job the monitor re-renders a handful of changed lines each second (the clock, a GPU's
watts, a job's step), and Textual's path for a line - ``Content.from_rich_text`` then ``Visual.to_strips`` -
converts every span's style and builds a new Rich style (with its ``{"offset": (x, y)}`` meta, pickled) for every
segment, each time: ~half of the main thread beside one job. The styles a line's segments get depend only on the
widget's visual style, the styles over the segment, and the column it starts in; in a monitor those repeat from
second to second (the digits change, not the layout), so ``LineStrips`` computes each once, with Textual's own
functions, and remembers it.

The result is the same strip Textual makes - segment for segment, text, style and meta (tests/test_tui_line_strip.py
compares both on every line the monitor draws) - for the lines this renders: one line, no wider than the width, one
cell per character, left-aligned, no text selection, no tabs or control characters. Any other line (and any Textual
whose styles do not look as expected) gets ``None``: the caller renders it Textual's way.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, NamedTuple

from rich.cells import cell_len
from rich.segment import Segment
from rich.style import Style as RichStyle
from rich.text import Text
from textual.strip import Strip
from textual.style import Style

if TYPE_CHECKING:
    from textual.widget import Widget

CACHE_LIMIT = 8192  # styles remembered per widget; past it the cache starts again (a resize, many new layouts)


_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]").search


def _plain_line(plain: str) -> bool:
    """One cell per character, nothing Textual would strip or expand (control characters, tabs, newlines)."""
    return cell_len(plain) == len(plain) and _CONTROL(plain) is None


class LineStrips:
    """Renders lines for one widget; remembers the Rich style of each (visual style, span styles, column)."""

    def __init__(self) -> None:
        self._styles: dict[tuple, RichStyle] = {}
        self._spans: dict[object, Style | None] = {}  # a span's style (Rich style or string) as Textual's Style
        self._theme: str | None = None  # the app's theme the styles were made under

    def strip(self, widget: Widget, text: Text, width: int, style: Style) -> Strip | None:
        """The strip ``Visual.to_strips(widget, visualize(widget, text, markup=False), width, 1, style)[0]`` is,
        or None where this cannot promise the same (then render it Textual's way)."""
        plain = text.plain
        n = len(plain)
        if width <= 0 or widget.text_selection is not None or not _plain_line(plain):
            return None
        rules = widget.styles
        if (rules.get_rule("text_align", "left") != "left" or rules.get_rule("line_pad", 0) != 0
                or tuple(rules.content_align) != ("left", "top")):
            return None
        theme = widget.app.theme
        if self._theme is None:
            self._theme = theme
        elif theme != self._theme:  # the monitor never changes theme (no command palette); if it did, Textual's
            return None  # conversions of named colours differ: every line goes Textual's way from then on
        spans: list = text._spans  # Rich Spans, then (start, end, style) tuples like them
        if n > width:  # Content.truncate(width, ellipsis=True): the spans over the end end at the ellipsis
            if rules.get_rule("text_wrap", "wrap") != "nowrap" or rules.get_rule("text_overflow", "fold") != "ellipsis":
                return None
            plain, n = plain[:width - 1] + "…", width
            spans = [sp if sp.end < n else sp._replace(end=min(n, sp.end)) for sp in spans if sp.start < n]
        elif not plain:  # Textual: one empty segment in the base style, unless styled (then its own way)
            return None if spans or text.style else Strip([Segment("", self._style(style, (), 0))], 0)
        if text.style:  # from_rich_text puts the Text's own style first, over the whole line (before any cut)
            spans = [(0, n, _own(text.style)), *spans]
        return self._strip(widget, plain, spans, style)

    def _strip(self, widget: Widget, plain: str, spans: list, style: Style) -> Strip | None:
        """Content.render's segments for ``plain`` with ``spans`` (start, end, style) over ``style``."""
        n = len(plain)
        styled: list[object] = []  # the Content's span styles in Textual's order
        bounds: list[tuple[int, bool, int]] = []
        for start, end, span_style in spans:
            if end > n or start < 0:
                return None
            styled.append(span_style)
            k = len(styled)
            bounds.append((start, False, k))
            bounds.append((end, True, k))
        if any(self._span_style(widget, s) is None for s in styled):
            return None  # a link or an action in a span: Textual adds its link style, left to it
        if len(self._styles) > CACHE_LIMIT:
            self._styles.clear()
        segments: list[Segment] = []
        add = segments.append
        if not styled:
            add(Segment(plain, self._style(style, (), 0)))
            return Strip(segments, n)
        events = [(0, False, 0), *bounds, (n, True, 0)]
        events.sort(key=_event_key)  # Content.render's order: by (offset, leaving)
        stack: set[int] = set()
        for (offset, leaving, index), (next_offset, _, _) in zip(events, events[1:]):
            if leaving:
                stack.discard(index)
            else:
                stack.add(index)
            if next_offset > offset:
                over = tuple(styled[i - 1] for i in sorted(stack) if i)
                add(Segment(plain[offset:next_offset], self._style(style, over, offset)))
        return Strip(segments, n)

    def _style(self, base: Style, over: tuple, x: int) -> RichStyle:
        key = (base, over, x)
        found = self._styles.get(key)
        if found is None:
            current = Style.combine([base, *(self._spans[s] or base for s in over)])  # never None here: checked
            found = self._styles[key] = (base + current).rich_style_with_offset(x, 0)
        return found

    def _span_style(self, widget: Widget, span_style: object) -> Style | None:
        """What Content.from_rich_text makes of a span's style (strings parsed by the app's console); None for
        a style with a link or meta (an action), which this does not render."""
        if span_style in self._spans:
            return self._spans[span_style]
        app = widget.app
        if isinstance(span_style, _OwnStyle):  # the Text's own style as a string: Textual parses it, not Rich
            parsed = widget._get_style(span_style.text)
            own = None if parsed.link or parsed._meta else parsed
            self._spans[span_style] = own
            return own
        rich = app.console.get_style(span_style) if isinstance(span_style, str) else span_style
        if not isinstance(rich, RichStyle):
            return None
        found: Style | None = Style.from_rich_style(rich, app.ansi_theme)
        if rich.link or rich._meta:
            found = None
        self._spans[span_style] = found
        return found


class _OwnStyle(NamedTuple):
    """A Text's own style given as a string (Content keeps it a string and parses it with the widget's parser)."""

    text: str


def _own(style: object) -> object:
    return _OwnStyle(style) if isinstance(style, str) else style


def _event_key(event: tuple[int, bool, int]) -> tuple[int, bool]:
    return event[0], event[1]
