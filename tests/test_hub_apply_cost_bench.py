"""bench/hub_apply_cost.py runs in-process: its tiny mode, a recording, and a usage error."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("hub_apply_cost", ROOT / "bench" / "hub_apply_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_smoke_counts_records_snapshots_and_refits(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert _bench().main(["--cpu-smoke", "--synthetic", "real", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    best = r["timed_best"]
    assert best["snapshots"]["count"] >= 1 and best["snapshots"]["fits"] >= 1
    assert any(k.startswith("agent:step") for k in best["kinds"])
    assert r["profiled"]["snapshots"]["calls_per_snapshot"] > 0
    assert "synthetic:real" in capsys.readouterr().out


def test_a_recording_replays_through_the_hub_state(tmp_path):
    out = tmp_path / "r.json"
    rec = ROOT / "tests" / "fixtures" / "tui_h200_one_job.jsonl"
    assert _bench().main(["--recording", str(rec), "--warmup", "0", "--repeat", "1", "--no-profile",
                          "--out", str(out)]) == 0
    kinds = json.loads(out.read_text())["timed_best"]["kinds"]
    assert kinds["nvml"]["count"] >= 1 and kinds["agent:hello"]["count"] == 1


def test_no_source_is_a_usage_error(capsys):
    assert _bench().main([]) == 2
    assert "give --recording FILE or --synthetic" in capsys.readouterr().err
