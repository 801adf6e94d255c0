"""What the saved activations are made of, for what-ifs derived from measurement (issue 13, point 2).

Two splits of the bytes saved for backward that the memory model cannot see in the activations total:

* by where they are saved: inside the model's repeated blocks (the transformer layers, a ResNet stage's
  blocks: what ``gradient_checkpointing_enable()`` or a checkpoint per block wraps) or outside them
  (embeddings, heads, logits, loss), and the bytes of the blocks' inputs (what a checkpoint keeps). With it
  the checkpointing what-if keeps ``outside + block inputs + inside / n`` (one block recomputed at a time)
  instead of assuming the outside is at most one block's worth.
* by dtype: 16-bit, fp32 and other (masks, indices). With it the AMP what-if can tell an AMP run's saved bytes
  from an fp32 run's (an observed fp32 run saves no 16-bit tensor; what autocast would lower still needs the
  producing op, which a saved-tensor hook does not see).

Pure helpers: ``repeated_blocks(model)`` finds the blocks; ``BlockMeter`` attributes the growth of a running
saved-bytes counter (the agent's ActivationCounter) to the blocks with forward pre/post hooks; ``dtype_kind``
classifies one saved tensor. Nothing here raises into the training: hooks catch their own errors.

Call site: batchmon.agent.saved_split.SplitProbe hooks the blocks with a BlockMeter for one sampled forward per
process (the agent's counter as ``read_bytes``) and reports ``take()`` in Step.saved_split (``in_blocks``,
``block_inputs``, ``blocks``); what autocast would lower is measured there from the autograd graph.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

LOW_PRECISION = (torch.float16, torch.bfloat16)


def dtype_kind(t: torch.Tensor) -> str:
    """'16-bit', 'fp32' or 'other' (fp64, integer and boolean tensors: indices, masks)."""
    if t.dtype in LOW_PRECISION:
        return "16-bit"
    if t.dtype == torch.float32:
        return "fp32"
    return "other"


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The largest run of same-class children of one ModuleList/Sequential that hold parameters (at least 2):
    the blocks a per-block checkpoint wraps. [] when the model has none (an MLP of Linear+ReLU pairs has
    Linear children of one class: those count, as a checkpoint per layer would wrap them)."""
    best: list[torch.nn.Module] = []
    for module in model.modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)):
            continue
        groups: dict[type, list[torch.nn.Module]] = {}
        for child in module.children():
            if any(True for _ in child.parameters()):
                groups.setdefault(type(child), []).append(child)
        for members in groups.values():
            if len(members) >= 2 and len(members) > len(best):
                best = members
    return best


class BlockMeter:
    """Attributes the growth of ``read_bytes()`` (saved bytes so far this step) between each block's forward
    pre and post hooks to the blocks. Nested or re-entered blocks count once (the outermost)."""

    def __init__(self, blocks: list[torch.nn.Module], read_bytes: Callable[[], int]) -> None:
        self.blocks = len(blocks)
        self._read = read_bytes
        self._inside = 0
        self._inputs = 0
        self._depth = 0
        self._start = 0
        self.errors = 0
        self._handles: list[Any] = []
        for block in blocks:
            self._handles.append(block.register_forward_pre_hook(self._pre))
            self._handles.append(block.register_forward_hook(self._post, always_call=True))

    def _pre(self, module: torch.nn.Module, args: Any) -> None:
        try:
            if self._depth == 0:
                self._start = self._read()
                self._inputs += sum(t.untyped_storage().nbytes() for t in args if isinstance(t, torch.Tensor))
            self._depth += 1
        except Exception:  # noqa: BLE001 - metering must never break the forward
            self.errors += 1

    def _post(self, module: torch.nn.Module, args: Any, result: Any) -> None:
        try:
            self._depth = max(0, self._depth - 1)
            if self._depth == 0:
                self._inside += max(0, self._read() - self._start)
        except Exception:  # noqa: BLE001
            self.errors += 1

    def take(self) -> tuple[int, int, int]:
        """(bytes saved inside the blocks, bytes of the blocks' tensor inputs - both since the last take -,
        number of blocks); resets the counts."""
        inside, self._inside = self._inside, 0
        inputs, self._inputs = self._inputs, 0
        return inside, inputs, self.blocks

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
