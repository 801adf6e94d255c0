"""The GPU scripts' CPU paths: the GPT example's --check under `batchmon run`, and the overhead bench --tiny."""

from __future__ import annotations

import json
import os
import sys

from agent_helpers import ROOT, agent_dir, run_batchmon  # noqa: F401 - fixture


def test_gpt_check_under_batchmon_run_on_cpu(agent_dir, tmp_path):
    out = tmp_path / "gpt_check.json"
    result = run_batchmon("run", "--", sys.executable, "examples/train_gpt.py", "--tiny", "--device", "cpu",
                          "--steps", "3", "--batch-size", "2", "--seq-len", "16", "--check", "--check-out", str(out),
                          env={"BATCHMON_DIR": str(agent_dir)}, timeout=240)
    assert result.returncode == 0, result.stderr
    check = json.loads(out.read_text())
    assert check["example"] == "train_gpt" and check["step"] == 3 and check["batch_size"] == 2
    rows = check["components"]
    assert set(rows) == {"parameters", "gradients", "optimizer", "activations", "batch"}
    n = check["parameters_count"]
    assert rows["parameters"]["agent"] == rows["gradients"]["agent"] == n * 4  # fp32, tied weights once
    assert rows["batch"]["agent"] == 2 * 2 * 16 * 8  # int64 inputs and targets
    assert rows["activations"]["agent"] > 0
    assert all(r["measured"] is None and r["ok"] is None for r in rows.values())  # CPU: nothing to measure
    assert check["ok"] is None and "check: not comparable here" in result.stderr


def test_overhead_bench_tiny_writes_its_result(tmp_path, agent_dir, preloaded):
    """The bench script (it attaches in its own code) forks from the session's torch-preloaded server."""
    env = {**os.environ, "OUT": str(tmp_path), "BATCHMON_DIR": str(agent_dir)}
    result = preloaded.run(["bench/agent_overhead.py", "--tiny", "--device", "cpu", "--batch-size", "2",
                            "--seq-len", "16"], timeout=240, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "agent_overhead.json").read_text())
    assert data["steps_per_mode"] == {"attached": 8, "plain": 8}
    assert data["agent_steps_seen"] == 8  # the agent measured exactly the attached steps
    assert data["ratio"] > 0 and data["settings"]["activation_every"] == 10
    assert "agent overhead:" in result.stdout
