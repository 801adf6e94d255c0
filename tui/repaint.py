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

from typing import Any

from textual.geometry import Region
from textual.widget import Widget

_NEEDED = ("_set_dirty", "clear_cached_dimensions", "_rich_style_cache", "_layout_cache", "_is_mounted",
           "_closing", "_repaint_required")


def repaint(widget: Widget, *regions: Region) -> None:
    """What ``widget.refresh(*regions)`` does for a repaint, without the widget's message round trip."""
    screen = _screen_for(widget)
    if screen is None:
        widget.refresh(*regions)
        return
    widget._layout_cache.clear()
    widget._set_dirty(*regions)
    widget.clear_cached_dimensions()
    widget._rich_style_cache.clear()
    # what _check_refresh (the widget's idle) and Screen._on_update (its Update message) would do
    screen._dirty_widgets.add(widget)
    screen.check_idle()


def _screen_for(widget: Any) -> Any:
    """The widget's screen where the short road applies, else None."""
    if not all(hasattr(widget, name) for name in _NEEDED):
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
