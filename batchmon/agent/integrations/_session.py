"""What both callbacks share: attach with the trainer's objects, detach only what they attached, never raise.

A callback runs inside the trainer's loop, so an error of ours must not end someone's training run: every hook
body runs under ``Session.guard`` which turns an exception into one ``RuntimeWarning`` per callback and lets
training go on (unmonitored if attaching failed).
"""

from __future__ import annotations

import warnings
from types import TracebackType
from typing import Any, Callable

import torch

from batchmon.agent import accounting
from batchmon.agent import handle as agent

BatchSizeFn = Callable[..., "int | None"]


class Session:
    """One callback's use of the agent: its settings, the handle, and whether this callback attached it."""

    def __init__(self, owner: str, *, name: str | None, activation_every: int | None,
                 socket_dir: Any, batch_size_fn: BatchSizeFn | None) -> None:
        self.owner = owner
        self.name = name
        self.activation_every = activation_every
        self.socket_dir = socket_dir
        self.user_batch_size_fn = batch_size_fn
        self.handle: agent.AgentHandle | None = None
        self.owned = False  # True when this callback created the agent, so it also detaches it
        self.errors: list[str] = []  # every swallowed error, "where: Type: message"

    def start(self, model: torch.nn.Module | None, optimizer: torch.optim.Optimizer | None,
              batch_size_fn: BatchSizeFn) -> agent.AgentHandle:
        """Attach (or adopt an agent already attached, e.g. by ``batchmon run``) with this model and optimizer."""
        self.owned = agent.current() is None
        self.handle = agent.attach(model, base_optimizer(optimizer), name=self.name,
                                   batch_size_fn=self.user_batch_size_fn or batch_size_fn,
                                   activation_every=self.activation_every, socket_dir=self.socket_dir)
        return self.handle

    def stop(self) -> None:
        """Detach, if this callback attached the agent; an agent someone else attached stays."""
        handle, owned = self.handle, self.owned
        self.owned = False
        if handle is not None and owned and agent.current() is handle:
            handle.detach()

    def guard(self, where: str) -> "_Guard":
        return _Guard(self, where)

    def report(self, where: str, exc: BaseException) -> None:
        self.errors.append(f"{where}: {type(exc).__name__}: {exc}")
        if len(self.errors) == 1:
            warnings.warn(f"batchmon: {self.owner}.{where} failed ({type(exc).__name__}: {exc}); "
                          "training continues", RuntimeWarning, stacklevel=3)


class _Guard:
    """``with session.guard("hook"):`` - an Exception inside is reported (once) and swallowed."""

    def __init__(self, session: Session, where: str) -> None:
        self.session = session
        self.where = where

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> bool:
        if exc is None or not isinstance(exc, Exception):
            return False  # KeyboardInterrupt and friends are not ours to swallow
        try:
            self.session.report(self.where, exc)
        except Exception:  # noqa: BLE001 - even a failing warnings filter must not reach the trainer
            pass
        return True


def base_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer that really steps: through accelerate's ``AcceleratedOptimizer`` (``.optimizer``) and
    Lightning's ``LightningOptimizer`` (``._optimizer``). The agent counts a step when the optimizer it was
    given steps, and a wrapper's step only calls the inner one's."""
    for _ in range(8):
        inner = getattr(optimizer, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            inner = getattr(optimizer, "_optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer) or inner is optimizer:
            break
        optimizer = inner
    return optimizer if isinstance(optimizer, torch.optim.Optimizer) else None


def batch_size_of(batch: Any) -> int | None:
    """Leading dimension of the first tensor in a batch (tensors inside tuples, lists, dicts), None without one."""
    return accounting.first_batch_size((batch,), {})
