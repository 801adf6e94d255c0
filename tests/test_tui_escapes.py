"""Nobody writes to the user's terminal through the monitor (issue 17 item 5): every string from outside (an
agent's argv and name, model class, optimizer, device, event text; a GPU's name; the host name; another
user's process user and command line; warnings) is drawn with its control characters as spaces.

Two views: every cell Textual composes (headless, fast), and a real terminal (tmux): the window title stays,
the text is on screen, inert."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import unicodedata
import uuid
from pathlib import Path

import pytest

import tui_fixtures as fx
from batchmon.tui.app import BatchmonApp
from batchmon.tui.fmt import clean_line
from batchmon.units import clean_text
from conftest import wait_until

ROOT = Path(__file__).resolve().parents[1]


def _controls(text: str) -> list[str]:
    return sorted({repr(ch) for ch in text if unicodedata.category(ch) in ("Cc", "Cf") and ch != "\n"})


def test_clean_text_and_clean_line_keep_length_and_styles():
    assert clean_text(fx.HOSTILE) == "x ]2;PWNED \\y [2Jz [10;10H  31m"
    from rich.text import Text

    line = Text("ab").append(fx.CLEAR_SCREEN, style="bold").append("cd", style="red")
    cleaned = clean_line(line)
    assert cleaned.plain == "ab [2Jcd" and [(s.start, s.end) for s in cleaned.spans] == [(2, 6), (6, 8)]


async def test_every_cell_of_a_hostile_snapshot_is_inert():
    app = BatchmonApp(snapshot=fx.hostile())
    async with app.run_test(size=(180, 60)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and "PWNED" in fx.screen_text(app))
        strips = app.screen._compositor.render_strips()
        text = "\n".join("".join(seg.text for seg in strip) for strip in strips)
        assert _controls(text) == []
        for drawn in ("trainx ]2;PWNED \\y [2Jz", "H200x ]2;PWNED", "CUDA out of memoryx ]2;PWNED",
                      "invalid lines dropped", "gpu-boxx ]2;PWNED"):
            assert drawn in text, drawn


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_hostile_strings_leave_a_real_terminal_alone(tmp_path):
    session = f"batchmon-esc-{uuid.uuid4().hex[:8]}"
    status = tmp_path / "status"
    app = ROOT / "tests" / "tui_fixture_app.py"
    cmd = (f"env -u COLUMNS -u LINES {shlex.quote(sys.executable)} {shlex.quote(str(app))} hostile; "
           f"echo $? > {shlex.quote(str(status))}")

    def tmux(*args: str) -> str:
        return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout

    tmux("new-session", "-d", "-s", session, "-x", "180", "-y", "50", "cat")
    try:
        tmux("set-option", "-t", session, "allow-rename", "on")
        tmux("select-pane", "-t", session, "-T", "before")
        tmux("respawn-pane", "-k", "-t", session, cmd)
        screen = lambda: tmux("capture-pane", "-p", "-t", session)  # noqa: E731
        wait_until(lambda: "CUDA out of memory" in screen() and "largest batch" in screen(), what="the first frame")
        # drawn top to bottom: a clear-screen obeyed on the way would leave the lines above it blank
        wait_until(lambda: screen().lstrip().startswith("batchmon") and "(×2)" in screen()
                   and len([ln for ln in screen().splitlines() if ln.strip()]) > 20, what="the whole screen")
        text = screen()
        assert "]2;PWNED" in text  # drawn, as text
        assert "PWNED" not in tmux("display-message", "-p", "-t", session, "#{pane_title}")
        tmux("send-keys", "-t", session, "q")
        wait_until(lambda: status.exists() and status.read_text().strip() != "", what="the monitor to exit")
        assert status.read_text().strip() == "0"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
