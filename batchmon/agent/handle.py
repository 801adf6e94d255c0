"""The in-process agent: measures what each byte of training memory is, step by step, and serves it on a socket.

``attach(model, optimizer)`` hooks the model's forward (the root module only: one slow-path module, not all of
them), the optimizers' steps (global step post hook; ``optimizer.step`` is also wrapped, to see an OOM leave
it) and ``torch.autograd.backward``. With model or optimizer omitted the agent finds them: the root is the
outermost module with trainable parameters whose forward runs with grad enabled when no other forward is
running (global forward hooks, removed once it is found); optimizers are whatever steps. A step ends at the
first optimizer's step (others count for optimizer bytes only); it is then measured (batchmon.agent.accounting) and
published: kept in ``handle.steps`` and handed to the transport thread (batchmon.agent.transport).

What a step reports:

- ``batch_size``: leading dimension of the first tensor argument of the root forward (or ``batch_size_fn``);
  with gradient accumulation, that of the last micro-batch (what is in memory at once).
- ``batch``: storages of the tensors passed to the root forward (positional and keyword, inside tuples, lists
  and dicts), plus targets where seen: tensors that do not require grad passed to a criterion module called
  after the model's forward (a torch loss module, or a parameter-free module named ...Loss/...Criterion; it is
  looked for during the first 3 steps, then hooked). A functional loss (``F.cross_entropy`` called outside
  the model) is not seen: its targets are not batch, its saved tensors not activations (on CUDA they end up
  in ``other``). Forwards since the last backward form a group; the step reports its largest group.
- ``activations``: bytes saved for backward inside the root forward and the criterion's forward
  (accounting.ActivationCounter), same grouping.
- ``other``: on CUDA the allocator peak since the previous step minus the five above (>= 0); on CPU 0, as
  there is no allocator peak to take it from.
- on CUDA: ``allocated``, ``peak_allocated`` (the peak is reset after every step - note that this resets
  what ``torch.cuda.max_memory_allocated()`` reports to the training script too), ``reserved``,
  ``num_alloc_retries``, ``num_ooms``, and ``device_used``: NVML's per-process figure, read by the agent
  thread once a second (null where NVML does not see this pid, e.g. in some containers).
- ``step_seconds``: wall time between optimizer steps as the host sees it (no device sync is added).

Cost control (the overhead target is 1% of step time): activations are counted on *sampled* steps only -
the first 3 steps, every ``activation_every``-th step (default DEFAULT_ACTIVATION_EVERY = 10; env
BATCHMON_ACTIVATION_EVERY under ``batchmon run``) and any step whose batch size differs from the last sampled
one. Parameter, gradient and optimizer bytes are recomputed on the same steps (or when optimizer state
appears); other steps carry the last measured values forward.

Events: ``oom`` when a torch.OutOfMemoryError (by type) leaves the root forward, the criterion, backward or
the optimizer step, with the components so far, the batch size and the requested bytes (from CUDA's OOM
observer; else read from the error text); ``alloc_retry`` when num_alloc_retries grew during a step;
``warning`` for an internal error. Everything the agent runs on the training thread is wrapped: an internal
error turns into one ``warning`` event, one stderr line ``batchmon: ...`` and a disabled agent; training goes
on. Exceptions of the training itself pass through unchanged (same object, re-raised).
"""

from __future__ import annotations

import atexit
import functools
import inspect
import os
import platform
import re
import socket
import sys
import threading
import time
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.modules.module as _module_hooks
import torch.optim.optimizer as _optimizer_hooks

from batchmon import protocol
from batchmon.agent import accounting
from batchmon.agent.process_memory import ProcessMemory
from batchmon.agent.transport import HISTORY_EVENTS, HISTORY_STEPS, Transport
from batchmon.protocol import Bye, Event, Hello, ModelInfo, Step

DEFAULT_ACTIVATION_EVERY = 10
FULL_STEPS = 3  # the first steps are always fully measured
LOSS_SEARCH_STEPS = 3  # how many steps the agent looks for a criterion module after the model's forward
NVML_SECONDS = 1.0
EXIT_LINGER_SECONDS = 1.5  # at exit after an OOM, wait this long for a first monitor to collect the history

_lock = threading.RLock()
_current: "AgentHandle | None" = None
_original_backward: Callable[..., Any] | None = None
_oom_observer_installed = False
_oom_requested: int | None = None  # bytes of the last failed allocation (CUDA's OOM observer)

_TRIED = re.compile(r"Tried to allocate (\d+(?:\.\d+)?) ?(B|bytes|KiB|MiB|GiB|TiB)\b")
_UNITS = {"B": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}


# ------------------------------------------------------------------------------------------------ public API


