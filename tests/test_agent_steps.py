"""The agent's step logic on CPU: boundaries, batch size, discovery, sampling, OOM events, failure handling."""

from __future__ import annotations

import torch
import torch.nn as nn
import pytest

import batchmon
from batchmon.agent import handle as agent
from batchmon.protocol import COMPONENTS, Event
from agent_helpers import agent_dir  # noqa: F401 - fixture

F32 = 4
D, H, O = 8, 16, 3


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, O))


def step(model: nn.Module, opt: torch.optim.Optimizer, batch: int = 4) -> torch.Tensor:
    opt.zero_grad()
    loss = model(torch.randn(batch, D)).sum()
    loss.backward()
    opt.step()
    return loss


def test_step_boundary_is_the_optimizer_step(agent_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    for _ in range(5):
        step(model, opt)
    model(torch.randn(4, D)).sum().backward()  # a forward and backward without a step: no step message
    steps = handle.steps
    assert [s.step for s in steps] == [1, 2, 3, 4, 5]
    assert all(s.step_seconds is not None and s.step_seconds > 0 for s in steps)
    assert all(set(s.components) == set(COMPONENTS) for s in steps)
    assert all(s.allocated is None and s.peak_allocated is None and s.device_used is None for s in steps)
    assert steps[-1].time >= steps[0].time


def test_attach_is_idempotent_and_a_context_manager(agent_dir):
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    first = batchmon.attach()
    assert first.model is None
    second = batchmon.attach(model, opt)
    assert second is first and second.model is model and second.optimizers == [opt]
    with batchmon.attach() as handle:
        assert handle is first
        step(model, opt)
    assert agent.current() is None and not handle.enabled
    steps_before = len(handle.steps)
    step(model, opt)  # detached: nothing is recorded, nothing is hooked
    assert len(handle.steps) == steps_before
    assert model._forward_hooks == {} and model._forward_pre_hooks == {}
    assert "step" not in opt.__dict__ and torch.autograd.backward.__module__ == "torch.autograd"


def test_model_and_optimizer_found_without_being_named(agent_dir):
    model = mlp()
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters())
    handle = batchmon.attach()
    with torch.no_grad():  # an eval forward is not a training forward: not the root
        nn.Linear(D, D)(torch.randn(2, D))
    for _ in range(3):
        opt.zero_grad()
        criterion(model(torch.randn(5, D)), torch.randint(0, O, (5,))).backward()
        opt.step()
    assert handle.model is model
    assert handle.optimizers == [opt]
    last = handle.last_step
    assert last.step == 3 and last.batch_size == 5
    assert last.components["batch"] == 5 * D * F32 + 5 * 8  # inputs and the criterion's targets


def test_batch_size_from_first_tensor_or_batch_size_fn(agent_dir):
    class DictModel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(D, 1)

        def forward(self, batch: dict[str, torch.Tensor], scale: float = 1.0) -> torch.Tensor:
            return self.lin(batch["features"]) * scale

    model = DictModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    opt.zero_grad()
    model({"features": torch.randn(6, D)}, scale=2.0).sum().backward()
    opt.step()
    assert handle.last_step.batch_size == 6
    batchmon.attach(batch_size_fn=lambda batch, scale=1.0: batch["features"].shape[0] * 10)
    opt.zero_grad()
    model({"features": torch.randn(6, D)}).sum().backward()
    opt.step()
    assert handle.last_step.batch_size == 60


def test_gradient_accumulation_reports_one_micro_batch(agent_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=1)
    opt.zero_grad()
    for _ in range(3):  # three micro-batches of 4, one optimizer step
        model(torch.randn(4, D)).sum().backward()
    opt.step()
    last = handle.last_step
    assert last.step == 1 and last.batch_size == 4
    assert last.components["activations"] == 4 * H * F32  # one micro-batch's ReLU output at a time
    assert last.components["batch"] == 4 * D * F32
    # two forwards before one backward keep both graphs alive: their activations add up
    opt.zero_grad()
    (model(torch.randn(4, D)).sum() + model(torch.randn(4, D)).sum()).backward()
    opt.step()
    assert handle.last_step.components["activations"] == 2 * 4 * H * F32


class HookProbe(nn.Module):
    """Records, at each forward, whether saved-tensor hooks were active (i.e. the agent was counting)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, H)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(torch._C._autograd._top_saved_tensors_default_hooks(False) is not None)
        return torch.relu(self.lin(x))


def test_activations_sampled_every_nth_step_and_on_batch_size_change(agent_dir):
    model = HookProbe()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=4)
    sizes = [4, 4, 4, 4, 4, 4, 2, 2, 2, 2]
    for b in sizes:
        step(model, opt, b)
    sampled = [i + 1 for i, on in enumerate(model.seen) if on]
    assert sampled == [1, 2, 3, 4, 7, 8]  # first three, every 4th, and step 7 where the batch size changed
    acts = [s.components["activations"] for s in handle.steps]
    assert acts == [b * H * F32 for b in [4, 4, 4, 4, 4, 4, 2, 2, 2, 2]]  # carried forward in between


def test_default_activation_every_is_documented_value(agent_dir):
    handle = batchmon.attach()
    assert handle.activation_every == agent.DEFAULT_ACTIVATION_EVERY == 10


class Boom(nn.Module):
    """Raises a real torch.OutOfMemoryError (or another error) from forward when armed."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, H)
        self.raise_next: BaseException | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.lin(x))
        if self.raise_next is not None:
            exc, self.raise_next = self.raise_next, None
            raise exc
        return out


