"""The agent's global module hooks, all registered here, so that torch.compile's warning about them stays quiet.

torch warns at every call site of a compiled module while any global module hook exists ("Using
`torch.compile(module)` when there are global hooks on modules ..."). The agent's discovery, loss-window and
batch-layout hooks are global during the first forwards, so a script that compiles (nanoGPT does by default)
printed a warning it never caused: output the agent added to the training. While at least one of the agent's
global hooks is registered, that one warning, matched by its message, is ignored; the filter goes with the last
hook. A script's own global hooks registered in that window lose the warning for that time only.
"""

from __future__ import annotations

import threading
import warnings
from typing import Any, Callable, cast

import torch.nn.modules.module as module_hooks

COMPILE_HOOK_WARNING = r"Using `torch\.compile\(module\)` when there are global hooks"

_lock = threading.Lock()
_live = 0
_filter: Any = None


class GlobalHook:
    """A registered global hook; remove() takes it away (idempotent), and the warning filter with the last."""

    def __init__(self, handle: Any) -> None:
        self._handle: Any = handle

    def remove(self) -> None:
        handle, self._handle = self._handle, None
        if handle is None:
            return
        handle.remove()
        _released()


def _acquired() -> None:
    global _live, _filter
    with _lock:
        _live += 1
        if _live == 1 and _filter is None:
            warnings.filterwarnings("ignore", message=COMPILE_HOOK_WARNING, category=UserWarning)
            _filter = warnings.filters[0]


def _released() -> None:
    global _live, _filter
    with _lock:
        _live = max(0, _live - 1)
        if _live or _filter is None:
            return
        entry, _filter = _filter, None
        try:
            cast(list, warnings.filters).remove(entry)  # a list at run time; typeshed says Sequence
        except ValueError:  # the script reset the filters meanwhile: nothing of ours is left
            return
        mutated = getattr(warnings, "_filters_mutated", None)  # drops cached decisions, as filterwarnings does
        if callable(mutated):
            mutated()


def forward_pre(hook: Callable[..., Any]) -> GlobalHook:
    _acquired()
    return GlobalHook(module_hooks.register_module_forward_pre_hook(hook))


def forward(hook: Callable[..., Any], *, always_call: bool = False) -> GlobalHook:
    _acquired()
    return GlobalHook(module_hooks.register_module_forward_hook(hook, always_call=always_call))


def live() -> int:
    """How many of the agent's global hooks are registered now (tests)."""
    return _live
