"""The monitor's tools on a real recording: screenshots/make_screenshots.py and bench/monitor_cpu.py (CPU path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recording(tmp_path_factory) -> Path:
    """A real `batchmon record` of this machine (NVML as it is here, host memory, no agents)."""
    path = tmp_path_factory.mktemp("rec") / "here.jsonl"
    subprocess.run([sys.executable, "-m", "batchmon", "record", "-o", str(path), "--duration", "0.6",
                    "--interval", "0.2"], check=True, timeout=60)
    assert path.stat().st_size > 0
    return path


def test_make_screenshots_writes_svg_and_png(recording, tmp_path):
    out = tmp_path / "shots"
    proc = subprocess.run([sys.executable, str(ROOT / "screenshots" / "make_screenshots.py"), str(recording),
                           "--out", str(out), "--name", "here", "--size", "160x48", "--size", "80x24"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    for size in ("160x48", "80x24"):
        svg = (out / f"here_{size}.svg").read_text()
        assert svg.startswith("<svg") and "batchmon" in svg and "replay" in svg
        png = out / f"here_{size}.png"
        if f"no PNG for here_{size}.svg" in proc.stderr:  # a converter that is there but does not work
            assert not png.exists() and len(proc.stderr.splitlines()) == 2
        elif any(shutil.which(t) for t in ("rsvg-convert", "convert")):
            assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.print.svg"))


def test_make_screenshots_bad_file_is_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "screenshots" / "make_screenshots.py"),
                           str(tmp_path / "missing.jsonl")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and len(proc.stderr.strip().splitlines()) == 1


def test_monitor_cpu_bench_runs_the_monitor_in_a_pty(recording, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "monitor_cpu.py"), "--replay", str(recording),
                           "--duration", "1", "--warmup", "1.5", "--name", "t"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["mode"] == "replay" and result["exit_code_after_q"] == 0
    assert result["cpu_seconds_total"] > 0  # it did start Python and Textual
    assert 0 <= result["cpu_seconds_steady"] <= result["cpu_seconds_total"]
    assert 0.9 <= result["window_s"] < 5


@pytest.mark.parametrize("extra, mode", [
    (["--nvml-replay", str(ROOT / "tests" / "fixtures" / "nvml_h200_recording.json"), "--idle-gpu"],
     "live, NVML replayed"),
    (["--bare", "ticking"], "bare Textual app (ticking)"),
])
def test_monitor_cpu_bench_nvml_replay_and_bare_floor_modes(extra, mode, tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "TMPDIR": str(tmp_path), "BATCHMON_DIR": str(tmp_path / "sock")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "monitor_cpu.py"), *extra, "--duration", "1",
                           "--warmup", "2", "--name", "t"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads((tmp_path / "t.json").read_text())
    assert result["mode"] == mode and result["exit_code_after_q"] == 0 and result["cpu_seconds_total"] > 0
    if "--idle-gpu" in extra:
        assert result["idle_gpu"] is True and result["terminal_bytes_steady"] > 0  # the GPU panel refreshes
