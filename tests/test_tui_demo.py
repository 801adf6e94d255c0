"""`batchmon demo`: the one-line error without examples/, and the real thing in tmux when the parts exist."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from batchmon.cli import demo
from batchmon.cli import main as cli

ROOT = Path(__file__).resolve().parents[1]


def test_demo_without_examples_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(demo, "examples_dir", lambda: tmp_path)
    assert cli.main(["demo", "--steps", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "train_mlp.py" in err and err.startswith("batchmon: error:")


def test_demo_rejects_negative_steps(capsys):
    assert cli.main(["demo", "--steps", "-2"]) == 1
    assert "--steps" in capsys.readouterr().err


def test_training_command_runs_the_example_under_the_agent():
    cmd = demo.training_command(Path("/x/examples/train_mlp.py"), 0)
    assert cmd[:5] == [sys.executable, "-m", "batchmon", "run", "--"]
    assert cmd[5:7] == [sys.executable, "/x/examples/train_mlp.py"]
    assert cmd[cmd.index("--steps") + 1] == "0"  # 0: the example trains until it is stopped
    assert "--device" in cmd and "auto" in cmd


def _parts_missing() -> str | None:
    if shutil.which("tmux") is None:
        return "tmux not installed"
    if not (demo.examples_dir() / demo.EXAMPLE).is_file():
        return "examples/train_mlp.py not there yet"
    try:
        import batchmon.cli.run  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        return f"needs the launcher and torch ({exc})"
    return None


@pytest.mark.skipif(_parts_missing() is not None, reason=str(_parts_missing()))
def test_demo_in_tmux_shows_its_run_and_stops_it_on_quit(tmp_path):
    session = f"batchmon-demo-{uuid.uuid4().hex[:8]}"
    status = tmp_path / "status"
    cmd = (f"env -u COLUMNS -u LINES {shlex.quote(sys.executable)} -m batchmon demo; "
           f"echo $? > {shlex.quote(str(status))}")
    # start with a placeholder and respawn once the window has its size, so the app never starts at 80x24
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "48", "-c", str(ROOT), "cat"],
                   check=True)
    subprocess.run(["tmux", "respawn-pane", "-k", "-t", session, "-c", str(ROOT), cmd], check=True)
    try:
        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                  text=True).stdout

        deadline = time.monotonic() + 90
        while not ("train_mlp.py" in screen() and "largest batch" in screen()):
            assert time.monotonic() < deadline, screen()
            time.sleep(0.1)
        text = screen()
        assert "demo: train_mlp.py" in text
        found = re.search(r"train_mlp\.py[^\n]*? pid (\d+)", text)  # the job panel's title
        assert found, text
        pid = int(found.group(1))
        assert psutil.pid_exists(pid)
        cmdline = psutil.Process(pid).cmdline()
        assert cmdline[cmdline.index("--steps") + 1] == "0"  # runs until the demo stops it
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        deadline = time.monotonic() + 30
        while not (status.exists() and status.read_text().strip()):
            assert time.monotonic() < deadline, "demo did not exit after q"
            time.sleep(0.1)
        assert status.read_text().strip() == "0"
        gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert gone, "the training run outlived the demo"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