def attach(model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
           name: str | None = None, batch_size_fn: Callable[..., int] | None = None,
           activation_every: int | None = None, socket_dir: str | os.PathLike[str] | None = None) -> "AgentHandle":
    """Attach the agent to this process; idempotent.

    A second call returns the same handle, adopting a model or optimizer it did not know yet (and a new
    ``name``, ``batch_size_fn`` or ``activation_every`` when given). ``batch_size_fn`` is called with the
    model's forward arguments (``batch_size_fn(*args, **kwargs)``) and returns the batch size; by default it
    is the leading dimension of the first tensor input. ``activation_every``: count activations every N-th
    step (default 10, see the module docstring); 1 counts every step. ``socket_dir`` overrides the socket
    folder (default: protocol.socket_dir()).
    """
    return _attach(model, optimizer, name=name, batch_size_fn=batch_size_fn, activation_every=activation_every,
                   socket_dir=socket_dir, auto=False)


def detach() -> None:
    """Detach the agent of this process, if attached (sends bye, removes the socket)."""
    handle = _current
    if handle is not None:
        handle.detach()


def current() -> "AgentHandle | None":
    """The attached agent's handle, or None."""
    return _current


def _auto_attach() -> "AgentHandle | None":
    """Called by ``batchmon run``'s bootstrap right after torch is imported (BATCHMON_AUTO=1).

    Installs only the discovery hooks; the socket opens when a model's first forward is seen, so processes
    that import torch but never train (tools, data workers) do not show up as agents.
    """
    every = _env_int("BATCHMON_ACTIVATION_EVERY")
    return _attach(None, None, name=os.environ.get("BATCHMON_NAME") or None, batch_size_fn=None,
                   activation_every=every, socket_dir=None, auto=True)


def _attach(model: Any, optimizer: Any, *, name: str | None, batch_size_fn: Any, activation_every: int | None,
            socket_dir: Any, auto: bool) -> "AgentHandle":
    global _current
    if model is not None and not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach(model=...) expects a torch.nn.Module, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach(optimizer=...) expects a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if batch_size_fn is not None and not callable(batch_size_fn):
        raise TypeError("attach(batch_size_fn=...) expects a callable")
    if activation_every is not None and (isinstance(activation_every, bool) or not isinstance(activation_every, int)
                                         or activation_every < 1):
        raise ValueError(f"attach(activation_every=...) expects an integer >= 1, got {activation_every!r}")
    with _lock:
        handle = _current
        if handle is None:
            handle = AgentHandle(name=name, batch_size_fn=batch_size_fn,
                                 activation_every=activation_every or DEFAULT_ACTIVATION_EVERY,
                                 socket_dir=Path(socket_dir) if socket_dir is not None else None, auto=auto)
            _current = handle
            handle._start(model, optimizer)
        else:
            handle._update(model, optimizer, name=name, batch_size_fn=batch_size_fn,
                           activation_every=activation_every)
        return handle


# ------------------------------------------------------------------------------------------------ the handle


