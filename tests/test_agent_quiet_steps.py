"""Quiet steady steps (issue 14 point 1, batchmon.agent.quiet_steps): once steps are steady the loss module's hooks
go and the root's post hook only sees errors; what a quiet step must still see - OOMs leaving forward, loss,
backward and the optimizer step, evaluation forwards, copies of the model - and the torch behaviour the re-arming
relies on (a post hook registered in a pre hook runs for that same call)."""

from __future__ import annotations

import copy
import io
import pickle
from typing import Any

import pytest
import torch
import torch.nn as nn

import batchmon
from batchmon.agent import torch_patches
from agent_helpers import agent_dir  # noqa: F401 - fixture

D = 16


def _hook_fns(module: nn.Module) -> set:
    return {fn for table in (module._forward_pre_hooks, module._forward_hooks) for fn in table.values()}


def _train(model: nn.Module, opt: torch.optim.Optimizer, crit: nn.Module, n: int, batch: int = 8) -> None:
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        crit(model(torch.randn(batch, D)), torch.randint(0, 4, (batch,))).backward()
        opt.step()


def _setup(every: int = 1000) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module, batchmon.AgentHandle]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    return model, opt, crit, batchmon.attach(model, opt, activation_every=every)


def test_torch_runs_a_post_hook_registered_by_the_same_calls_pre_hook():
    """What arming from the root's pre hook relies on (torch 2.13's _call_impl reads the hooks after forward):
    for a forward that returns and for one that raises (always_call)."""
    model = nn.Linear(2, 2)
    seen: list[str] = []

    def post(module, args, kwargs, result):  # noqa: ANN001, ANN202
        seen.append("ok" if result is not None else "raised")

    def pre(module, args, kwargs):  # noqa: ANN001, ANN202
        if not seen or seen[-1] != "pre":
            seen.append("pre")
            model.register_forward_hook(post, with_kwargs=True, always_call=True)

    model.register_forward_pre_hook(pre, with_kwargs=True)
    model(torch.ones(1, 2))
    assert seen == ["pre", "ok"]
    seen.clear()

    def boom(x: torch.Tensor) -> torch.Tensor:
        raise ValueError("boom")

    model = nn.Linear(2, 2)
    model.forward = boom  # type: ignore[method-assign]
    model.register_forward_pre_hook(pre, with_kwargs=True)
    with pytest.raises(ValueError):
        model(torch.ones(1, 2))
    assert seen == ["pre", "raised"]


def test_steady_steps_go_quiet_and_a_sampled_step_arms_every_hook(agent_dir):
    model, opt, crit, handle = _setup(every=12)
    _train(model, opt, crit, 6)
    assert handle.quiet
    # no hook on the root: its instance _call_impl opens the step and calls torch's (fast path) _call_impl
    assert _hook_fns(model) == set() and handle._hooks.calling
    assert getattr(model.__dict__["_call_impl"], "batchmon_quiet_call", False)
    assert _hook_fns(crit) == set()  # the loss module runs torch's fast path
    _train(model, opt, crit, 6)  # step 12 is sampled: armed for it, quiet again after the next carried step
    assert handle.steps[11].components["activations"] > 0 and handle.steps[11].step == 12
    assert not handle.quiet and _hook_fns(crit) == {torch_patches.crit_pre_hook, torch_patches.crit_post_hook}
    _train(model, opt, crit, 1)
    assert handle.quiet and _hook_fns(crit) == set()
    # a step with another batch size is measured with every hook, its batch size its own
    _train(model, opt, crit, 1, batch=5)
    assert handle.last_step.batch_size == 5 and not handle.quiet
    assert _hook_fns(crit) == {torch_patches.crit_pre_hook, torch_patches.crit_post_hook}
    assert _hook_fns(model) == {torch_patches.root_pre_hook, torch_patches.root_post_hook}
    _train(model, opt, crit, 3, batch=5)
    assert handle.quiet and [s.step for s in handle.steps] == list(range(1, 18))
    handle.detach()
    assert _hook_fns(model) == set() and _hook_fns(crit) == set() and "_call_impl" not in model.__dict__


