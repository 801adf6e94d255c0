"""Issue 14 point 1: the steady step's shortcut - a step whose inputs are plain tensors shaped as the last
step's carries that step's batch size and batch bytes instead of measuring them again (no storage walk, no
target walk). What it must not change: every step's batch component and batch size are what measuring gives,
through batch-size changes, a dtype change at the same shape, keyword inputs and gradient accumulation."""

from __future__ import annotations

import torch
import torch.nn as nn

import batchmon
from agent_helpers import agent_dir  # noqa: F401 - fixture
from torch_models import CastingMLP

D = 64


def expected_batch_bytes(batch: int, dtype: torch.dtype, with_scale: bool) -> int:
    x = batch * D * torch.empty((), dtype=dtype).element_size()
    return x + batch * 8 + (batch * 4 if with_scale else 0)  # int64 targets; float32 scale


def test_carried_steps_report_what_measuring_gives(agent_dir):
    torch.manual_seed(0)
    model = CastingMLP(D, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    handle = batchmon.attach(model, opt, activation_every=1000)  # after the first steps nothing is sampled
    plan = [(32, torch.float32, False)] * 8 + [(16, torch.float32, False)] * 6 + [(16, torch.float64, False)] * 6 \
        + [(16, torch.float64, True)] * 4 + [(32, torch.float32, False)] * 6
    try:
        for batch, dtype, with_scale in plan:
            opt.zero_grad()
            x = torch.randn(batch, D, dtype=dtype)
            y = torch.randint(0, 4, (batch,))
            out = model(x, scale=torch.ones(batch)) if with_scale else model(x)
            crit(out, y).backward()
            opt.step()
        steps = handle.steps
        assert len(steps) == len(plan)
        for s, (batch, dtype, with_scale) in zip(steps, plan):
            assert s.batch_size == batch, (s.step, s.batch_size, batch)
            assert s.components["batch"] == expected_batch_bytes(batch, dtype, with_scale), (s.step, s.components)
        meter = handle._meter
        assert meter._carried_batch is not None  # the shortcut was in use at the end (same shapes again)
    finally:
        handle.detach()


def test_gradient_accumulation_with_carried_steps(agent_dir):
    torch.manual_seed(0)
    model = CastingMLP(D, 32)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    handle = batchmon.attach(model, opt, activation_every=1000)
    try:
        for _ in range(8):
            opt.zero_grad()
            for _ in range(3):
                crit(model(torch.randn(8, D)), torch.randint(0, 4, (8,))).backward()
            opt.step()
        steps = handle.steps
        assert [s.micro_batches for s in steps] == [3] * 8
        assert all(s.batch_size == 8 and s.components["batch"] == expected_batch_bytes(8, torch.float32, False)
                   for s in steps)
    finally:
        handle.detach()
