"""Issue 14 point 1: the steady step's end (StepMeter.finish_carried) repeats the last step's Step with its own
number and times instead of measuring it, and the steps after it run quiet (batchmon.agent.quiet_steps: no loss
hooks, the root's post hook only for errors). What they must not change: every step the handle keeps (and the
monitor gets, coalesced) and every OOM event is field for field what measuring every step's end with every hook
gives - through batch-size changes, a short last batch, a dtype change, keyword inputs, gradient accumulation with
a changing number of micro-batches, evaluation forwards under no_grad, sampled steps and an OOM in backward on a
quiet step (the script catches it and redoes the step). The reference run is the same training with
finish_carried switched off (every step's end through StepMeter.finish, never quiet, as before); on CUDA the
allocator's figures are compared too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn

import batchmon
from batchmon.agent import step_meter, torch_patches
from agent_helpers import agent_dir  # noqa: F401 - fixture
from torch_models import CastingMLP

D = 32
EVERY = 5  # an explicit activation_every is exact: both runs sample the same steps
PER_STEP = ("time", "step_seconds")  # a step's own: everything else must be equal

# (batch, dtype, keyword input, micro-batches, an evaluation forward before the step)
PLAN = [(16, "float32", False, 1, False)] * 9 + [(16, "float32", False, 2, False)] * 3 \
    + [(16, "float32", False, 1, True)] * 4 + [(8, "float32", False, 1, False)] * 6 \
    + [(8, "float64", False, 1, False)] * 5 + [(8, "float64", True, 1, False)] * 3 \
    + [(16, "float32", False, 1, False)] * 7 + [(5, "float32", False, 1, False)]  # a short last batch

OOM_AT = {7, 20}  # plan steps whose first backward raises torch.OutOfMemoryError (quiet steps in the fast run)


class OOMOnce(torch.autograd.Function):
    """Identity forward; its backward raises an OOM when armed (once)."""

    armed = False

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x * 1

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        if OOMOnce.armed:  # as CUDA's allocator fails: its OOM observer first (what sees it on a quiet step, whose
            OOMOnce.armed = False  # backward runs unwrapped), then the error
            torch_patches._oom_observer(0, 8 << 20, 0, 0)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 8.00 MiB.")
        return grad


SCRIPT = r"""
import json, sys
import torch, torch.nn as nn
sys.path.insert(0, sys.argv[1])
import batchmon
from batchmon.agent import step_meter
from test_agent_carried_steps import train
if sys.argv[2] == "measured":
    step_meter.StepMeter.finish_carried = lambda self, device_used: None