def test_evaluation_forwards_between_quiet_steps_change_nothing(agent_dir):
    model, opt, crit, handle = _setup()
    _train(model, opt, crit, 6)
    assert handle.quiet
    for _ in range(3):
        with torch.no_grad():
            model(torch.randn(64, D))
        _train(model, opt, crit, 1)
    assert handle.quiet and handle.last_step.step == 9 and handle.last_step.batch_size == 8
    assert handle._meter.root_depth == 0 and not handle._meter.step_open


def test_copies_of_a_model_on_quiet_steps_carry_no_agent_hooks(agent_dir):
    model, opt, crit, handle = _setup()
    _train(model, opt, crit, 6)
    assert handle.quiet
    assert "_call_impl" in model.__dict__
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model)), copy.copy(model)):
        assert _hook_fns(clone) == set() and "_call_impl" not in clone.__dict__
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert _hook_fns(loaded) == set() and "_call_impl" not in loaded.__dict__
    _train(model, opt, crit, 2)
    assert handle.last_step.step == 8


class FailInBackward(torch.autograd.Function):
    """Identity; its backward, when ``fail`` is set, calls it once with the gradient (what fails there)."""

    fail: Any = None

    @staticmethod
    def forward(ctx, x):  # noqa: ANN001, ANN205
        return x * 1

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        fail, FailInBackward.fail = FailInBackward.fail, None
        if fail is not None:
            fail(grad)
        return grad


def _allocator_oom(grad: torch.Tensor) -> None:
    """As CUDA's allocator fails: its OOM observer first (a quiet step's backward runs unwrapped: the observer is
    what sees it), then the error."""
    torch_patches._oom_observer(0, 64 << 20, 0, 0)
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 MiB.")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, 32), nn.Linear(32, 4)
        self.raise_next: BaseException | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.raise_next is not None:
            exc, self.raise_next = self.raise_next, None
            raise exc
        return FailInBackward.apply(self.b(torch.relu(self.a(x))))


class AllocatorLoss(nn.CrossEntropyLoss):
    """A loss whose next call fails as CUDA's allocator fails: its OOM observer first, then the error."""

    fail = False

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        if self.fail:
            self.fail = False
            torch_patches._oom_observer(0, 3 << 20, 0, 0)
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 MiB.")
        return super().forward(out, y)


def _oom_run(where: str) -> tuple[batchmon.AgentHandle, list]:
    torch.manual_seed(0)
    model, crit = Net(), AllocatorLoss()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    fail_step = []

    def step_pre(optimizer, args, kwargs):  # noqa: ANN001, ANN202 - inside the optimizer's step
        if fail_step:
            fail_step.clear()
            torch_patches._oom_observer(0, 20 << 10, 0, 0)  # as CUDA's allocator calls it before raising
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 KiB.")

    opt.register_step_pre_hook(step_pre)
    handle = batchmon.attach(model, opt, activation_every=1000)
    _train(model, opt, crit, 6)
    assert handle.quiet
    if where == "forward":
        model.raise_next = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB.")
    elif where == "backward":
        FailInBackward.fail = _allocator_oom
    elif where == "optimizer step":
        fail_step.append(True)
    else:
        crit.fail = True
    with pytest.raises(torch.OutOfMemoryError):
        _train(model, opt, crit, 1)
    _train(model, opt, crit, 3)  # the script caught it and goes on
    return handle, [e for e in handle.events if e.kind == "oom"]


@pytest.mark.parametrize("where", ["forward", "backward", "loss", "optimizer step"])
def test_an_oom_on_a_quiet_step_is_reported_where_it_happened(agent_dir, where: str):
    handle, ooms = _oom_run(where)
    assert len(ooms) == 1, ooms
    assert f"in {where} at step 7" in ooms[0].message and ooms[0].batch_size == 8
    assert ooms[0].components is not None and ooms[0].components["parameters"] > 0
    if where == "loss":
        assert ooms[0].requested_bytes == 3 << 20  # the observer's figure
    # the failed step is continued by the next forward, as without quiet steps; steps go on and quiet again
    assert handle.last_step.step == 9 and handle.quiet
    assert handle._meter.root_depth == 0 and handle._meter.crit_depth == 0
    handle.detach()


