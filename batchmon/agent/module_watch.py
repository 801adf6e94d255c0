"""The agent's hooks on modules other than the model's root: finding the root, finding the loss module.

Discovery (``attach()`` without a model, ``batchmon run``): global forward hooks until the first forward of
a module with trainable parameters, with grad enabled, when no other forward is running - that module is the
root. The loss window: after the root's forward, for the first LOSS_SEARCH_STEPS steps, global hooks look
for a criterion called on its output (a torch loss module, or a parameter-free module named ...Loss or
...Criterion); once found it gets the two criterion hooks of batchmon.agent.torch_patches (targets are batch,
its saved tensors activations) and the global hooks go. Global hooks live in torch's global tables, never on
a user's module; they are removed as soon as they have done their job.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable, Protocol

import torch

from batchmon.agent import global_hooks
from batchmon.agent import torch_patches as patches
from batchmon.agent.accounting import tensors_in
from batchmon.agent.step_meter import StepMeter

LOSS_SEARCH_STEPS = 3  # how many steps the agent looks for a criterion module after the model's forward


class Owner(Protocol):
    """What the watch needs from the agent (AgentHandle)."""

    _meter: StepMeter
    _disabled: bool

    @property
    def disabled(self) -> bool: ...
    def _found_root(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None: ...
    def _fail(self, exc: BaseException, teardown: bool = True) -> None: ...
    def _on_oom(self, exc: BaseException, where: str) -> None: ...
    def _teardown_hooks(self) -> None: ...


def has_trainable(module: torch.nn.Module) -> bool:
    return any(p.requires_grad for p in module.parameters())


def looks_like_loss(module: torch.nn.Module) -> bool:
    """A criterion: a torch loss module, or a parameter-free module named like one (…Loss, …Criterion)."""
    if isinstance(module, torch.nn.modules.loss._Loss):
        return True
    name = type(module).__name__.lower()
    return ("loss" in name or "criterion" in name) and not has_trainable(module)


class _Shared:
    """One pair of global hooks shared by every ModuleWatch in a phase (discovery, the loss window): the hooks are
    module-level functions made with ``torch_patches.eager`` - inside ``torch.compile`` they run eagerly at a graph
    break, and trace to nothing under ``fullgraph=True`` (a graph break is an error there: a model called only
    inside a full-graph compiled function is not discovered by them) - and never a bound method per agent."""

    def __init__(self, pre: Callable[..., Any], post: Callable[..., Any]) -> None:
        self.watches: list[ModuleWatch] = []
        self._hooks: list[Any] = []
        self._pre, self._post = pre, post

    def join(self, watch: "ModuleWatch") -> "_Member":
        if watch not in self.watches:
            self.watches.append(watch)
        if not self._hooks:
            self._hooks = [global_hooks.forward_pre(self._pre), global_hooks.forward(self._post, always_call=True)]
        return _Member(self, watch)

    def leave(self, watch: "ModuleWatch") -> None:
        if watch in self.watches:
            self.watches.remove(watch)
        if not self.watches:
            hooks, self._hooks = self._hooks, []
            for hook in hooks:
                hook.remove()


class _Member:
    """A watch's place in a _Shared pair: what its hook lists hold (``remove()`` as a hook handle's)."""

    def __init__(self, shared: _Shared, watch: "ModuleWatch") -> None:
        self._shared, self._watch = shared, watch

    def remove(self) -> None:
        self._shared.leave(self._watch)


@patches.eager
def _discover_pre(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    for watch in tuple(_DISCOVERY.watches):
        watch._discover_pre(module, args)


@patches.eager
def _discover_post(module: torch.nn.Module, args: tuple[Any, ...], result: Any) -> None:
    for watch in tuple(_DISCOVERY.watches):
        watch._discover_post(module, args, result)


@patches.eager
def _window_pre(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    for watch in tuple(_WINDOW.watches):
        watch._window_pre(module, args)


@patches.eager
def _window_post(module: torch.nn.Module, args: tuple[Any, ...], result: Any) -> None:
    for watch in tuple(_WINDOW.watches):
        watch._window_post(module, args, result)


_DISCOVERY = _Shared(_discover_pre, _discover_post)
_WINDOW = _Shared(_window_pre, _window_post)


class ModuleWatch:
    """Discovery and criterion hooks of one agent (training thread)."""

    def __init__(self, owner: Owner, has_model: Callable[[], bool]) -> None:
        self._owner = owner
        self._has_model = has_model
        self.criterion_ref: weakref.ReferenceType[torch.nn.Module] | None = None
        self.discovery_hooks: list[Any] = []
        self.window_hooks: list[Any] = []
        self.criterion_hooks: list[Any] = []
        self._tls = threading.local()
        self._window_depth = 0
        self.loss_search_left = LOSS_SEARCH_STEPS

    # -------------------------------------------------------------------------------------------- discovery

    def start_discovery(self) -> None:
        if not self.discovery_hooks:
            self.discovery_hooks = [_DISCOVERY.join(self)]

    def stop_discovery(self) -> None:
        hooks, self.discovery_hooks = self.discovery_hooks, []
        for hook in hooks:
            hook.remove()

    def _discover_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._owner.disabled:
            return
        try:
            depth = getattr(self._tls, "depth", 0)
            self._tls.depth = depth + 1
            if depth == 0 and not self._has_model() and torch.is_grad_enabled() and has_trainable(module):
                self._owner._found_root(module, args)
        except Exception as exc:  # noqa: BLE001
            self._owner._fail(exc)

    def _discover_post(self, module: torch.nn.Module, args: tuple[Any, ...], result: Any) -> None:
        self._tls.depth = max(0, getattr(self._tls, "depth", 1) - 1)

    # -------------------------------------------------------------------------------------------- loss window

    def open_loss_window(self) -> None:
        """After the model's forward, briefly watch for a loss module called on its output (targets, loss
        activations). Closed by backward, the step or the next forward."""
        if self.criterion_ref is not None or self.loss_search_left <= 0 or self.window_hooks:
            return
        self._window_depth = 0
        self.window_hooks = [_WINDOW.join(self)]

    def close_loss_window(self) -> None:
        hooks, self.window_hooks = self.window_hooks, []
        for hook in hooks:
            hook.remove()

    def step_ended(self) -> None:
        self.close_loss_window()
        if self.loss_search_left > 0 and self.criterion_ref is None:
            self.loss_search_left -= 1

    def _window_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._owner.disabled:
            return
        try:
            depth = self._window_depth
            self._window_depth += 1
            if depth == 0 and looks_like_loss(module) and torch.is_grad_enabled():
                self.close_loss_window()
                self.criterion_ref = weakref.ref(module)
                self.criterion_hooks = patches.register_pair(module, patches.crit_pre_hook, patches.crit_post_hook)
                self.crit_pre(module, args, {})
        except Exception as exc:  # noqa: BLE001
            self._owner._fail(exc)

    def _window_post(self, module: torch.nn.Module, args: tuple[Any, ...], result: Any) -> None:
        self._window_depth = max(0, self._window_depth - 1)

    # -------------------------------------------------------------------------------------------- criterion

    # The two criterion hooks run on every step (torch_patches calls them through the handle's attributes): the
    # steady step's case - a carried step, its targets are the last step's - costs a few attribute reads.

    def crit_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        owner = self._owner
        ref = self.criterion_ref
        if owner._disabled or ref is None or ref() is not module:
            return
        meter = owner._meter
        try:
            meter.crit_depth += 1
            if meter.batch_carried or meter.crit_depth > 1 or meter.root_depth > 0 or not meter.step_open \
                    or not torch.is_grad_enabled():
                return  # (a carried step: the targets are the last step's, StepMeter.begin_forward)
            meter.add_targets(tensors_in((args, kwargs) if kwargs else args, depth=4))
        except Exception as exc:  # noqa: BLE001
            owner._fail(exc)

    def crit_post(self, module: torch.nn.Module, exc: BaseException | None) -> None:
        ref = self.criterion_ref
        if ref is None or ref() is not module:
            return
        owner = self._owner
        meter = owner._meter
        try:
            depth = meter.crit_depth - 1
            meter.crit_depth = depth if depth > 0 else 0
            if depth > 0 or meter.root_depth > 0:
                return
            if meter.counter is not None:
                meter.stop_counting()
            if owner._disabled:
                owner._teardown_hooks()
                return
            if exc is not None and isinstance(exc, torch.OutOfMemoryError):
                owner._on_oom(exc, "loss")
        except Exception as err:  # noqa: BLE001
            owner._fail(err)

    def unhook_criterion(self) -> None:
        """A quiet step (batchmon.agent.quiet_steps) runs without the criterion's hooks."""
        hooks, self.criterion_hooks = self.criterion_hooks, []
        for hook in hooks:
            hook.remove()

    def hook_criterion(self) -> None:
        """The criterion's hooks back (after a quiet step), if a criterion was found and is alive."""
        ref = self.criterion_ref
        module = ref() if ref is not None else None
        if module is not None and not self.criterion_hooks:
            self.criterion_hooks = patches.register_pair(module, patches.crit_pre_hook, patches.crit_post_hook)

    # -------------------------------------------------------------------------------------------- teardown

    def remove(self, busy: bool) -> None:
        """Remove every hook; the criterion's stay while a saved-tensor context they must close is open."""
        groups = [self.discovery_hooks, self.window_hooks] + ([] if busy else [self.criterion_hooks])
        for group in groups:
            for hook in group:
                hook.remove()
            group.clear()
