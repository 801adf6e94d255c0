"""bench/predict_accuracy.py's CPU path (--cpu-smoke): the GPU script's code runs end to end and is exact
where it must be (the smoke device's peak is the sum of the measured components, so linear by construction)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "predict_accuracy.py"


def test_cpu_smoke_run_writes_json_and_markdown(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--quick", "--arch", "gpt"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads((tmp_path / "predict_accuracy.json").read_text())
    md = (tmp_path / "predict_accuracy.md").read_text()
    assert "| gpt |" in md and md.strip() in proc.stdout
    (r,) = doc["results"]
    assert len(r["points"]) == 4 and all(pt["ok"] for pt in r["points"])
    assert r["worst_error_pct"] == 0.0
    assert r["batchmon_ooms"] == 0
    # the central fit is exact on the smoke device; the largest batch may be conservative (a tiny model's
    # gradients are large against its per-sample bytes: the band's high side), never above the real one
    assert r["predicted_max_batch_central"] == r["real_max_batch"] > 0
    assert 0 < r["predicted_max_batch"] <= r["real_max_batch"]
    lt = r["lightning"]
    assert lt["ooms"] >= 1 and lt["trials"] > lt["ooms"] and lt["found"] == r["real_max_batch"]
    assert r["basis"].startswith("3 steps at batch 2, 4 (steps 1-3)")


def test_cpu_smoke_with_batchmons_agent_as_the_observer(tmp_path):
    pytest.importorskip("batchmon.agent.handle")
    env = {**os.environ, "OUT": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--quick", "--arch", "mlp", "--observer", "agent"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads((tmp_path / "predict_accuracy.json").read_text())["results"]
    assert r["observer"].startswith("batchmon.agent.handle"), r["observer"]
    assert [s["batch_size"] for s in r["observed"]] == [8, 8, 4]
    assert all(s["components"]["activations"] > 0 for s in r["observed"])
    assert r["predicted_max_batch"] > 0 and r["real_max_batch"] > 0
