"""`batchmon demo`: a real small training run under the agent, shown in the monitor; the README's first command.

The run gets a fresh private socket folder (BATCHMON_DIR), so the demo shows only its own process; its
output goes to a log file because anything it printed would tear through the full-screen UI.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import batchmon
from batchmon.errors import CliError

EXAMPLE = "train_mlp.py"
STOP_GRACE_S = 5.0


def examples_dir() -> Path:
    """examples/ of a repository checkout (it sits beside the package)."""
    return Path(batchmon.__file__).resolve().parents[1] / "examples"


def training_command(script: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "batchmon", "run", "--", sys.executable, str(script),
            "--steps", str(steps), "--device", "auto",  # the example trains until stopped at --steps 0
            # a watchable pace, and three batch sizes so the memory model fits a line, not a single point
            "--sleep", "0.2", "--vary-batch"]


def start_training(script: Path, steps: int, socket_dir: Path, log_path: Path) -> subprocess.Popen:
    """The example under `batchmon run`, in its own process group, output to log_path only."""
    env = {**os.environ, "BATCHMON_DIR": str(socket_dir), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(training_command(script, steps), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True)


def stop_training(proc: subprocess.Popen) -> int | None:
    """SIGTERM the run's process group, SIGKILL after a grace period. Returns its exit code."""
    if proc.poll() is not None:
        return proc.returncode
    for sig, wait in ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, STOP_GRACE_S)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            return proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def main(args: Any) -> int:
    steps = int(getattr(args, "steps", 0) or 0)
    if steps < 0:
        raise CliError(f"--steps must be 0 (until you quit) or positive, got {steps}")
    script = examples_dir() / EXAMPLE
    if not script.is_file():
        raise CliError(f"the demo needs {script}, which ships with a repository checkout (git clone, then pip install -e .)")
    try:
        from batchmon.tui.app import run_monitor
    except ImportError as exc:
        raise CliError(f"the interactive monitor is not available ({exc})") from None
    from batchmon.monitor.hub import Hub

    workdir = Path(tempfile.mkdtemp(prefix="batchmon-demo-"))  # 0700, ours alone
    socket_dir = workdir / "sockets"
    socket_dir.mkdir(mode=0o700)
    log_path = workdir / "train.log"
    interval = float(getattr(args, "interval", 1.0) or 1.0)
    proc = start_training(script, steps, socket_dir, log_path)
    hub = Hub(interval=interval, socket_dir=socket_dir)
    try:
        code = run_monitor(hub, interval=interval, mouse=not getattr(args, "no_mouse", False),
                           title=f"demo: {EXAMPLE} (log {log_path})")
    finally:
        hub.stop()
        finished_before = proc.poll()
        stop_training(proc)
        shutil.rmtree(socket_dir, ignore_errors=True)
    if finished_before not in (None, 0):
        print(f"batchmon demo: the training run exited with code {finished_before}; its log: {log_path}",
              file=sys.stderr)
        return code or 1
    print(f"batchmon demo: training log kept at {log_path}", file=sys.stderr)
    return code
