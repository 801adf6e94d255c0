"""Which dimension of the model's input is the batch, and where that answer comes from (issue 12, point 3).

In order: the user's ``batch_size_fn``; a ``PackedSequence`` input (its first ``batch_sizes`` entry); an
explicit dimension (``attach(batch_dim=N)``, ``BATCHMON_BATCH_DIM``, ``batchmon run --batch-dim N``); a
dimension learned from the model's own sequence-first modules (an ``nn.LSTM``/``GRU``/``RNN``,
``nn.Transformer*`` layer or ``nn.MultiheadAttention`` with ``batch_first=False`` reads its batch from dim 1 of
what it is given: the first forwards are watched, and the input dimension of that size is the batch), or from
the targets given to the loss module (on the first steps: when their leading dimension is not the input's dim 0
but exactly one other input dimension, that one is the batch - a sequence-first classifier); else
dim 0 of the first tensor input (positional, then keyword, inside tuples, lists, dicts and tokenizer outputs).
Each answer carries its source, sent with every step as ``batch_source`` (e.g. ``"input dim 1 (LSTM
batch_first=False)"``).
"""

from __future__ import annotations

import operator
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch.nn.utils.rnn import PackedSequence


from batchmon.agent.torch_patches import eager

ENV_BATCH_DIM = "BATCHMON_BATCH_DIM"
_SEQ_FIRST = (torch.nn.RNNBase, torch.nn.MultiheadAttention, torch.nn.TransformerEncoderLayer,
              torch.nn.TransformerDecoderLayer, torch.nn.Transformer)


@dataclass(frozen=True)
class BatchSize:
    size: int | None
    source: str | None


