"""Modal screens: the help listing every key, and the prompt to type a what-if batch size."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from batchmon.tui.palette import ACCENT, BAD, DIM

#: keys that are not App bindings but still do something, for the help screen
EXTRA_KEYS: tuple[tuple[str, str], ...] = (
    ("tab / shift+tab", "select the next / previous device or process"),
    ("mouse click", "select a device or process; wheel scrolls (off with --no-mouse)"),
    ("escape", "close this help or the batch prompt"),
)


def help_text(rows: list[tuple[str, str]]) -> Text:
    t = Text().append("Keys\n\n", style="bold")
    width = max(len(k) for k, _ in rows) + 2
    for key, desc in rows:
        t.append(f"  {key:<{width}}", style=f"bold {ACCENT}")
        t.append(desc + "\n")
    t.append("\nWhat-ifs apply to the selected training process (the first one if a GPU is selected).\n",
             style=DIM)
    t.append("Press ? or escape to close.", style=DIM)
    return t


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,question_mark,q", "dismiss_help", "close", show=False)]

    def __init__(self, rows: list[tuple[str, str]]) -> None:
        super().__init__(id="help")
        self.rows = rows

    def compose(self) -> ComposeResult:
        with Vertical(id="help-box"):
            yield Static(help_text(self.rows), id="help-text")

    def action_dismiss_help(self) -> None:
        self.dismiss(None)


class BatchPrompt(ModalScreen[int | None]):
    """Type a what-if batch size; Enter applies, escape cancels."""

    BINDINGS = [Binding("escape", "cancel", "cancel", show=False)]

    def __init__(self, current: int | None) -> None:
        super().__init__(id="batch-prompt")
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical(id="batch-box"):
            yield Static(Text("What-if batch size (Enter applies, escape cancels)"), id="batch-label")
            yield Input(value=str(self.current or ""), placeholder="e.g. 128", type="integer",
                        id="batch-input", select_on_focus=True)
            yield Static("", id="batch-error")

    def on_mount(self) -> None:
        inp = self.query_one(Input)
        inp.cursor_blink = False  # deterministic screenshots
        inp.focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        text = event.value.strip()
        try:
            value = int(text)
        except ValueError:
            value = 0
        if value < 1 or value > (1 << 30):
            self.query_one("#batch-error", Static).update(Text().append(f"not a batch size: {text!r}", style=BAD))
            return
        self.dismiss(value)

    def action_cancel(self) -> None:
        self.dismiss(None)
