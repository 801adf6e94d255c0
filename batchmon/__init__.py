"""batchmon: where does my GPU memory go, and what batch size will fit?

`batchmon.attach(model, optimizer)` starts the in-process agent; torch is imported only when it is called.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["attach", "detach", "__version__"]


def attach(model: Any = None, optimizer: Any = None, **kwargs: Any) -> Any:
    """Attach the agent to this training process (idempotent). See batchmon.agent.attach."""
    from batchmon.agent.handle import attach as _attach

    return _attach(model, optimizer, **kwargs)


def detach() -> None:
    """Detach the agent, if attached."""
    from batchmon.agent.handle import detach as _detach

    _detach()
