"""The in-process agent: measures what each byte of training memory is, step by step, and serves it on a socket.

``attach(model, optimizer)`` hooks the model's forward (the root module only: one slow-path module, not all of
them), the optimizers' steps (global step post hook; ``optimizer.step`` is also wrapped, to see an OOM leave
it), ``torch.autograd.backward`` and ``GradScaler.update`` (batchmon.agent.torch_patches: nothing that can reach
the agent is left on the user's objects; copies, pickles and ``torch.save`` of them carry no hook). With model
or optimizer omitted the agent finds them: the root is the outermost module with trainable parameters whose
forward runs with grad enabled when no other forward is running (global forward hooks, removed once it is
found); optimizers are whatever steps. Where a step ends is batchmon.agent.step_meter's rule (the primary
optimizer's step; a GradScaler-skipped step; without any optimizer, the next training forward after the
gradients were cleared); the meter returns the Step, which is published: kept in ``handle.steps`` and handed to
the transport thread (batchmon.agent.transport).

What a step reports:

- ``batch_size``: the batch dimension of the root forward's input (batchmon.agent.batch_dim: ``batch_size_fn``,
  a packed sequence, ``batch_dim``/``BATCHMON_BATCH_DIM``, the model's sequence-first modules, else dim 0), with
  ``batch_source`` saying which; with gradient accumulation, that of the last micro-batch (what is in memory
  at once), ``micro_batches`` the number of backward passes.
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
- on CUDA: ``allocated``, ``peak_allocated`` (the allocator's peak is reset after every step; the script's
  own ``max_memory_allocated()`` and ``reset_peak_memory_stats()`` still work: batchmon.agent.torch_patches), ``reserved``,
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
import os
import re
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
from batchmon.agent import identity
from batchmon.agent import torch_patches as patches
from batchmon.agent.accounting import iter_tensors
from batchmon.agent.batch_dim import ENV_BATCH_DIM, BatchSizer, explicit_dim
from batchmon.agent.process_memory import ProcessMemory
from batchmon.agent.step_meter import FULL_STEPS, CudaFigures, StepMeter, device_of, device_of_optimizer
from batchmon.agent.transport import HISTORY_EVENTS, HISTORY_STEPS, Transport
from batchmon.protocol import Bye, Event, Hello, Step

DEFAULT_ACTIVATION_EVERY = 10
LOSS_SEARCH_STEPS = 3  # how many steps the agent looks for a criterion module after the model's forward
NVML_SECONDS = 1.0
EXIT_LINGER_SECONDS = 1.5  # at exit after an OOM, wait this long for a first monitor to collect the history

_lock = threading.RLock()
_current: "AgentHandle | None" = None

_TRIED = re.compile(r"Tried to allocate (\d+(?:\.\d+)?) ?(B|bytes|KiB|MiB|GiB|TiB)\b")
_UNITS = {"B": 1, "bytes": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40}
__all__ = ["AgentHandle", "DEFAULT_ACTIVATION_EVERY", "FULL_STEPS", "attach", "current", "detach"]


# ------------------------------------------------------------------------------------------------ public API


def attach(model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
           name: str | None = None, batch_size_fn: Callable[..., int] | None = None,
           activation_every: int | None = None, socket_dir: str | os.PathLike[str] | None = None,
           batch_dim: int | None = None) -> "AgentHandle":
    """Attach the agent to this process; idempotent.

    A second call returns the same handle, adopting a model or optimizer it did not know yet (and a new
    ``name``, ``batch_size_fn``, ``activation_every`` or ``batch_dim`` when given). ``batch_size_fn`` is called
    with the model's forward arguments (``batch_size_fn(*args, **kwargs)``) and returns the batch size; else the
    batch dimension is found (batchmon.agent.batch_dim), or ``batch_dim`` says which dimension of the first
    tensor input it is. ``activation_every``: count activations every N-th step (default 10, see the module
    docstring); 1 counts every step. ``socket_dir`` overrides the socket folder (default:
    protocol.socket_dir()).
    """
    if batch_dim is not None and (isinstance(batch_dim, bool) or not isinstance(batch_dim, int) or batch_dim < 0):
        raise ValueError(f"attach(batch_dim=...) expects an integer >= 0, got {batch_dim!r}")
    return _attach(model, optimizer, name=name, batch_size_fn=batch_size_fn, activation_every=activation_every,
                   socket_dir=socket_dir, auto=False, batch_dim=(batch_dim, "batch_dim=") if batch_dim is not None
                   else None)


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
    every = identity.env_int("BATCHMON_ACTIVATION_EVERY")
    return _attach(None, None, name=os.environ.get("BATCHMON_NAME") or None, batch_size_fn=None,
                   activation_every=every, socket_dir=None, auto=True, batch_dim=None)


def _env_batch_dim() -> tuple[int, str] | None:
    try:
        dim, origin = explicit_dim(os.environ.get(ENV_BATCH_DIM), ENV_BATCH_DIM)
    except ValueError:
        sys.stderr.write(f"batchmon: {ENV_BATCH_DIM}={os.environ.get(ENV_BATCH_DIM)!r} is not an integer >= 0; "
                         "finding the batch dimension instead\n")
        return None
    return (dim, origin) if dim is not None and origin is not None else None


def _attach(model: Any, optimizer: Any, *, name: str | None, batch_size_fn: Any, activation_every: int | None,
            socket_dir: Any, auto: bool, batch_dim: tuple[int, str] | None) -> "AgentHandle":
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
                                 socket_dir=Path(socket_dir) if socket_dir is not None else None, auto=auto,
                                 batch_dim=batch_dim or _env_batch_dim())
            _current = handle
            handle._start(model, optimizer)
        else:
            handle._update(model, optimizer, name=name, batch_size_fn=batch_size_fn,
                           activation_every=activation_every, batch_dim=batch_dim)
        return handle


def _current_agent() -> "AgentHandle | None":
    return _current


patches.current = _current_agent  # type: ignore[assignment]


# ------------------------------------------------------------------------------------------------ the handle


class AgentHandle:
    """The attached agent. Use ``.steps`` / ``.last_step`` for what it measured, ``.detach()`` to stop.

    Also a context manager: ``with batchmon.attach(model, opt): train()`` detaches at the end.
    """

    def __init__(self, *, name: str | None, batch_size_fn: Callable[..., int] | None, activation_every: int,
                 socket_dir: Path | None, auto: bool, batch_dim: tuple[int, str] | None = None) -> None:
        self.name = name
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
        dim, origin = batch_dim if batch_dim is not None else (None, None)
        self._sizer = BatchSizer(batch_size_fn, dim, origin, self._warn_once)
        self._meter = StepMeter(activation_every, self._sizer, _cuda_figures)
        self._criterion_ref: weakref.ReferenceType[torch.nn.Module] | None = None
        # hooks
        self._root_hooks: list[Any] = []
        self._discovery_hooks: list[Any] = []
        self._criterion_hooks: list[Any] = []
        self._window_hooks: list[Any] = []
        self._step_hook: Any = None
        self._tls = threading.local()
        self._window_depth = 0
        self._loss_search_left = LOSS_SEARCH_STEPS
        self._discovered_call = False  # the running root forward is the one discovery found the model in
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
        return self._meter.model

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self._meter.optimizers

    @property
    def batch_size_fn(self) -> Callable[..., int] | None:
        return self._sizer.fn

    @property
    def activation_every(self) -> int:
        return self._meter.activation_every

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

        ``margin``: bytes to keep free on top of the memory model's own margin (taken off the device size).
        """
        try:
            from batchmon import memory_model

            steps = self.steps
            total = self._device_total()
            if not steps or total is None:
                return None
            if margin is not None:
                total = max(0, total - int(margin))
            primary = self._meter.primary()
            prediction = memory_model.predict_from_steps(
                steps, total, what_if=memory_model.WhatIf(),
                optimizer=type(primary).__name__ if primary is not None else None)
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
        if not self._disabled and self.pid == os.getpid():
            try:  # a loop without an optimizer step: its last step ends here
                meter = self._meter
                if meter.step_open and meter.backwards and meter.optimizer_steps == 0:
                    self._finish_step(in_loop=True)
            except Exception:  # noqa: BLE001
                pass
        self.attached = False
        self._disabled = True
        self._teardown_hooks()
        for opt in self.optimizers:
            patches.unwrap_step(opt)
        patches.uninstall()
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
                f"steps={self._meter.step} socket={self.socket_path} enabled={self.enabled}>")

    def __deepcopy__(self, memo: dict[int, Any]) -> "AgentHandle":
        return self  # one agent per process; a copy of something that reaches it reaches the same one

    def __reduce__(self) -> Any:
        raise TypeError("the batchmon agent cannot be pickled")

    # -------------------------------------------------------------------------------------------- start/update

    def _start(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None) -> None:
        self.attached = True
        try:
            patches.install()
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
                activation_every: int | None, batch_dim: tuple[int, str] | None) -> None:
        if self._disabled:
            return
        try:
            changed = self.auto
            if name is not None and name != self.name:
                self.name, changed = name, True
            if batch_size_fn is not None:
                self._sizer.fn = batch_size_fn
            if batch_dim is not None:
                self._sizer.dim, self._sizer.dim_origin = batch_dim
            if activation_every is not None:
                self._meter.activation_every = activation_every
            if optimizer is not None and optimizer is not self._meter.primary():
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
        for hook in self._root_hooks:
            hook.remove()
        self._stop_discovery()
        self._meter.model_ref = weakref.ref(model)
        self._sizer.use_model(model)
        self._root_hooks = patches.register_pair(model, patches.root_pre_hook, patches.root_post_hook)
        self._use_device(device_of(model) or self._meter.device or torch.device("cpu"))
        self._ensure_transport()
        self._publish_hello()

    def _use_device(self, device: torch.device) -> None:
        """Measure on this device (the model's); called again when the model moved (checked on sampled steps)."""
        self._meter.set_device(device)
        self._nvml = None
        self._device_used = None
        if device.type == "cuda":
            index = identity.cuda_index(device)
            patches.install_cuda_memory()
            patches.agent_reset(index, patches.raw_stats(index))
            patches.agent_missed(index)
            patches.install_oom_observer()
            uuid = identity.nvml_uuid(index)
            if uuid is not None:
                self._nvml = ProcessMemory(uuid, self.pid)

    def _track_optimizer(self, optimizer: torch.optim.Optimizer, primary: bool = False) -> None:
        meter = self._meter
        if optimizer not in meter.optimizer_set:
            meter.optimizer_set.add(optimizer)
            patches.wrap_step(optimizer)
        if primary or meter.primary() is None:
            meter.primary_ref = weakref.ref(optimizer)
            meter._static = None
            if meter.device is None:
                meter.device = device_of_optimizer(optimizer)
            self._publish_hello()

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
        for hook in hooks:
            hook.remove()

    def _discover_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._disabled:
            return
        try:
            depth = getattr(self._tls, "depth", 0)
            self._tls.depth = depth + 1
            if depth == 0 and self.model is None and torch.is_grad_enabled() and _has_trainable(module):
                self._set_model(module)
                # this call's instance pre-hooks were fixed before we registered ours: run it by hand (a global
                # pre hook gets no keyword arguments: the post hook adds them to this first step's batch)
                self._discovered_call = True
                self._root_pre(module, args, {})
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _discover_post(self, module: torch.nn.Module, args: tuple[Any, ...], result: Any) -> None:
        self._tls.depth = max(0, getattr(self._tls, "depth", 1) - 1)

    # -------------------------------------------------------------------------------------------- forward

    def _root_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self._disabled or module is not self.model:
            return
        meter = self._meter
        try:
            meter.root_depth += 1
            if meter.root_depth > 1 or not torch.is_grad_enabled():
                return  # a nested call of the root, or an eval/no-grad forward: not part of a training step
            meter.root_counting = True
            if self._window_hooks:
                self._close_loss_window()
            if meter.loop_boundary():
                self._finish_step(in_loop=True)
            inputs = list(iter_tensors((args, kwargs) if kwargs else args, depth=4))
            measured = self._sizer.measure(args, kwargs, inputs)
            meter.batch_size, meter.batch_source = measured.size, measured.source
            if not meter.step_open and meter.open_step():
                self._use_device(meter.device_or_cpu())
                self._publish_hello()
            if meter.sampled or meter.step < FULL_STEPS:
                self._sizer.start_probe()
            meter.add_inputs(inputs)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _root_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   exc: BaseException | None) -> None:
        if module is not self.model:
            return
        meter = self._meter
        try:
            meter.root_depth = max(0, meter.root_depth - 1)
            if meter.root_depth > 0:
                return
            counting, meter.root_counting = meter.root_counting, False
            meter.stop_counting()
            discovered, self._discovered_call = self._discovered_call, False
            if discovered and counting and kwargs:
                inputs = list(iter_tensors((args, kwargs), depth=4))
                measured = self._sizer.measure(args, kwargs, inputs)
                meter.batch_size, meter.batch_source = measured.size, measured.source
                meter.add_inputs(inputs, count=False)
            learned = self._sizer.stop_probe()
            if learned is not None and counting:
                meter.batch_size, meter.batch_source = learned.size, learned.source
            if self._disabled:
                self._teardown_hooks()
                return
            if exc is not None and isinstance(exc, torch.OutOfMemoryError):
                self._on_oom(exc, "forward")
            elif exc is None and counting:
                self._open_loss_window()
        except Exception as err:  # noqa: BLE001
            self._fail(err)

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
        for hook in hooks:
            hook.remove()

    def _window_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._disabled:
            return
        try:
            depth = self._window_depth
            self._window_depth += 1
            if depth == 0 and _looks_like_loss(module) and torch.is_grad_enabled():
                self._close_loss_window()
                self._criterion_ref = weakref.ref(module)
                self._criterion_hooks = patches.register_pair(module, patches.crit_pre_hook, patches.crit_post_hook)
                self._crit_pre(module, args, {})
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _window_post(self, module: torch.nn.Module, args: tuple[Any, ...], result: Any) -> None:
        self._window_depth = max(0, self._window_depth - 1)

    def _crit_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        criterion = self._criterion_ref() if self._criterion_ref is not None else None
        if self._disabled or module is not criterion:
            return
        meter = self._meter
        try:
            meter.crit_depth += 1
            if meter.crit_depth > 1 or meter.root_depth > 0 or not meter.step_open or not torch.is_grad_enabled():
                return
            meter.add_targets(iter_tensors((args, kwargs), depth=4))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _crit_post(self, module: torch.nn.Module, exc: BaseException | None) -> None:
        criterion = self._criterion_ref() if self._criterion_ref is not None else None
        if module is not criterion:
            return
        meter = self._meter
        try:
            meter.crit_depth = max(0, meter.crit_depth - 1)
            if meter.crit_depth > 0 or meter.root_depth > 0:
                return
            meter.stop_counting()
            if self._disabled:
                self._teardown_hooks()
                return
            if exc is not None and isinstance(exc, torch.OutOfMemoryError):
                self._on_oom(exc, "loss")
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    # -------------------------------------------------------------------------------------------- backward/step

    def _before_backward(self) -> None:
        if self._disabled:
            return
        try:
            self._close_loss_window()
            self._meter.fold_group()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _after_backward(self) -> None:
        if self._disabled:
            return
        try:
            self._meter.after_backward()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _scaler_update(self) -> None:
        """GradScaler.update() ran: a step whose optimizer step the scaler skipped ends here."""
        if self._disabled:
            return
        try:
            meter = self._meter
            if meter.step_open and meter.backwards and self.pid == os.getpid():
                self._finish_step()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._disabled:
            return
        try:
            if self.pid != os.getpid():
                return
            meter = self._meter
            primary = meter.primary()
            if primary is None or optimizer not in meter.optimizer_set:
                self._track_optimizer(optimizer)
                primary = meter.primary()
            if optimizer is primary:
                meter.optimizer_steps += 1
                self._finish_step()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _finish_step(self, in_loop: bool = False) -> None:
        self._close_loss_window()
        if self._loss_search_left > 0 and self._criterion_ref is None:
            self._loss_search_left -= 1
        self._ensure_transport()
        meter = self._meter
        step, cuda = meter.finish(self._device_used, in_loop)
        self._steps.append(step)
        if self._transport is not None:
            self._transport.put(step)
        if cuda is not None:
            retries = cuda.retries
            if meter.retries is not None and retries > meter.retries:
                self._publish_event(Event(
                    kind="alloc_retry", components=step.components, time=step.time, step=step.step,
                    batch_size=step.batch_size,
                    message=f"the CUDA caching allocator freed its cache and retried {retries - meter.retries} "
                            f"allocation(s) during step {step.step}: memory is nearly full or fragmented"))
            meter.retries = retries
        patches.take_oom_requested()  # an allocation failure someone caught and survived is not the next OOM's size

    # -------------------------------------------------------------------------------------------- OOM

    def _on_oom(self, exc: BaseException, where: str) -> None:
        """An out-of-memory error is leaving forward, loss, backward or the optimizer step."""
        if self._disabled:
            return
        self.oom_count += 1
        try:
            requested = patches.take_oom_requested()
            if requested is None:
                requested = _requested_from_text(str(exc))
            self._close_loss_window()
            comps = self._meter.current_components()
            text = " ".join(str(exc).split())
            first = text.split(". ", 1)[0][:300]
            n = self._meter.step + 1
            self._publish_event(Event(kind="oom", message=f"out of memory in {where} at step {n}: {first}",
                                      components=comps, time=time.time(), step=n,
                                      batch_size=self._meter.batch_size, requested_bytes=requested))
        except Exception as err:  # noqa: BLE001
            self._fail(err)

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
        primary = self._meter.primary()
        return identity.hello(self.pid, self._meter.device, self._meter.model_info,
                              type(primary).__name__ if primary is not None else None, self.name)

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
                                      time=time.time(), step=self._meter.step))
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
        counter = self._meter.counter
        busy = counter is not None and counter.active
        groups = [self._discovery_hooks, self._window_hooks]
        if not busy:
            groups += [self._root_hooks, self._criterion_hooks]
        for group in groups:
            for hook in group:
                hook.remove()
            group.clear()
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    def _after_fork(self) -> None:
        """In a forked child: this agent belongs to the parent. Go quiet, keep the parent's socket file."""
        self._disabled = True
        self.attached = False
        transport, self._transport = self._transport, None
        if transport is not None:
            transport.forget()

    def _device_total(self) -> int | None:
        device = self._meter.device
        if device is None or device.type != "cuda":
            return None
        return int(torch.cuda.get_device_properties(identity.cuda_index(device)).total_memory)


# ------------------------------------------------------------------------------------------------ small helpers


def _cuda_figures(device: torch.device | None, reset: bool) -> CudaFigures | None:
    if device is None or device.type != "cuda":
        return None
    index = identity.cuda_index(device)
    stats = patches.raw_stats(index)
    if not stats:  # CUDA not initialised (yet): nothing to report
        return None
    # a peak the script's own reset_peak_memory_stats() cleared during the step still counts for the step
    peak = max(int(stats["allocated_bytes"]["all"]["peak"]), patches.agent_missed(index, take=reset))
    figures = CudaFigures(int(stats["allocated_bytes"]["all"]["current"]), peak,
                          int(stats["reserved_bytes"]["all"]["current"]), int(stats.get("num_alloc_retries", 0)),
                          int(stats.get("num_ooms", 0)))
    if reset:
        patches.agent_reset(index, stats)
    return figures


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
