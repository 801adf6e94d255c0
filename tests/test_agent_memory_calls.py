"""Issue 12 point 4: a script's own memory calls neither corrupt the agent's readings nor stop working.

CPU here: the profiler with ``profile_memory=True`` around attached training (losses, the agent's components
and the profiler's memory figures as without the other). The CUDA cases (``reset_peak_memory_stats()``,
``max_memory_allocated()``, ``empty_cache()``, ``_record_memory_history()``) run where CUDA is available:
``python -m pytest tests/test_agent_memory_calls.py`` on the GPU machine.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import batchmon
from batchmon.agent import handle as agent
from agent_helpers import agent_dir  # noqa: F401 - fixture

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def mlp(device: str = "cpu") -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 8)).to(device)


def train(model: nn.Module, opt: torch.optim.Optimizer, n: int, batch: int = 32, device: str = "cpu",
          between=None) -> list[float]:
    losses = []
    for i in range(n):
        opt.zero_grad()
        out = model(torch.randn(batch, 64, device=device))
        if between is not None:
            between(i)
        loss = out.square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_profiler_with_profile_memory_keeps_readings_and_still_profiles(agent_dir):
    from torch.profiler import ProfilerActivity, profile

    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    handle = batchmon.attach(model, opt, activation_every=1)
    plain = train(model, opt, 3)
    before = [s.components for s in handle.steps]
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        profiled = train(model, opt, 3)
    after = [s.components for s in handle.steps[3:]]
    assert len(after) == 3 and all(c == before[-1] for c in after)  # same model, same batch: same figures
    assert all(isinstance(x, float) for x in plain + profiled)
    events = prof.key_averages()
    assert any(getattr(e, "self_cpu_memory_usage", 0) or getattr(e, "cpu_memory_usage", 0) for e in events)


@cuda
def test_script_reset_mid_step_does_not_hide_the_peak(agent_dir):
    model = mlp("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=1)
    train(model, opt, 3, device="cuda")
    reference = handle.last_step.peak_allocated
    train(model, opt, 3, device="cuda", between=lambda i: torch.cuda.reset_peak_memory_stats())
    assert all(s.peak_allocated >= reference for s in handle.steps[3:])
    for s in handle.steps:
        assert sum(s.components.values()) == s.peak_allocated


@cuda
def test_script_sees_its_own_peak_across_the_agents_resets(agent_dir):
    model = mlp("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batchmon.attach(model, opt)
    torch.cuda.reset_peak_memory_stats()
    train(model, opt, 1, batch=4096, device="cuda")  # a large step first ...
    big = max(s.peak_allocated for s in agent.current().steps)
    train(model, opt, 3, batch=8, device="cuda")  # ... then small ones (the agent resets the peak after each)
    assert torch.cuda.max_memory_allocated() >= big
    assert torch.cuda.memory_stats()["allocated_bytes.all.peak"] >= big
    torch.cuda.reset_peak_memory_stats()  # the script's own reset still resets its view
    assert torch.cuda.max_memory_allocated() < big


@cuda
def test_empty_cache_and_memory_history_still_work(agent_dir):
    model = mlp("cuda")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    torch.cuda.memory._record_memory_history(max_entries=1000)
    try:
        train(model, opt, 3, device="cuda", between=lambda i: torch.cuda.empty_cache())
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    assert snapshot["segments"] and any(t for t in snapshot.get("device_traces", []))
    assert [s.step for s in handle.steps] == [1, 2, 3]
    assert all(s.components["activations"] > 0 and s.peak_allocated > 0 for s in handle.steps)
