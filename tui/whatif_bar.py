"""The widgets around the panels: the what-if bar above the footer, and the panel columns."""

from __future__ import annotations

from rich.text import Text
from textual.containers import VerticalScroll
from textual.widget import Widget

from batchmon.tui.fmt import clean_line
from batchmon.tui.job_panel import command_text
from batchmon.tui.palette import ACCENT, BG, DIM
from batchmon.tui.views import JobView


class PanelColumn(VerticalScroll, inherit_bindings=False):
    """A scrolling column of panels that leaves the arrow keys to the app (they select, not scroll)."""


class WhatIfBar(Widget):
    """One line above the footer: the what-if settings of the selected job and their keys."""

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id)
        self.view: JobView | None = None

    def update_view(self, view: JobView | None) -> None:
        """Repaint only when the line would read differently: a repaint here, at the bottom of the screen,
        widens every frame's update region to the whole screen (Textual repaints the bounding box)."""
        self.view = view
        if not self.is_mounted or self.content_size.width <= 0:
            self.refresh()
            return
        text = self._text()
        if text != getattr(self, "_shown", None):
            self.refresh()

    def render(self) -> Text:
        self._shown = self._text()
        return self._shown

    def _text(self) -> Text:
        v = self.view
        t = Text().append(" what-if ", style=f"bold {BG} on {ACCENT}")
        if v is None:
            t.append("  no training process attached", style=DIM)
            return t
        s = v.what_if
        observed = v.observed_batch
        b = s.effective_batch(observed)
        wide = self.content_size.width >= 120
        t.append(" ")
        if wide:
            t.append(command_text(v.lead)[:30], style="bold")
            t.append("  ")
        t.append("batch ", style=DIM)
        t.append(str(b) if b is not None else "n/a", style="bold")
        if s.batch_size is not None and s.batch_size != observed:
            t.append(f" (ran {observed})", style=DIM)
        elif wide:
            t.append(" (+/- b)", style=DIM)

        def flag(label: str, value: str, key: str, on_: bool) -> None:
            t.append(f"  {label} ", style=DIM)
            t.append(value, style=f"bold {ACCENT}" if on_ else "")
            if wide:
                t.append(f" ({key})", style=DIM)

        flag("AMP", "on" if s.amp else "off", "a", s.amp)
        flag("ckpt", "on" if s.checkpointing else "off", "c", s.checkpointing)
        flag("accum", str(s.accumulation_steps), "g", s.accumulation_steps != 1)
        flag("optim", s.optimizer or "as run", "o", s.optimizer is not None)
        t.no_wrap = True
        t.overflow = "ellipsis"
        return clean_line(t)  # the command comes from the agent
