"""`batchmon demo`: a real small training run under the agent, shown in the monitor; the README's first command.

The run is batchmon.agent.demo_train (inside the package, so the demo works from an installed wheel), started
under `batchmon run` with a fresh private socket folder (BATCHMON_DIR), so the demo shows only its own process;
its output goes to a log file because anything it printed would tear through the full-screen UI.

Every way out ends the run and removes the demo's temporary folder: q, Ctrl-C, SIGTERM, SIGHUP (the terminal
closed) are caught and lead through the same cleanup; if the demo itself is killed outright (SIGKILL), the
kernel sends the run SIGTERM (PR_SET_PDEATHSIG), so it is never left orphaned training forever.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from batchmon.errors import CliError

TRAINING_MODULE = "batchmon.agent.demo_train"
EXAMPLE = "demo_train.py"
STOP_GRACE_S = 5.0
LOG_TAIL_LINES = 15
END_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Signalled(BaseException):
    """SIGTERM or SIGHUP reached the demo outside the monitor (which turns them into its own exit)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def training_script() -> Path | None:
    """Where the demo's training script is, inside the installed package (found without importing torch)."""
    spec = importlib.util.find_spec(TRAINING_MODULE)
    return Path(spec.origin) if spec is not None and spec.origin else None


def training_command(steps: int) -> list[str]:
    return [sys.executable, "-m", "batchmon", "run", "--", sys.executable, "-m", TRAINING_MODULE,
            "--steps", str(steps), "--device", "auto",  # --steps 0: trains until stopped
            # a watchable pace, and three batch sizes so the memory model fits a line, not a single point
            "--sleep", "0.2", "--vary-batch"]


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the demo dies, however it dies (Linux; elsewhere a no-op)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_training(steps: int, socket_dir: Path, log_path: Path) -> subprocess.Popen:
    """The run under `batchmon run`, in its own session (the terminal's Ctrl-C and hang-up reach the demo,
    which ends it), output to log_path only."""
    env = {**os.environ, "BATCHMON_DIR": str(socket_dir), "PYTHONUNBUFFERED": "1"}
    with open(log_path, "wb") as log:
        return subprocess.Popen(training_command(steps), stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None)


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


def _raise_signalled(signum: int, frame: Any) -> None:
    raise Signalled(signum)


def _catch(handler: Any) -> None:
    for sig in END_SIGNALS:
        _catch_one(sig, handler)


def _catch_one(sig: int, handler: Any) -> None:
    try:
        signal.signal(sig, handler)
    except (ValueError, OSError, TypeError):  # not the main thread (tests calling main() from a thread)
        pass


def _stdin_is_terminal() -> bool:
    try:
        return sys.stdin is not None and os.isatty(sys.stdin.fileno())
    except (AttributeError, OSError, ValueError):
        return False


def _say(text: str) -> None:
    """A line on stderr; the terminal may be gone (SIGHUP), which is no error of the demo's."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join(lines[-LOG_TAIL_LINES:])


def main(args: Any) -> int:
    steps = int(getattr(args, "steps", 0) or 0)
    if steps < 0:
        raise CliError(f"--steps must be 0 (until you quit) or positive, got {steps}", code=2)
    if not _stdin_is_terminal():  # before anything starts: the monitor would refuse after the run began
        raise CliError("the demo shows its run in the live monitor, which needs a terminal to read keys from, "
                       "and stdin is not one")
    if training_script() is None:
        raise CliError(f"the demo's training script ({TRAINING_MODULE}) is missing from this installation")
    try:
        from batchmon.tui.app import run_monitor
    except ImportError as exc:
        raise CliError(f"the interactive monitor is not available ({exc})") from None
    from batchmon.monitor.hub import Hub

    interval = float(getattr(args, "interval", 1.0) or 1.0)
    code = 0
    ended: list[int] = []
    proc: subprocess.Popen | None = None
    hub: Any = None
    finished_before: int | None = None
    workdir = Path(tempfile.mkdtemp(prefix="batchmon-demo-"))  # 0700, ours alone
    log_path = workdir / "train.log"
    before = {sig: signal.getsignal(sig) for sig in END_SIGNALS}
    _catch(_raise_signalled)
    try:
        socket_dir = workdir / "sockets"
        socket_dir.mkdir(mode=0o700)
        proc = start_training(steps, socket_dir, log_path)
        hub = Hub(interval=interval, socket_dir=socket_dir)
        code = run_monitor(hub, interval=interval, mouse=not getattr(args, "no_mouse", False),
                           title=f"demo: {EXAMPLE} (batchmon run, agent attached)",
                           # from here a signal asks the app to quit: raised, it could land inside Textual's
                           # start-up (before the app's own handlers) and leave the demo hanging
                           on_app=lambda app: _catch(lambda signum, frame: app.quit_from_signal(signum)))
    except Signalled as exc:
        code = 128 + exc.signum
    finally:
        _catch(lambda signum, frame: ended.append(signum))  # a second signal must not cut the cleanup short
        try:
            if hub is not None:
                hub.stop()
            if proc is not None:
                finished_before = proc.poll()
                stop_training(proc)
            if finished_before not in (None, 0):
                _say(f"batchmon demo: the training run exited with code {finished_before}; the end of its log:\n"
                     f"{_log_tail(log_path)}")
                code = code or 1
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
            for sig, handler in before.items():
                _catch_one(sig, handler if handler is not None else signal.SIG_DFL)
    return code
