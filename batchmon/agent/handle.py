"""The in-process agent: measures what each byte of training memory is, step by step, and serves it on a socket.

``attach(model, optimizer)`` hooks the model's forward (the root module only: one slow-path module), the
optimizers' steps, ``torch.autograd.backward`` and ``GradScaler.update`` (batchmon.agent.torch_patches: nothing
that can reach the agent is left on the user's objects). With model or optimizer omitted the agent finds them
(batchmon.agent.module_watch); optimizers are whatever steps. Where a step ends is batchmon.agent.step_meter's
rule; the Step it returns is kept in ``handle.steps`` and served to monitors (batchmon.agent.publisher).

What a step reports, and what cost control leaves out, is batchmon.agent.step_meter's docstring. The agent is
split along its seams: step_meter (measurement state, returns Step/Event values), torch_patches (everything
changed in torch and the hooks on user modules), module_watch (root discovery, the loss module), batch_dim,
identity (hello fields), placement (devices, allocator figures), publisher (history, socket, warnings). This
module (600 lines, over the 400 of the guide) is the wiring between them: the public API, the lifecycle, and
the dispatch of every hook with its never-raise-into-training guard, which reads best in one place.

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
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Callable

import torch

from batchmon.agent import identity, oom_report
from batchmon.agent import torch_patches as patches
from batchmon.agent.batch_dim import BatchSizer, env_batch_dim
from batchmon.agent.module_watch import ModuleWatch
from batchmon.agent.process_memory import ProcessMemory
from batchmon.agent.handle_views import HandleViews
from batchmon.agent.publisher import Publisher
from batchmon.agent.quiet_steps import QuietSteps
from batchmon.agent.saved_split import SplitProbe
from batchmon.agent.placement import cuda_figures, device_of, device_of_optimizer, suggested_batch
from batchmon.agent.step_meter import FULL_STEPS, StepMeter
from batchmon.protocol import Bye, Event, Hello, with_saved_split

DEFAULT_ACTIVATION_EVERY = 10
EXIT_LINGER_SECONDS = 1.5  # at exit after an OOM, wait this long for a first monitor to collect the history

_grad_enabled = torch.is_grad_enabled
_getpid = os.getpid
_lock = threading.RLock()
_current: "AgentHandle | None" = None

__all__ = ["AgentHandle", "DEFAULT_ACTIVATION_EVERY", "FULL_STEPS", "attach", "current", "detach"]


# ------------------------------------------------------------------------------------------------ public API


def attach(model: torch.nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None, *,
           name: str | None = None, batch_size_fn: Callable[..., int | None] | None = None,
           activation_every: int | None = None, socket_dir: str | os.PathLike[str] | None = None,
           batch_dim: int | None = None) -> "AgentHandle":
    """Attach the agent to this process; idempotent.

    A second call returns the same handle, adopting a model or optimizer it did not know yet (and a new
    ``name``, ``batch_size_fn``, ``activation_every`` or ``batch_dim`` when given). ``batch_size_fn`` is called
    with the model's forward arguments (``batch_size_fn(*args, **kwargs)``) and returns the batch size; else the
    batch dimension is found (batchmon.agent.batch_dim), or ``batch_dim`` says which dimension of the first
    tensor input it is. ``activation_every``: count activations every N-th step (default 10, then at most 4 a
    second; an explicit N is exact: step_meter). ``socket_dir``: the socket folder (default protocol.socket_dir()).
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


def _attach(model: Any, optimizer: Any, *, name: str | None, batch_size_fn: Any, activation_every: int | None,
            socket_dir: Any, auto: bool, batch_dim: tuple[int, str] | None) -> "AgentHandle":
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
                                 activation_explicit=activation_every is not None,
                                 socket_dir=Path(socket_dir) if socket_dir is not None else None, auto=auto,
                                 batch_dim=batch_dim or env_batch_dim())
            _set_current(handle)
            handle._start(model, optimizer)
        else:
            handle._update(model, optimizer, name=name, batch_size_fn=batch_size_fn,
                           activation_every=activation_every, batch_dim=batch_dim)
        return handle


def _set_current(handle: "AgentHandle | None") -> None:
    """The attached agent, here and where torch_patches' hooks read it (one global load per hook call)."""
    global _current
    _current = patches.agent = handle


# ------------------------------------------------------------------------------------------------ the handle


