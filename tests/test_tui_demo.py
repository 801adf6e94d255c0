"""`batchmon demo`: the one-line error without examples/, and the real thing in tmux when the parts exist."""

from __future__ import annotations

import os
import re
import signal
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


def test_demo_script_is_inside_the_installed_package():
    """Issue 15 point 6: the training script ships in the package (a wheel has no examples/)."""
    script = demo.training_script()
    assert script is not None and script.is_file()
    assert script.resolve().is_relative_to(Path(demo.__file__).resolve().parents[1])  # batchmon/
    assert script.name == demo.EXAMPLE


def test_demo_without_its_script_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(demo, "training_script", lambda: None)
    monkeypatch.setattr(demo, "_stdin_is_terminal", lambda: True)
    assert cli.main(["demo", "--steps", "3"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "demo_train" in err and err.startswith("batchmon: error:")


@pytest.mark.parametrize("argv", [["demo", "--steps", "-2"], ["demo", "--steps", "-5"], ["demo", "--steps", "x"],
                                  ["demo", "--bogus"]])
def test_demo_usage_errors_are_rc_2_with_demos_own_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: batchmon demo" in err and "Traceback" not in err


def test_training_command_runs_the_packaged_script_under_the_agent():
    cmd = demo.training_command(0)
    assert cmd[:5] == [sys.executable, "-m", "batchmon", "run", "--"]
    assert cmd[5:8] == [sys.executable, "-m", "batchmon.agent.demo_train"]
    assert cmd[cmd.index("--steps") + 1] == "0"  # 0: the run trains until it is stopped
    assert "--device" in cmd and "auto" in cmd


def _parts_missing() -> str | None:
    if shutil.which("tmux") is None:
        return "tmux not installed"
    try:
        import batchmon.cli.run  # noqa: F401
        import torch  # noqa: F401
    except ImportError as exc:
        return f"needs the launcher and torch ({exc})"
    return None


def _tmux_demo(tmp_path: Path, cwd: Path, extra: str = "", status: Path | None = None) -> tuple[str, Path]:
    """`batchmon demo` as the pane's process itself (exec), TMPDIR private to the test, started in cwd; with
    ``status``, run by the pane's shell, which writes the demo's exit status there."""
    session = f"batchmon-demo-{uuid.uuid4().hex[:8]}"
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    env = f"env -u COLUMNS -u LINES TMPDIR={shlex.quote(str(tmpdir))} PYTHONPATH={shlex.quote(str(ROOT))}"
    cmd = f"exec {env} {shlex.quote(sys.executable)} -m batchmon demo {extra}"
    if status is not None:
        cmd = f"{cmd.removeprefix('exec ')}; echo $? > {shlex.quote(str(status))}"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "48", "-c", str(cwd), "cat"],
                   check=True)
    subprocess.run(["tmux", "respawn-pane", "-k", "-t", session, "-c", str(cwd), cmd], check=True)
    return session, tmpdir


def _pane_pid(session: str) -> int:
    out = subprocess.run(["tmux", "display-message", "-p", "-t", session, "#{pane_pid}"], capture_output=True,
                         text=True, check=True).stdout
    return int(out.strip())


