"""Issue 17 C6, C9, C11, C12: what a recording, a remote box or the environment sends cannot crash, freeze or
fool the monitor. Real subprocesses of `python -m batchmon`, a fake `ssh` on PATH, /dev/full, a real pipe."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchmon.monitor.replay import NotARecording, ReplaySource, final_snapshot, read_recording

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
TWO_JOBS = FIXTURES / "tui_h200_two_jobs.jsonl"
HUGE = 2 ** 1024 + 1


def batchmon(*args: str, env: dict[str, str] | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "batchmon", *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, **kw)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def _lines_of(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _write(path: Path, records: list[dict] | list[str]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


# ------------------------------------------------------------------------------------------ C6: huge numbers


def _with_huge_sample_values(tmp_path: Path) -> Path:
    records = _lines_of(TWO_JOBS)
    out = []
    for r in records:
        out.append(r)
        if r["kind"] == "nvml" and r.get("source", "local") == "local":
            bad = json.loads(json.dumps(r))
            bad["data"]["devices"][0]["memory"]["total"] = HUGE
            bad["data"]["devices"][0]["power"] = HUGE
            out.append(bad)
        if r["kind"] == "host":
            bad = json.loads(json.dumps(r))
            bad["data"]["memory_total"] = HUGE
            out.append(bad)
    # json.dumps writes the big integers as digits, as a hostile remote box or a crafted recording would
    return _write(tmp_path / "huge.jsonl", out)


@pytest.mark.parametrize("as_json", [False, True])
def test_integers_over_2_to_the_1024_in_samples_are_warnings_not_crashes(tmp_path, as_json):
    path = _with_huge_sample_values(tmp_path)
    proc = batchmon("replay", str(path), "--once", *(["--json"] if as_json else []))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    if as_json:
        warnings = json.loads(proc.stdout)["warnings"]
        text = json.dumps(warnings)
        assert "bad NVML sample" in text and "bad host sample" in text and "out of range" in text
    else:
        assert "bad NVML sample" in proc.stdout


@pytest.mark.parametrize("t", ["Infinity", "1e300", "1e400", "-Infinity", "NaN", str(HUGE)],
                         ids=["inf", "1e300", "1e400", "-inf", "nan", "2**1024"])
def test_unbelievable_tick_times_neither_freeze_nor_crash(tmp_path, t):
    """A tick with t=Infinity froze a replay (its thread died on an overflowing wait); t=1e400 crashed --once."""
    lines = TWO_JOBS.read_text().splitlines()
    ticks = [i for i, line in enumerate(lines) if '"kind":"tick"' in line.replace(" ", "")]
    i = ticks[len(ticks) // 2]
    record = json.loads(lines[i])
    lines[i] = json.dumps(record).replace(json.dumps(record["t"]), t, 1)
    assert t in lines[i]
    path = tmp_path / "t.jsonl"
    path.write_text("\n".join(lines) + "\n")
    proc = batchmon("replay", str(path), "--once", "--json")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["agents"]
    source = ReplaySource(path, speed=1000.0)
    try:
        source.start()
        assert source.finished.wait(60), "the replay froze"
        assert source.error is None and source.snapshot().agents
    finally:
        source.stop()


# ------------------------------------------------------------------------------------------ C11: not a recording


def test_random_bytes_dev_null_and_empty_files_are_an_error(tmp_path):
    random_bytes = tmp_path / "random.bin"
    random_bytes.write_bytes(os.urandom(1 << 16))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for path, words in ((random_bytes, "not a batchmon recording"), (Path("/dev/null"), "not a regular file"),
                        (empty, "is empty"), (tmp_path, "Is a directory")):
        for once in (["--once"], ["--once", "--json"], []):
            line = one_line_error(batchmon("replay", str(path), *once, stdin=subprocess.DEVNULL))
            assert words in line and line.startswith("batchmon: error:"), line
        with pytest.raises((NotARecording, OSError)):
            read_recording(path, strict=True)


def test_a_fifo_is_not_waited_on(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    line = one_line_error(batchmon("replay", str(fifo), "--once", timeout=20))
    assert "not a regular file" in line


def test_once_to_a_full_disk_is_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        for argv in (["replay", str(TWO_JOBS), "--once"], ["replay", str(TWO_JOBS), "--once", "--json"]):
            proc = subprocess.run([sys.executable, "-m", "batchmon", *argv], stdout=full, stderr=subprocess.PIPE,
                                  text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
            line = one_line_error(proc)
            assert "No space left on device" in line and "recording" not in line, line


def test_once_into_a_pipe_closed_early_never_blames_the_recording():
    """`replay x --once | head -2`: the reader leaves before the table is written; rc 0, nothing on stderr."""
    for _ in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "batchmon", "replay", str(TWO_JOBS), "--once"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
        proc.stdout.close()  # the reader is gone before anything is written
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.wait(60) == 0 and err == "", err


def test_closed_stdout_is_one_line():
    proc = subprocess.run(f"{sys.executable} -m batchmon replay {TWO_JOBS} --once >&-", shell=True,
                          capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "stdout is closed" in one_line_error(proc)


def test_library_readers_stay_tolerant(tmp_path):
    """load_snapshots/final_snapshot without strict still replay damaged content (tests, screenshots)."""
    junk = tmp_path / "junk.jsonl"
    junk.write_bytes(b"\x00\xff\n")
    assert final_snapshot(junk).agents == ()


# ------------------------------------------------------------------------------------------ C7: bounded sources


def test_a_hundred_thousand_sources_are_capped_with_a_warning(tmp_path):
    records: list[dict] = [{"t": 1.0, "kind": "meta", "version": 1, "interval": 1.0, "source": "local"}]
    for i in range(100_000):
        records.append({"t": 2.0, "kind": "link", "source": f"h{i}",
                        "data": {"state": "lost", "message": "x", "retry_in": 1.0}})
    records.append({"t": 3.0, "kind": "tick", "source": "local"})
    path = _write(tmp_path / "sources.jsonl", records)
    started = time.monotonic()
    snap = final_snapshot(path, strict=True)
    assert time.monotonic() - started < 30
    assert any("sources; the rest skipped" in w.message for w in snap.warnings)
    assert len(snap.remotes) <= 64 if hasattr(snap, "remotes") else True


# ------------------------------------------------------------------------------------------ C9, C12: remote


@pytest.fixture
def fake_ssh(tmp_path):
    """An `ssh` on PATH that never answers (a box that drops packets), recording its pid."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pids = tmp_path / "pids"
    script = bin_dir / "ssh"
    script.write_text(f"#!/bin/sh\necho $$ >> {pids}\nexec sleep 600\n")
    script.chmod(0o755)
    return {"PATH": f"{bin_dir}:{os.environ['PATH']}", "BATCHMON_DIR": str(tmp_path / "sock")}, pids


