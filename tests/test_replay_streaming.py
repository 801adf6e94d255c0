"""Issue 17 C7: replay streams the recording: the peak memory of `replay --once` does not grow with the file.
(The test keeps its name, listed slow in tests/conftest.py, from when the file was 60 MB.)

A real recording (the 16-agent H200 fixture) repeated to 30 MB; reading it whole used ~7.6x its size (a 543 MB
recording needed 4.1 GB), so the old reader would peak near 230 MB here (the streaming one: ~24 MB, at 30 MB as at
60 MB; 30 MB halves the replay's CPU and still leaves the old reader well over the 150 MB limit). The peak RSS
of the replay process is measured by a parent that has no other child (RUSAGE_CHILDREN)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path



ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "tui_h200_16_agents.jsonl"
SIZE = 30 << 20
PEAK_LIMIT_KB = 150 << 10

MEASURE = ("import resource, subprocess, sys\n"
           "r = subprocess.run([sys.executable, '-m', 'batchmon', 'replay', sys.argv[1], '--once', '--json'],"
           " stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
           "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
           "sys.stderr.write(r.stderr.decode())\n")


def _big_recording(path: Path) -> int:
    lines = FIXTURE.read_bytes().splitlines(keepends=True)
    body = b"".join(lines[1:])
    written = 0
    with open(path, "wb") as f:
        f.write(lines[0])  # the meta line once, then the same minutes of recording again and again
        while written < SIZE:
            f.write(body)
            written += len(body)
    return written + len(lines[0])


def test_replay_once_of_a_60mb_recording_stays_under_150mb(tmp_path):
    path = tmp_path / "big.jsonl"
    size = _big_recording(path)
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    code, peak_kb = map(int, proc.stdout.split())
    assert code == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert peak_kb < PEAK_LIMIT_KB, f"peak RSS {peak_kb / 1024:.0f} MB replaying {size / 2**20:.0f} MB"


def test_the_tui_source_opens_a_big_recording_at_once(tmp_path):
    """The TUI waited 15 s for its first frame of a 543 MB recording: ReplaySource now reads only the first
    lines before the first snapshot."""
    import time

    from batchmon.monitor.replay import ReplaySource

    path = tmp_path / "big.jsonl"
    _big_recording(path)
    started = time.monotonic()
    source = ReplaySource(path, speed=1.0)
    try:
        assert source.snapshot() is not None
        assert time.monotonic() - started < 5
    finally:
        source.stop()