def _wait(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _training_tree(demo_pid: int) -> list[psutil.Process]:
    """The demo's descendants once the run's agent socket is up (launcher and training process)."""
    def ready():
        try:
            kids = psutil.Process(demo_pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return None
        return kids if any("batchmon.agent.demo_train" in " ".join(k.cmdline()) for k in kids) else None

    return _wait(ready, 60, "the demo's training run")  # type: ignore[return-value]


def _all_gone(procs: list[psutil.Process]) -> bool:
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            continue
    return True


@pytest.mark.skipif(_parts_missing() is not None, reason=str(_parts_missing()))
@pytest.mark.parametrize("how", ["SIGTERM", "SIGHUP", "terminal closed"])
def test_demo_ended_by_a_signal_leaves_no_run_and_no_temp_folder(tmp_path, how):
    """D14: kill -TERM, kill -HUP or closing the terminal (tmux kill-session: the pane's process gets SIGHUP)
    end the demo's training run (it used to go on forever, PPID 1) and remove /tmp/batchmon-demo-*."""
    session, tmpdir = _tmux_demo(tmp_path, tmp_path)
    try:
        demo_pid = _pane_pid(session)
        tree = _training_tree(demo_pid)
        assert [d.name for d in tmpdir.iterdir() if d.name.startswith("batchmon-demo-")]  # the demo's folder
        if how == "SIGTERM":
            os.kill(demo_pid, signal.SIGTERM)
        elif how == "SIGHUP":
            os.kill(demo_pid, signal.SIGHUP)
        else:
            subprocess.run(["tmux", "kill-session", "-t", session], check=True)
        _wait(lambda: _all_gone([psutil.Process(demo_pid)] if psutil.pid_exists(demo_pid) else []), 30, "demo exit")
        _wait(lambda: _all_gone(tree), 30, "the training run to end with the demo")
        assert [d for d in tmpdir.iterdir() if d.name.startswith("batchmon-demo-")] == []
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.mark.skipif(_parts_missing() is not None, reason=str(_parts_missing()))
def test_demo_runs_from_outside_the_checkout_shows_its_run_and_stops_it_on_quit(tmp_path):
    """Issue 15 point 6 and the demo's promise, in one demo (every demo started costs a Textual app, the launcher
    and a torch training process): started in a folder that is not the checkout, `batchmon demo` finds its
    training script in the package, shows its run (the job panel with the pid, the largest batch), trains until
    stopped (--steps 0: a run that ended would leave the screen of a loaded box's monitor), and q stops it: exit
    status 0, the training process gone, its temp folder removed."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    status = tmp_path / "status"
    session, tmpdir = _tmux_demo(tmp_path, outside, status=status)
    try:
        def screen() -> str:
            return subprocess.run(["tmux", "capture-pane", "-p", "-t", session], capture_output=True,
                                  text=True).stdout

        deadline = time.monotonic() + 90
        while not ("demo_train.py" in (text := screen()) and "pid " in text and "largest batch" in text):
            log = next(tmpdir.glob("batchmon-demo-*/train.log"), None)
            assert time.monotonic() < deadline, (f"the demo's job panel did not show in 90 s; screen:\n{text}\n"
                                                 f"train.log: {log.read_text()[-2000:] if log else None}")
            time.sleep(0.1)
        assert "demo: demo_train.py" in text
        found = re.search(r"demo_train\.py[^\n]*? pid (\d+)", text)  # the job panel's title
        assert found, text
        pid = int(found.group(1))
        assert psutil.pid_exists(pid)
        cmdline = psutil.Process(pid).cmdline()
        assert cmdline[cmdline.index("--steps") + 1] == "0"  # runs until the demo stops it
        subprocess.run(["tmux", "send-keys", "-t", session, "q"], check=True)
        _wait(lambda: status.exists() and status.read_text().strip(), 30, "demo exit after q")
        assert status.read_text().strip() == "0"
        gone = not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        assert gone, "the training run outlived the demo"
        assert [d for d in tmpdir.iterdir() if d.name.startswith("batchmon-demo-")] == []
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


@pytest.mark.slow
def test_demo_script_resolves_inside_an_installed_wheel(tmp_path):
    """Issue 15 point 6 from a real wheel: built from a copy of the tracked tree, installed into a private
    folder, imported from elsewhere: the demo's training script is a file of that installation."""
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    src = tmp_path / "src"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "whl"), str(src)], check=True, capture_output=True, timeout=300)
    (wheel,) = (tmp_path / "whl").glob("batchmon-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    out = subprocess.run([sys.executable, "-c", "from batchmon.cli import demo; print(demo.training_script())"],
                         cwd=elsewhere, capture_output=True, text=True, timeout=60, check=True,
                         env={k: v for k, v in {**os.environ, "PYTHONPATH": str(site)}.items()}).stdout.strip()
    assert Path(out).is_file() and Path(out).is_relative_to(site), out
