"""Issue 17, the general test: every subcommand given hostile values (huge, negative, NaN, inf, empty, non-UTF-8,
a directory, a FIFO, a closed stdout, no terminal) ends with one line on stderr (argparse's usage line allowed
before it), no traceback, the right exit code (2 for usage), and leaves no process, socket or temp folder.

Each case is a real `python -m batchmon` child in its own session, with a private TMPDIR and BATCHMON_DIR and
stdin from /dev/null (no terminal); afterwards nothing of that session may be alive and both folders must be
empty of batchmon's files.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

ROOT = Path(__file__).resolve().parents[1]
RECORDING = ROOT / "tests" / "fixtures" / "tui_h200_no_agents.jsonl"
PREDICT = ["predict", "--params", "125M", "--layers", "12", "--hidden", "768", "--input-dim", "1024"]

# (id, argv with {dir} {fifo} {rec} placeholders or bytes, expected exit code, how stdout is set up)
USAGE = 2
CASES: list[tuple[str, list, int, str]] = [
    # huge
    ("interval-huge", ["--once", "--interval", "1e300"], USAGE, "pipe"),
    ("interval-overflow", ["--once", "--interval", "1e400"], USAGE, "pipe"),
    ("demo-steps-huge", ["demo", "--steps", "9" * 400], 1, "pipe"),  # valid number, but no terminal
    ("export-port-huge", ["export", "--prometheus", "--port", "99999999999999999999"], USAGE, "pipe"),
    ("predict-batch-huge", [*PREDICT, "--batch", "1e400"], USAGE, "pipe"),
    ("speed-huge", ["replay", "{rec}", "--speed", "1e400"], USAGE, "pipe"),
    # negative
    ("interval-negative", ["--once", "--interval", "-1"], USAGE, "pipe"),
    ("demo-steps-negative", ["demo", "--steps", "-5"], USAGE, "pipe"),
    ("export-port-negative", ["export", "--prometheus", "--port", "-1"], USAGE, "pipe"),
    ("record-duration-negative", ["record", "-o", "{dir}/out.jsonl", "--duration", "-3"], USAGE, "pipe"),
    ("predict-batch-negative", [*PREDICT, "--batch", "-3"], USAGE, "pipe"),
    # NaN and inf
    ("interval-nan", ["--once", "--interval", "nan"], USAGE, "pipe"),
    ("speed-nan", ["replay", "{rec}", "--once", "--speed", "nan"], USAGE, "pipe"),
    ("stream-duration-inf", ["stream", "--duration", "inf"], USAGE, "pipe"),
    ("predict-params-inf", [*PREDICT, "--batch", "8", "--params", "inf"], USAGE, "pipe"),
    # empty
    ("interval-empty", ["--once", "--interval", ""], USAGE, "pipe"),
    ("host-empty", ["--once", "--host", ""], USAGE, "pipe"),
    ("replay-empty-name", ["replay", "", "--once"], 1, "pipe"),
    ("record-empty-name", ["record", "-o", "", "--duration", "1"], 1, "pipe"),
    ("run-nothing", ["run"], USAGE, "pipe"),
    ("run-empty-command", ["run", "--", ""], USAGE, "pipe"),
    ("bind-empty", ["export", "--prometheus", "--bind", "", "--port", "1"], 1, "pipe"),
    # non-UTF-8
    ("replay-non-utf8", [b"replay", b"\xff\xfe.jsonl", b"--once"], 1, "pipe"),
    ("host-non-utf8", [b"--once", b"--host", b"-\xff"], USAGE, "pipe"),
    ("interval-non-utf8", [b"--once", b"--interval", b"\xff"], USAGE, "pipe"),
    ("unknown-option-non-utf8", [b"demo", b"--\xff"], USAGE, "pipe"),
    # a directory
    ("replay-directory", ["replay", "{dir}", "--once"], 1, "pipe"),
    ("record-into-directory", ["record", "-o", "{dir}", "--duration", "1"], 1, "pipe"),
    # a FIFO nobody reads or writes
    ("replay-fifo", ["replay", "{fifo}", "--once"], 1, "pipe"),
    ("record-into-fifo", ["record", "-o", "{fifo}", "--duration", "1"], 1, "pipe"),
    # a closed stdout
    ("once-closed-stdout", ["--once"], 1, "closed"),
    ("replay-closed-stdout", ["replay", "{rec}", "--once", "--json"], 1, "closed"),
    ("predict-closed-stdout", [*PREDICT, "--batch", "8"], 1, "closed"),
    ("stream-closed-stdout", ["stream", "--duration", "1"], 1, "closed"),
    ("version-closed-stdout", ["--version"], 1, "closed"),
    ("predict-full-disk", [*PREDICT, "--batch", "8"], 1, "full"),
    ("once-full-disk", ["--once", "--json"], 1, "full"),
    # no terminal (stdin is /dev/null in every case)
    ("monitor-no-terminal", [], 1, "pipe"),
    ("replay-no-terminal", ["replay", "{rec}"], 1, "pipe"),
    ("demo-no-terminal", ["demo", "--steps", "3"], 1, "pipe"),
]


def _argv(raw: list, tmp: Path) -> list:
    subst = {"{dir}": str(tmp / "d"), "{fifo}": str(tmp / "fifo"), "{rec}": str(RECORDING)}
    out = []
    for a in raw:
        if isinstance(a, str):
            for k, v in subst.items():
                a = a.replace(k, v)
        out.append(a)
    return out


def _session_alive(sid: int) -> list[psutil.Process]:
    alive = []
    for p in psutil.process_iter(["pid", "status"]):
        try:
            if p.pid != os.getpid() and os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue
    return alive


@pytest.mark.parametrize("argv, code, stdout", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_value(tmp_path, argv, code, stdout):
    (tmp_path / "d").mkdir()
    os.mkfifo(tmp_path / "fifo")
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    sockdir = tmp_path / "sock"
    env = {**os.environ, "TMPDIR": str(tmpdir), "BATCHMON_DIR": str(sockdir), "PYTHONPATH": str(ROOT),
           "COLUMNS": "100"}
    cmd = [sys.executable.encode(), b"-m", b"batchmon",
           *[a if isinstance(a, bytes) else a.encode() for a in _argv(argv, tmp_path)]]
    out_target = subprocess.PIPE
    if stdout == "closed":
        # the child starts with fd 1 closed (`>&-`)
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env, start_new_session=True, cwd=tmp_path,
                                preexec_fn=lambda: os.close(1))
    elif stdout == "full":
        with open("/dev/full", "wb") as full:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=full, stderr=subprocess.PIPE, env=env,
                                    start_new_session=True, cwd=tmp_path)
    else:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out_target, stderr=subprocess.PIPE,
                                env=env, start_new_session=True, cwd=tmp_path)
    sid = proc.pid
    try:
        _, err_bytes = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(sid, 9)
        proc.communicate()
        pytest.fail(f"{argv} hung")
    err = err_bytes.decode("utf-8", "replace")
    assert "Traceback" not in err, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if code == USAGE and lines and lines[0].startswith("usage:"):
        lines = [ln for ln in lines if not ln.startswith(("usage:", " "))]  # argparse's usage, then one line
    if code == 0:
        assert lines == [], err
    else:
        assert len(lines) == 1, err
    assert proc.returncode == code, (proc.returncode, err)
    deadline = time.monotonic() + 10
    while _session_alive(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _session_alive(sid) == [], "processes left behind"
    left = [p.name for p in tmpdir.iterdir() if not p.name.startswith("torchinductor")]
    assert left == [], f"temp files left behind: {left}"
    assert not sockdir.exists() or not any(p.suffix == ".sock" or p.name.startswith(".") for p in sockdir.iterdir())