def test_gradient_accumulation_arms_on_the_second_forward_and_counts_every_backward(agent_dir):
    model, opt, crit, handle = _setup()
    _train(model, opt, crit, 6)
    assert handle.quiet
    for micro in (2, 3, 1, 1, 1):
        opt.zero_grad(set_to_none=True)
        for _ in range(micro):
            crit(model(torch.randn(8, D)), torch.randint(0, 4, (8,))).backward()
        opt.step()
    assert [s.micro_batches for s in handle.steps[-5:]] == [2, 3, 1, 1, 1]
    assert handle.quiet


def test_a_compiled_model_is_measured_every_step_through_quiet_steps(agent_dir):
    model, opt, crit, handle = _setup(every=5)
    compiled = torch.compile(model, backend="eager")
    for i in range(14):
        opt.zero_grad(set_to_none=True)
        crit(compiled(torch.randn(8 if i < 10 else 4, D)), torch.randint(0, 4, (8 if i < 10 else 4,))).backward()
        opt.step()
    assert [s.step for s in handle.steps] == list(range(1, 15))
    assert [s.batch_size for s in handle.steps] == [8] * 10 + [4] * 4
    assert handle.quiet
    handle.detach()


# ------------------------------------------------------------------------------------------ the root off torch's hooked path


def test_a_copy_of_the_roots_dict_called_from_another_thread_runs_itself(agent_dir):
    """DataParallel's replicas are copies of the root's __dict__ (the instance _call_impl with it), called from worker
    threads: each must run its own forward, and the agent's step is left alone."""
    import threading

    model, opt, crit, handle = _setup()
    _train(model, opt, crit, 6)
    assert handle._hooks.calling
    replica = model.__new__(type(model))
    replica.__dict__ = model.__dict__.copy()
    replica._modules = copy.deepcopy(model._modules)
    with torch.no_grad():
        replica[0].weight.add_(1.0)
    x = torch.randn(3, D)
    out: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: out.append(replica(x)))
    worker.start()
    worker.join()
    assert torch.equal(out[0], replica._modules["2"](replica._modules["1"](replica._modules["0"](x))))
    assert not handle._meter.step_open  # the replica's forward was not the root's
    with torch.no_grad():
        assert not torch.equal(out[0], model(x))
    _train(model, opt, crit, 2)
    assert handle.last_step.step == 8 and handle.quiet


def test_a_quiet_root_is_held_weakly(agent_dir):
    import weakref

    model, opt, crit, handle = _setup()
    _train(model, opt, crit, 6)
    assert handle._hooks.calling
    ref = weakref.ref(model)
    del model
    assert ref() is None  # no reference cycle through the instance _call_impl: freed at once, no gc pass


def test_an_oom_caught_inside_a_quiet_forward_leaves_the_next_steps_measured(agent_dir):
    """The OOM observer arms every hook in the middle of a forward that then goes on (the script caught the error
    inside its forward): the root ran torch's fast path, so the depth the observer opened is closed by the call."""

    class Retrying(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(D, 32), nn.Linear(32, 4)
            self.fail = False

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.fail:
                self.fail = False
                try:
                    torch_patches._oom_observer(0, 1 << 20, 0, 0)
                    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 MiB.")
                except torch.OutOfMemoryError:
                    pass  # e.g. retried in smaller chunks
            return self.b(torch.relu(self.a(x)))

    torch.manual_seed(0)
    model = Retrying()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    handle = batchmon.attach(model, opt, activation_every=1000)
    _train(model, opt, crit, 6)
    assert handle._hooks.calling
    model.fail = True
    _train(model, opt, crit, 4, batch=5)
    assert handle._meter.root_depth == 0 and [s.batch_size for s in handle.steps][-4:] == [5] * 4
    assert not [e for e in handle.events if e.kind == "oom"]
    assert handle.quiet


def test_a_root_with_its_own_forward_hook_keeps_the_hooked_quiet_steps(agent_dir):
    model, opt, crit, handle = _setup()
    seen: list[int] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(1))
    _train(model, opt, crit, 6)
    assert handle.quiet and not handle._hooks.calling and "_call_impl" not in model.__dict__
    assert torch_patches.root_pre_hook in _hook_fns(model) and len(seen) == 6


