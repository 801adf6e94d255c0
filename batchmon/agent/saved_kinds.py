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

Pure helpers: ``repeated_blocks(model)`` finds the blocks; ``dtype_kind`` classifies one saved tensor.

Call site: batchmon.agent.saved_split (``checkpoint_blocks`` falls back to ``repeated_blocks``; its
``BlockSplitMeter`` attributes the saved bytes to the blocks with forward pre/post hooks for one sampled forward
per process); what autocast would lower is measured there from the autograd graph.
"""

from __future__ import annotations


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
