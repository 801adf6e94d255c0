"""The oom event's allocator figures (added protocol fields): sent by the agent on CUDA, read leniently, and
what the post-mortem's reserved, fragmentation and retries then rest on."""

from __future__ import annotations

import json

from batchmon import protocol
from batchmon.postmortem import oom_report
from batchmon.protocol import COMPONENTS, Event
from conftest import make_step

SIX = {name: (i + 1) << 20 for i, name in enumerate(COMPONENTS)}  # 21 MiB live in all


def _event(**extra: object) -> Event:
    line = protocol.encode(Event(kind="oom", message="out of memory in forward at step 3", components=SIX,
                                 time=1.0, step=3, batch_size=64, requested_bytes=8 << 20, **extra))
    decoded = protocol.decode(line)
    assert isinstance(decoded, Event)
    return decoded


def test_allocator_figures_round_trip_and_odd_values_read_as_missing() -> None:
    ev = _event(allocated=22 << 20, reserved=40 << 20, num_alloc_retries=2)
    assert (ev.allocated, ev.reserved, ev.num_alloc_retries) == (22 << 20, 40 << 20, 2)
    d = json.loads(protocol.encode(ev))
    for odd in (-1, "40", 2.5, True):
        d["reserved"] = odd
        assert protocol.decode(json.dumps(d).encode()).reserved is None  # type: ignore[union-attr]
    del d["reserved"], d["allocated"], d["num_alloc_retries"]  # an older agent's event
    old = protocol.decode(json.dumps(d).encode())
    assert isinstance(old, Event) and old.reserved is None and old.requested_bytes == 8 << 20


def test_post_mortem_uses_the_reported_pool_for_fragmentation_and_retries() -> None:
    reported = oom_report(_event(allocated=22 << 20, reserved=40 << 20, num_alloc_retries=2),
                          last_step=make_step(2), model=None, optimizer=None, device_total=None)
    assert reported.reserved == 40 << 20 and reported.reserved_basis == "reported with the error"
    assert reported.fragmentation == (40 << 20) - sum(SIX.values())
    assert reported.num_alloc_retries == 2
    unreported = oom_report(_event(), last_step=None, model=None, optimizer=None, device_total=None)
    assert unreported.reserved is None and unreported.fragmentation is None


def test_the_agent_reports_no_allocator_figures_off_cuda() -> None:
    import torch

    from batchmon.agent.step_meter import StepMeter

    assert StepMeter._allocator_at_error.__doc__
    meter = StepMeter.__new__(StepMeter)
    meter.device = torch.device("cpu")
    assert meter._allocator_at_error() == (None, None, None)


def test_h200_recording_post_mortem_reports_the_pool_at_the_error() -> None:
    """A GPT at batch 2048 recorded on the H200 with this agent: the pool, fragmentation and retries come with the
    error and agree with PyTorch's own message (138.71 GiB allocated, 44.78 MiB reserved but unallocated)."""
    from pathlib import Path

    from batchmon.monitor.render import snapshot_to_json
    from batchmon.monitor.replay import final_snapshot

    path = Path(__file__).parent / "fixtures" / "agent_h200_oom_allocator.jsonl"
    snap = final_snapshot(path)
    (agent,) = [a for a in snapshot_to_json(snap)["agents"] if a.get("oom")]
    oom = agent["oom"]
    assert agent["state"] == "oom" and agent["ended"]["exit_code"] == 1
    assert oom["reserved_basis"] == "reported with the error"
    assert abs(oom["fragmentation"] - 44.78 * 2**20) < 0.01 * 2**20
    assert abs(oom["allocated"] - 138.71 * 2**30) < 0.01 * 2**30
    assert oom["requested_bytes"] == 6 * 2**30 and oom["num_alloc_retries"] >= 1
