"""Recordings made on the H200 (`batchmon record` while `batchmon run` trained the examples), replayed in CI.

They are real agent output on CUDA, so CI checks the CUDA figures' invariants on every commit: the component
identities the agent must satisfy, agreement between the agent's NVML figure and the NVML probe's, and the OOM
event's fields.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from batchmon.protocol import decode
from batchmon.replay import load_snapshots
from batchmon.render import snapshot_to_json

FIXTURES = Path(__file__).parent / "fixtures"


def last_view(name: str, argv0: str):
    """The last snapshot in which the agent running argv0 had reported a step, and that agent."""
    for snap in reversed(load_snapshots(FIXTURES / name)):
        for agent in snap.agents:
            if agent.last_step and agent.hello.argv[0].endswith(argv0):
                return snap, agent
    raise AssertionError(f"{name}: no step from {argv0}")


def test_gpt_run_components_are_the_exact_identities_on_cuda():
    snap, agent = last_view("tui_h200_one_job.jsonl", "train_gpt.py")
    step, hello = agent.last_step, agent.hello
    assert hello.device.startswith("cuda") and hello.torch and "cu" in hello.torch
    assert hello.model and hello.model.cls == "GPT" and hello.optimizer == "AdamW"
    c = step.components
    # fp32 parameters (no buffers beyond them in this GPT), one gradient each, AdamW's two states each
    assert c["parameters"] == hello.model.parameter_bytes == hello.model.parameters * 4
    assert c["gradients"] == c["parameters"]
    assert c["optimizer"] == 2 * c["parameters"]
    # tokens: batch x sequence int64 inputs and targets
    assert c["batch"] == step.batch_size * 1024 * 8 * 2
    assert sum(c.values()) == step.peak_allocated  # other is the rest of the allocator peak
    assert step.peak_allocated <= step.reserved <= step.device_used


def test_agent_nvml_figure_matches_the_probe_for_the_same_pid():
    snap, agent = last_view("tui_h200_one_job.jsonl", "train_gpt.py")
    device = snap.device_of(agent)
    assert device is not None and device.uuid == agent.hello.nvml_uuid
    listed = {p.pid: p.used for p in device.processes}
    assert agent.hello.pid in listed
    # sampled at different moments of the same steady run: within 1% of each other
    assert listed[agent.hello.pid] == pytest.approx(agent.last_step.device_used, rel=0.01)


def test_two_jobs_share_one_gpu_and_both_are_predicted():
    snaps = load_snapshots(FIXTURES / "tui_h200_two_jobs.jsonl")
    both = [s for s in snaps if sum(1 for a in s.agents if a.last_step) == 2]
    assert both, "the two training runs were never live together"
    snap = both[-1]
    assert {a.hello.argv[0].split("/")[-1] for a in snap.agents} == {"train_gpt.py", "train_cnn.py"}
    for agent in snap.agents:
        assert snap.device_of(agent) is snap.nvml.devices[0]
        assert agent.prediction is not None and agent.prediction.max_batch > agent.last_step.batch_size
    out = snapshot_to_json(snap)
    assert len(out["agents"]) == 2 and all(a["prediction"]["max_batch"] for a in out["agents"])


def test_sixteen_agents_all_reported():
    snaps = load_snapshots(FIXTURES / "tui_h200_16_agents.jsonl")
    snap = max(snaps, key=lambda s: sum(1 for a in s.agents if a.last_step))
    live = [a for a in snap.agents if a.last_step]
    assert len(live) == 16
    assert len({a.hello.pid for a in live}) == 16
    gpu_pids = {p.pid for p in snap.nvml.devices[0].processes}
    assert {a.hello.pid for a in live} <= gpu_pids


def test_oom_event_recorded_with_batch_and_requested_bytes():
    events = []
    for line in (FIXTURES / "agent_h200_oom.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("kind") == "agent" and isinstance(record.get("data"), dict):
            message = decode(json.dumps(record["data"]))
            if message is not None and message.type == "event":
                events.append(message)
    ooms = [e for e in events if e.kind == "oom"]
    assert len(ooms) == 1
    oom = ooms[0]
    assert oom.batch_size == 2048
    # the caching allocator's own message said "Tried to allocate 6.00 GiB"
    assert oom.requested_bytes == 6 * 2**30
    assert oom.components is not None and oom.components["parameters"] > 0


def test_cnn_check_run_components_on_cuda():
    snap, agent = last_view("agent_h200_cnn_check.jsonl", "train_cnn.py")
    c, step = agent.last_step.components, agent.last_step
    assert agent.hello.optimizer == "SGD"
    # BatchNorm buffers are parameters-side bytes without gradients; SGD momentum keeps one buffer per gradient
    assert c["parameters"] > c["gradients"] > 0
    assert c["optimizer"] == c["gradients"]
    assert sum(c.values()) == step.peak_allocated <= step.reserved <= step.device_used
