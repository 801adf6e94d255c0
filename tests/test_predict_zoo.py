"""bench/predict_zoo.py's CPU path (--cpu-smoke): the H200 script's code runs end to end through the real
agent, writes the JSON issue 13 asks for, and its markdown writer reads it back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "predict_zoo.py"


@pytest.mark.slow
def test_cpu_smoke_writes_the_issue_13_json_and_a_table(tmp_path):
    out = tmp_path / "zoo.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--arch", "lstm-lm,unet,gpt-compiled",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu-smoke" and "fake" in doc["emulation"]
    assert [r["arch"] for r in doc["results"]] == ["lstm-lm", "unet", "gpt-compiled"]
    for r in doc["results"]:
        assert "error" not in r, r.get("error")
        assert r["observer"].startswith("batchmon.agent"), r["observer"]
        assert r["observed"] == [r["observed"][0]] * 3 + [r["observed"][0] // 2]
        assert r["predicted_max_batch"] > 0 and r["real_max_batch"] > 0
        assert r["points"] and all({"batch", "predicted_peak", "measured_peak"} <= set(pt) for pt in r["points"])
        assert isinstance(r["what_ifs"], list)
    table = subprocess.run([sys.executable, str(SCRIPT), "--markdown", str(out)], capture_output=True, text=True,
                           timeout=60)
    assert table.returncode == 0 and "| lstm-lm | 20, 20, 20, 10 |" in table.stdout
