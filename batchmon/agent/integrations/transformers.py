"""Hugging Face callback: ``Trainer(..., callbacks=[BatchmonCallback()])`` attaches the batchmon agent.

At ``on_train_begin`` it attaches with the ``model`` and ``optimizer`` the Trainer hands its callbacks (the
torch optimizer inside accelerate's wrapper: that is the one whose step ends a training step); at
``on_train_end`` it detaches, unless the agent was already attached before (``batchmon run``,
``batchmon.attach()``), which it then leaves as it was.

Batch size: the per-device micro-batch, the batch in memory at once - gradient accumulation and the number of
devices multiply what an optimizer step sees, not what one forward holds. Taken from the leading dimension of
the first tensor the model's forward receives (``input_ids`` and the like: also the short last batch and
``auto_find_batch_size``'s retries), else ``args.per_device_train_batch_size``.
"""

from __future__ import annotations

import importlib.util
from typing import Any

if importlib.util.find_spec("transformers") is None:
    raise ImportError("batchmon.agent.integrations.transformers needs Hugging Face transformers, which is not "
                      "installed: pip install transformers")

from transformers import TrainerCallback  # noqa: E402 - after the check that names the pip command

from batchmon.agent.integrations._session import BatchSizeFn, Session, batch_size_of  # noqa: E402


class BatchmonCallback(TrainerCallback):
    """Attach the batchmon agent for the duration of ``trainer.train()``.

    ``name``: the job's name in the monitor. ``activation_every``: count activations every N-th step (the
    agent's default otherwise). ``socket_dir``: where the agent's socket goes (default: batchmon's).
    ``batch_size_fn``: called with the model's forward arguments, returns the batch size (default: see the
    module docstring).
    """

    def __init__(self, *, name: str | None = None, activation_every: int | None = None, socket_dir: Any = None,
                 batch_size_fn: BatchSizeFn | None = None) -> None:
        self.session = Session("BatchmonCallback", name=name, activation_every=activation_every,
                               socket_dir=socket_dir, batch_size_fn=batch_size_fn)
        self._per_device: int | None = None

    @property
    def handle(self) -> Any:
        """The agent handle (``.steps``, ``.suggest_batch_size()``), None before training started."""
        return self.session.handle

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        with self.session.guard("on_train_begin"):
            size = getattr(args, "per_device_train_batch_size", None)
            self._per_device = size if isinstance(size, int) and size > 0 else None
            self.session.start(model, optimizer, self._batch_size_fn)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        with self.session.guard("on_train_end"):
            self.session.stop()

    def _batch_size_fn(self, *args: Any, **kwargs: Any) -> int | None:
        size = batch_size_of((args, kwargs))
        return size if size is not None else self._per_device
