"""Quiet steady steps (issue 14 point 1): the hooks a steady training step runs without, and when they come back.

A hooked module costs torch its ``Module._call_impl`` slow path (on the dev box CPU about 4 us for the first hook,
1-2 us for each more); the loss module's pair alone cost ~7 us a step (bench/hook_floor.py), where the issue allows
10 us for all of it on a ~100 us CPU step. So once steps are steady - a step ended carried
(StepMeter.finish_carried: same inputs, not sampled, nothing it reports changed) with one training forward, the
optimizer ending steps, no loss search, no batch-layout probe - the next steps run *quiet*: the root's forward
pre hook (which opens the step, ``StepMeter.open_quiet``, and still sees every change of the inputs), a post hook
on the root that returns at once unless the forward raised (then it reports an out-of-memory error as on any step),
the optimizer's step post hook (the step's end). The loss module's hooks are off, and so are the global optimizer
step pre hook (the step depth, which only matters while no optimizer ends steps), the optimizers' ``step`` wrappers
(torch_patches' ``_StepWrapper``, an OOM leaving the step: ~1.5 us of a quiet step inside a real step on the dev
box's CPU, bench/agent_step_parts.py) and the agent's ``torch.autograd.backward`` (it counts the backward and sees
an OOM leave it: ~3 us of the H200's 2.7 ms MLP step, py-spy; a quiet step's backward count is the last measured
step's, ``StepMeter.quiet_backwards``, taken as such when a second forward or a skipped optimizer step makes the
step go on measured). On a quiet step an allocator OOM inside the optimizer's step or backward is reported by the
OOM observer (``arm_on_error``: an optimizer's ``step`` on the stack, or torch's backward - on CUDA the engine's
own thread, no module's forward on it - says where); on the CPU torch's allocator raises RuntimeError, which the
wrappers never reported.

Everything comes back (``arm``) from the root's pre hook before the forward that needs it runs - a sampled step,
new input shapes, dtypes or places, keyword inputs, a ``batch_size_fn``, a second training forward in the step
(gradient accumulation, an LBFGS closure), a moved model: torch's ``_call_impl`` reads the forward hooks after
the forward, so a post hook registered in the pre hook is called for that very forward (torch 2.13:
tests/test_agent_quiet_steps.py). An out-of-memory error in the loss module of a quiet step is seen through CUDA's
OOM observer, which the allocator calls before raising (``arm_on_error``: the loss's call on the stack's frames
says where), and so is one inside the optimizer's step or backward. (An OutOfMemoryError raised by hand inside a
loss module, an optimizer's step or a backward, with no allocator involved, is not reported on a quiet step; on the
CPU torch's allocator raises RuntimeError, not OutOfMemoryError.)
Evaluation forwards (no grad) pass through the pre hook untouched.

**The root off torch's hooked path** (``quiet_call``). Any forward hook puts the root on ``Module._call_impl``'s
slow path (about 2-3 us on the dev box CPU before the hook runs, best case; 4-6 us inside a real step), over a
quarter of the issue's 10 us. So where it is safe, a quiet step has no hook on the root at all: the root's own
instance ``_call_impl`` (nn.Module's ``__call__`` looks ``self._call_impl`` up on the instance) is a small closure
that opens the step (``StepMeter.open_quiet``) and calls torch's ``Module._call_impl`` - which, with no hooks, takes
its fast path. When the step is not steady it puts every hook back *before* calling torch (which then runs them for
this very call: cleaner than the hooked path's re-arming); an out-of-memory error leaving the forward is reported
by the closure itself (by-hand ones too). Safe means: the root's ``__call__``/``_call_impl`` are nn.Module's, it has
no forward hooks but the agent's and no ``_compiled_call_impl``, and it was never seen called under
``torch.compile``. Under dynamo the closure's first line returns torch's ``_call_impl`` (``is_compiling()``), so a
compiled call traces exactly what it would without it (checked on torch 2.13: ``torch.compile(model)``,
``model.compile()``, a ``fullgraph`` function or parent module calling the root - same graphs, no graph break);
the agent does not see such a call, so a step that ends with no forward seen puts the hooks back for good.
The closure holds the root weakly (no cycle: ``del model`` frees it at once), is left out of pickles and copies
(``torch_patches._without_agent_hooks``), and, called from another thread than the training thread's (a
DataParallel replica carries a copy of the root's ``__dict__``), takes the module from its caller's frame.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import Any, Callable, Protocol

import torch

from batchmon.agent import torch_patches as patches
from batchmon.agent.module_watch import ModuleWatch
from batchmon.agent.step_meter import StepMeter

_MODULE_CALL_IMPL = torch.nn.Module._call_impl
_CALL_IMPL = _MODULE_CALL_IMPL.__code__
_WRAPPED = getattr(torch.nn.Module, "_wrapped_call_impl", None)  # nn.Module.__call__ (torch >= 2.1)
_WRAPPED_CODE = getattr(_WRAPPED, "__code__", None)
_grad_enabled = torch.is_grad_enabled
_dynamo_compiling, _compiler = patches._dynamo_compiling, patches._compiler  # (torch_patches: the compile check)
_get_ident = threading.get_ident
_getframe = sys._getframe
_OOM = torch.OutOfMemoryError
_OPTIMIZER = torch.optim.Optimizer


class Owner(Protocol):
    """What the switch needs of the agent (AgentHandle); ``quiet`` is read by the hooks, so it lives there."""

    quiet: bool
    _meter: StepMeter
    _watch: ModuleWatch
    _disabled: bool

    oom_count: int

    def _moved(self) -> None: ...
    def _on_oom(self, exc: BaseException, where: str) -> None: ...
    def _fail(self, exc: BaseException, teardown: bool = True) -> None: ...
    def _open_quiet(self, module: Any, args: tuple[Any, ...]) -> bool: ...


class QuietSteps:
    """The agent's forward hooks on the model's root, and the switch between every hook and a quiet step's few."""

    def __init__(self, owner: Owner) -> None:
        self._owner = owner
        self._pre: Any = None
        self._post: Any = None
        self._post_fn: Any = None  # which post hook is registered
        self._model: weakref.ReferenceType[torch.nn.Module] | None = None  # the hooked root
        self._call: Callable[..., Any] | None = None  # the root's instance _call_impl while quiet (quiet_call)
        self.compiled = False  # the root was called under torch.compile, or a quiet step missed its forward
        self._thread = 0  # the training thread's ident, as the last quiet steps began (arm_on_error: backward?)

    def hook_model(self, model: torch.nn.Module) -> None:
        self.remove()
        self._model = weakref.ref(model)
        self.compiled = False
        self._pre, self._post = patches.register_pair(model, patches.root_pre_hook, patches.root_post_hook)
        self._post_fn = patches.root_post_hook
        self.arm()

    def remove(self) -> None:
        self._uncall()
        for handle in (self._pre, self._post):
            if handle is not None:
                handle.remove()
        self._pre = self._post = self._post_fn = None

    @property
    def calling(self) -> bool:
        """The root runs torch's fast path through the agent's instance ``_call_impl`` (a quiet step, no hooks)."""
        return self._call is not None

    def _uncall(self) -> None:
        call, self._call = self._call, None
        model = self._model() if self._model is not None else None
        if call is not None and model is not None and model.__dict__.get("_call_impl") is call:
            del model.__dict__["_call_impl"]

    def _can_call(self, model: torch.nn.Module | None) -> bool:
        """Whether a quiet step can take the root off torch's hooked path (the module docstring's "safe")."""
        if model is None or self.compiled or _WRAPPED_CODE is None or self._pre is None:
            return False
        cls = type(model)
        d = model.__dict__
        return (cls.__call__ is _WRAPPED and cls._call_impl is torch.nn.Module._call_impl and "_call_impl" not in d
                and d.get("_compiled_call_impl") is None
                and all(fn in patches.AGENT_HOOKS for fn in model._forward_pre_hooks.values())
                and all(fn in patches.AGENT_HOOKS for fn in model._forward_hooks.values()))

    def after_carried(self, forwards: int) -> None:
        """A carried step ended (not quiet): the next ones run quiet if this one was steady enough - one training
        forward, the optimizer ending steps, nothing counting, no loss search, no batch-layout probe."""
        owner = self._owner
        meter, watch = owner._meter, owner._watch
        if (forwards == 1 and meter.optimizer_steps > 0 and meter.root_depth == 0 and meter.crit_depth == 0
                and meter.counter is None and not meter.phases.active and meter.sizer._probe is None
                and not watch.window_hooks and not watch.discovery_hooks
                and (watch.criterion_ref is not None or watch.loss_search_left <= 0)):
            model = meter.model
            if self._can_call(model):
                for handle in (self._pre, self._post):
                    handle.remove()
                self._pre = self._post = self._post_fn = None
                self._call = model.__dict__["_call_impl"] = quiet_call(weakref.ref(model), _get_ident())
            else:
                self._set_post(model, patches.quiet_post_hook)
            watch.unhook_criterion()
            patches.step_depth_hook(False)
            patches.backward_patch(False)  # (its backwards: the template's; an OOM in it: arm_on_error)
            self._thread = _get_ident()
            for opt in meter.optimizers:  # (an OOM leaving a quiet step's optimizer step: arm_on_error reports it)
                patches.unwrap_step(opt)
            owner.quiet = True

    def arm(self) -> None:
        """Every hook back (a quiet step's pre hook found something to measure; a new model)."""
        owner = self._owner
        owner.quiet = False
        if self._call is not None:
            self._uncall()
            model = self._model() if self._model is not None else None
            if model is not None:
                self._pre, self._post = patches.register_pair(model, patches.root_pre_hook, patches.root_post_hook)
                self._post_fn = patches.root_post_hook
        self._set_post(owner._meter.model, patches.root_post_hook)
        owner._watch.hook_criterion()
        patches.step_depth_hook(True)
        patches.backward_patch(True)
        for opt in owner._meter.optimizers:
            patches.wrap_step(opt)

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
            meter.quiet_backwards()  # (the step's first forward's backward ran unseen)
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

    def forward_failed(self, exc: BaseException, mark: int) -> None:
        """An exception left the root's forward on a quiet step run through ``quiet_call`` (torch's fast path: no
        post hook saw it): an out-of-memory error is reported (once: ``mark`` is the OOM count before it) and
        every hook comes back, as the hooked path's post hook would."""
        owner = self._owner
        try:
            meter = owner._meter
            meter.root_depth, meter.root_counting = 0, False  # (the OOM observer may have armed, counting this call)
            if owner.quiet:
                self.arm()
            if owner.oom_count == mark and isinstance(exc, _OOM):
                owner._on_oom(exc, "forward")
        except Exception as err:  # noqa: BLE001
            owner._fail(err)

    def settle(self) -> None:
        """A forward run through ``quiet_call`` returned after something armed the hooks inside it: torch took its
        fast path, so no post hook will close the root's depth that the OOM observer opened."""
        meter = self._owner._meter
        meter.root_depth, meter.root_counting = 0, False

    def before_compile(self, fn: Any) -> Any:
        """``torch.compile(fn)`` is called (torch_patches): the root keeps the hooked quiet steps from now on (a
        model compiled after attach is measured every step, as before quiet_call); what to compile instead of
        ``fn`` when it is the root's quiet ``_call_impl`` (``nn.Module.compile`` passes ``self._call_impl``)."""
        self.compiled = True
        call = self._call
        if call is None:
            return fn
        self.arm()
        model = self._model() if self._model is not None else None
        return model._call_impl if fn is call and model is not None else fn

    def missed_forward(self) -> None:
        """A quiet step ended with no forward of the root seen: a compiled call went around ``quiet_call`` (or the
        script called ``model.forward`` itself). Every hook back; this root keeps them on quiet steps from now on."""
        if self._call is not None:
            self.compiled = True
        self.arm()

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
            where = None
            if meter.root_depth == 0 and depth_on_stack(crit() if crit is not None else None):
                where = "loss"
            elif meter.root_depth == 0 and in_optimizer_step():
                where = "optimizer step"  # (a quiet step's optimizer runs without the agent's step wrapper)
            elif meter.root_depth == 0 and (patches.on_backward_stack() or (
                    _get_ident() != self._thread and not any_module_on_stack())):
                where = "backward"  # (a quiet step's backward runs unwrapped: CUDA's on the engine's own threads)
            if where is not None:
                owner._on_oom(torch.OutOfMemoryError(
                    f"CUDA out of memory. Tried to allocate {requested} bytes (seen by the allocator's OOM observer)."),
                    where)
        except Exception as exc:  # noqa: BLE001
            owner._fail(exc)