steps, carried, quiet, events = train(torch.device("cuda", 0))
print(json.dumps({"steps": steps, "carried": carried, "quiet": quiet, "events": events}))
"""


def train(device: torch.device) -> tuple[list[dict[str, Any]], int, int, list[dict[str, Any]]]:
    """The plan's steps as the handle keeps them (without their own times), how many ended carried, how many ran
    quiet, and the OOM events (without their times)."""
    torch.manual_seed(0)
    model = CastingMLP(D, 64).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = nn.CrossEntropyLoss()
    carried = quiet = 0
    original, original_quiet = step_meter.StepMeter.finish_carried, step_meter.StepMeter.finish_quiet

    def counting(self: step_meter.StepMeter, device_used: int | None) -> Any:
        nonlocal carried
        step = original(self, device_used)
        carried += step is not None
        return step

    def counting_quiet(self: step_meter.StepMeter, device_used: int | None) -> bool:  # a carried step, no Step made
        nonlocal carried
        joined = original_quiet(self, device_used)
        carried += joined
        return joined

    step_meter.StepMeter.finish_carried = counting  # type: ignore[method-assign]
    step_meter.StepMeter.finish_quiet = counting_quiet  # type: ignore[method-assign]
    handle = batchmon.attach(model, opt, activation_every=EVERY)
    try:
        for i, (batch, dtype, keyword, micro, evaluate) in enumerate(PLAN):
            if evaluate:
                with torch.no_grad():
                    model(torch.randn(batch, D, device=device))
            quiet += handle.quiet
            OOMOnce.armed = i in OOM_AT
            for attempt in range(2):
                opt.zero_grad(set_to_none=True)
                try:
                    for _ in range(micro):
                        x = torch.randn(batch, D, dtype=getattr(torch, dtype), device=device)
                        y = torch.randint(0, 4, (batch,), device=device)
                        out = model(x, scale=torch.ones(batch, device=device)) if keyword else model(x)
                        crit(OOMOnce.apply(out), y).backward()
                except torch.OutOfMemoryError:
                    continue  # the script redoes the step
                break
            opt.step()
        steps = [{k: v for k, v in s.to_dict().items() if k not in PER_STEP} for s in handle.steps]
        # the OOM events (a run's other events, e.g. a socket warning, carry its own paths)
        events = [{k: v for k, v in e.to_dict().items() if k != "time"} for e in handle.events if e.kind == "oom"]
        times = [(s.time, s.step_seconds) for s in handle.steps]
    finally:
        handle.detach()
        step_meter.StepMeter.finish_carried = original  # type: ignore[method-assign]
        step_meter.StepMeter.finish_quiet = original_quiet  # type: ignore[method-assign]
    assert all(secs is not None and secs > 0 for _, secs in times[1:])
    assert all(a[0] <= b[0] for a, b in zip(times, times[1:]))  # every step has its own time
    return steps, carried, quiet, events


def test_carried_step_ends_are_what_measuring_gives(agent_dir, monkeypatch: pytest.MonkeyPatch):
    fast, carried, quiet, fast_events = train(torch.device("cpu"))
    monkeypatch.setattr(step_meter.StepMeter, "finish_carried", lambda self, device_used: None)
    measured, none, loud, measured_events = train(torch.device("cpu"))
    assert none == 0 and loud == 0 and len(fast) == len(measured) == len(PLAN)
    for a, b in zip(fast, measured):
        assert a == b, (a, b)
    assert len(fast_events) == len(OOM_AT) and fast_events == measured_events
    assert all(e["kind"] == "oom" and "in backward" in e["message"] for e in fast_events)
    # the steps after a carried one ran quiet, the OOMs' steps among them (not the sampled ones, not the first
    # after a change, not gradient accumulation's); deterministic: activation_every is exact
    assert quiet >= 17, quiet  # 17 of the 38
    assert [s["step"] for s in fast] == list(range(1, len(PLAN) + 1))
    assert [s["micro_batches"] for s in fast] == [micro for *_, micro, _ in PLAN]
    assert fast[-1]["batch_size"] == 5  # the short last batch is its own
    # most steady steps took the shortcut (not the sampled ones, the first ones, nor the first after a change):
    # 19 of the plan's 38 (deterministic: activation_every is exact; an OOM's redone step is measured)
    assert carried >= 19, carried


def test_a_carried_step_is_a_new_step_object_with_its_own_components(agent_dir):
    model = CastingMLP(D, 64)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt, activation_every=1000)
    x, y = torch.randn(8, D), torch.randint(0, 4, (8,))
    for _ in range(8):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    a, b = handle.steps[-2:]
    assert a is not b and a.components is not b.components and a.components == b.components
    assert (b.step, b.steps, b.peak_phase) == (a.step + 1, 1, None) and b.time >= a.time
    handle.detach()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_carried_step_ends_on_cuda_are_what_measuring_gives(tmp_path: Path):
    """The allocator's figures too: each run in a fresh process (the caching allocator's state is the run's own),
    the allocator read on sampled and first steps only (ALLOCATOR_READ_SECONDS and pace's out of reach: no timing)."""
    results = {}
    for mode in ("carried", "measured"):
        (tmp_path / mode).mkdir()  # the socket folder's parent (the agent creates the folder itself)
        env = dict(os.environ, BATCHMON_DIR=str(tmp_path / mode / "s"), PYTHONPATH=os.pathsep.join(
            [str(Path(__file__).parent), str(Path(batchmon.__file__).resolve().parents[1])]))
        script = SCRIPT.replace("steps, carried = train", "step_meter.ALLOCATOR_READ_SECONDS = 1e9\n"
                                "from batchmon.agent import pace\n"
                                "pace.READ_SECONDS = pace.READ_STEADY_SECONDS = 1e9\n"  # (what the socket sets)
                                "steps, carried = train")
        out = subprocess.run([sys.executable, "-c", script, str(Path(__file__).parent), mode], env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    fast, measured = results["carried"], results["measured"]
    # fewer than on the CPU (19): a sampled CUDA step has phase fields, so the step after it is measured (12 on the
    # H200 before the two OOM steps were added to the plan; each OOM's redone step is measured)
    assert measured["carried"] == 0 and fast["carried"] >= 8
    assert measured["quiet"] == 0 and fast["quiet"] >= 5
    # the allocator's figures at the error: each run's own state
    strip = ("components", "allocated", "reserved", "num_alloc_retries")
    assert [{k: v for k, v in e.items() if k not in strip} for e in fast["events"]] == \
        [{k: v for k, v in e.items() if k not in strip} for e in measured["events"]]
    assert len(fast["steps"]) == len(measured["steps"]) == len(PLAN)
    for a, b in zip(fast["steps"], measured["steps"]):
        a.pop("device_used"), b.pop("device_used")  # NVML's figure, read once a second by the agent's thread
        assert a["peak_allocated"] is not None and a == b, (a, b)
