"""Lightning callback: ``Trainer(callbacks=[BatchmonCallback()])`` attaches the batchmon agent to the run.

At ``on_train_start`` (after the strategy moved the model and built the optimizers, after the sanity check) it
attaches with the LightningModule and the trainer's first optimizer; at ``on_fit_end`` it detaches, unless the
agent was already attached before (``batchmon run``, ``batchmon.attach()``), which it then leaves as it was.
After an exception it leaves the agent attached so that an OOM event still reaches a monitor.

Batch size: the leading dimension of the first tensor of the batch Lightning hands to ``on_train_batch_start``
(the real micro-batch, also the short last one), else the train dataloader's ``batch_size``.

Why the training step is routed through the module's forward: the agent sees a step's batch and activations
from the model's forward hooks, and a ``training_step`` that calls ``self.net(x)`` never runs the
LightningModule's own forward. Under DDP, FSDP or DeepSpeed Lightning already calls ``training_step`` through
the module's ``__call__`` (its forward redirection); on a single device this callback does the same for the
run, so the whole ``training_step`` (forward and loss) is the agent's root forward and the batch Lightning
passes in is the step's batch. Not routed (the agent then sees the module's own forward, when it runs): manual
optimization, ``route_training_step=False``, and a LightningModule carrying forward hooks of its own (they
expect the forward's arguments). The routing is removed at the end of the fit, also after an exception.

Imports ``lightning.pytorch``, else ``pytorch_lightning``; the callback works with either package's Trainer.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from typing import Any, Callable


def _import_lightning() -> Any:
    for name in ("lightning.pytorch", "pytorch_lightning"):
        if importlib.util.find_spec(name.split(".")[0]) is not None:
            return importlib.import_module(name)  # installed but broken: its own error is the useful one
    raise ImportError("batchmon.agent.integrations.lightning needs Lightning, which is not installed: "
                      "pip install lightning")


pl = _import_lightning()

from batchmon.agent.integrations._session import BatchSizeFn, Session, batch_size_of  # noqa: E402 - after the check

_MISSING = object()


class BatchmonCallback(pl.Callback):  # type: ignore[misc, name-defined]
    """Attach the batchmon agent for the duration of ``trainer.fit``.

    ``name``: the job's name in the monitor. ``activation_every``: count activations every N-th step (the
    agent's default otherwise). ``socket_dir``: where the agent's socket goes (default: batchmon's).
    ``batch_size_fn``: called with the root forward's arguments, returns the batch size (default: see the
    module docstring). ``route_training_step=False`` keeps the agent on the module's own forward.
    """

    def __init__(self, *, name: str | None = None, activation_every: int | None = None, socket_dir: Any = None,
                 batch_size_fn: BatchSizeFn | None = None, route_training_step: bool = True) -> None:
        super().__init__()
        self.session = Session("BatchmonCallback", name=name, activation_every=activation_every,
                               socket_dir=socket_dir, batch_size_fn=batch_size_fn)
        self.route_training_step = route_training_step
        self._batch_size: int | None = None
        self._loader_batch_size: int | None = None
        self._unroute: Callable[[], None] | None = None

    @property
    def handle(self) -> Any:
        """The agent handle (``.steps``, ``.suggest_batch_size()``), None before training started."""
        return self.session.handle

    # ---------------------------------------------------------------------------------------- Lightning hooks

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        with self.session.guard("on_train_start"):
            self._batch_size = None
            self._loader_batch_size = _loader_batch_size(trainer)
            optimizers = list(getattr(trainer, "optimizers", None) or [])
            handle = self.session.start(pl_module, optimizers[0] if optimizers else None, self._batch_size_fn)
            if (self.route_training_step and getattr(pl_module, "automatic_optimization", True)
                    and _only_agent_hooks(pl_module, handle)):
                self._route(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int, *args: Any) -> None:
        with self.session.guard("on_train_batch_start"):
            size = batch_size_of(batch)
            self._batch_size = size if size is not None else self._loader_batch_size

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        with self.session.guard("on_fit_end"):
            self._restore()
            self.session.stop()

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        with self.session.guard("on_exception"):
            self._restore()  # the agent stays: its OOM event and exit linger are for a monitor to see

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        with self.session.guard("teardown"):
            self._restore()

    # ---------------------------------------------------------------------------------------- helpers

    def _batch_size_fn(self, *args: Any, **kwargs: Any) -> int | None:
        """The agent asks at the root forward; the batch Lightning handed out this step answers."""
        if self._batch_size is not None:
            return self._batch_size
        return batch_size_of((args, kwargs))

    def _route(self, trainer: Any, module: Any) -> None:
        self._restore()
        original = module.__dict__.get("training_step", _MISSING)
        method = module.training_step
        strategy = getattr(trainer, "strategy", None)

        @functools.wraps(method)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            # a wrapped model (DDP, FSDP, ...) already calls training_step through the module's __call__
            if strategy is not None and getattr(strategy, "model", module) is not module:
                return method(*args, **kwargs)
            return _call_through_forward(module, method, args, kwargs)

        module.training_step = training_step

        def unroute() -> None:
            if module.__dict__.get("training_step") is training_step:
                if original is _MISSING:
                    del module.__dict__["training_step"]
                else:
                    module.__dict__["training_step"] = original

        self._unroute = unroute

    def _restore(self) -> None:
        unroute, self._unroute = self._unroute, None
        if unroute is not None:
            unroute()


def _call_through_forward(module: Any, method: Callable[..., Any], args: tuple[Any, ...],
                          kwargs: dict[str, Any]) -> Any:
    """``method(*args, **kwargs)`` called as ``module(*args, **kwargs)``, so the module's forward hooks run
    around it (Lightning's own forward redirection, with the module as its own wrapper). The real forward is
    back in place before ``method`` runs, so ``self(x)`` inside it is the model's forward."""
    saved = module.__dict__.get("forward", _MISSING)

    def put_back() -> None:
        if saved is _MISSING:
            module.__dict__.pop("forward", None)
        else:
            module.__dict__["forward"] = saved

    def forward(*a: Any, **k: Any) -> Any:
        put_back()
        return method(*a, **k)

    module.__dict__["forward"] = forward
    try:
        return module(*args, **kwargs)
    finally:
        if module.__dict__.get("forward") is forward:
            put_back()


def _only_agent_hooks(module: Any, handle: Any) -> bool:
    """Whether every forward hook on the module is the agent's: hooks of your own expect the forward's
    arguments, so with one of them the training step is not routed through the forward."""
    from batchmon.agent.torch_patches import AGENT_HOOKS

    hooks = [*module._forward_pre_hooks.values(), *module._forward_hooks.values()]
    return all(hook in AGENT_HOOKS for hook in hooks)


def _loader_batch_size(trainer: Any) -> int | None:
    try:
        size = getattr(trainer.train_dataloader, "batch_size", None)
    except Exception:  # noqa: BLE001 - no loader yet or a combined one: the batch's tensors will tell
        return None
    return size if isinstance(size, int) and size > 0 else None
