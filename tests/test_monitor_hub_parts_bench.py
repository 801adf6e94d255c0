"""bench/monitor_hub_parts.py: the live monitor in a pty beside 2 peers, its hub's parts timed, for a few seconds."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("monitor_hub_parts", ROOT / "bench" / "monitor_hub_parts.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_parts_of_the_live_hub_beside_two_peers(tmp_path):
    out = tmp_path / "parts.json"
    assert _bench().main(["--nvml-replay", str(ROOT / "tests" / "fixtures" / "nvml_h200_recording.json"),
                          "--agents", "2", "--rate", "20", "--gpu-agents", "--prefill", "10", "--warmup", "3",
                          "--duration", "3", "--size", "100x30", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    parts = r["parts"]
    for name in ("Hub._tick", "HubState.snapshot", "NvmlProbe.sample", "AgentConnection.read",
                 "HubState.ingest[agent:step]"):
        assert parts[name]["calls_per_s"] > 0, name
    assert parts["HubState.ingest[agent:step]"]["calls_per_s"] >= 10  # 2 peers x 20 steps/s, uncoalesced
    assert parts["Hub._tick"]["ms_per_s"] >= parts["HubState.snapshot"]["ms_per_s"]  # the tick holds the snapshot
    assert len(r["threads_cpu_ms_per_s"]) >= 2 and r["rss_max_mib"] > 10
    memory = r["memory"]
    assert memory["rss_kb_total"] > 10_000 and memory["modules_by_package"]["batchmon"] > 10
    assert not any("libcrypto" in name for name in memory["rss_kb_by_mapping"])  # tui/__init__: no OpenSSL
