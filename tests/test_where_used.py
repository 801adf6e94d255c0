"""Where NVML's "used" goes (issue 16 point 5), on real H200 recordings: per GPU used = the processes' figures +
unattributed; per attached process its allocator pool + what lies outside it; processes without an agent named
as such. In --once text and JSON, and in the GPU panel."""

from __future__ import annotations

from pathlib import Path

from batchmon.monitor.render import format_table, snapshot_to_json
from batchmon.monitor.replay import load_snapshots
from batchmon.probes.nvml import DeviceMemory, DeviceSample, GpuProcess
from batchmon.snapshot import AgentFigures, device_use
from batchmon.tui.gpu_panel import gpu_lines
from batchmon.tui.views import device_views

FIXTURES = Path(__file__).parent / "fixtures"


def busiest(name: str):
    snaps = load_snapshots(FIXTURES / name)
    return max(reversed(snaps), key=lambda s: len(s.running))


def test_sixteen_agents_on_one_h200_add_up_and_each_splits_into_pool_and_outside():
    snap = busiest("tui_h200_16_agents.jsonl")
    (use,) = snap.where_used()
    (dev,) = snap.nvml.devices
    assert len(use.processes) == 16 and all(p.agent for p in use.processes)
    assert use.processes_total == sum(p.used for p in dev.processes)
    assert use.used == dev.memory.used == use.processes_total + use.unattributed
    reserved = {a.hello.pid: a.last_step.reserved for a in snap.running}
    for p in use.processes:
        assert p.reserved == reserved[p.pid] and p.outside == p.used - p.reserved and p.outside > 0
        assert p.outside_label == "context + libraries"


def test_ddp_ranks_name_nccl_in_what_lies_outside_the_allocator():
    snap = busiest("ddp_h200_run.jsonl")
    uses = snap.where_used()
    assert len(uses) == 2
    for use in uses:
        (rank,) = use.processes
        assert rank.agent and rank.outside_label == "context + NCCL + libraries"
        assert rank.reserved + rank.outside == rank.used


def test_processes_without_an_agent_are_named_as_such_in_the_text_and_the_panel():
    # the two-jobs recording: the processes held their CUDA context before their agents said hello
    snaps = load_snapshots(FIXTURES / "tui_h200_two_jobs.jsonl")
    early = next(s for s in snaps if len(s.nvml.devices[0].processes) == 2 and not s.agents)
    (use,) = early.where_used()
    assert [p.agent for p in use.processes] == [False, False] and use.without_agent == use.processes
    pids = ", ".join(str(p.pid) for p in use.processes)  # largest first
    assert sorted(p.pid for p in use.processes) == [516, 517]
    assert f"without an agent: pid {pids}" in format_table(early, 120)
    (_, view), = device_views(early, {})
    panel = "\n".join(t.plain for t in gpu_lines(view, 120, "full"))
    assert f"without an agent: {use.processes[0].pid} " in panel and "allocator" not in panel


def test_once_text_json_and_gpu_panel_show_the_split_of_two_running_jobs():
    snaps = load_snapshots(FIXTURES / "tui_h200_two_jobs.jsonl")
    snap = [s for s in snaps if len(s.running) == 2][-1]
    (use,) = snap.where_used()
    gpt = next(p for p in use.processes if p.pid == 516)
    text = format_table(snap, 140)
    assert "pid 516: allocator reserved" in text and "unattributed" in text
    dev_json = snapshot_to_json(snap)["devices"][0]
    split = dev_json["where_used"]
    assert split["processes_total"] + split["unattributed"] == dev_json["memory"]["used"]
    row = next(p for p in split["processes"] if p["pid"] == 516)
    assert (row["agent"], row["reserved"], row["outside_allocator"]) == (True, gpt.reserved, gpt.outside)
    (_, view), = device_views(snap, {})
    lines = [t.plain for t in gpu_lines(view, 100, "full")]
    assert any(line.startswith("  used ") and "= 2 processes" in line for line in lines)
    assert sum("allocator" in line for line in lines) == 2 and all(len(line) <= 100 for line in lines)


def test_a_pool_that_grew_after_nvmls_sample_leaves_the_outside_share_unknown_not_negative():
    dev = DeviceSample(index=0, name="H200", uuid="GPU-x", memory=DeviceMemory(total=100, used=60, reserved=0, free=40),
                       utilization=0, temperature=0, power=0.0,
                       processes=(GpuProcess(1, 30), GpuProcess(2, 20), GpuProcess(3, None)))
    use = device_use(dev, {1: AgentFigures(reserved=35), 2: AgentFigures(reserved=12)})
    rows = {p.pid: p for p in use.processes}
    assert rows[1].outside is None and rows[2].outside == 8 and not rows[3].agent
    assert use.unattributed is None  # one process's figure is unknown: the rest cannot be told apart


def test_an_ended_runs_process_still_on_the_gpu_is_named_so_not_as_without_an_agent():
    snap = load_snapshots(FIXTURES / "tui_h200_two_jobs.jsonl")[-1]  # the GPT said bye; its process still exits
    assert snap.running == () and [p.pid for p in snap.nvml.devices[0].processes] == [516]
    (_, view), = device_views(snap, {})
    panel = "\n".join(t.plain for t in gpu_lines(view, 100, "full"))
    assert "run ended, process still on the GPU: 516" in panel and "without an agent" not in panel
    text = format_table(snap, 120)
    assert "run ended, process still exiting: pid 516" in text and "without an agent" not in text