class AgentHandle(HandleViews):
    """The attached agent. Use ``.steps`` / ``.last_step`` for what it measured, ``.detach()`` to stop.

    Also a context manager: ``with batchmon.attach(model, opt): train()`` detaches at the end.
    """

    def __init__(self, *, name: str | None, batch_size_fn: Callable[..., int | None] | None, activation_every: int,
                 socket_dir: Path | None, auto: bool, batch_dim: tuple[int, str] | None = None,
                 activation_explicit: bool = True) -> None:
        self.name = name
        self.auto = auto
        self.pid = os.getpid()
        self.attached = False
        self.error: str | None = None  # why the agent disabled itself, if it did
        self._socket_dir = socket_dir
        self._nvml: ProcessMemory | None = None
        self._device_used: int | None = None
        self._disabled = False
        self._out = Publisher(self.pid, socket_dir, self._hello, self._transport_failed, self._tick)
        dim, origin = batch_dim if batch_dim is not None else (None, None)
        self._sizer = BatchSizer(batch_size_fn, dim, origin, self._out.warn_once)
        self._meter = StepMeter(activation_every, self._sizer, cuda_figures, explicit_every=activation_explicit)
        self._out.pace = self._meter.set_read_seconds  # (the monitors' refresh sets how often it reads the allocator)
        self._watch = ModuleWatch(self, lambda: self._meter.model_ref is not None)
        # the criterion's hooks go straight to the watch (no call in between: they run on every step)
        self._crit_pre = self._watch.crit_pre  # type: ignore[method-assign]
        self._crit_post = self._watch.crit_post  # type: ignore[method-assign]
        self.quiet = False  # a quiet steady step: the root's post hook and the loss hooks are off (quiet_steps)
        self._hooks = QuietSteps(self)
        self._arm_on_error = self._hooks.arm_on_error  # (torch_patches' OOM observer calls it)
        self._open_quiet = self._meter.open_quiet  # (a quiet step's root pre hook calls it first)
        self._discovered_call = False  # the running root forward is the one discovery found the model in
        self.oom_count = 0  # OOM events so far; the wrappers use it to report a nested OOM only once
        # the saved activations' split, measured once on a sampled step (saved_split: the derived what-ifs)
        self._split: SplitProbe | None = SplitProbe()
        self._split_out: dict[str, int] | None = None

    # -------------------------------------------------------------------------------------------- public

    def suggest_batch_size(self, margin: int | None = None) -> int | None:
        """The largest batch that fits this device, predicted from the measured steps (None when unknown).

        ``margin``: bytes to keep free on top of the memory model's own margin (taken off the device size).
        """
        try:
            primary = self._meter.primary()
            return suggested_batch(self.steps, self._meter.device, margin,
                                   type(primary).__name__ if primary is not None else None)
        except Exception as exc:  # noqa: BLE001 - a helper for the training script: never raise into it
            self._warn_once("suggest", f"suggest_batch_size failed: {type(exc).__name__}: {exc}")
            return None

    def detach(self, reason: str = "detached") -> None:
        """Stop measuring, say bye to monitors, remove the socket. Idempotent."""
        with _lock:
            if _current is self:
                _set_current(None)
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
        if self.pid == os.getpid():
            # a run that dies of an OOM right after starting would vanish before a monitor's next scan
            linger = EXIT_LINGER_SECONDS if reason == "exit" and self.oom_count else 0.0
            self._out.close(Bye(reason=reason, time=time.time()), linger=linger)

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
            patches.install()  # its optimizer post hook calls _on_step
            if optimizer is not None:
                self._track_optimizer(optimizer, primary=True)
            if model is not None:
                self._set_model(model)
            else:
                self._watch.start_discovery()
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
            if activation_every is not None:  # an explicit setting: exactly every N-th step
                self._meter.set_every(activation_every)
            if optimizer is not None and optimizer is not self._meter.primary():
                self._track_optimizer(optimizer, primary=True)  # publishes a new hello itself
            if model is not None and model is not self.model:
                self._set_model(model)  # likewise
            self.auto = False
            self._ensure_transport()
            if changed:
                self._out.hello()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _set_model(self, model: torch.nn.Module) -> None:
        self._watch.stop_discovery()
        self._meter.model_ref = weakref.ref(model)
        if self._split is None or not self._split.armed:  # a new model: its own split (batchmon.agent.saved_split)
            self._split, self._split_out = SplitProbe(), None
        self._sizer.use_model(model)
        self._hooks.hook_model(model)
        self._use_device(device_of(model) or self._meter.device or torch.device("cpu"))
        self._ensure_transport()
        self._out.hello()

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

    def _moved(self) -> None:
        """A sampled step found the model on another device (or materialised): measure there."""
        self._use_device(self._meter.device_or_cpu())
        self._out.hello()

    def _track_optimizer(self, optimizer: torch.optim.Optimizer, primary: bool = False) -> None:
        meter = self._meter
        if meter.add_optimizer(optimizer):
            patches.wrap_step(optimizer)
        if primary or meter.primary() is None:
            meter.primary_ref = weakref.ref(optimizer)
            meter._static = None
            if meter.device is None:
                meter.device = device_of_optimizer(optimizer)
            self._out.hello()

    # -------------------------------------------------------------------------------------------- forward

    @property
    def disabled(self) -> bool:
        return self._disabled

    def _found_root(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        """Discovery found the model: hook it, and measure this very call (its instance pre-hooks were fixed
        before ours; a global pre hook gets no keyword arguments: the post hook adds them to the batch)."""
        self._set_model(module)
        self._discovered_call = True
        self._root_pre(module, args, {})

    def _crit_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self._watch.crit_pre(module, args, kwargs)

    def _crit_post(self, module: torch.nn.Module, exc: BaseException | None) -> None:
        self._watch.crit_post(module, exc)

    def _root_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        meter = self._meter
        ref = meter.model_ref
        if self._disabled or ref is None or module is not ref():
            return
        try:
            if self.quiet:  # (batchmon.agent.quiet_steps) the steady case opens the step and that is all
                if not kwargs and meter.open_quiet(module, args):
                    return
                if self._hooks.forward(args, kwargs):
                    return
            meter.root_depth += 1
            if meter.root_depth > 1 or not _grad_enabled():
                return  # a nested call of the root, or an eval/no-grad forward: not part of a training step
            meter.root_counting = True
            if self._watch.window_hooks:
                self._watch.close_loss_window()
            if meter.step_open and meter.loop_boundary():
                self._finish_step(in_loop=True)
            if meter.begin_forward(args, kwargs):
                self._moved()
            if meter.sampled and self._split is not None:  # once per run (batchmon.agent.saved_split)
                self._split.begin(module, meter)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _root_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   exc: BaseException | None, result: Any = None) -> None:
        meter = self._meter
        ref = meter.model_ref
        if ref is None or module is not ref():
            return
        try:
            depth = meter.root_depth - 1
            meter.root_depth = depth if depth > 0 else 0
            if depth > 0:
                return
            counting, meter.root_counting = meter.root_counting, False
            if meter.counter is not None:
                meter.stop_counting()
            split = self._split
            if split is not None and split.armed:  # the sampled forward it measured ends: walk its graph
                self._split_out = split.end(result if exc is None else None, meter, module)
                if split.done:
                    self._split = None
            discovered, self._discovered_call = self._discovered_call, False
            if discovered or self._sizer._probe is not None:  # (else end_forward has nothing to do)
                meter.end_forward(args, kwargs, counting, discovered)
            if self._disabled:
                self._teardown_hooks()
                return
            if exc is not None and isinstance(exc, torch.OutOfMemoryError):
                self._on_oom(exc, "forward")
            elif exc is None and counting:
                phases = meter.phases
                if phases.active:  # a followed step: the backward splits where the output's gradient arrives
                    follow = getattr(phases, "follow_output", None)
                    if follow is not None:
                        follow(result)
                watch = self._watch
                if watch.loss_search_left > 0 and watch.criterion_ref is None:
                    watch.open_loss_window()
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    # -------------------------------------------------------------------------------------------- backward/step

    def _before_backward(self) -> None:
        if self._disabled:
            return
        try:
            if self._watch.window_hooks:
                self._watch.close_loss_window()
            meter = self._meter
            if meter.phases.active:
                meter.before_backward()
            if meter.counter is not None or meter.batch is not None:
                meter.fold_group()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _after_backward(self) -> None:
        if self._disabled:
            return
        try:
            meter = self._meter
            if meter.optimizer_steps and meter.step_open and not meter.phases.active:
                meter.backwards += 1  # the steady case of after_backward: the optimizer's step ends steps
            else:
                meter.after_backward()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _scaler_update(self) -> None:
        """GradScaler.update() ran: a step whose optimizer step the scaler skipped ends here."""
        if self._disabled:
            return
        try:
            meter = self._meter
            if self.quiet and meter.step_open:  # the optimizer's step was skipped (it ends quiet steps): the
                meter.quiet_backwards()  # step's backward ran unseen (quiet_steps)
            if meter.step_open and meter.backwards and self.pid == os.getpid():
                self._finish_step()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _on_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._disabled:
            return
        try:
            meter = self._meter
            ref = meter.primary_ref
            primary = ref() if ref is not None else None
            if optimizer is primary and self.quiet and meter.batch_carried:  # a quiet step that did not join the
                meter.quiet_backwards()  # run (torch_patches._step_post tried StepMeter.finish_quiet first): its
                self._finish_step()  # backward ran unseen, it ends as the last measured step did
                return
            if optimizer is not primary and (primary is None or optimizer not in meter.optimizer_set):
                self._track_optimizer(optimizer)  # (the primary optimizer is tracked: no set look-up for it)
                primary = meter.primary()
            if optimizer is primary:
                meter.optimizer_steps += 1
                if self.quiet:
                    if not meter.step_open:  # no forward of the root seen (quiet_steps: compiled around it)
                        self._hooks.missed_forward()
                self._finish_step()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    def _finish_step(self, in_loop: bool = False) -> None:
        watch = self._watch
        if watch.window_hooks or (watch.loss_search_left > 0 and watch.criterion_ref is None):
            watch.step_ended()
        out = self._out
        if out.transport is None and out.socket_error is None and not self._disabled:
            out.ensure()
        meter = self._meter
        forwards = meter.forwards
        step = meter.finish_carried(self._device_used) if meter.batch_carried and not in_loop else None
        if step is not None:  # the steady step: the last step's figures, no events (step_meter.finish_carried)
            out.step(step)
            if not self.quiet:
                self._hooks.after_carried(forwards)
            if self.quiet:  # the next steps are quiet: a run of this one (step_runs)
                out.run(meter.new_run())
            return
        if self.pid != _getpid():  # a child forked outside os.fork (whose handler disables the agent there)
            return
        sampled = meter.sampled  # (finish resets it)
        step, events = meter.finish(self._device_used, in_loop)
        if self._split_out is not None and sampled:
            step = with_saved_split(step, self._split_out)
        out.step(step)
        for event in events:
            self._out.event(event)
        if self.quiet:  # still quiet (an allocator read ended this step): the next steps are a run of this one
            out.run(meter.new_run())

    # -------------------------------------------------------------------------------------------- OOM

    def _on_oom(self, exc: BaseException, where: str) -> None:
        """An out-of-memory error is leaving forward, loss, backward or the optimizer step."""
        if self._disabled:
            return
        self.oom_count += 1
        try:
            self._watch.close_loss_window()
            self._out.event(oom_report.oom_event(self._meter, exc, where))
        except Exception as err:  # noqa: BLE001
            self._fail(err)

    # -------------------------------------------------------------------------------------------- publishing

    def _ensure_transport(self) -> None:
        if not self._disabled:
            self._out.ensure()

    def _hello(self) -> Hello:
        primary = self._meter.primary()
        return identity.hello(self.pid, self._meter.device, self._meter.model_info,
                              type(primary).__name__ if primary is not None else None, self.name)

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
        self.quiet = False  # (the root's pre hook then goes to _root_pre, which returns)
        self.error = f"{type(exc).__name__}: {exc}"
        try:
            self._out.event(Event(kind="warning", message=f"agent disabled after an internal error: {self.error}",
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
        self._out.warn_once(key, message)

    def _teardown_hooks(self) -> None:
        """Remove every hook; the forward post hooks stay while a saved-tensor context they must close is open."""
        counter = self._meter.counter
        busy = counter is not None and counter.active
        self._watch.remove(busy)
        if not busy:
            self._hooks.remove()

    def _after_fork(self) -> None:
        """In a forked child: this agent belongs to the parent. Go quiet, keep the parent's socket file."""
        self._disabled = True
        self.attached = False
        self._out.forget()


# ------------------------------------------------------------------------------------------------ small helpers


def _after_fork_in_child() -> None:
    handle = _current
    _set_current(None)
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