@pytest.mark.parametrize("how", ["torch.compile", "Module.compile"])
def test_compiling_after_quiet_steps_puts_the_hooks_back_and_measures_every_step(agent_dir, how: str):
    original_compile = torch_patches._originals["compile"] if "compile" in torch_patches._originals else None
    model, opt, crit, handle = _setup()
    _train(model, opt, crit, 6)
    assert handle._hooks.calling and torch.compile is torch_patches._compile
    if how == "torch.compile":
        compiled = torch.compile(model, backend="eager")
    else:  # nn.Module.compile passes self._call_impl: torch's own, not the quiet one
        model.compile(backend="eager")
        compiled = model
        assert not getattr(model._compiled_call_impl, "batchmon_quiet_call", False)
    assert handle._hooks.compiled and not handle._hooks.calling  # before dynamo met the root
    for batch in (8, 8, 8, 4, 4, 4):
        opt.zero_grad(set_to_none=True)
        crit(compiled(torch.randn(batch, D)), torch.randint(0, 4, (batch,))).backward()
        opt.step()
    assert [s.step for s in handle.steps] == list(range(1, 13))
    assert [s.batch_size for s in handle.steps] == [8] * 9 + [4] * 3
    assert handle.quiet and not handle._hooks.calling  # quiet again, in the hooked form
    handle.detach()
    assert torch.compile is not torch_patches._compile and original_compile in (None, torch.compile)


def test_a_sample_leaves_quiet_for_one_step_end_only(agent_dir):
    """Whether a run 'went quiet' is not one snapshot at its end: a sampled step arms every hook, and the carried
    step after it makes the next ones quiet again (on CUDA one more: a phase-followed step leaves no template, so
    the step after it ends with ``finish``). Here, every 10th step sampled: the step ends that leave the agent not
    quiet are exactly the sampled ones, one at a time."""
    model, opt, crit, handle = _setup(every=10)
    _train(model, opt, crit, 6)
    after: list[bool] = []
    for _ in range(26):
        _train(model, opt, crit, 1)
        after.append(handle.quiet)
    loud = [handle.steps[-26 + i].step for i, q in enumerate(after) if not q]
    assert loud == [10, 20, 30], loud


def test_a_model_moved_alone_is_measured_again_within_place_steps(agent_dir):
    """A quiet step looks at the model's place (its first parameter's storage) every PLACE_STEPS-th step, not every
    step (step_meter.open_quiet): new storages under the same inputs (here every parameter's ``.data`` replaced)
    arm every hook at the next such step, and that step counts the parameters again."""
    from batchmon.agent.step_meter import PLACE_STEPS

    model, opt, crit, handle = _setup(every=1000)  # (no sample in the window: only the place check can arm)
    _train(model, opt, crit, 8)
    assert handle.quiet
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.clone()
    after = []
    for _ in range(PLACE_STEPS + 1):
        _train(model, opt, crit, 1)
        after.append(handle.quiet)
    loud = [i for i, q in enumerate(after) if not q]
    assert loud and loud[0] < PLACE_STEPS, after
    assert any(after[loud[0] + 1:]), after  # quiet again after it


def _huge_allocation(grad: torch.Tensor) -> None:
    """Far more than the device has from CUDA's allocator: a real OOM, raised on the autograd engine's CUDA thread,
    its OOM observer called first."""
    torch.empty(1 << 50, dtype=torch.uint8, device=grad.device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_real_cuda_oom_in_a_quiet_steps_unwrapped_backward_is_reported_as_backward(agent_dir):
    """A quiet step's backward runs without the agent's wrapper: the allocator's OOM observer, called on the
    engine's own thread, says where; the script catches the error and goes on, and steps go quiet again."""
    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 4)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    handle = batchmon.attach(model, opt, activation_every=1000)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = FailInBackward.apply(model(torch.randn(8, D, device=dev)))
        crit(out, torch.randint(0, 4, (8,), device=dev)).backward()
        opt.step()

    for _ in range(6):
        step()
    assert handle.quiet and torch.autograd.backward is not torch_patches._backward  # unwrapped while quiet
    FailInBackward.fail = _huge_allocation
    with pytest.raises(torch.OutOfMemoryError):
        step()
    for _ in range(6):
        step()
    ooms = [e for e in handle.events if e.kind == "oom"]
    assert len(ooms) == 1 and "in backward at step 7" in ooms[0].message, [e.message for e in ooms]
    assert ooms[0].requested_bytes is not None and ooms[0].requested_bytes >= 1 << 50
    assert handle.quiet and handle.last_step.step == 12
    handle.detach()
