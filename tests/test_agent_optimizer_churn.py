"""Issue 17 A3: optimizers created again and again do not slow the training: dead ones leave the agent's list.

Before, every optimizer ever seen stayed in a list of weakrefs scanned on every step (40k steps with a new
optimizer each: 50.7 s against 3.6 s unattached). The agent now keeps a WeakSet: a dead optimizer drops out.
"""

from __future__ import annotations

import gc
import time

import torch
import torch.nn as nn

import batchmon
from agent_helpers import agent_dir  # noqa: F401 - fixture


def churn(model: nn.Module, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)  # a new optimizer every step
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
    return time.perf_counter() - start


def test_dead_optimizers_are_pruned_and_steps_stay_cheap(agent_dir):
    model = nn.Linear(4, 2)
    handle = batchmon.attach(model)
    churn(model, 50)
    gc.collect()
    assert len(handle.optimizers) <= 1  # only the last one can still be alive
    assert len(handle._meter.optimizer_set) <= 1
    assert [s.step for s in handle.steps][-3:] == [48, 49, 50]  # each new optimizer's step ends a step
    early = churn(model, 300)
    late = churn(model, 300)  # with a list growing by one per step, the second run would scan 300-600 dead refs
    gc.collect()
    assert len(handle._meter.optimizer_set) <= 1
    assert late < early * 2 + 0.5, (early, late)
