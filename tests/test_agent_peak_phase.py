"""Issue 16 point 4: the phase of a sampled step in which the allocator's peak was reached.

The pure rule (phase_of_peak) and the coalescer's handling run everywhere; the real readings need CUDA's
allocator: three scripts whose peak is built into one phase each (a large temporary in the forward, in a custom
backward, in a custom optimizer's step) run on the GPU machine (``python -m pytest tests/test_agent_peak_phase.py``
there, the ``cudatests`` stage of bench/h200_run.sh). On the CPU there is no allocator peak: no phase.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import batchmon
from agent_helpers import agent_dir  # noqa: F401 - fixture
from batchmon.agent.coalesce import StepCoalescer
from batchmon.agent.peak_phase import phase_of_peak
from conftest import make_step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MIB = 1 << 20


def test_the_phase_is_where_the_running_peak_last_rose():
    assert phase_of_peak([("forward", 10), ("backward", 30), ("optimizer", 30)]) == (
        "backward", {"forward": 10, "backward": 30, "optimizer": 30})
    assert phase_of_peak([("forward", 50), ("backward", 50), ("optimizer", 50)])[0] == "forward"
    assert phase_of_peak([("forward", 10), ("backward", 20), ("optimizer", 25)])[0] == "optimizer"
    # gradient accumulation: the second micro-batch's forward set the high
    phase, peaks = phase_of_peak([("forward", 10), ("backward", 20), ("forward", 35), ("backward", 35),
                                  ("optimizer", 35)])
    assert phase == "forward" and peaks == {"forward": 35, "backward": 35, "optimizer": 35}


def test_a_coalesced_window_keeps_the_phase_of_its_peak_or_of_its_last_sampled_step():
    c = StepCoalescer(interval=10.0, first_steps=0)
    sampled = make_step(5, 8, peak_allocated=100, peak_phase="backward", phase_peaks={"forward": 60, "backward": 100})
    assert len(c.add(make_step(3, 8, peak_allocated=90), 0.0)) == 1  # the first window goes at once
    assert c.add(make_step(4, 8, peak_allocated=90), 0.05) == []
    assert c.add(sampled, 0.1) == []
    assert c.add(make_step(6, 8, peak_allocated=120), 0.2) == []  # the window's peak: not a sampled step
    [window] = c.flush(0.3)
    assert window.steps == 3 and window.peak_allocated == 120 and window.step == 6
    assert window.peak_phase == "backward" and window.phase_peaks == {"forward": 60, "backward": 100}
    c.add(make_step(7, 8, peak_allocated=90), 0.4)
    c.add(make_step(8, 8, peak_allocated=80), 0.45)
    [plain] = c.flush(0.5)
    assert plain.peak_phase is None and plain.phase_peaks is None


def test_no_phase_off_cuda(agent_dir):
    model = nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=1)
    try:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(8, 16)).square().mean().backward()
            opt.step()
        assert len(handle.steps) >= 1 and all(s.peak_phase is None and s.phase_peaks is None for s in handle.steps)
    finally:
        handle.detach()


class BigForward(nn.Module):
    """A forward with a large temporary freed before it returns: the step's peak is in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scratch = torch.ones(256 * MIB // 4, device=x.device)
            scale = scratch[:1].clone()
            del scratch
        return self.lin(x) * scale


class _WideGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        scratch = torch.ones(256 * MIB // 4, device=grad.device)
        out = grad * scratch[:1]
        del scratch
        return out


class BigBackward(nn.Module):
    """A backward with a large temporary: the step's peak is in the backward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WideGrad.apply(self.lin(x))


class ScratchSGD(torch.optim.SGD):
    """SGD whose step allocates a large temporary: the step's peak is in the optimizer phase."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        scratch = torch.ones(256 * MIB // 4, device=self.param_groups[0]["params"][0].device)
        del scratch
        return super().step(closure)


@cuda
@pytest.mark.parametrize("case, expected", [("forward", "forward"), ("backward", "backward"),
                                            ("optimizer", "optimizer")])
def test_the_peak_phase_of_real_steps(agent_dir, case, expected):
    device = "cuda"
    model: nn.Module = (BigForward() if case == "forward" else BigBackward() if case == "backward"
                        else nn.Linear(64, 64)).to(device)
    opt = (ScratchSGD if case == "optimizer" else torch.optim.SGD)(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt, activation_every=1)
    try:
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(32, 64, device=device)).square().mean().backward()
            opt.step()
        torch.cuda.synchronize()
        phased = [s for s in handle.steps if s.peak_phase is not None]
        assert len(phased) >= 3, [(s.step, s.peak_phase) for s in handle.steps]
        assert all(s.peak_phase == expected for s in phased[1:]), [(s.step, s.peak_phase) for s in phased]
        last = phased[-1]
        assert last.phase_peaks is not None and last.phase_peaks[expected] >= 256 * MIB
        assert last.phase_peaks["optimizer"] == max(last.phase_peaks.values()) <= last.peak_allocated
    finally:
        handle.detach()
