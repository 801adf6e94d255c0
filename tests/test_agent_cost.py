"""The agent's fixed cost per step (issue 14 point 1), as something a test can hold: what a step runs.

Timings belong to bench/agent_cost.py; here the work itself is counted. A step that is not sampled runs the
same Python calls whether the model has 4 parameter tensors or 200 (nothing walks the parameters, their
gradients or the optimizer state), and far fewer than a sampled step; a sampled step with nothing changed does
not walk them either, except every RECOUNT_SECONDS.
"""

from __future__ import annotations

import collections
from pathlib import Path
import sys
from typing import Callable

import pytest
import torch
import torch.nn as nn

import batchmon
from batchmon.agent import step_meter
from agent_helpers import agent_dir  # noqa: F401 - fixture

D = 16


def mlp(layers: int) -> nn.Module:
    mods: list[nn.Module] = []
    for _ in range(layers):
        mods += [nn.Linear(D, D), nn.ReLU()]
    return nn.Sequential(*mods, nn.Linear(D, 4))


# batchmon's own files (a path test on "batchmon" alone also matched torch's files when the virtual environment's
# path contains that word, as CI's does: torch's optimizer then counted per parameter)
PACKAGE = str(Path(batchmon.__file__).resolve().parent)


def calls_in(fn: Callable[[], None]) -> collections.Counter:
    """Python-level calls made while fn runs, by (file, function): batchmon's and torch's module walks."""
    seen: collections.Counter = collections.Counter()

    def profile(frame, event, arg):  # noqa: ANN001, ANN202 - sys.setprofile's signature
        if event == "call":
            code = frame.f_code
            if code.co_filename.startswith(PACKAGE) or code.co_name in ("_named_members", "named_modules",
                                                                        "named_parameters", "parameters"):
                seen[(code.co_filename.rsplit("/", 1)[-1], code.co_name)] += 1

    sys.setprofile(profile)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return seen


def one_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    crit = nn.CrossEntropyLoss()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        crit(model(x), y).backward()
        opt.step()

    return step


def agent_calls(model: nn.Module, *, sampled: bool) -> collections.Counter:
    """The batchmon calls of one step after 20 (counting is every 1000th step: steps 21.. are not sampled)."""
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters())
    handle = batchmon.attach(model, opt, activation_every=1 if sampled else 1000)
    step = one_step(model, opt, torch.randn(8, D), torch.randint(0, 4, (8,)))
    for _ in range(20):
        step()
    counted = calls_in(step)
    assert handle.last_step.step == 21
    handle.detach()
    return counted


def bytecodes_in(fn: Callable[[], None]) -> collections.Counter:
    """Bytecodes executed in batchmon's frames while fn runs, by (file, function) (sys.settrace's opcode events)."""
    seen: collections.Counter = collections.Counter()

    def local(frame, event, arg):  # noqa: ANN001, ANN202 - sys.settrace's signature
        if event == "opcode":
            seen[(frame.f_code.co_filename.rsplit("/", 1)[-1], frame.f_code.co_name)] += 1
        return local

    def tracer(frame, event, arg):  # noqa: ANN001, ANN202
        if not frame.f_code.co_filename.startswith(PACKAGE):
            return None
        frame.f_trace_opcodes = True
        return local

    sys.settrace(tracer)
    try:
        fn()
    finally:
        sys.settrace(None)
    return seen


