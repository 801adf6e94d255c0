"""The real monitor in a real terminal (tmux): screen text via capture-pane, keys via send-keys, q exits 0."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import wait_until

pytestmark = [pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed"), pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[1]


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


@pytest.fixture
def session():
    name = f"batchmon-test-{uuid.uuid4().hex[:8]}"
    yield name
    subprocess.run(["tmux", "kill-session", "-t", name], capture_output=True)


def test_monitor_in_tmux_shows_screen_reacts_to_keys_and_quits(session, tmp_path):
    status = tmp_path / "status"
    app = ROOT / "tests" / "tui_fixture_app.py"
    # tmux may hand the pane COLUMNS/LINES of whoever started its server; the app must ask the terminal
    cmd = (f"env -u COLUMNS -u LINES {shlex.quote(sys.executable)} {shlex.quote(str(app))}; "
           f"echo $? > {shlex.quote(str(status))}")
    # a placeholder first, the app once the window has its size (no start at 80x24 followed by a resize)
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "48", "cat")
    tmux("respawn-pane", "-k", "-t", session, cmd)

    def screen() -> str:
        return tmux("capture-pane", "-p", "-t", session)

    wait_until(lambda: "largest batch" in screen(), what="the first frame")
    text = screen()
    assert "batchmon" in text and "fixture" in text and "GPU 0" in text
    assert "train.py --model gpt-medium" in text and "finetune.py" in text
    assert "every 250 ms" in text
    assert max(len(line) for line in text.splitlines()) > 120  # laid out for 160 columns

    tmux("send-keys", "-t", session, "+")
    wait_until(lambda: "pred b=24" in screen(), what="the what-if batch to change")
    tmux("send-keys", "-t", session, "p")
    wait_until(lambda: "PAUSED" in screen(), what="pause")
    tmux("send-keys", "-t", session, "?")
    wait_until(lambda: "show this help" in screen(), what="the help screen")
    tmux("send-keys", "-t", session, "Escape")
    wait_until(lambda: "show this help" not in screen(), what="the help screen to close")

    tmux("send-keys", "-t", session, "q")
    wait_until(lambda: status.exists() and status.read_text().strip() != "", timeout=10, what="the monitor to exit")
    assert status.read_text().strip() == "0"
