"""Per-component byte counting: what each byte of training memory is (DESIGN.md, "Components").

The unit is the storage, not the tensor: tensors that share memory (tied weights, views, q/k/v split from one
projection, the transposed weight a Linear saves) are one storage and are counted once, keyed by the storage's
base pointer on the agent's device. Tensors on other devices are not counted (a CUDA model's CPU-side
``step`` counters in Adam's state, for instance, are host memory).

Sizes: on CUDA each storage is rounded up to the caching allocator's 512-byte block granularity, which is what
it occupies and what ``torch.cuda.memory_allocated()`` counts; elsewhere the storage's own size.

Activations are the bytes saved for backward while the agent counts (see ActivationCounter): storages the
autograd graph holds, minus parameter and batch storages. Under autocast the low-precision weight copies a
layer saves for backward are new storages and count as activations; with torch.utils.checkpoint only what
the checkpoint saves in forward (its inputs) counts, since recomputation happens in backward.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch

from batchmon.protocol import COMPONENTS

CUDA_BLOCK_BYTES = 512  # CUDACachingAllocator rounds every block up to a multiple of this


def round_up(n: int, block: int) -> int:
    return -(-n // block) * block if block > 1 else n


def device_matcher(device: torch.device) -> Callable[[torch.Tensor], bool]:
    """A fast 'is this tensor on the agent's device' test (torch.device equality is slow per tensor)."""
    if device.type == "cpu":
        return lambda t: t.is_cpu
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return lambda t: t.is_cuda and t.get_device() == index
    return lambda t: t.device == device