OOM_TEXT = ("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 79.10 GiB of which "
            "1.20 GiB is free.")


def test_oom_in_forward_is_reported_and_reraised_unchanged(agent_dir):
    model = Boom()
    opt = torch.optim.Adam(model.parameters())
    handle = batchmon.attach(model, opt, activation_every=1)
    step(model, opt, 6)
    exc = torch.OutOfMemoryError(OOM_TEXT)
    model.raise_next = exc
    with pytest.raises(torch.OutOfMemoryError) as caught:
        step(model, opt, 6)
    assert caught.value is exc and str(caught.value) == OOM_TEXT
    ooms = [e for e in handle.events if e.kind == "oom"]
    assert len(ooms) == 1
    event = ooms[0]
    assert event.batch_size == 6 and event.step == 2
    assert event.requested_bytes == int(2.5 * (1 << 30))  # no CUDA observer on CPU: from the message
    assert event.components is not None and event.components["parameters"] == (D * H + H) * F32
    assert "forward" in event.message
    step(model, opt, 6)  # training goes on
    assert handle.last_step.step == 2


def test_other_errors_and_oom_text_in_other_errors_are_not_oom(agent_dir):
    model = Boom()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    model.raise_next = RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")  # not the OOM type
    with pytest.raises(RuntimeError):
        step(model, opt)
    assert [e for e in handle.events if e.kind == "oom"] == []
    assert handle.enabled


def test_oom_handled_around_a_normal_forward_is_not_reported_again(agent_dir):
    model = Boom()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    try:
        raise torch.OutOfMemoryError("Tried to allocate 1.00 MiB")
    except torch.OutOfMemoryError:
        step(model, opt)  # e.g. a retry with a smaller batch inside the handler: no OOM leaves this forward
    assert [e for e in handle.events if e.kind == "oom"] == []


class OOMInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x * 2

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 512.00 MiB.")


class OOMSGD(torch.optim.SGD):
    fail = False

    def step(self, closure=None):  # noqa: ANN001, ANN201
        if self.fail:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 KiB.")
        return super().step(closure)


def test_oom_in_backward_and_in_step(agent_dir):
    model = mlp()
    opt = OOMSGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    step(model, opt)
    opt.zero_grad()
    with pytest.raises(torch.OutOfMemoryError):
        OOMInBackward.apply(model(torch.randn(3, D))).sum().backward()
    opt.fail = True
    with pytest.raises(torch.OutOfMemoryError):
        step(model, opt)
    ooms = [e for e in handle.events if e.kind == "oom"]
    assert [("backward" in e.message, "optimizer step" in e.message) for e in ooms] == [(True, False), (False, True)]
    assert [e.requested_bytes for e in ooms] == [512 << 20, 20 << 10]


def test_lr_scheduler_still_works_with_the_step_wrapper(agent_dir):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    handle = batchmon.attach(model, opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "lr_scheduler.step() before optimizer.step()" would be an error here
        for _ in range(3):
            step(model, opt)
            sched.step()
    assert opt.param_groups[0]["lr"] == 0.125
    assert handle.last_step.step == 3


class FragileModel(nn.Module):
    """Its buffers() fails after a while: the agent calls it, training does not."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(D, H)
        self.broken = False

    def buffers(self, recurse: bool = True):  # noqa: ANN201
        if self.broken:
            raise RuntimeError("boom")
        return super().buffers(recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_internal_error_disables_agent_with_one_warning(agent_dir, capfd):
    model = FragileModel()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=1)
    step(model, opt)
    model.broken = True
    for _ in range(5):
        step(model, opt)  # no exception reaches the training loop
    warnings_ = [e for e in handle.events if isinstance(e, Event) and e.kind == "warning"]
    assert len(warnings_) == 1 and "boom" in warnings_[0].message
    err = capfd.readouterr().err
    assert err.count("batchmon:") == 1 and "boom" in err
    assert not handle.enabled and handle.error is not None
    assert model._forward_hooks == {} and model._forward_pre_hooks == {}


def test_suggest_batch_size_on_cpu_is_none_and_calls_the_memory_model(agent_dir):
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    handle = batchmon.attach(model, opt)
    assert handle.suggest_batch_size() is None  # no steps yet
    step(model, opt)
    assert handle.suggest_batch_size() is None  # CPU: no device size, so no largest batch


def test_oom_inside_a_step_closure_is_reported_once(agent_dir):
    model = Boom()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    model.raise_next = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 KiB.")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = model(torch.randn(2, D)).sum()
        loss.backward()
        return loss

    with pytest.raises(torch.OutOfMemoryError):
        opt.step(closure)
    ooms = [e for e in handle.events if e.kind == "oom"]
    assert len(ooms) == 1 and "forward" in ooms[0].message and ooms[0].requested_bytes == 1024


def test_model_changed_after_attach_is_remeasured_on_sampled_steps(agent_dir):
    model = mlp().to(torch.float64)  # CPU only here: change the dtype (a device move takes the same path)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    opt.zero_grad()
    model(torch.randn(4, D, dtype=torch.float64)).sum().backward()
    opt.step()
    assert handle.last_step.components["parameters"] == (D * H + H + H * O + O) * 8
    model.to(torch.float32)
    opt.zero_grad()
    model(torch.randn(4, D)).sum().backward()
    opt.step()
    assert handle.last_step.components["parameters"] == (D * H + H + H * O + O) * 4  # re-measured (step 2)