def seq_first_modules(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """The model's modules that take (sequence, batch, ...) inputs, by id."""
    found: dict[int, torch.nn.Module] = {}
    for module in model.modules():
        if isinstance(module, _SEQ_FIRST) and getattr(module, "batch_first", None) is False:
            found[id(module)] = module
    return found


def _packed(inputs: Any) -> PackedSequence | None:
    for value in (inputs if isinstance(inputs, (list, tuple)) else (inputs,)):
        if isinstance(value, PackedSequence):
            return value
    return None


def _module_batch(module: torch.nn.Module, args: tuple[Any, ...]) -> int | None:
    """The batch size a sequence-first module sees in its first argument."""
    if not args:
        return None
    first = args[0]
    if isinstance(first, PackedSequence):
        return int(first.batch_sizes[0]) if first.batch_sizes.numel() else None
    if isinstance(first, torch.Tensor) and first.dim() == 3:
        return int(first.shape[1])
    return None


class BatchSizer:
    """The batch size of each root forward, learning a sequence-first layout from the model's modules."""

    def __init__(self, fn: Callable[..., Any] | None, dim: int | None, dim_origin: str | None,
                 warn: Callable[[str, str], None]) -> None:
        self.fn = fn
        self.dim = dim
        self.dim_origin = dim_origin
        self.learned: tuple[int, str] | None = None
        self._warn = warn
        self._candidates: dict[int, torch.nn.Module] = {}
        self._probe: Any = None
        self._probe_left = 0
        self._seen: int | None = None  # batch a sequence-first module saw in this forward
        self._seen_module = ""
        self._shape: tuple[int, ...] | None = None
        self._target_checks = 3

    def use_model(self, model: torch.nn.Module) -> None:
        self._candidates = seq_first_modules(model)
        self.learned = None
        self._probe_left = 3 if self._candidates else 0

    def measure(self, args: tuple[Any, ...], kwargs: dict[str, Any], inputs: list[torch.Tensor]) -> BatchSize:
        """At the root forward's start."""
        first = None
        for t in inputs:
            if t.dim() >= 1:
                first = t
                break
        self._shape = first.shape if first is not None else None  # a torch.Size: already an immutable tuple
        if self.fn is not None:
            try:
                value = self.fn(*args, **kwargs)
                return BatchSize(int(value) if value is not None else None, "batch_size_fn")
            except Exception as exc:  # noqa: BLE001 - the user's function failed: fall back, say so once
                self._warn("batch_size_fn", f"batch_size_fn failed ({type(exc).__name__}: {exc}); "
                                            "finding the batch dimension instead")
        packed = None
        if kwargs or len(inputs) != len(args) or not all(map(operator.is_, inputs, args)):  # not just tensors
            packed = _packed(args) or (_packed(list(kwargs.values())) if kwargs else None)
        if packed is not None and packed.batch_sizes.numel():
            return BatchSize(int(packed.batch_sizes[0]), "packed sequence")
        shape = self._shape
        if shape is None:
            return BatchSize(None, None)
        if self.dim is not None and self.dim < len(shape):
            return BatchSize(int(shape[self.dim]), f"input dim {self.dim} ({self.dim_origin})")
        if self.learned is not None and self.learned[0] < len(shape):
            return BatchSize(int(shape[self.learned[0]]), f"input dim {self.learned[0]} ({self.learned[1]})")
        size = shape[0]
        found = _DIM0.get(size)
        if found is None:
            found = BatchSize(int(size), "input dim 0")
            if len(_DIM0) < 4096:
                _DIM0[size] = found
        return found

    # ---------------------------------------------------------------------------------------- learning

    def start_probe(self) -> None:
        """Watch this forward's sequence-first modules (only while the layout is unknown, first forwards)."""
        if self._probe_left <= 0 or self.fn is not None or self.dim is not None or self._probe is not None:
            return
        from batchmon.agent import global_hooks

        self._probe_left -= 1
        self._seen = None
        self._probe = global_hooks.forward_pre(_probe_hook)
        _probing.append(self)

    def stop_probe(self) -> BatchSize | None:
        """At the root forward's end: the corrected batch size when a layout was learned now."""
        probe, self._probe = self._probe, None
        if probe is None:
            return None
        probe.remove()
        if self in _probing:
            _probing.remove(self)
        seen, shape = self._seen, self._shape
        if seen is None or shape is None:
            return None
        self._probe_left = 0  # a sequence-first module ran: its answer stands
        if shape[0] == seen:
            return None  # dim 0 is (or is as large as) the batch: nothing to correct
        for dim, size in enumerate(shape[1:], start=1):
            if size == seen:
                self.learned = (dim, f"{self._seen_module} batch_first=False")
                return BatchSize(int(size), f"input dim {dim} ({self.learned[1]})")
        return None

    def observe_targets(self, targets: list[torch.Tensor]) -> BatchSize | None:
        """The loss module's targets (first steps, nothing else known): a corrected batch size, or None."""
        if self._target_checks <= 0 or self.fn is not None or self.dim is not None or self.learned is not None:
            return None
        self._target_checks -= 1
        shape = self._shape
        first = next((t for t in targets if t.dim() >= 1), None)
        if shape is None or first is None or len(shape) < 2 or shape[0] == first.shape[0]:
            return None
        matches = [dim for dim, size in enumerate(shape[1:], start=1) if size == first.shape[0]]
        if len(matches) != 1:
            return None
        self.learned = (matches[0], "matches the targets")
        self._probe_left = 0
        return BatchSize(int(first.shape[0]), f"input dim {matches[0]} (matches the targets)")

    def _observe(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if self._seen is None and id(module) in self._candidates:
            batch = _module_batch(module, args)
            if batch is not None:
                self._seen, self._seen_module = batch, type(module).__name__


_probing: list[BatchSizer] = []
_DIM0: dict[int, BatchSize] = {}  # the common answer, made once per size (a frozen dataclass costs us a step)


@eager
def _probe_hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
    try:
        for sizer in _probing:
            sizer._observe(module, args)
    except Exception:  # noqa: BLE001 - a probe never breaks the forward
        pass


def env_batch_dim() -> tuple[int, str] | None:
    """(dim, origin) from BATCHMON_BATCH_DIM (set by ``batchmon run --batch-dim``); a bad value is one warning."""
    try:
        dim, origin = explicit_dim(os.environ.get(ENV_BATCH_DIM), ENV_BATCH_DIM)
    except ValueError:
        sys.stderr.write(f"batchmon: {ENV_BATCH_DIM}={os.environ.get(ENV_BATCH_DIM)!r} is not an integer >= 0; "
                         "finding the batch dimension instead\n")
        return None
    return (dim, origin) if dim is not None and origin is not None else None


def explicit_dim(value: Any, origin: str) -> tuple[int | None, str | None]:
    """(dim, origin) from attach(batch_dim=) or the environment; (None, None) when not given."""
    if value is None or value == "":
        return None, None
    dim = int(value)
    if dim < 0:
        raise ValueError(f"batch dimension must be >= 0, got {value!r}")
    return dim, origin



