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


def test_a_costly_sample_spaces_the_next_one(agent_dir):
    """With the default sampling, every-N-th samples are SAMPLE_SECONDS apart at least and further apart where a
    sample's extra time over a steady step would take more than SAMPLE_SHARE of the training's time (at most
    SAMPLE_MAX_SECONDS); an explicit activation_every samples exactly every N-th step, whatever it costs."""
    from batchmon.agent import step_meter as sm

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 8)

    def train(steps: int) -> None:
        for _ in range(steps):
            model(x).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()

    handle = batchmon.attach(model, opt, name="gap")
    train(12)
    meter = handle._meter
    # an every-N-th sample in the flow of training sets the gap from its own cost
    meter.sample_gap, meter._sampled_t = 123.0, float("-inf")
    train(meter.activation_every)
    assert sm.SAMPLE_SECONDS <= meter.sample_gap <= sm.SAMPLE_MAX_SECONDS
    steady = meter._template.step_seconds
    assert steady is not None
    meter.cost_sample(steady + 0.25 * sm.SAMPLE_SECONDS * sm.SAMPLE_SHARE)  # cheap: the floor
    assert meter.sample_gap == sm.SAMPLE_SECONDS
    meter.cost_sample(steady + 0.001)  # a millisecond more than a steady step: 0.5 s at 0.2%
    assert abs(meter.sample_gap - 0.001 / sm.SAMPLE_SHARE) < 1e-9
    meter.cost_sample(steady + 1.0)  # a very costly sample: the ceiling
    assert meter.sample_gap == sm.SAMPLE_MAX_SECONDS
    # the gap decides when the next every-N-th sample is due
    n = meter.activation_every * 1000
    meter._sampled_t = sm._perf_counter()
    assert not meter._nth_sample_due(n, meter._sampled_t + sm.SAMPLE_MAX_SECONDS - 0.01)
    assert meter._nth_sample_due(n, meter._sampled_t + sm.SAMPLE_MAX_SECONDS)
    batchmon.detach()

    handle = batchmon.attach(model, opt, name="every", activation_every=2)
    train(12)
    assert handle._meter.sample_gap == 0.0 and handle._meter.sample_seconds == 0.0
    assert handle._meter._nth_sample_due(14, handle._meter._sampled_t)
