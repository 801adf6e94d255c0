"""What the agent changes in torch itself, and the hooks it puts on the user's modules - all of it undoable.

(Over 400 lines on purpose: every patch and its undo sit together, so that detach provably restores torch.)

The rule (issue 12): the agent leaves no trace on user objects. A hook registered on the user's root module or
loss module is one of the module-level functions below (never a bound method of the handle, which reaches the
monitor sockets), so whatever copies a module cannot reach the agent's state; and while the agent is attached,
``nn.Module.__getstate__`` leaves the agent's hooks out, so ``copy.deepcopy``, ``pickle`` and ``torch.save`` of
a whole model give a copy without them (a file that loads where batchmon is not installed, an EMA copy that is
not measured as the model). The hook functions run eagerly under ``torch.compile`` where graph breaks are allowed
(``torch._dynamo.disable``d copies once dynamo is loaded; never importing dynamo ourselves: it costs seconds), so
a model compiled after attach is measured every step, as in eager mode; under ``fullgraph=True`` they trace to
nothing (``eager``): the compiled forward is not seen, the steps still are.

Patches on torch (installed at attach, removed at detach): ``torch.autograd.backward`` (forward groups,
accumulation, OOM leaving backward), ``nn.Module.__getstate__`` (above), ``GradScaler.update`` (a step whose
optimizer step the scaler skipped still ends), ``torch.compile`` (quiet steps' hooks back first), CUDA's OOM
observer. ``optimizer.step`` of a tracked optimizer
is wrapped on the instance (``_StepWrapper``) to see an OOM leave it; ``Optimizer.__getstate__`` already drops
it from copies.

The script's own CUDA memory calls (issue 12 point 4), patched on CUDA only, live in batchmon.agent.cuda_peaks
(re-exported here, undone by ``uninstall``): the agent's peak resets must not hide the script's peak, nor the
script's resets the step's. ``empty_cache()``, ``_record_memory_history()``
and the profiler are left alone: the agent allocates nothing on the device and reads only allocator counters.
"""

from __future__ import annotations

import functools
import re
import sys
import weakref
from types import FrameType
from typing import Any, Callable, Iterator, Protocol

import torch

from batchmon.agent.cuda_peaks import (  # noqa: F401 - the agent reaches them here
    agent_missed, agent_reset, install_cuda_memory, raw_stats, uninstall_cuda_memory)


class Sink(Protocol):
    """What the patches call on the attached agent (AgentHandle)."""

    oom_count: int
    _device_used: int | None  # NVML's per-process figure (a quiet step's end compares it)
    quiet: bool  # a quiet steady step (batchmon.agent.quiet_steps): backward only counted (``_meter.backwards``)
    _meter: Any
    _hooks: Any  # batchmon.agent.quiet_steps.QuietSteps

    def _open_quiet(self, module: torch.nn.Module, args: tuple[Any, ...]) -> bool: ...
    def _fail(self, exc: BaseException, teardown: bool = True) -> None: ...
    def _set_model(self, model: torch.nn.Module) -> None: ...

    def _before_backward(self) -> None: ...
    def _after_backward(self) -> None: ...
    def _on_oom(self, exc: BaseException, where: str) -> None: ...
    def _arm_on_error(self, requested: int) -> None: ...
    def _scaler_update(self) -> None: ...
    def _on_step(self, optimizer: Any, args: Any, kwargs: Any) -> None: ...
    def _root_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None: ...
    def _root_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   exc: BaseException | None, result: Any = None) -> None: ...
    def _crit_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None: ...
    def _crit_post(self, module: torch.nn.Module, exc: BaseException | None) -> None: ...


agent: Sink | None = None  # the attached agent: batchmon.agent.handle keeps it (every hook reads it, once)


def current() -> Sink | None:
    return agent


