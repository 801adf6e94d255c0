"""The allocations of one training step under activation checkpointing (a checkpoint per block), synthesised from
what the agent measured in the user's own (plain) run, for the caching allocator's model (``step_trace``,
``allocator_sim``): the checkpointing what-if's pool derived from the run, not assumed.

The agent's split carries, measured once on a sampled forward (batchmon.agent.saved_split.BlockSplitMeter
.sequence), each checkpointed block's saved storages in creation order, its hidden-state input and its parameters'
storages, the saved bytes outside the blocks between them, and the model output's bytes. A checkpointed step asks
the allocator for (sizes per sample as measured at the split's batch, a storage shaped as one sample's fixed):

* before the step: the parameters and the optimizer's state (``persistent``; gradients set to None);
* forward: the saved bytes before the first block (kept); per block, under no_grad, its saved storages as
  transients (each freed once the next two are made: a chain of ops) and its output (the next block's input, kept
  by that block's checkpoint); the saved bytes outside between blocks and after the last (kept); the output (the
  logits) and the loss's log-softmax of it (kept), the logits then freed (held by nothing but the graph);
* the loss's backward: two output-sized gradients (nll's, log-softmax's), the log-softmax freed; the head's
  backward: the last hidden state's gradient and the outside parameters' gradients, the output's gradient and the
  saved bytes after the blocks freed;
* the model's backward, per block in reverse: the block recomputed (its saved storages, all kept, and its output),
  its parameters' gradients, then its backward op by op in reverse: a gradient the size of each saved storage made
  as the one before is freed, the saved storage freed; the input's gradient, the block's kept input freed;
* the optimizer's step: a parameter-sized temporary per parameter (a foreach optimizer's sqrt of its second
  moment), freed.

Assumptions: fp32 output and loss, one stream, gradients the size of what their op saved, no transients beyond the
saved storages (kernel scratch, a no_grad op's unsaved output); the blocks' inputs other than the hidden states
(T5's position biases, the encoder's output) inside the saved bytes outside the blocks. Validated against the real
checkpointed step recorded op by op (bench/ckpt_fragmentation.py --synth).
"""

from __future__ import annotations

from typing import Any

from batchmon.memory_model.step_trace import FREE, StepTrace


#: the transients alive at once in a block's forward under no_grad (each freed once this many more are made)
WINDOW = 3


class _Builder:
    def __init__(self, batch: int) -> None:
        self.batch = max(1, batch)
        self.events: list[tuple[int, float, float]] = []
        self._next = 0

    def alloc(self, measured: int | float, fixed: bool = False) -> int | None:
        """An allocation of ``measured`` bytes at the split's batch (per sample, unless ``fixed``); None for 0."""
        if measured == 0:
            return None
        key = self._next
        self._next += 1
        size = abs(float(measured))
        fixed = fixed or measured < 0
        self.events.append((key, size, 0.0) if fixed else (key, 0.0, size / self.batch))
        return key

    def free(self, key: int | None) -> None:
        if key is not None:
            self.events.append((key, FREE, 0.0))


def synthesise(seq: dict[str, Any], batch: int, output: int, parameters: int, optimizer: int,
               trainable: int | None = None, window: int = WINDOW) -> StepTrace | None:
    """The checkpointed step's allocations from the split's ``block_seq`` (measured at ``batch``), the output's
    bytes there, and the parameters' and optimizer state's bytes (the fitted fixed lines). None where the
    sequence is not usable."""
    try:
        kinds = [(int(k[0]), [int(v) for v in k[1]], [int(v) for v in k[2]]) for k in seq["kinds"]]
        order = [(int(o[0]), int(o[1]), int(o[2]) if len(o) > 2 else 0) for o in seq["order"]]
        before, after = int(seq.get("before", 0)), int(seq.get("after", 0))
    except (KeyError, TypeError, ValueError, IndexError):
        return None
    if not kinds or not order or batch < 1 or any(not 0 <= k < len(kinds) for k, _, _ in order):
        return None
    blocks = [kinds[k] for k, _, _ in order]
    block_params = [p for _, _, params in blocks for p in params]
    outside_params = max(0, (trainable if trainable is not None else parameters) - sum(block_params))
    param_list = block_params + ([outside_params] if outside_params else [])
    states = round(optimizer / parameters) if parameters > 0 else 0
    frozen = max(0, parameters - sum(param_list))
    persistent = [s for s in ([frozen] if frozen else []) + param_list * (1 + states) if s > 0]

    b = _Builder(batch)
    kept: list[int | None] = [b.alloc(before)]
    inputs: list[int | None] = []
    gaps: list[int | None] = []
    hidden = blocks[0][0]
    current = b.alloc(hidden)  # the first block's input
    for (_, gap, fixed), (own_in, saved, _) in zip(order, blocks, strict=True):
        gaps.append(b.alloc(gap))
        kept.append(b.alloc(fixed, fixed=True))
        if own_in != hidden:  # another stack (T5's decoder): its input made outside, the last output let go
            b.free(current)
            current = b.alloc(own_in)
            hidden = own_in
        inputs.append(current)
        live: list[int | None] = []
        for size in saved:  # the block's forward under no_grad: a chain of transients
            live.append(b.alloc(size))
            if len(live) > window:
                b.free(live.pop(0))
        current = b.alloc(own_in)  # its output: the next block's kept input
        for key in live:
            b.free(key)
    kept.append(b.alloc(after))
    last_out = current
    logits = b.alloc(output)
    logp = b.alloc(output)  # the loss's log-softmax of the (fp32) output, saved for its backward
    b.free(logits)
    b.free(last_out)  # the last block's output: only the head's saved input (in ``after``) holds on
    # the loss's backward
    g1 = b.alloc(output)
    g2 = b.alloc(output)
    b.free(g1)
    b.free(logp)
    grad = b.alloc(blocks[-1][0])  # the last hidden state's gradient
    b.alloc(outside_params, fixed=True)  # the head's (tied embedding's) gradient, kept
    b.free(g2)
    b.free(kept.pop())
    # the model's backward: each block recomputed, then differentiated op by op
    for i in range(len(blocks) - 1, -1, -1):
        own_in, saved, params = blocks[i]
        recomputed = [b.alloc(size) for size in saved]
        out = b.alloc(own_in)
        for p in params:
            b.alloc(p, fixed=True)
        prev = grad
        for key, size in zip(reversed(recomputed), reversed(saved), strict=True):
            g = b.alloc(size)
            b.free(prev)
            b.free(key)
            prev = g
        grad = b.alloc(own_in)
        b.free(prev)
        b.free(out)
        b.free(inputs[i])
        b.free(gaps[i])
    b.free(grad)
    for key in kept:
        b.free(key)
    temps = [b.alloc(p, fixed=True) for p in param_list]  # the optimizer's step
    for key in temps:
        b.free(key)
    return StepTrace(tuple(persistent), tuple(b.events))
