"""Repaint a few regions of a widget without waking the widget's own message task.

Why: ``Widget.refresh(*regions)`` marks the regions dirty and prompts the widget's message pump; the pump wakes,
finds a repaint required (``_check_refresh``), posts an Update message to its screen, whose pump wakes in turn
and adds the widget to its dirty set. Beside 16 fast jobs about a dozen widgets repaint a line or two each second
(the clock, a GPU's figures, each visible job's step counter): two task wake-ups and two messages per widget, a
part of the main thread as large as the repaint itself. Here the widget is put in the screen's dirty set directly
and the screen is prompted once: the same compositor update at the same time, one wake-up in all.

Only for a plain repaint of a mounted, shown widget on the current screen; anything else (and a Textual whose
internals this reads are not there) goes through ``Widget.refresh``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from textual.dom import DOMNode
from textual.geometry import Region
from textual.widget import Widget

if TYPE_CHECKING:
    from textual.screen import Screen

_NEEDED = ("_set_dirty", "clear_cached_dimensions", "_rich_style_cache", "_layout_cache", "_is_mounted",
           "_closing", "_repaint_required", "_dirty_regions", "_repaint_regions", "_styles_cache")


def repaint(widget: Widget, *regions: Region) -> None:
    """What ``widget.refresh(*regions)`` does for a repaint, without the widget's message round trip."""
    screen = _screen_for(widget)
    if screen is None:
        widget.refresh(*regions)
        return
    widget._layout_cache.clear()
    _set_dirty(widget, regions)
    widget.clear_cached_dimensions()
    widget._rich_style_cache.clear()
    # what _check_refresh (the widget's idle) and Screen._on_update (its Update message) would do
    screen._dirty_widgets.add(widget)
    screen.check_idle()


def _set_dirty(widget: Any, regions: tuple[Region, ...]) -> None:
    """``widget._set_dirty(*regions)``: Textual's reads the content's offset through ``Widget.gutter``, which asks
    whether each scrollbar shows (~8 us a repaint, ~10 repaints a second beside 16 jobs) to add a scrollbar
    gutter that is only ever right and bottom; the offset is the top left of the styles' gutter alone."""
    if not regions:
        widget._set_dirty()
        return
    top, _, _, left = widget.styles.gutter
    widget_regions = [region.translate((left, top)) for region in regions]
    widget._dirty_regions.update(widget_regions)
    widget._repaint_regions.update(widget_regions)
    widget._styles_cache.set_dirty(*widget_regions)


_ROAD: dict[type, bool] = {}  # a widget class: whether its widgets have what the short road reads


def _screen_for(widget: Any) -> Any:
    """The widget's screen where the short road applies, else None."""
    road = _ROAD.get(type(widget))
    if road is None:  # once per class (instance attributes: Widget.__init__ sets them on every widget)
        road = _ROAD[type(widget)] = all(hasattr(widget, name) for name in _NEEDED) and hasattr(
            getattr(widget, "_styles_cache", None), "set_dirty")
    if not road:
        return None
    if not widget._is_mounted or widget._closing or widget._repaint_required or not widget.display:
        return None  # not mounted yet, closing, or a repaint already on its way: Textual's own road
    try:
        screen = widget.screen
        app = widget.app
    except Exception:  # noqa: BLE001 - no screen (being removed): Textual's own road
        return None
    batching = getattr(app, "_batch_count", None)  # inside App.batch_update: Textual holds repaints back
    if (not isinstance(getattr(screen, "_dirty_widgets", None), set) or not screen.is_current
            or batching is None or batching > 0 or screen not in getattr(screen, "_compositor", ())):
        return None
    return screen


_PARENT = "_MessagePump__parent"  # where MessagePump keeps its parent: a weak reference (None when detached)


class KeptScreen(Widget):
    """A widget whose screen is looked up once while it stays where it is in the DOM.

    Why: Textual's ``screen`` walks up the parents (an import, a property and an isinstance a level) on every read,
    and ``region``, ``content_size``, ``text_selection`` and this module read it: beside 16 fast jobs ~55 reads a
    refresh at ~3 us each. Kept, it is checked against the same chain of parent references (the same weak
    reference objects, so the same parents: a detach or a move replaces one), ~0.5 us; any change, or a DOM
    that does not look as expected, walks as Textual does."""

    _kept_screen: tuple[tuple[Any, ...], Any] | None = None

    @property
    def screen(self) -> "Screen[object]":
        kept = self._kept_screen
        if kept is not None:
            refs, screen = kept
            node: Any = self
            for ref in refs:
                if node.__dict__.get(_PARENT) is not ref:
                    break
                node = ref()
            else:
                return screen  # type: ignore[no-any-return]
        screen = DOMNode.screen.fget(self)  # type: ignore[attr-defined]
        chain = []
        node = self
        while node is not screen:
            ref = getattr(node, "__dict__", {}).get(_PARENT)
            if ref is None:
                return screen  # type: ignore[no-any-return]  # not as this expects: nothing kept
            chain.append(ref)
            node = ref()
        self._kept_screen = (tuple(chain), screen)
        return screen  # type: ignore[no-any-return]
