"""Quiet steps kept as runs (batchmon.agent.step_runs): the history and the socket's windows made from them are what
one Step per step gave (issue 14 point 1: no Step object per quiet step)."""

from __future__ import annotations

import torch
import torch.nn as nn

import batchmon
from batchmon.agent import step_meter, step_runs
from batchmon.agent.coalesce import StepCoalescer
from batchmon.agent.step_runs import QuietRun, StepHistory
from batchmon.protocol import new_step
from agent_helpers import agent_dir  # noqa: F401 - fixture

COMPS = {"parameters": 10, "gradients": 10, "optimizer": 20, "activations": 5, "batch": 3, "other": 0}


def template(n: int = 1, batch: int = 8) -> object:
    return new_step(n, 1000.0, 0.01, batch, dict(COMPS), None, None, None, None, None, None, "input dim 0", 1)


def run_of(first: int, ends: list[float], start: float = 0.0) -> QuietRun:
    run = QuietRun(template(first - 1), first, start)  # type: ignore[arg-type]
    run.ends.extend(ends)
    return run


def test_a_run_makes_each_step_with_its_number_and_times():
    run = run_of(5, [1.0, 1.5, 3.0], start=0.5)
    steps = run.steps(0, 3)
    assert [s.step for s in steps] == [5, 6, 7]
    assert [s.step_seconds for s in steps] == [0.5, 0.5, 1.5]
    assert [s.time - run.offset for s in steps] == [1.0, 1.5, 3.0]
    assert all(s.components == COMPS and s.components is not run.template.components for s in steps)
    assert all(s.batch_size == 8 and s.micro_batches == 1 and s.steps == 1 for s in steps)


def test_a_runs_window_is_what_the_coalescer_makes_of_its_steps():
    run = run_of(10, [float(i) for i in range(1, 21)], start=0.0)
    one_by_one, folded = StepCoalescer(interval=3600.0), StepCoalescer(interval=3600.0)
    assert len(one_by_one.add(template(9), 0.0)) == len(folded.add(template(9), 0.0)) == 1  # (sent: the first)
    for step in run.steps(0, 20):
        assert one_by_one.add(step, 0.0) == []
    assert folded.add(run.window(0, 12), 0.0) == [] and folded.add(run.window(12, 20), 0.0) == []
    a, b = one_by_one.flush(1.0)[0], folded.flush(1.0)[0]
    assert (a.step, a.steps, a.batch_size, a.components) == (b.step, b.steps, b.batch_size, b.components) == (
        29, 20, 8, COMPS)
    assert a.time == b.time and abs(a.step_seconds - b.step_seconds) < 1e-12


def test_the_history_keeps_the_last_limit_steps_across_runs():
    history = StepHistory(limit=10)
    history.append(template(1))  # type: ignore[arg-type]
    first = run_of(2, [float(i) for i in range(6)])
    history.append(first)
    history.append(template(8))  # type: ignore[arg-type]  # (the run ended at 6 steps: 2..7)
    second = run_of(9, [])
    history.append(second)
    assert [s.step for s in history.steps()] == list(range(1, 9))
    second.ends.extend(float(i) for i in range(7))  # live: steps 9..15 join it after it was kept
    assert [s.step for s in history.steps()] == list(range(6, 16))
    assert history.last().step == 15  # type: ignore[union-attr]
    history.append(template(16))  # type: ignore[arg-type]
    assert [s.step for s in history.steps()] == list(range(7, 17))
    assert len(history._items) == 4  # the first Step was dropped; without the first run too, 9 < 10 steps would be left


def test_an_empty_run_is_not_kept():
    history = StepHistory(limit=10)
    history.append(template(1))  # type: ignore[arg-type]
    history.append(run_of(2, []))
    history.append(template(2))  # type: ignore[arg-type]
    assert [s.step for s in history.steps()] == [1, 2] and len(history._items) == 2


def test_quiet_training_longer_than_a_run_keeps_every_step(agent_dir, monkeypatch):
    monkeypatch.setattr(step_runs, "RUN_MAX", 7)
    monkeypatch.setattr(step_meter, "RUN_MAX", 7)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=1000)
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    try:
        for _ in range(60):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        assert handle.quiet
        steps = handle.steps
        assert [s.step for s in steps] == list(range(1, 61))
        assert all(b.time >= a.time and b.step_seconds > 0 for a, b in zip(steps, steps[1:]))
        assert len({(s.batch_size, tuple(s.components.items())) for s in steps[5:]}) == 1
        # the steps a full run ends through the full path say one backward too (a quiet step's ran unseen)
        assert [s.micro_batches for s in steps] == [1] * 60
        runs = [item for item in handle._out.steps._items if isinstance(item, QuietRun)]
        assert len(runs) >= 6 and all(len(run) <= 7 for run in runs)
    finally:
        handle.detach()