def quiet_call(ref: "weakref.ReferenceType[torch.nn.Module]", owner: int) -> Callable[..., Any]:
    """The root's instance ``_call_impl`` on a quiet step (module docstring: "The root off torch's hooked path").
    ``ref``: the root, weakly; ``owner``: the training thread's ident."""

    def _call_impl(*args: Any, **kwargs: Any) -> Any:
        # traced by dynamo or run by a non-strict export (torch_patches' one-call compile check: a quiet step runs
        # this every step): what torch would call, nothing of the agent's in the graph
        if _dynamo_compiling() or (_compiler is not None and _compiler._is_compiling_flag):
            return _MODULE_CALL_IMPL(ref(), *args, **kwargs)
        root = module = ref()
        if _get_ident() != owner:  # maybe a DataParallel replica (a copy of the root's __dict__): who is called?
            caller = _getframe(1)
            if caller.f_code is _WRAPPED_CODE:
                module = caller.f_locals["self"]
        a = patches.agent
        if a is not None and a.quiet and module is root:
            try:
                opened = not kwargs and a._open_quiet(module, args)
                if not opened and _grad_enabled():  # not a steady step: every hook back before torch reads them
                    a._hooks.arm()
            except Exception as exc:  # noqa: BLE001 - never into the training
                opened = False
                a._fail(exc)
            if opened:
                mark = a.oom_count
                try:
                    result = _MODULE_CALL_IMPL(module, *args)  # (opened: no keyword inputs)
                except BaseException as exc:
                    a._hooks.forward_failed(exc, mark)
                    raise
                if not a.quiet:  # armed during the call (the OOM observer, an error caught inside the forward)
                    a._hooks.settle()
                return result
        return _MODULE_CALL_IMPL(module, *args, **kwargs)

    _call_impl.batchmon_quiet_call = True  # type: ignore[attr-defined]  # torch_patches leaves it out of pickles
    return _call_impl


def in_optimizer_step() -> bool:
    """Whether a ``torch.optim`` optimizer's ``step`` is running on this thread now: a frame of a ``step`` method of
    an optimizer, or of what its class's ``step`` is now (torch's hook-running wrapper: its pre hooks run there)."""
    for frame in patches.frames(sys._getframe(1)):
        code = frame.f_code
        if code.co_name in ("step", "wrapper"):
            opt = frame.f_locals.get("self")
            if isinstance(opt, _OPTIMIZER) and (
                    code.co_name == "step" or code is getattr(type(opt).step, "__code__", None)):
                return True
    return False


def any_module_on_stack() -> bool:
    """Whether some module's forward (nn.Module's ``_call_impl``) runs on this thread now: on another thread than
    the training thread's, a DataParallel replica's forward rather than autograd's engine running a backward."""
    return any(frame.f_code is _CALL_IMPL for frame in patches.frames(sys._getframe(1)))


def depth_on_stack(module: Any) -> int:
    """How many calls of ``module`` (through nn.Module's ``_call_impl``) are running on this thread now."""
    if module is None:
        return 0
    return sum(1 for frame in patches.frames(sys._getframe(1))
               if frame.f_code is _CALL_IMPL and frame.f_locals.get("self") is module)