def test_once_with_a_host_that_never_answers_says_so(fake_ssh, monkeypatch, capsys):
    """C12: the host is in "warnings" (it was `[]`) and in the table; rc 0; its ssh does not outlive --once."""
    from batchmon.cli import main as cli
    from batchmon.cli import monitor

    env, pids = fake_ssh
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(monitor, "ONCE_REMOTE_WAIT_S", 1.0)
    assert cli.main(["--once", "--json", "--host", "gpu1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert any(w.get("source") == "gpu1" and "no answer within 1 s" in json.dumps(w) for w in out["warnings"]), out
    assert cli.main(["--once", "--host", "gpu1"]) == 0
    table = capsys.readouterr().out
    assert "gpu1" in table and "no answer within 1 s" in table
    for pid in map(int, pids.read_text().split()):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            time.sleep(0.05)
        else:
            pytest.fail(f"fake ssh {pid} outlived --once")


@pytest.mark.parametrize("command", ["-oProxyCommand=touch {marker}", "  -F/dev/null batchmon stream"])
def test_remote_command_starting_with_a_dash_is_refused(fake_ssh, tmp_path, command):
    """C9: ssh took BATCHMON_REMOTE_COMMAND=-oProxyCommand=... as an option (a local command ran)."""
    env, pids = fake_ssh
    marker = tmp_path / "pwned"
    env = {**env, "BATCHMON_REMOTE_COMMAND": command.format(marker=marker)}
    for argv in (["--once", "--host", "gpu1"], ["--once", "--json", "--host", "gpu1"]):
        line = one_line_error(batchmon(*argv, env=env), code=2)
        assert "BATCHMON_REMOTE_COMMAND" in line
    assert not marker.exists() and not pids.exists()  # ssh never ran
