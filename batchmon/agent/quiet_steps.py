"""Quiet steady steps (issue 14 point 1): the hooks a steady training step runs without, and when they come back.

A hooked module costs torch its ``Module._call_impl`` slow path (on the dev box CPU about 4 us for the first hook,
1-2 us for each more); the loss module's pair alone cost ~7 us a step (bench/hook_floor.py), where the issue allows
10 us for all of it on a ~100 us CPU step. So once steps are steady - a step ended carried
(StepMeter.finish_carried: same inputs, not sampled, nothing it reports changed) with one training forward, the
optimizer ending steps, no loss search, no batch-layout probe - the next steps run *quiet*: the root's forward
pre hook (which opens the step, ``StepMeter.open_quiet``, and still sees every change of the inputs), a post hook
on the root that returns at once unless the forward raised (then it reports an out-of-memory error as on any step),
the patched ``torch.autograd.backward`` (counts the backward, reports an OOM leaving it), the optimizer's step
post hook and step wrapper (the step's end, an OOM leaving the step). The loss module's hooks are off, and so is
the global optimizer step pre hook (the step depth, which only matters while no optimizer ends steps).

Everything comes back (``arm``) from the root's pre hook before the forward that needs it runs - a sampled step,
new input shapes, dtypes or places, keyword inputs, a ``batch_size_fn``, a second training forward in the step
(gradient accumulation, an LBFGS closure), a moved model: torch's ``_call_impl`` reads the forward hooks after
the forward, so a post hook registered in the pre hook is called for that very forward (torch 2.13:
tests/test_agent_quiet_steps.py). An out-of-memory error in the loss module of a quiet step is seen through CUDA's
OOM observer, which the allocator calls before raising (``arm_on_error``: the loss's call on the stack's frames
says where). (An OutOfMemoryError raised by hand inside a loss module, with no allocator involved, is not reported
on a quiet step; on the CPU torch's allocator raises RuntimeError, not OutOfMemoryError.)
Evaluation forwards (no grad) pass through the pre hook untouched.
"""

from __future__ import annotations

import sys
from types import FrameType
from typing import Any, Protocol

import torch

from batchmon.agent import torch_patches as patches
from batchmon.agent.module_watch import ModuleWatch
from batchmon.agent.step_meter import StepMeter

_CALL_IMPL = torch.nn.Module._call_impl.__code__
_grad_enabled = torch.is_grad_enabled


class Owner(Protocol):
    """What the switch needs of the agent (AgentHandle); ``quiet`` is read by the hooks, so it lives there."""

    quiet: bool
    _meter: StepMeter
    _watch: ModuleWatch
    _disabled: bool

    def _moved(self) -> None: ...
    def _on_oom(self, exc: BaseException, where: str) -> None: ...
    def _fail(self, exc: BaseException, teardown: bool = True) -> None: ...


class QuietSteps:
    """The agent's forward hooks on the model's root, and the switch between every hook and a quiet step's few."""

    def __init__(self, owner: Owner) -> None:
        self._owner = owner
        self._pre: Any = None
        self._post: Any = None
        self._post_fn: Any = None  # which post hook is registered

    def hook_model(self, model: torch.nn.Module) -> None:
        self.remove()
        self._pre, self._post = patches.register_pair(model, patches.root_pre_hook, patches.root_post_hook)
        self._post_fn = patches.root_post_hook
        self.arm()

    def remove(self) -> None:
        for handle in (self._pre, self._post):
            if handle is not None:
                handle.remove()
        self._pre = self._post = self._post_fn = None

    def after_carried(self, forwards: int) -> None:
        """A carried step ended (not quiet): the next ones run quiet if this one was steady enough - one training
        forward, the optimizer ending steps, nothing counting, no loss search, no batch-layout probe."""
        owner = self._owner
        meter, watch = owner._meter, owner._watch
        if (forwards == 1 and meter.optimizer_steps > 0 and meter.root_depth == 0 and meter.crit_depth == 0
                and meter.counter is None and not meter.phases.active and meter.sizer._probe is None
                and not watch.window_hooks and not watch.discovery_hooks
                and (watch.criterion_ref is not None or watch.loss_search_left <= 0)):
            self._set_post(meter.model, patches.quiet_post_hook)
            watch.unhook_criterion()
            patches.step_depth_hook(False)
            owner.quiet = True

    def arm(self) -> None:
        """Every hook back (a quiet step's pre hook found something to measure; a new model)."""
        owner = self._owner
        owner.quiet = False
        self._set_post(owner._meter.model, patches.root_post_hook)
        owner._watch.hook_criterion()
        patches.step_depth_hook(True)

    def _set_post(self, model: torch.nn.Module | None, hook: Any) -> None:
        """The root's post hook is ``hook`` (the full one, or a quiet step's, which only sees errors leave)."""
        if self._pre is None or model is None or self._post_fn is hook:
            return
        if self._post is not None:
            self._post.remove()
        self._post = model.register_forward_hook(hook, with_kwargs=True, always_call=True)
        self._post_fn = hook

    def forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """The root's forward starts on a quiet step and ``StepMeter.open_quiet`` declined it: True when this
        handled it (an evaluation forward; the step's first forward, opened by ``begin_forward`` - armed when it
        is measured), False after arming for a second training forward in the step (the caller goes on as on
        any step)."""
        owner = self._owner
        if not _grad_enabled():
            return True  # an evaluation forward: no post hook to pair with, so no depth either
        meter = owner._meter
        if meter.step_open:
            self.arm()
            return False
        moved = meter.begin_forward(args, kwargs)
        if meter.batch_carried:
            return True  # steady after all: the step is open, its batch the last step's
        self.arm()  # measured (sampled, other inputs): torch calls the post hook for this very forward
        meter.root_depth, meter.root_counting = 1, True
        if moved:
            owner._moved()
        return True

    def arm_on_error(self, requested: int) -> None:
        """CUDA's allocator is about to raise an out-of-memory error (its observer, with the allocator's lock
        released): on a quiet step, every hook back. Inside the root's forward its post hook then reports the
        error leaving (the root is on torch's hooked path: the hooks are read after the call). The loss module
        was called on torch's fast path (no hooks: no post hook will run for this call), so an error inside it
        is reported here, now - what leaves it next is this error (backward and the optimizer step report their
        own)."""
        owner = self._owner
        if not owner.quiet or owner._disabled:
            return
        try:
            meter = owner._meter
            self.arm()
            meter.root_depth, meter.root_counting = depth_on_stack(meter.model), False
            crit = owner._watch.criterion_ref
            if meter.root_depth == 0 and depth_on_stack(crit() if crit is not None else None):
                owner._on_oom(torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {requested} bytes (seen by the allocator's OOM observer)."),
                    "loss")
        except Exception as exc:  # noqa: BLE001
            owner._fail(exc)


def depth_on_stack(module: Any) -> int:
    """How many calls of ``module`` (through nn.Module's ``_call_impl``) are running on this thread now."""
    if module is None:
        return 0
    n = 0
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _CALL_IMPL and frame.f_locals.get("self") is module:
            n += 1
        frame = frame.f_back
    return n
