"""Every way out of the monitor restores the terminal and ends what batchmon started (issue 17 item 15).

The real `batchmon --host ...` in a real terminal (tmux), with a fake `ssh` on PATH that stays connected (so
the monitor has a child process of its own); then Ctrl-C, SIGTERM, SIGHUP or SIGINT. Afterwards the pane must
be back to normal (alternate screen off, mouse reporting off, cursor shown), the exit status says what
happened, and every ssh the monitor started is gone."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from conftest import wait_until

pytestmark = [pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed"), pytest.mark.slow]

FAKE_SSH = """#!/bin/sh
echo $$ >> "{pids}"
exec sleep 600
"""


def tmux(*args: str) -> str:
    return subprocess.run(["tmux", *args], check=True, capture_output=True, text=True).stdout


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie waiting for its parent counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how, status", [("ctrl+c", 0), ("SIGTERM", 128 + signal.SIGTERM),
                                         ("SIGHUP", 128 + signal.SIGHUP), ("SIGINT", 128 + signal.SIGINT)])
def test_every_way_out_restores_the_terminal_and_ends_the_ssh_sessions(tmp_path, how, status):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pids = tmp_path / "ssh.pids"
    ssh = bin_dir / "ssh"
    ssh.write_text(FAKE_SSH.format(pids=pids))
    ssh.chmod(0o755)
    sockets = tmp_path / "sockets"
    sockets.mkdir(mode=0o700)
    pidfile, statusfile = tmp_path / "monitor.pid", tmp_path / "status"
    env = (f"env -u COLUMNS -u LINES PATH={shlex.quote(str(bin_dir))}:\"$PATH\" "
           f"BATCHMON_DIR={shlex.quote(str(sockets))} PYTHONPATH={shlex.quote(os.pathsep.join(sys.path))}")
    # the shell prints its pid and execs: the pid is the monitor's
    inner = f"echo $$ > {shlex.quote(str(pidfile))}; exec {env} {shlex.quote(sys.executable)} -m batchmon --host gpu1"
    cmd = f"sh -c {shlex.quote(inner)}; echo $? > {shlex.quote(str(statusfile))}; cat"
    session = f"batchmon-sig-{uuid.uuid4().hex[:8]}"
    tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "48", "cat")
    try:
        tmux("respawn-pane", "-k", "-t", session, cmd)
        screen = lambda: tmux("capture-pane", "-p", "-t", session)  # noqa: E731
        flags = lambda: tmux("display-message", "-p", "-t", session,  # noqa: E731
                             "#{alternate_on} #{mouse_any_flag} #{mouse_button_flag} #{cursor_flag}").split()
        wait_until(lambda: "every 1 s" in screen(), what="the first frame")
        wait_until(lambda: pids.exists() and pids.read_text().strip(), what="the ssh session to start")
        assert flags()[0] == "1" and flags()[3] == "0"  # running: alternate screen on, cursor hidden
        monitor = int(pidfile.read_text())
        if how == "ctrl+c":
            tmux("send-keys", "-t", session, "C-c")
        else:
            os.kill(monitor, getattr(signal, how))
        wait_until(lambda: statusfile.exists() and statusfile.read_text().strip(), timeout=15,
                   what="the monitor to exit")
        assert int(statusfile.read_text()) == status
        assert flags() == ["0", "0", "0", "1"]  # alternate screen off, no mouse reporting, cursor shown
        assert "Traceback" not in screen()
        started = [int(p) for p in pids.read_text().split()]
        wait_until(lambda: not any(alive(p) for p in started), timeout=10, what="the ssh sessions to end")
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