class StorageSet:
    """Distinct storages on one device and their bytes; storages in ``exclude`` (keys) are never counted."""

    __slots__ = ("on_device", "block", "keys", "bytes", "exclude")

    def __init__(self, device: torch.device, exclude: Iterable[set[int]] = (),
                 matcher: Callable[[torch.Tensor], bool] | None = None) -> None:
        self.on_device = matcher or device_matcher(device)
        self.block = CUDA_BLOCK_BYTES if device.type == "cuda" else 1
        self.keys: set[int] = set()
        self.bytes = 0
        self.exclude = tuple(exclude)

    def add(self, t: Any) -> int:
        """Count t's storage once; returns the bytes newly counted (0 for a duplicate, foreign or odd tensor)."""
        if not isinstance(t, torch.Tensor) or not self.on_device(t):
            return 0
        try:
            storage = t.untyped_storage()
            key = storage.data_ptr()
            size = storage.nbytes()
        except (RuntimeError, NotImplementedError, TypeError, AttributeError, ValueError):
            local = getattr(t, "_local_tensor", None)  # a DTensor (FSDP2's sharded parameters): this rank's shard
            if isinstance(local, torch.Tensor) and local is not t:
                return self.add(local)
            return 0  # sparse, nested, fake, functional or lazy (uninitialised) tensors have no plain storage
        if size == 0 or key == 0 or key in self.keys:
            return 0
        for excluded in self.exclude:
            if key in excluded:
                return 0
        self.keys.add(key)
        block = self.block
        if block > 1:
            size = -(-size // block) * block
        self.bytes += size
        return size

    def add_all(self, tensors: Iterable[Any]) -> int:
        added = 0
        for t in tensors:
            added += self.add(t)
        return added

    def reset(self) -> "StorageSet":
        """Empty again, for the next step (a new key set: whoever kept the old one keeps its contents)."""
        self.keys = set()
        self.bytes = 0
        return self


def iter_tensors(obj: Any, depth: int = 3) -> Iterator[torch.Tensor]:
    """Tensors in a forward's arguments: the object itself, or inside tuples, lists and dicts (depth-limited)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth > 0:
        if isinstance(obj, dict):
            for value in obj.values():
                yield from iter_tensors(value, depth - 1)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from iter_tensors(value, depth - 1)
        elif hasattr(obj, "keys") and hasattr(obj, "__getitem__") and not isinstance(obj, (str, bytes)):
            try:  # BatchEncoding-like mappings
                for key in list(obj.keys())[:64]:
                    yield from iter_tensors(obj[key], depth - 1)
            except Exception:  # noqa: BLE001 - a strange mapping is just not a batch
                return


def tensors_in(obj: Any, depth: int = 4) -> list[torch.Tensor]:
    """``list(iter_tensors(obj, depth))``, with the usual case - a tuple of tensors - taken without generators."""
    if type(obj) is tuple:
        for value in obj:
            if not isinstance(value, torch.Tensor):
                break
        else:
            return list(obj)
    return list(iter_tensors(obj, depth))


def first_batch_size(args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
    """Leading dimension of the first tensor input (positional first, then keyword), None if there is none."""
    for t in iter_tensors((args, kwargs), depth=4):
        if t.dim() >= 1:
            return int(t.shape[0])
    return None


def _unique_params(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    yield from model.parameters()  # nn.Module de-duplicates tied parameters by identity
    yield from model.buffers()


def parameter_storages(model: torch.nn.Module | None, device: torch.device,
                       extra_params: Iterable[torch.Tensor] = ()) -> StorageSet:
    """Parameters and buffers of the model (plus optimizer parameters the model may not own)."""
    found = StorageSet(device)
    if model is not None:
        found.add_all(_unique_params(model))
    found.add_all(extra_params)
    return found


def parameters_of(model: torch.nn.Module | None, optimizers: Iterable[torch.optim.Optimizer]) -> list[torch.Tensor]:
    params: list[torch.Tensor] = list(model.parameters()) if model is not None else []
    for opt in optimizers:
        for group in opt.param_groups:
            params.extend(group["params"])
    return params


def gradient_storages(params: Iterable[torch.Tensor], device: torch.device, exclude: set[int]) -> StorageSet:
    """``.grad`` of every parameter, storages de-duplicated."""
    found = StorageSet(device, (exclude,))
    for p in params:
        g = p.grad
        if g is not None:
            found.add(g)
    return found


def optimizer_storages(optimizers: Iterable[torch.optim.Optimizer], device: torch.device,
                       exclude: set[int]) -> StorageSet:
    """Every tensor in ``optimizer.state`` (exp_avg, exp_avg_sq, momentum_buffer, ...), de-duplicated."""
    found = StorageSet(device, (exclude,))
    for opt in optimizers:
        for state in list(opt.state.values()):
            found.add_all(iter_tensors(state, depth=2))
    return found


def has_lazy(model: torch.nn.Module) -> bool:
    """Whether some parameter is still uninitialised (a LazyLinear before its first forward)."""
    return any(torch.nn.parameter.is_lazy(p) for p in model.parameters())


def parameter_count(model: torch.nn.Module) -> tuple[int, int]:
    """(number of parameters, their bytes as stored on their device), tied weights once; lazy ones not yet."""
    params = [p for p in model.parameters() if not torch.nn.parameter.is_lazy(p)]
    device = next((p.device for p in params), torch.device("cpu"))
    bytes_ = StorageSet(device).add_all(params)
    return sum(p.numel() for p in params), bytes_


class _Outer:
    """What the saved-tensor hooks in force before ours packed (a user's offloading hook, ``save_on_cpu``): ours
    count the tensor and hand it on, so that pair still packs and unpacks it."""

    __slots__ = ("unpack", "packed")

    def __init__(self, unpack: Any, packed: Any) -> None:
        self.unpack, self.packed = unpack, packed


# the innermost saved-tensor hooks in force (torch's private query; without it no outer pair is seen)
_top_saved_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


class ActivationCounter:
    """Counts bytes saved for backward while active, as a ``saved_tensors_hooks`` pack hook.

    Only the innermost saved-tensor hooks apply, so inside a non-reentrant checkpoint region the checkpoint's
    own hooks take over (and what it keeps - its inputs - is counted by ours). A pair already in force when
    counting starts (the script's own: ``save_on_cpu``, an offloading hook) would be displaced by ours for the
    sampled step - its tensors kept where the script moved them away from - so ours count and pass each tensor to
    it (``_Outer``): the script's pair packs and unpacks as without the agent; the tensor is counted at its size
    when saved (an offloading pair's device bytes are counted as if kept: conservative). The pack hook returns a
    detached alias otherwise: returning the tensor itself would make a saved output hold its own grad_fn, a
    reference cycle that keeps the graph alive until the garbage collector runs.
    """

    def __init__(self, device: torch.device, exclude: Iterable[set[int]]) -> None:
        self.saved = StorageSet(device, exclude)
        self.errors = 0
        self._ctx: Any = None
        self._outer: tuple[Any, Any] | None = None  # the pair in force when counting started, if any

    @property
    def bytes(self) -> int:
        return self.saved.bytes

    def _pack(self, t: torch.Tensor) -> Any:
        try:
            self.saved.add(t)
        except Exception:  # noqa: BLE001 - counting must never break the forward
            self.errors += 1
        outer = self._outer
        if outer is not None:
            return _Outer(outer[1], outer[0](t))  # (its errors are the script's own, as without the agent)
        return t.detach()

    @staticmethod
    def _unpack(t: Any) -> Any:
        if type(t) is _Outer:
            return t.unpack(t.packed)
        return t

    def push(self) -> None:
        """Start counting on this thread (enter the hooks). Pair with pop() on the same thread."""
        if self._ctx is None:
            try:
                self._outer = _top_saved_hooks(False) if _top_saved_hooks is not None else None
            except Exception:  # noqa: BLE001
                self._outer = None
            ctx = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
            ctx.__enter__()
            self._ctx = ctx

    def pop(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)
        self._outer = None

    @property
    def active(self) -> bool:
        return self._ctx is not None


def components(parameters: int = 0, gradients: int = 0, optimizer: int = 0, activations: int = 0, batch: int = 0,
               other: int = 0) -> dict[str, int]:
    """A components object with exactly the protocol's keys."""
    values = {"parameters": parameters, "gradients": gradients, "optimizer": optimizer,
              "activations": activations, "batch": batch, "other": other}
    return {name: int(values[name]) for name in COMPONENTS}