def test_a_step_costs_the_same_calls_with_4_or_200_parameter_tensors(agent_dir):
    small = agent_calls(mlp(1), sampled=False)
    large = agent_calls(mlp(99), sampled=False)
    assert small == large, set(small.items()) ^ set(large.items())
    assert not any(name in ("_named_members", "named_parameters", "parameters") for _, name in small)
    # the whole step path, hooks to hand-off: 62 calls before the steady step's end (StepMeter.finish_carried) and
    # the hooks' direct dispatch, 21 then; 11 on a quiet step with hooks (batchmon.agent.quiet_steps); 8 with the root
    # off torch's hooked path; 7 with the hand-off inline in the step's end; 6 now: a quiet step's end makes no Step
    # and hands nothing over (it joins the quiet run: batchmon.agent.step_runs), straight from the optimizer's hook
    assert sum(small.values()) <= 6, sorted(small.items())
    assert small[("transport.py", "put")] == 0 and small[("publisher.py", "step")] == 0
    assert small[("quiet_steps.py", "_call_impl")] == 1  # (quiet_steps.quiet_call's closure)
    assert small[("step_meter.py", "finish_quiet")] == 1 and small[("step_meter.py", "finish")] == 0
    assert small[("step_meter.py", "finish_carried")] == 0 and small[("handle.py", "_on_step")] == 0
    assert small[("step_meter.py", "open_quiet")] == 1 and small[("step_meter.py", "begin_forward")] == 0
    assert not any(file == "step_runs.py" for file, _ in small)  # no Step made, no run begun
    assert small[("torch_patches.py", "_step_pre")] == 0  # the step depth's hook is off while quiet
    # no forward hook on the root or the loss module, nothing before backward
    assert not {name for _, name in small} & {"crit_pre_hook", "crit_post_hook", "root_post_hook", "crit_pre",
                                              "crit_post", "_root_post", "_before_backward", "_after_backward",
                                              "root_pre_hook", "quiet_post_hook"}


def test_a_quiet_step_runs_at_most_400_bytecodes_of_batchmon(agent_dir):
    """The agent's Python on a quiet step, counted (deterministic, any box): 447 before quiet steps stopped making
    a Step each (the closure 63, open_quiet 117, backward 48, the step wrapper 39, the optimizer's hook 18, _on_step
    71, finish_carried 91), 394 now; the same with 4 or 200 parameter tensors."""
    counts = []
    for layers in (1, 99):
        torch.manual_seed(0)
        model = mlp(layers)
        opt = torch.optim.Adam(model.parameters())
        handle = batchmon.attach(model, opt, activation_every=1000)
        step = one_step(model, opt, torch.randn(8, D), torch.randint(0, 4, (8,)))
        for _ in range(20):
            step()
        assert handle.quiet
        counts.append(bytecodes_in(step))
        handle.detach()
    small, large = counts
    assert small == large, set(small.items()) ^ set(large.items())
    assert sum(small.values()) <= 400, sorted(small.items())
    assert small[("step_meter.py", "finish_quiet")] <= 80, small  # the step's end: an array append and counters


def test_a_sampled_step_with_nothing_changed_does_not_walk_the_parameters(agent_dir, monkeypatch):
    from batchmon.agent import step_meter

    # the time-based recount (every RECOUNT_SECONDS) is another rule: on a loaded box 21 steps can take longer
    monkeypatch.setattr(step_meter, "RECOUNT_SECONDS", 3600.0)
    small = agent_calls(mlp(1), sampled=True)
    large = agent_calls(mlp(99), sampled=True)
    # saved tensors are counted (more layers save more: the pack hook runs per saved tensor) ...
    assert large[("accounting.py", "_pack")] > small[("accounting.py", "_pack")] > 0
    # ... but parameters, gradients and optimizer state are not walked again within RECOUNT_SECONDS
    walks = ("parameter_storages", "gradient_storages", "optimizer_storages", "parameters_of")
    assert all(large[("accounting.py", name)] == 0 for name in walks), {n: large[("accounting.py", n)] for n in walks}


def test_a_sampled_step_walks_them_again_after_recount_seconds(agent_dir, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(step_meter, "RECOUNT_SECONDS", 0.0)  # every sampled step is due
    counted = agent_calls(mlp(3), sampled=True)
    assert counted[("accounting.py", "gradient_storages")] == 1 and counted[("accounting.py", "optimizer_storages")] == 1


def test_freezing_a_layer_shows_in_gradients_at_the_next_recount(agent_dir, monkeypatch: pytest.MonkeyPatch):
    model = mlp(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=1)
    step = one_step(model, opt, torch.randn(8, D), torch.randint(0, 4, (8,)))
    for _ in range(4):
        step()
    full = handle.last_step.components["gradients"]
    model[0].weight.requires_grad_(False)
    step()
    assert handle.last_step.components["gradients"] == full  # carried: nothing it watches changed
    monkeypatch.setattr(step_meter, "RECOUNT_SECONDS", 0.0)
    step()
    assert handle.last_step.components["gradients"] == full - D * D * 4  # the frozen weight has no gradient
