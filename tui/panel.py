"""Base for panels that draw themselves as lines of Rich Text at whatever width they get."""

from __future__ import annotations

from rich.text import Text
from textual.geometry import Region, Size
from textual.widget import Widget

from batchmon.tui.messages import PanelFocused


class LinesPanel(Widget):
    """A focusable panel whose content is ``build(width) -> list[Text]``; height follows the line count."""

    can_focus = True

    def __init__(self, *, id: str | None = None, classes: str | None = None) -> None:
        super().__init__(id=id, classes=classes)
        self._cache: tuple[int, int, list[Text]] | None = None
        self._version = 0

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
        width = self.content_size.width
        if old is None or width <= 0 or old[0] != width or old[1] != self._version or not self.is_mounted:
            self.changed()
            return True
        self._version += 1
        self._cache = None
        new = self.lines(width)
        if len(new) != len(old[2]):
            self.refresh(layout=True)
            return True
        dirty = [Region(0, y, width, 1) for y, (a, b) in enumerate(zip(old[2], new)) if a != b]
        if dirty:
            self.refresh(*dirty)
        return True

    def lines(self, width: int) -> list[Text]:
        width = max(1, width)
        if self._cache is None or self._cache[0] != width or self._cache[1] != self._version:
            built = self.build(width)
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

    def on_resize(self) -> None:
        self.refresh(layout=True)

    def on_focus(self) -> None:
        self.changed()
        self.post_message(PanelFocused())

    def on_blur(self) -> None:
        self.changed()
        self.post_message(PanelFocused())