oom_requested: int | None = None  # bytes of the last failed allocation (CUDA's OOM observer)
_originals: dict[str, Any] = {}
_TRIED = re.compile(r"Tried to allocate (\d+(?:\.\d+)?) ?(B|bytes|KiB|MiB|GiB|TiB)\b")
_UNITS = {"B": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
_oom_observer_installed = False
step_depth = 0  # optimizer steps running on the training thread (an LBFGS closure runs inside one)


# ------------------------------------------------------------------------------------------------ eager hooks

_modules = sys.modules


def eager(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as it must run inside a ``torch.compile``d call, without importing dynamo ourselves.

    Outside compilation the returned function calls ``fn`` directly (a ``dynamo.disable``d function costs about
    1 us a call even when nothing compiles: it swaps the frame evaluator twice). While dynamo traces it
    (``torch.compiler.is_compiling()`` is a constant True there):

    - where graph breaks are allowed (``fullgraph=False``), dynamo meets a ``dynamo.disable``d copy of ``fn``: a
      graph break, the agent's code runs eagerly in every call of the compiled code, as in eager mode;
    - under ``fullgraph=True`` (or ``error_on_graph_break``) a graph break is an error: the traced call is empty,
      nothing of the agent's in the graph (the agent sees the step from backward and the optimizer step).

    ``_graph_breaks_allowed`` decides which at trace time (dynamo runs it, its result a constant) and makes the
    disabled copies then (inside traced code dynamo refuses to make one)."""
    disabled: list[Callable[..., Any]] = []
    _EAGER.append((fn, disabled))

    def call(*args: Any, **kwargs: Any) -> Any:
        if not _is_compiling():
            return fn(*args, **kwargs)
        if _graph_breaks_allowed():
            return disabled[0](*args, **kwargs)
        return None

    if call.__code__ not in _EAGER_CODE:
        _EAGER_CODE.append(call.__code__)
    return call


_EAGER: list[tuple[Callable[..., Any], list[Callable[..., Any]]]] = []  # every eager() function, its disabled copy
_EAGER_CODE: list[Any] = []  # the code of eager()'s wrapper (one code object, whatever number of wrappers)
_skipped_top_level = False


def _skip_top_level() -> None:
    """Dynamo never compiles eager()'s wrapper as a frame of its own. After a graph break in a hook dynamo has
    inlined - or first of all, where torch.compile(module) runs the module's hooks from nn.Module's own frames,
    which dynamo leaves to run - torch calls the hook outside any trace with dynamo's frame callback set, and dynamo
    compiles the wrapper as a new frame, guarded on its arguments: a global hook (loss discovery, met by every
    module) recompiled for each module type until dynamo's recompile limit, and dynamo printed its warning into
    the training's output (nanoGPT with torch.compile on the H200, torch 2.11: "hit config.recompile_limit (8)").
    Such a call only ever runs ``fn`` eagerly (through its disabled copy), so the wrapper's frame is marked to
    run without dynamo, its callees too (dynamo's own frame strategy: skip this frame and those it calls); where
    dynamo inlines the wrapper while tracing, nothing changes. Marked when torch.compile is called, at install
    when dynamo is already imported, and at the latest when dynamo first traces a wrapper (a mark set while the
    wrapper's own frame compiles does not hold: nanoGPT on torch 2.13 recompiled it anyway). Anything unexpected
    (another torch's internals): left as it was."""
    global _skipped_top_level
    dynamo = _modules.get("torch._dynamo")
    if _skipped_top_level or dynamo is None:
        return
    _skipped_top_level = True
    try:
        from torch._dynamo.types import FrameAction, FrameExecStrategy

        for code in _EAGER_CODE:
            dynamo.eval_frame.set_code_exec_strategy(code, FrameExecStrategy(FrameAction.SKIP, FrameAction.SKIP))
    except Exception:  # noqa: BLE001
        pass


def _graph_breaks_allowed() -> bool:
    """Whether the code dynamo traces now may break the graph (not ``fullgraph=True``, not
    ``error_on_graph_break``). Marked for dynamo as a constant result: dynamo calls it at trace time, eagerly, and
    puts its answer in the trace, so it can read the tracer's setting and make the ``dynamo.disable``d copies
    (``eager``). Anything unexpected (another torch's internals) answers False: no graph break, never an error."""
    try:
        dynamo = _modules.get("torch._dynamo")
        if dynamo is None:
            return False
        for fn, disabled in _EAGER:
            if not disabled:
                disabled.append(dynamo.disable(fn))
        _skip_top_level()
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()
        return not (getattr(tx, "one_graph", True) or getattr(tx, "error_on_graph_break", False))
    except Exception:  # noqa: BLE001
        return False


_graph_breaks_allowed._dynamo_marked_constant = True  # type: ignore[attr-defined]  # (assume_constant_result)


_is_compiling: Callable[[], bool] = getattr(getattr(torch, "compiler", None), "is_compiling", None) or (lambda: True)
# the same answer in one Python call where a per-step path asks (quiet_steps.quiet_call): ``_dynamo_compiling()``
# (dynamo folds is_dynamo_compiling to True while it traces) ``or (_compiler is not None and
# _compiler._is_compiling_flag)`` (a non-strict export runs the Python); is_compiling() calls
# torch.jit.is_scripting() first. An older torch without them: is_compiling() itself, and no flag.
_compiler: Any = getattr(torch, "compiler", None)
_dynamo_compiling: Callable[[], bool] = getattr(_compiler, "is_dynamo_compiling", None) or _is_compiling
if _dynamo_compiling is _is_compiling or not hasattr(_compiler, "_is_compiling_flag"):
    _dynamo_compiling, _compiler = _is_compiling, None


def _leaving(depth: int = 8) -> BaseException | None:
    """The exception a forward hook is being called for: torch runs ``always_call`` hooks from the except block
    of the module's ``_call_impl``, so that frame heads the exception's traceback. (An exception merely being
    handled further out, around a normal forward, does not count.)"""
    exc = sys.exc_info()[1]
    if exc is None or exc.__traceback__ is None:
        return None
    caller: FrameType | None = sys._getframe(2)
    for _ in range(depth):  # up to the module's _call_impl (through our own and dynamo's wrappers)
        if caller is None:
            return None
        if caller.f_code.co_name == "_call_impl":
            return exc if caller is exc.__traceback__.tb_frame else None
        caller = caller.f_back
    return None


# Each hook reads the attached agent from the module global ``agent`` (batchmon.agent.handle sets it): one global
# load, not a call per hook. The four hooks are what torch calls on every training step.

def _root_pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    a = agent
    if a is not None:
        a._hooks.compiled = True  # (only ever called under torch.compile: quiet steps keep the hooks for this root)
        a._root_pre(module, args, kwargs)


def _root_post(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
    a = agent
    if a is not None:
        a._root_post(module, args, kwargs, _leaving() if sys.exc_info()[1] is not None else None, result)


def _crit_pre(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    a = agent
    if a is not None:
        a._crit_pre(module, args, kwargs)


def _crit_post(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
    a = agent
    if a is not None:
        a._crit_post(module, _leaving() if sys.exc_info()[1] is not None else None)


_root_pre_eager, _root_post_eager = eager(_root_pre), eager(_root_post)
_crit_pre_eager, _crit_post_eager = eager(_crit_pre), eager(_crit_post)


def root_pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if _is_compiling():
        return _root_pre_eager(module, args, kwargs)
    a = agent
    if a is not None:
        if a.quiet and not kwargs:  # a quiet steady step (batchmon.agent.quiet_steps): opened in one call
            try:
                if a._meter.model is module and a._open_quiet(module, args):  # (open_quiet: the root, checked)
                    return
            except Exception as exc:  # noqa: BLE001 - never into the training
                a._fail(exc)
                return
        a._root_pre(module, args, kwargs)


def root_post_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
    if _is_compiling():
        return _root_post_eager(module, args, kwargs, result)
    a = agent
    if a is not None:
        a._root_post(module, args, kwargs, _leaving() if sys.exc_info()[1] is not None else None, result)


def crit_pre_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    if _is_compiling():
        return _crit_pre_eager(module, args, kwargs)
    a = agent
    if a is not None:
        a._crit_pre(module, args, kwargs)


def crit_post_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
    if _is_compiling():
        return _crit_post_eager(module, args, kwargs, result)
    a = agent
    if a is not None:
        a._crit_post(module, _leaving() if sys.exc_info()[1] is not None else None)


def quiet_post_hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> None:
    """A quiet step's root post hook (quiet_steps): nothing unless the forward raised (then no result: an OOM?)."""
    if result is None:
        root_post_hook(module, args, kwargs, result)


AGENT_HOOKS = frozenset((root_pre_hook, root_post_hook, crit_pre_hook, crit_post_hook, quiet_post_hook))
_HOOK_DICTS = ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks",
               "_forward_hooks_with_kwargs", "_forward_hooks_always_called")


def register_pair(module: torch.nn.Module, pre: Callable[..., Any], post: Callable[..., Any]) -> list[Any]:
    return [module.register_forward_pre_hook(pre, with_kwargs=True),
            module.register_forward_hook(post, with_kwargs=True, always_call=True)]


def _without_agent_hooks(state: dict[str, Any]) -> dict[str, Any]:
    """A module's pickled state minus the agent's hooks and its quiet steps' instance ``_call_impl``
    (batchmon.agent.quiet_steps; the live module keeps them)."""
    pre, post = state.get("_forward_pre_hooks"), state.get("_forward_hooks")
    ours = [k for hooks in (pre, post) if hooks for k, fn in hooks.items() if fn in AGENT_HOOKS]
    call = getattr(state.get("_call_impl"), "batchmon_quiet_call", False)
    if not ours and not call:
        return state
    state = dict(state)
    if call:
        del state["_call_impl"]
    for name in _HOOK_DICTS:
        table = state.get(name)
        if table is not None:
            state[name] = type(table)((k, v) for k, v in table.items() if k not in ours)
    return state


def _getstate(self: torch.nn.Module) -> Any:
    return _without_agent_hooks(_originals["getstate"](self))


# ------------------------------------------------------------------------------------------------ backward


def _backward(*args: Any, **kwargs: Any) -> Any:
    """torch.autograd.backward, seen by the agent: folds the forward group, reports OOM leaving backward."""
    a = agent
    mark = 0
    if a is not None:
        if not a.quiet:
            a._before_backward()
        mark = a.oom_count
    try:
        result = _originals["backward"](*args, **kwargs)
    except torch.OutOfMemoryError as exc:
        if a is not None and a is agent and a.oom_count == mark:
            a._on_oom(exc, "backward")
        raise
    if a is not None and a is agent:
        if a.quiet:  # a quiet step (quiet_steps): _after_backward's steady case, without the call
            meter = a._meter
            if meter.step_open:
                meter.backwards += 1
        else:
            a._after_backward()
    return result


def _compile(model: Any = None, *args: Any, **kwargs: Any) -> Any:
    """torch.compile, seen by the agent: a quiet root's instance ``_call_impl`` (quiet_steps) leaves before dynamo
    meets it (later costs a compilation), ``nn.Module.compile``'s ``self._call_impl`` becomes torch's own; the root
    compiled with ``fullgraph=True`` (its hooks trace to nothing there) gives way to the compiled module."""
    a, root = agent, None
    if a is not None:
        try:
            full = kwargs.get("fullgraph") and isinstance(model, torch.nn.Module) and a._meter.model is model
            root = model if full else None
            model = a._hooks.before_compile(model)
        except Exception as exc:  # noqa: BLE001
            a._fail(exc)
    compiled = _originals["compile"](model, *args, **kwargs)
    _skip_top_level()  # (torch.compile imported dynamo) before dynamo meets a hook at the top
    if a is not None and root is not None and a is agent and isinstance(compiled, torch.nn.Module) \
            and compiled is not root:
        try:
            a._set_model(compiled)
        except Exception as exc:  # noqa: BLE001
            a._fail(exc)
    return compiled


def _scaler_update(self: Any, *args: Any, **kwargs: Any) -> Any:
    result = _originals["scaler_update"](self, *args, **kwargs)
    a = agent
    if a is not None:
        a._scaler_update()
    return result


def _step_pre(optimizer: Any, args: Any, kwargs: Any) -> None:
    global step_depth
    step_depth += 1


def _step_post(optimizer: Any, args: Any, kwargs: Any) -> None:
    """Every optimizer's step ended: out of it, and the agent's step end (one global hook for both). A quiet step's
    end (the primary optimizer's, its forward carried) joins the quiet run here (StepMeter.finish_quiet: no Step,
    no call in between); anything else goes to the agent's ``_on_step``."""
    global step_depth
    if step_depth > 0:  # (0 on a quiet step: the pre hook is off)
        step_depth -= 1
    a = agent
    if a is None:
        return
    if a.quiet:
        try:
            meter = a._meter
            ref = meter.primary_ref
            if meter.batch_carried and ref is not None and optimizer is ref() \
                    and meter.finish_quiet(a._device_used):
                return
        except Exception as exc:  # noqa: BLE001 - never into the training
            a._fail(exc)
            return
    a._on_step(optimizer, args, kwargs)


def backward_patch(on: bool) -> None:
    """``torch.autograd.backward`` the agent's wrapper or torch's own: a quiet step runs without the wrapper (its
    backward count is the last measured step's; an allocator OOM inside backward is seen by the OOM observer,
    quiet_steps). Left alone where something else replaced it since (it may call ours: unwrapping would drop it)."""
    original = _originals.get("backward")
    if original is None:
        return
    current = torch.autograd.backward
    if on and current is original:
        torch.autograd.backward = _backward  # type: ignore[assignment]
    elif not on and current is _backward:
        torch.autograd.backward = original  # type: ignore[assignment]


def frames(frame: FrameType | None) -> Iterator[FrameType]:
    """``frame`` and its callers, innermost first (the stack checks of an OOM's whereabouts walk it)."""
    while frame is not None:
        yield frame
        frame = frame.f_back


def on_backward_stack() -> bool:
    """Whether a backward pass runs on this thread now (torch's engine entry on the stack): where a quiet step's
    OOM observer call came from when the training thread itself runs it (the CPU's ready queue, a test)."""
    return any(frame.f_code in _BACKWARD_CODES for frame in frames(sys._getframe(1)))


def step_depth_hook(on: bool) -> None:
    """The global optimizer step pre hook (the step depth) registered or not: a quiet step, ended by the optimizer
    it knows, has no use for the depth (StepMeter.loop_boundary reads it only while no optimizer ended a step)."""
    hooks = _originals.get("step_hooks")
    if hooks is None:
        return
    pre, post = hooks
    if on and pre is None:
        import torch.optim.optimizer as optim

        pre = optim.register_optimizer_step_pre_hook(_step_pre)
    elif not on and pre is not None:
        pre.remove()
        pre = None
    _originals["step_hooks"] = (pre, post)


def _codes(*fns: Any) -> frozenset[Any]:
    return frozenset(fn.__code__ for fn in fns if getattr(fn, "__code__", None) is not None)


# torch's backward entries (on_backward_stack): read at import, before install() wraps torch.autograd.backward
_BACKWARD_CODES = _codes(getattr(getattr(torch.autograd, "graph", None), "_engine_run_backward", None),
                         torch.autograd.backward, torch.autograd.grad)


def install() -> None:
    """Patch torch (idempotent)."""
    _skip_top_level()  # dynamo already imported (a model compiled before attach): its hooks' first calls come later
    if "backward" not in _originals:
        _originals["backward"] = torch.autograd.backward
        functools.update_wrapper(_backward, _originals["backward"])
        torch.autograd.backward = _backward  # type: ignore[assignment]
    if "compile" not in _originals and callable(getattr(torch, "compile", None)):
        _originals["compile"] = torch.compile
        functools.update_wrapper(_compile, _originals["compile"])
        torch.compile = _compile  # type: ignore[assignment]
    if "getstate" not in _originals:
        _originals["getstate"] = torch.nn.Module.__dict__["__getstate__"]
        torch.nn.Module.__getstate__ = _getstate  # type: ignore[method-assign]
    scaler = getattr(getattr(torch, "amp", None), "GradScaler", None)
    if scaler is not None and "scaler_update" not in _originals and "update" in scaler.__dict__:
        _originals["scaler_update"] = scaler.__dict__["update"]
        functools.update_wrapper(_scaler_update, _originals["scaler_update"])
        scaler.update = _scaler_update
    if "step_hooks" not in _originals:
        import torch.optim.optimizer as optim

        _originals["step_hooks"] = (optim.register_optimizer_step_pre_hook(_step_pre),
                                    optim.register_optimizer_step_post_hook(_step_post))


def uninstall() -> None:
    """Undo install()."""
    global step_depth
    original = _originals.pop("backward", None)
    if original is not None and torch.autograd.backward is _backward:  # (or a quiet step's: torch's already)
        torch.autograd.backward = original  # type: ignore[assignment]
    original = _originals.pop("compile", None)
    if original is not None and torch.compile is _compile:
        torch.compile = original  # type: ignore[assignment]
    original = _originals.pop("getstate", None)
    if original is not None:
        torch.nn.Module.__getstate__ = original  # type: ignore[method-assign]
    original = _originals.pop("scaler_update", None)
    if original is not None:
        torch.amp.GradScaler.update = original  # type: ignore[method-assign]
    hooks = _originals.pop("step_hooks", ())
    for hook in hooks:
        if hook is not None:
            hook.remove()
    uninstall_cuda_memory()
    step_depth = 0


# ------------------------------------------------------------------------------------------------ optimizer.step


class _StepWrapper:
    """``optimizer.step`` seen by the agent: reports an OOM leaving the step, then re-raises it unchanged.

    Set as an instance attribute; it looks enough like a bound method (``__func__``, ``__self__``) for
    LRScheduler, which wraps ``optimizer.step`` through ``__func__``. Holds the optimizer weakly. Copies of
    the optimizer do not carry it (``Optimizer.__getstate__`` keeps only defaults, state and param_groups).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, inner: Any) -> None:
        self._opt = weakref.ref(optimizer)
        self._inner = inner  # an instance-level step set before us (an LRScheduler's wrapper), or None
        wrapper = self

        def step(opt: Any, *args: Any, **kwargs: Any) -> Any:
            return wrapper(*args, **kwargs)

        self.__func__ = functools.wraps(type(optimizer).step)(step)
        self.__wrapped__ = type(optimizer).step

    @property
    def __self__(self) -> torch.optim.Optimizer | None:
        return self._opt()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        opt = self._opt()
        if opt is None:
            raise ReferenceError("optimizer no longer exists")
        inner = self._inner
        global step_depth
        a = agent
        mark = a.oom_count if a is not None else 0
        depth = step_depth
        try:
            if inner is not None:
                return inner(*args, **kwargs)
            return type(opt).step(opt, *args, **kwargs)  # (no bound method made per step)
        except BaseException as exc:
            step_depth = depth  # the step's post hook will not run: it is no longer "inside a step"
            # reported once: an OOM in a closure's forward or backward was reported where it happened
            if isinstance(exc, torch.OutOfMemoryError) and a is not None and a is agent and a.oom_count == mark:
                a._on_oom(exc, "optimizer step")
            raise


def wrap_step(optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer.__dict__.get("step"), _StepWrapper):
        return
    optimizer.step = _StepWrapper(optimizer, optimizer.__dict__.get("step"))  # type: ignore[method-assign]


def unwrap_step(optimizer: torch.optim.Optimizer) -> None:
    wrapper = optimizer.__dict__.get("step")
    if isinstance(wrapper, _StepWrapper):
        if wrapper._inner is None:
            del optimizer.__dict__["step"]
        else:
            optimizer.step = wrapper._inner  # type: ignore[method-assign]


# ------------------------------------------------------------------------------------------------ CUDA OOM size


def _oom_observer(device: int, alloc: int, device_allocated: int, device_free: int) -> None:
    global oom_requested
    try:
        oom_requested = requested = int(alloc)
        a = agent
        if a is not None and a.quiet:
            a._arm_on_error(requested)  # the hooks a quiet step dropped, in time to see the error leave (quiet_steps)
    except Exception:  # noqa: BLE001
        pass


def install_oom_observer() -> None:
    """CUDA's allocator tells its observers how many bytes the failed allocation asked for."""
    global _oom_observer_installed
    if _oom_observer_installed:
        return
    attach_observer = getattr(torch._C, "_cuda_attach_out_of_memory_observer", None)
    if attach_observer is not None:
        try:
            attach_observer(_oom_observer)
        except Exception:  # noqa: BLE001 - then the size comes from the error text
            return
    _oom_observer_installed = True


def take_oom_requested() -> int | None:
    global oom_requested
    value, oom_requested = oom_requested, None
    return value


def requested_from_text(text: str) -> int | None:
    """Fallback when the allocator's observer is unavailable: the size in CUDA's message (rounded there)."""
    match = _TRIED.search(text)
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2)])
