"""The attached agent's public read-only views (``handle.steps``, ``.model``, ``.socket_path``, ...), apart from the
wiring in batchmon.agent.handle so that module stays within its size."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from batchmon.agent.publisher import snapshot
from batchmon.protocol import Event, Step

if TYPE_CHECKING:
    from batchmon.agent.batch_dim import BatchSizer
    from batchmon.agent.publisher import Publisher
    from batchmon.agent.step_meter import StepMeter


class HandleViews:
    """What AgentHandle shows of its state (its subclass sets every attribute below)."""

    attached: bool
    _disabled: bool
    _out: "Publisher"
    _meter: "StepMeter"
    _sizer: "BatchSizer"

    @property
    def steps(self) -> list[Step]:
        """Recent step messages, oldest first (at most the last 2000; quiet steps are kept as runs, each made a Step
        here: batchmon.agent.step_runs)."""
        return self._out.steps.steps()

    @property
    def last_step(self) -> Step | None:
        return self._out.steps.last()

    @property
    def events(self) -> list[Event]:
        """Recent events (oom, alloc_retry, warning), oldest first."""
        return snapshot(self._out.events)

    @property
    def model(self) -> torch.nn.Module | None:
        return self._meter.model

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return self._meter.optimizers

    @property
    def batch_size_fn(self) -> Callable[..., int | None] | None:
        return self._sizer.fn

    @property
    def activation_every(self) -> int:
        return self._meter.activation_every

    @property
    def socket_error(self) -> str | None:
        """Why there is no socket (training continues unmonitored), None while there is no such reason."""
        return self._out.socket_error

    @property
    def _transport(self) -> Any:
        return self._out.transport

    @property
    def socket_path(self) -> Path | None:
        """The socket monitors connect to, None while there is none (not yet opened, or unusable)."""
        return self._transport.path if self._transport is not None else None

    @property
    def enabled(self) -> bool:
        return self.attached and not self._disabled

    @property
    def stats(self) -> dict[str, int]:
        t = self._out.transport
        return {"monitors": t.monitors if t else 0, "connections": t.connections if t else 0,
                "queue_dropped": t.queue_dropped if t else 0, "monitor_dropped": t.client_dropped if t else 0}
