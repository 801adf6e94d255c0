"""Modal screens: the help listing every key, and the prompt to type a what-if batch size."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Input, Static

from batchmon.tui.palette import ACCENT, BAD, DIM

#: long descriptions for the help screen, by action
HELP: dict[str, str] = {
    "quit": "quit",
    "help": "show this help",
    "pause": "pause / resume the display (data keeps arriving)",
    "batch(1)": "what-if batch size: next larger (1, 2, 3, 4, 6, 8, 12, 16 ...)",
    "batch(-1)": "what-if batch size: next smaller",
    "type_batch": "type a what-if batch size",
    "toggle_amp": "what-if: mixed precision (AMP) on / off",
    "toggle_ckpt": "what-if: activation checkpointing on / off",
    "cycle_accum": "what-if: gradient accumulation steps 1 → 2 → 4 → 8",
    "cycle_optimizer": "what-if: optimizer as observed → sgd → sgd-momentum → adam",
    "reset_what_if": "reset the what-ifs to the observed run",
    "interval(-1)": "refresh faster (shorter interval)",
    "interval(1)": "refresh slower (longer interval)",
    "cycle_interval": "cycle the refresh interval",
    "select(-1)": "select the previous device or process",
    "select(1)": "select the next device or process",
    "column('devices')": "select the GPU of the selected process",
    "column('jobs')": "select a process on the selected GPU",
    "arrow(-1)": "replay: seek 10 s back; live: select the GPU of the selected process",
    "arrow(1)": "replay: seek 10 s on; live: select a process on the selected GPU",
    "seek_start": "replay: go to the recording's start",
    "seek_end": "replay: go to the recording's end",
}

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
