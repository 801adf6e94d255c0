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
from batchmon.monitor.replay import load_snapshots
from batchmon.monitor.render import snapshot_to_json

FIXTURES = Path(__file__).parent / "fixtures"


def last_view(name: str, argv0: str):
    """The last snapshot in which the agent running argv0 was running and had reported a step, and that agent
    (after it, the run is an ended run)."""
    for snap in reversed(load_snapshots(FIXTURES / name)):
        for agent in snap.running:
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


# ------------------------------------------------------------------- DDP on two H200s (issue 6, point 1)

DDP_RECORDINGS = ["ddp_h200_run.jsonl", "ddp_h200_attach.jsonl"]  # `batchmon run -- torchrun`, attach() in script


def ddp_job(name: str):
    """The last snapshot in which both ranks of the recorded torchrun job were running and had stepped, and that
    job (after it, the job is an ended run: tests/test_ended_runs.py)."""
    from batchmon.jobs import group_jobs

    for snap in reversed(load_snapshots(FIXTURES / name)):
        jobs = [j for j in group_jobs(snap.running) if len(j.ranks) == 2 and all(a.last_step for a in j.ranks)]
        if jobs:
            return snap, jobs[0]
    raise AssertionError(f"{name}: the two ranks never stepped together")


@pytest.mark.parametrize("name", DDP_RECORDINGS)
def test_ddp_ranks_group_into_one_job_on_two_gpus(name):
    snap, job = ddp_job(name)
    r0, r1 = job.ranks
    assert (r0.hello.rank, r1.hello.rank) == (0, 1) and job.world_size == 2
    assert r0.hello.job and r0.hello.job == r1.hello.job
    assert r0.hello.model.cls == "DistributedDataParallel" and r0.hello.optimizer == "AdamW"
    d0, d1 = snap.device_of(r0), snap.device_of(r1)
    assert d0 is not None and d1 is not None and d0.index != d1.index  # one GPU per rank
    assert (r0.hello.device, r1.hello.device) == (f"cuda:{d0.index}", f"cuda:{d1.index}")
    for agent, dev in ((r0, d0), (r1, d1)):  # each rank is a process on its own GPU in the NVML probe
        assert agent.hello.pid in {p.pid for p in dev.processes}
        c, s = agent.last_step.components, agent.last_step
        assert c["gradients"] == c["parameters"] == agent.hello.model.parameter_bytes
        assert c["optimizer"] == 2 * c["parameters"]
        assert sum(c.values()) == s.peak_allocated <= s.reserved <= s.device_used


@pytest.mark.parametrize("name", DDP_RECORDINGS)
def test_ddp_imbalance_follows_the_uneven_shards(name):
    # rank r trained on 256 + r*512 rows (--rank-batch-step 512): rank 1 carries more
    # activations and batch at every step of the same number, and the same replicated state
    snap, job = ddp_job(name)
    r0, r1 = job.ranks
    same = {s.step: s for s in r0.history}
    paired = [(same[s.step], s) for s in r1.history if s.step in same]
    assert len(paired) >= 20
    for a, b in paired:
        assert b.batch_size == 3 * a.batch_size  # 256 vs 768 rows, each cycled through 1/4, 1/2, 1x
        assert b.components["activations"] > a.components["activations"]
        assert b.components["parameters"] == a.components["parameters"]
    found = job.imbalance()
    assert found is not None and found.heaviest_rank == 1 and found.lightest_rank == 0
    assert found.spread == sum(r1.last_step.components.values()) - sum(r0.last_step.components.values()) > 0
    assert found.by_component["activations"] > 0 and found.by_component["batch"] > 0
    (listed,) = [j for j in snapshot_to_json(snap)["jobs"] if j["world_size"] == 2]
    assert listed["imbalance"]["spread"] == found.spread and listed["ranks"] == [r0.key, r1.key]
