"""bench/hook_floor.py runs end to end on the CPU (its figures are for the record, not asserted) and refuses bad
input with one line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "hook_floor.py"


def test_hook_floor_writes_the_four_modes(tmp_path):
    out = tmp_path / "hf.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--steps", "5", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc["median_step_us"]) == {"plain", "noop_hooks", "noop_quiet", "attached"}
    assert doc["noop_quiet_added_us"] == pytest.approx(doc["median_step_us"]["noop_quiet"]
                                                       - doc["median_step_us"]["plain"], abs=0.2)
    assert isinstance(doc["quiet_steps"], bool)
    assert all(v > 0 for v in doc["median_step_us"].values())
    assert doc["agent_share_us"] == pytest.approx(doc["attached_added_us"] - doc["noop_hooks_added_us"], abs=0.2)
    assert "hook_floor on cpu" in proc.stdout


def test_hook_floor_breakdown_times_each_kind_alone(tmp_path):
    out = tmp_path / "hf.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "1", "--steps", "5", "--breakdown", "--out", str(out)],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert set(doc["alone_added_us"]) == {"root_pre", "root_post", "loss_pre", "loss_post", "opt_pre", "opt_post",
                                          "backward_wrap"}
    assert "each hook kind alone" in proc.stdout


def test_hook_floor_refuses_a_zero_round_count(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--rounds", "0", "--out", str(tmp_path / "x.json")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