class AgentHandle:
    """The attached agent. Use ``.steps`` / ``.last_step`` for what it measured, ``.detach()`` to stop.

    Also a context manager: ``with batchmon.attach(model, opt): train()`` detaches at the end.
    """

    def __init__(self, *, name: str | None, batch_size_fn: Callable[..., int] | None, activation_every: int,
                 socket_dir: Path | None, auto: bool) -> None:
        self.name = name
        self.batch_size_fn = batch_size_fn
        self.activation_every = activation_every
        self.auto = auto
        self.pid = os.getpid()
        self.attached = False
        self.error: str | None = None  # why the agent disabled itself, if it did
        self.socket_error: str | None = None  # why there is no socket (training continues unmonitored)
        self._socket_dir = socket_dir
        self._transport: Transport | None = None
        self._nvml: ProcessMemory | None = None
        self._device_used: int | None = None
        self._disabled = False
        self._warned: set[str] = set()
        self._steps: deque[Step] = deque(maxlen=HISTORY_STEPS)
        self._events: deque[Event] = deque(maxlen=HISTORY_EVENTS)
        # what is measured
        self._model_ref: weakref.ReferenceType[torch.nn.Module] | None = None
        self._primary_ref: weakref.ReferenceType[torch.optim.Optimizer] | None = None
        self._optimizer_refs: list[weakref.ReferenceType[torch.optim.Optimizer]] = []
        self._criterion_ref: weakref.ReferenceType[torch.nn.Module] | None = None
        self._device: torch.device | None = None
        self._model_info: ModelInfo | None = None
        # hooks
        self._root_hooks: list[Any] = []
        self._discovery_hooks: list[Any] = []
        self._criterion_hooks: list[Any] = []
        self._window_hooks: list[Any] = []
        self._step_hook: Any = None
        self._tls = threading.local()
        self._window_depth = 0
        self._loss_search_left = LOSS_SEARCH_STEPS
        # per-step state (training thread)
        self._step = 0
        self._step_open = False
        self._sampled = False
        self._first_forward_t: float | None = None
        self._last_step_end: float | None = None
        self._root_depth = 0
        self._root_counting = False
        self._crit_depth = 0
        self._batch_size: int | None = None
        self._sampled_batch_size: int | None = None
        self._param_keys: set[int] = set()
        self._batch: accounting.StorageSet | None = None
        self._counter: accounting.ActivationCounter | None = None
        self._batch_max = 0
        self._acts_max = 0
        self._last_acts = 0
        self._static: tuple[int, int, int] | None = None
        self._static_state_len = -1
        self._retries: int | None = None
        self.oom_count = 0  # OOM events so far; the wrappers use it to report a nested OOM only once

    # -------------------------------------------------------------------------------------------- public

    @property
    def steps(self) -> list[Step]:
        """Recent step messages, oldest first (at most the last 2000)."""
        return _snapshot(self._steps)

    @property
    def last_step(self) -> Step | None:
        try:
            return self._steps[-1]
        except IndexError:
            return None

    @property
    def events(self) -> list[Event]:
        """Recent events (oom, alloc_retry, warning), oldest first."""
        return _snapshot(self._events)

    @property
    def model(self) -> torch.nn.Module | None:
        return self._model_ref() if self._model_ref is not None else None

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [opt for opt in (ref() for ref in self._optimizer_refs) if opt is not None]

    @property
    def socket_path(self) -> Path | None:
        """The socket monitors connect to, None while there is none (not yet opened, or unusable)."""
        return self._transport.path if self._transport is not None else None

    @property
    def enabled(self) -> bool:
        return self.attached and not self._disabled

    @property
    def stats(self) -> dict[str, int]:
        t = self._transport
        return {"monitors": t.monitors if t else 0, "connections": t.connections if t else 0,
                "queue_dropped": t.queue_dropped if t else 0, "monitor_dropped": t.client_dropped if t else 0}

    def suggest_batch_size(self, margin: int | None = None) -> int | None:
        """The largest batch that fits this device, predicted from the measured steps (None when unknown).

        ``margin``: bytes to keep free on top of the model's own margin (passed on when the memory model
        takes one, else taken off the device size).
        """
        try:
            from batchmon import memory_model

            predict = getattr(memory_model, "predict_from_steps", None)
            steps = self.steps
            if predict is None or not steps:
                return None
            total = self._device_total()
            if total is None:
                return None
            kwargs: dict[str, Any] = {}
            if margin is not None:
                if "margin" in inspect.signature(predict).parameters:
                    kwargs["margin"] = int(margin)
                else:
                    total = max(0, total - int(margin))
            primary = self._primary()
            prediction = predict(steps, total, what_if=memory_model.WhatIf(),
                                 optimizer=type(primary).__name__ if primary is not None else None, **kwargs)
            return None if prediction is None else prediction.max_batch
        except Exception as exc:  # noqa: BLE001 - a helper for the training script: never raise into it
            self._warn_once("suggest", f"suggest_batch_size failed: {type(exc).__name__}: {exc}")
            return None

    def detach(self, reason: str = "detached") -> None:
        """Stop measuring, say bye to monitors, remove the socket. Idempotent."""
        global _current
        with _lock:
            if _current is self:
                _current = None
        if not self.attached:
            return
        self.attached = False
        self._disabled = True
        self._teardown_hooks()
        self._unwrap_optimizers()
        _uninstall_backward_patch()
        transport, self._transport = self._transport, None
        if transport is not None and self.pid == os.getpid():
            # a run that dies of an OOM right after starting would vanish before a monitor's next scan
            linger = EXIT_LINGER_SECONDS if reason == "exit" and self.oom_count else 0.0
            transport.close(Bye(reason=reason, time=time.time()), linger=linger)

    def __enter__(self) -> "AgentHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        model = self.model
        return (f"<batchmon agent pid={self.pid} model={type(model).__name__ if model is not None else None} "
                f"steps={self._step} socket={self.socket_path} enabled={self.enabled}>")

    # -------------------------------------------------------------------------------------------- start/update

    def _start(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
        self.attached = True
        try:
            _install_backward_patch()
            self._step_hook = _optimizer_hooks.register_optimizer_step_post_hook(self._on_step)
            if optimizer is not None:
                self._track_optimizer(optimizer, primary=True)
            if model is not None:
                self._set_model(model)
            else:
                self._start_discovery()
            if not self.auto:
                self._ensure_transport()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _update(self, model: Any, optimizer: Any, *, name: str | None, batch_size_fn: Any,
                activation_every: int | None) -> None:
        if self._disabled:
            return
        try:
            changed = self.auto
            if name is not None and name != self.name:
                self.name, changed = name, True
            if batch_size_fn is not None:
                self.batch_size_fn = batch_size_fn
            if activation_every is not None:
                self.activation_every = activation_every
            if optimizer is not None and optimizer is not self._primary():
                self._track_optimizer(optimizer, primary=True)  # publishes a new hello itself
            if model is not None and model is not self.model:
                self._set_model(model)  # likewise
            self.auto = False
            self._ensure_transport()
            if changed:
                self._publish_hello()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _set_model(self, model: torch.nn.Module) -> None:
        for handle in self._root_hooks:
            handle.remove()
        self._stop_discovery()
        self._model_ref = weakref.ref(model)
        self._root_hooks = [
            model.register_forward_pre_hook(self._root_pre, with_kwargs=True),
            model.register_forward_hook(self._root_post, with_kwargs=True, always_call=True),
        ]
        self._use_device(_device_of(model) or self._device or torch.device("cpu"))
        self._ensure_transport()
        self._publish_hello()

    def _use_device(self, device: torch.device) -> None:
        """Measure on this device (the model's); called again when the model moved (checked on sampled steps)."""
        self._device = device
        model = self.model
        if model is not None:
            params, nbytes = accounting.parameter_count(model)
            self._model_info = ModelInfo(type(model).__name__, params, nbytes)
        self._static = None
        self._nvml = None
        self._device_used = None
        if device.type == "cuda":
            index = _cuda_index(device)
            torch.cuda.reset_peak_memory_stats(index)
            _install_oom_observer()
            uuid = _nvml_uuid(index)
            if uuid is not None:
                self._nvml = ProcessMemory(uuid, self.pid)

    def _track_optimizer(self, optimizer: torch.optim.Optimizer, primary: bool = False) -> None:
        if not any(ref() is optimizer for ref in self._optimizer_refs):
            self._optimizer_refs.append(weakref.ref(optimizer))
            _wrap_step(optimizer)
        if primary or self._primary() is None:
            self._primary_ref = weakref.ref(optimizer)
            self._static = None
            if self._device is None:
                self._device = _device_of_optimizer(optimizer)
            self._publish_hello()

    def _primary(self) -> torch.optim.Optimizer | None:
        return self._primary_ref() if self._primary_ref is not None else None

    # -------------------------------------------------------------------------------------------- discovery

    def _start_discovery(self) -> None:
        if not self._discovery_hooks:
            mod = _module_hooks
            self._discovery_hooks = [
                mod.register_module_forward_pre_hook(self._discover_pre),
                mod.register_module_forward_hook(self._discover_post, always_call=True),
            ]

    def _stop_discovery(self) -> None:
        hooks, self._discovery_hooks = self._discovery_hooks, []
        for handle in hooks:
            handle.remove()

    def _discover_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._disabled:
            return
        try:
            depth = getattr(self._tls, "depth", 0)
            self._tls.depth = depth + 1
            if depth == 0 and self._model_ref is None and torch.is_grad_enabled() and _has_trainable(module):
                self._set_model(module)
                # this call's instance pre-hooks were fixed before we registered ours: run it by hand
                self._root_pre(module, args, {})
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _discover_post(self, module: torch.nn.Module, args: tuple[Any, ...], result: Any) -> None:
        self._tls.depth = max(0, getattr(self._tls, "depth", 1) - 1)

    # -------------------------------------------------------------------------------------------- forward

    def _root_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._disabled:
            return
        try:
            self._root_depth += 1
            if self._root_depth > 1 or not torch.is_grad_enabled():
                return  # a nested call of the root, or an eval/no-grad forward: not part of a training step
            self._root_counting = True
            if self._window_hooks:
                self._close_loss_window()
            inputs = list(accounting.iter_tensors((args, kwargs) if kwargs else args, depth=4))
            size = self._batch_size_of(args, kwargs, inputs)
            self._batch_size = size
            if not self._step_open:
                self._open_step(size)
            if self._batch is None:
                self._batch = accounting.StorageSet(self._device_or_cpu())
            self._batch.add_all(inputs)
            if self._sampled:
                self._counter_for_group().push()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _root_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   result: Any) -> None:
        exc = _exception_leaving(sys._getframe(1))
        try:
            self._root_depth = max(0, self._root_depth - 1)
            if self._root_depth > 0:
                return
            counting, self._root_counting = self._root_counting, False
            if self._counter is not None and self._counter.active:
                self._counter.pop()
            if self._disabled:
                self._teardown_hooks()
                return
            if exc is not None and _is_oom(exc):
                self._on_oom(exc, "forward")
            elif exc is None and counting:
                self._open_loss_window()
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def _open_step(self, batch_size: int | None) -> None:
        self._step_open = True
        if self._first_forward_t is None:
            self._first_forward_t = time.perf_counter()
        n = self._step + 1
        every = self.activation_every
        self._sampled = (every <= 1 or n <= FULL_STEPS or n % every == 0
                         or batch_size != self._sampled_batch_size)
        if self._sampled:
            self._sampled_batch_size = batch_size
            model = self.model
            moved = _device_of(model) if model is not None else None
            if moved is not None and moved != self._device:
                self._use_device(moved)
                self._publish_hello()
            found = accounting.parameter_storages(
                model, self._device_or_cpu(), accounting.parameters_of(None, self.optimizers))
            self._param_keys = found.keys

    def _counter_for_group(self) -> accounting.ActivationCounter:
        if self._counter is None:
            assert self._batch is not None
            self._counter = accounting.ActivationCounter(self._device_or_cpu(), (self._param_keys, self._batch.keys))
        return self._counter

    def _batch_size_of(self, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[torch.Tensor]) -> int | None:
        fn = self.batch_size_fn
        if fn is None:
            return next((int(t.shape[0]) for t in inputs if t.dim() >= 1), None)
        try:
            value = fn(*args, **kwargs)
            return int(value) if value is not None else None
        except Exception as exc:  # noqa: BLE001 - the user's function failed: fall back, say so once
            self._warn_once("batch_size_fn", f"batch_size_fn failed ({type(exc).__name__}: {exc}); "
                                             "using the leading dimension of the first tensor input")
            return accounting.first_batch_size(args, kwargs)

    def _fold_group(self) -> None:
        """A forward group (forwards since the last backward) ended: keep the step's maximum."""
        counter = self._counter
        if counter is not None and not counter.active:
            self._acts_max = max(self._acts_max, counter.bytes)
            self._counter = None
        if self._batch is not None:
            self._batch_max = max(self._batch_max, self._batch.bytes)
            self._batch = None

    # -------------------------------------------------------------------------------------------- criterion

    def _open_loss_window(self) -> None:
        """After the model's forward, briefly watch for a loss module called on its output (targets, loss
        activations). Closed by backward, the step or the next forward."""
        if self._criterion_ref is not None or self._loss_search_left <= 0 or self._window_hooks:
            return
        mod = _module_hooks
        self._window_depth = 0
        self._window_hooks = [mod.register_module_forward_pre_hook(self._window_pre),
                              mod.register_module_forward_hook(self._window_post, always_call=True)]

    def _close_loss_window(self) -> None:
        hooks, self._window_hooks = self._window_hooks, []
        for handle in hooks:
            handle.remove()

    def _window_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._disabled:
            return
        try:
            depth = self._window_depth
            self._window_depth += 1
            if depth == 0 and _looks_like_loss(module) and torch.is_grad_enabled():
                self._close_loss_window()
                self._criterion_ref = weakref.ref(module)
                self._criterion_hooks = [
                    module.register_forward_pre_hook(self._crit_pre, with_kwargs=True),
                    module.register_forward_hook(self._crit_post, with_kwargs=True, always_call=True),
                ]
                self._crit_pre(module, args, {})
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _window_post(self, module: torch.nn.Module, args: tuple[Any, ...], result: Any) -> None:
        self._window_depth = max(0, self._window_depth - 1)

    def _crit_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._disabled:
            return
        try:
            self._crit_depth += 1
            if self._crit_depth > 1 or self._root_depth > 0 or not self._step_open or not torch.is_grad_enabled():
                return
            if self._batch is None:
                self._batch = accounting.StorageSet(self._device_or_cpu())
            for t in accounting.iter_tensors((args, kwargs), depth=4):
                if not t.requires_grad:  # targets; the model's output requires grad
                    self._batch.add(t)
            if self._sampled:
                self._counter_for_group().push()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _crit_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   result: Any) -> None:
        exc = _exception_leaving(sys._getframe(1))
        try:
            self._crit_depth = max(0, self._crit_depth - 1)
            if self._crit_depth > 0 or self._root_depth > 0:
                return
            if self._counter is not None and self._counter.active:
                self._counter.pop()
            if self._disabled:
                self._teardown_hooks()
                return
            if exc is not None and _is_oom(exc):
                self._on_oom(exc, "loss")
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    # -------------------------------------------------------------------------------------------- backward/step

    def _before_backward(self) -> None:
        if self._disabled:
            return
        try:
            self._close_loss_window()
            self._fold_group()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._disabled:
            return
        try:
            if self.pid != os.getpid():
                return
            primary = self._primary()
            if primary is None or not any(ref() is optimizer for ref in self._optimizer_refs):
                self._track_optimizer(optimizer)
                primary = self._primary()
            if optimizer is primary:
                self._finish_step()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _finish_step(self) -> None:
        now = time.perf_counter()
        start = self._last_step_end if self._last_step_end is not None else self._first_forward_t
        self._last_step_end = now
        self._step += 1
        self._close_loss_window()
        if self._loss_search_left > 0 and self._criterion_ref is None:
            self._loss_search_left -= 1
        self._fold_group()
        self._ensure_transport()
        sampled = self._sampled or not self._step_open
        if sampled:
            self._last_acts = self._acts_max if self._step_open else self._last_acts
        parameters, gradients, optimizer = self._static_components(force=sampled)
        comps = accounting.components(parameters, gradients, optimizer, self._last_acts, self._batch_max)
        cuda = self._cuda_figures(reset=True)
        allocated = peak = reserved = retries = ooms = None
        if cuda is not None:
            allocated, peak, reserved, retries, ooms = cuda
            comps["other"] = max(0, peak - sum(comps.values()))
        step = Step(step=self._step, time=time.time(), step_seconds=(now - start) if start is not None else None,
                    batch_size=self._batch_size if self._step_open else None, components=comps,
                    allocated=allocated, peak_allocated=peak, reserved=reserved, num_alloc_retries=retries,
                    num_ooms=ooms, device_used=self._device_used if cuda is not None else None)
        self._steps.append(step)
        if self._transport is not None:
            self._transport.put(step)
        if retries is not None:
            if self._retries is not None and retries > self._retries:
                self._publish_event(Event(
                    kind="alloc_retry", components=comps, time=step.time, step=step.step,
                    batch_size=step.batch_size,
                    message=f"the CUDA caching allocator freed its cache and retried {retries - self._retries} "
                            f"allocation(s) during step {step.step}: memory is nearly full or fragmented"))
            self._retries = retries
        self._step_open = False
        self._sampled = False
        self._acts_max = 0
        self._batch_max = 0
        global _oom_requested
        _oom_requested = None  # an allocation failure someone caught and survived is not the next OOM's size

    def _static_components(self, force: bool) -> tuple[int, int, int]:
        optimizers = self.optimizers
        state_len = sum(len(opt.state) for opt in optimizers)
        if force or self._static is None or state_len != self._static_state_len:
            device = self._device_or_cpu()
            model = self.model
            params = accounting.parameters_of(model, optimizers)
            pset = accounting.parameter_storages(model, device, accounting.parameters_of(None, optimizers))
            gset = accounting.gradient_storages(params, device, pset.keys)
            oset = accounting.optimizer_storages(optimizers, device, pset.keys | gset.keys)
            self._static = (pset.bytes, gset.bytes, oset.bytes)
            self._static_state_len = state_len
        return self._static

    def _cuda_figures(self, reset: bool) -> tuple[int, int, int, int, int] | None:
        device = self._device
        if device is None or device.type != "cuda":
            return None
        index = _cuda_index(device)
        stats = torch.cuda.memory_stats_as_nested_dict(index)
        if not stats:  # CUDA not initialised (yet): nothing to report
            return None
        figures = (int(stats["allocated_bytes"]["all"]["current"]), int(stats["allocated_bytes"]["all"]["peak"]),
                   int(stats["reserved_bytes"]["all"]["current"]), int(stats.get("num_alloc_retries", 0)),
                   int(stats.get("num_ooms", 0)))
        if reset:
            torch.cuda.reset_peak_memory_stats(index)
        return figures

    # -------------------------------------------------------------------------------------------- OOM

    def _on_oom(self, exc: BaseException, where: str) -> None:
        """An out-of-memory error is leaving forward, loss, backward or the optimizer step."""
        global _oom_requested
        if self._disabled:
            return
        self.oom_count += 1
        try:
            requested, _oom_requested = _oom_requested, None
            if requested is None:
                requested = _requested_from_text(str(exc))
            self._close_loss_window()
            comps = self._current_components()
            text = " ".join(str(exc).split())
            first = text.split(". ", 1)[0][:300]
            self._publish_event(Event(kind="oom", message=f"out of memory in {where} at step {self._step + 1}: {first}",
                                      components=comps, time=time.time(), step=self._step + 1,
                                      batch_size=self._batch_size, requested_bytes=requested))
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    def _current_components(self) -> dict[str, int]:
        parameters, gradients, optimizer = self._static_components(force=True)
        acts = self._last_acts
        if self._sampled:
            acts = max(self._acts_max, self._counter.bytes if self._counter is not None else 0)
        batch = max(self._batch_max, self._batch.bytes if self._batch is not None else 0)
        comps = accounting.components(parameters, gradients, optimizer, acts, batch)
        cuda = self._cuda_figures(reset=False)
        if cuda is not None:
            comps["other"] = max(0, cuda[1] - sum(comps.values()))
        return comps

    # -------------------------------------------------------------------------------------------- publishing

    def _ensure_transport(self) -> None:
        if self._transport is not None or self.socket_error is not None or self._disabled:
            return
        try:
            directory = protocol.ensure_socket_dir(self._socket_dir)
            transport = Transport(protocol.socket_path(self.pid, directory), on_error=self._transport_failed,
                                  tick=self._tick, tick_seconds=NVML_SECONDS)
            transport.start()
        except (protocol.SocketDirError, OSError) as exc:
            self.socket_error = str(exc) or type(exc).__name__
            self._warn_once("socket", f"not monitoring this process: {self.socket_error}")
            self._events.append(Event(kind="warning", message=f"no agent socket: {self.socket_error}",
                                      time=time.time()))
            return
        self._transport = transport
        for event in self.events:
            transport.put(event)
        self._publish_hello()

    def _publish_hello(self) -> None:
        if self._transport is not None:
            self._transport.set_hello(self._hello())

    def _hello(self) -> Hello:
        rank, local_rank, world_size = _ranks()
        device = self._device
        primary = self._primary()
        uuid = _nvml_uuid(_cuda_index(device)) if device is not None and device.type == "cuda" else None
        return Hello(pid=self.pid, host=socket.gethostname(), argv=tuple(str(a) for a in sys.argv),
                     python=platform.python_version(), torch=torch.__version__,
                     device=str(device) if device is not None else "cpu", nvml_uuid=uuid, rank=rank,
                     local_rank=local_rank, world_size=world_size, model=self._model_info,
                     optimizer=type(primary).__name__ if primary is not None else None, name=self.name,
                     time=time.time(), job=_job_id(world_size))

    def _publish_event(self, event: Event) -> None:
        self._events.append(event)
        if self._transport is not None:
            self._transport.put(event)

    def _tick(self) -> None:
        """On the agent thread, once a second: NVML's figure for this process."""
        reader = self._nvml
        if reader is not None:
            self._device_used = reader.read()

    # -------------------------------------------------------------------------------------------- failure

    def _fail(self, exc: BaseException, teardown: bool = True) -> None:
        """An internal error: one warning event, one stderr line, and the agent stops measuring."""
        if self._disabled:
            return
        self._disabled = True
        self.error = f"{type(exc).__name__}: {exc}"
        try:
            self._publish_event(Event(kind="warning", message=f"agent disabled after an internal error: {self.error}",
                                      time=time.time(), step=self._step))
        except Exception:  # noqa: BLE001
            pass
        self._warn_once("fail", f"agent disabled after an internal error ({self.error}); training continues")
        if teardown:
            try:
                self._teardown_hooks()
            except Exception:  # noqa: BLE001
                pass

    def _transport_failed(self, exc: BaseException) -> None:
        """On the agent thread: same as _fail, but the training thread's hooks are left to go inert."""
        self._fail(exc, teardown=False)

    def _warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        try:
            sys.stderr.write(f"batchmon: {message}\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass

    def _teardown_hooks(self) -> None:
        """Remove every hook; the forward post hooks stay while a saved-tensor context they must close is open."""
        busy = self._counter is not None and self._counter.active
        groups = [self._discovery_hooks, self._window_hooks]
        if not busy:
            groups += [self._root_hooks, self._criterion_hooks]
        for group in groups:
            for handle in group:
                handle.remove()
            group.clear()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    def _unwrap_optimizers(self) -> None:
        for opt in self.optimizers:
            _unwrap_step(opt)

    def _after_fork(self) -> None:
        """In a forked child: this agent belongs to the parent. Go quiet, keep the parent's socket file."""
        self._disabled = True
        self.attached = False
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.forget()

    # -------------------------------------------------------------------------------------------- helpers

    def _device_or_cpu(self) -> torch.device:
        return self._device if self._device is not None else torch.device("cpu")

    def _device_total(self) -> int | None:
        device = self._device
        if device is None or device.type != "cuda":
            return None
        return int(torch.cuda.get_device_properties(_cuda_index(device)).total_memory)


# ------------------------------------------------------------------------------------------------ hooks on torch


def _patched_backward(*args: Any, **kwargs: Any) -> Any:
    """torch.autograd.backward, seen by the agent: folds the forward group, reports OOM leaving backward."""
    handle = _current
    mark = 0
    if handle is not None:
        handle._before_backward()
        mark = handle.oom_count
    assert _original_backward is not None
    try:
        return _original_backward(*args, **kwargs)
    except torch.OutOfMemoryError as exc:
        if handle is not None and handle is _current and handle.oom_count == mark:
            handle._on_oom(exc, "backward")
        raise


def _install_backward_patch() -> None:
    global _original_backward
    if torch.autograd.backward is _patched_backward:
        return
    _original_backward = torch.autograd.backward
    functools.update_wrapper(_patched_backward, _original_backward)
    torch.autograd.backward = _patched_backward  # type: ignore[assignment]


def _uninstall_backward_patch() -> None:
    if torch.autograd.backward is _patched_backward and _original_backward is not None:
        torch.autograd.backward = _original_backward  # type: ignore[assignment]


class _StepWrapper:
    """``optimizer.step`` seen by the agent: reports an OOM leaving the step, then re-raises it unchanged.

    Set as an instance attribute; it looks enough like a bound method (``__func__``, ``__self__``) for
    LRScheduler, which wraps ``optimizer.step`` through ``__func__``. Holds the optimizer weakly.
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
        fn = self._inner if self._inner is not None else type(opt).step.__get__(opt, type(opt))
        handle = _current
        mark = handle.oom_count if handle is not None else 0
        try:
            return fn(*args, **kwargs)
        except torch.OutOfMemoryError as exc:
            # reported once: an OOM in a closure's forward or backward was reported where it happened
            if handle is not None and handle is _current and handle.oom_count == mark:
                handle._on_oom(exc, "optimizer step")
            raise


def _wrap_step(optimizer: torch.optim.Optimizer) -> None:
    if isinstance(optimizer.__dict__.get("step"), _StepWrapper):
        return
    optimizer.step = _StepWrapper(optimizer, optimizer.__dict__.get("step"))  # type: ignore[method-assign]


def _unwrap_step(optimizer: torch.optim.Optimizer) -> None:
    current = optimizer.__dict__.get("step")
    if isinstance(current, _StepWrapper):
        if current._inner is None:
            del optimizer.__dict__["step"]
        else:
            optimizer.step = current._inner  # type: ignore[method-assign]


def _oom_observer(device: int, alloc: int, device_allocated: int, device_free: int) -> None:
    global _oom_requested
    try:
        _oom_requested = int(alloc)
    except Exception:  # noqa: BLE001
        pass


def _install_oom_observer() -> None:
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


# ------------------------------------------------------------------------------------------------ small helpers


def _exception_leaving(caller: Any) -> BaseException | None:
    """The exception a forward hook is being called for: torch runs ``always_call`` hooks from the except
    block of the module's ``_call_impl``, so that frame heads the exception's traceback. (An exception
    merely being handled further out, around a normal forward, does not count.)"""
    exc = sys.exc_info()[1]
    if exc is None:
        return None
    tb = exc.__traceback__
    return exc if tb is not None and tb.tb_frame is caller else None


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def _requested_from_text(text: str) -> int | None:
    """Fallback when the allocator's observer is unavailable: the size in CUDA's message (rounded there)."""
    match = _TRIED.search(text)
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[match.group(2)])


def _has_trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def _looks_like_loss(module: torch.nn.Module) -> bool:
    """A criterion: a torch loss module, or a parameter-free module named like one (…Loss, …Criterion)."""
    if isinstance(module, torch.nn.modules.loss._Loss):
        return True
    name = type(module).__name__.lower()
    return ("loss" in name or "criterion" in name) and not _has_trainable(module)


def _device_of(model: torch.nn.Module) -> torch.device | None:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return None


def _device_of_optimizer(optimizer: torch.optim.Optimizer) -> torch.device | None:
    for group in optimizer.param_groups:
        for p in group["params"]:
            return p.device
    return None


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def _nvml_uuid(index: int) -> str | None:
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # noqa: BLE001
        return None
    if not uuid:
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def _env_int(name: str) -> int | None:
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def _ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torch.distributed, else the torchrun environment, else 0/0/1."""
    rank = _env_int0("RANK")
    local_rank = _env_int0("LOCAL_RANK")
    world = _env_int("WORLD_SIZE") or 1
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001
        pass
    return rank, local_rank, world


def _job_id(world_size: int) -> str | None:
    """What every rank of one distributed job shares and two concurrent jobs don't: the rendezvous address
    (MASTER_ADDR:MASTER_PORT, set by torchrun and most launchers) and torchrun's run id. None alone."""
    if world_size <= 1:
        return None
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    parts = [f"{addr}:{port}" if addr and port else None, run_id]
    text = " ".join(p for p in parts if p)
    return text[:256] or None


def _env_int0(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name, "0")))
    except ValueError:
        return 0


def _snapshot(items: deque[Any]) -> list[Any]:
    """A copy of a deque another thread may append to."""
    for _ in range(100):
        try:
            return list(items)
        except RuntimeError:  # mutated during iteration
            continue
    return []


def _after_fork_in_child() -> None:
    global _current
    handle = _current
    _current = None
    if handle is not None:
        handle._after_fork()


def _at_exit() -> None:
    handle = _current
    if handle is not None and handle.pid == os.getpid():
        try:
            handle.detach(reason="exit")
        except Exception:  # noqa: BLE001 - never turn an exit into a traceback
            pass


atexit.register(_at_exit)
os.register_at_fork(after_in_child=_after_fork_in_child)
