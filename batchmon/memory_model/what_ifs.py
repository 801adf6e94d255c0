"""What-ifs applied to the fitted component lines, each with the assumptions it rests on."""

from __future__ import annotations

from batchmon.formulas import OPTIMIZER_STATES, optimizer_kind
from batchmon.memory_model.observations import FIXED, Line, ParamLayout, SavedSplit
from batchmon.memory_model.prediction import WhatIf

DEFAULT_CHECKPOINT_LAYERS = 12


def apply_what_if(observed: dict[str, Line], what_if: WhatIf, *, trainable_bytes: float, state_bytes: float,
                  observed_amp: bool, split: SavedSplit | None = None,
                  layout: ParamLayout | None = None) -> tuple[dict[str, Line], list[str]]:
    """The component lines under ``what_if``, and the assumptions each change rests on. ``split``: the measured
    make-up of the saved activations; where it has what a what-if needs, the what-if is derived from it.
    ``layout``: how the parameters split into FSDP units (the sharding what-if's gathered bytes)."""
    lines = dict(observed)
    notes: list[str] = []
    if what_if.optimizer is not None:
        kind = optimizer_kind(what_if.optimizer)
        if kind is None:
            raise ValueError(f"unknown optimizer {what_if.optimizer!r} (expected one of {', '.join(OPTIMIZER_STATES)})")
        lines["optimizer"] = Line(OPTIMIZER_STATES[kind] * state_bytes, 0.0)
        notes.append(f"optimizer {kind}: {OPTIMIZER_STATES[kind]} state(s) per trainable parameter of the measured "
                     f"state size; the old optimizer's temporaries in 'other' kept")
    if what_if.amp and not observed_amp:
        act = lines["activations"]
        share = split.amp_share() if split is not None else None
        if share is not None and split is not None:
            # measured: the same forward under autocast saved `share` of the bytes; applied to the per-sample
            # part, and the 16-bit weight copies (already inside the measured bytes) added once more as fixed:
            # counted twice, on the safe side
            lines["activations"] = Line(act.fixed * share + 0.5 * trainable_bytes, act.per_sample * share)
            notes.append(f"amp: saved activations x{share:.2f} as measured under autocast at batch {split.batch} "
                         f"(+16-bit weight copies, half the trainable bytes); fp32 master weights, gradients and "
                         f"optimizer kept; activation gradients assumed not to shrink")
        else:
            # what autocast lowers is not measured (which saved tensors feed matmuls, which stay fp32): no shrink
            # is assumed, only what is sure to be added - the 16-bit weight copies saved for backward
            lines["activations"] = Line(act.fixed + 0.5 * trainable_bytes, act.per_sample)
            notes.append("amp: fp32 master weights, gradients and optimizer kept; +16-bit weight copies (half the "
                         "trainable bytes); saved activations and activation gradients assumed not to shrink "
                         "(autocast keeps softmax, norms and upcast logits in fp32 and saves a cast tensor in both "
                         "dtypes where an fp32 op feeds a 16-bit one): a lower bound of the gain")
    if what_if.checkpointing:
        n = what_if.checkpoint_layers or (split.blocks if split is not None and split.blocks else None) \
            or DEFAULT_CHECKPOINT_LAYERS
        share = split.checkpoint_share(n) if split is not None else None
        if share is not None and split is not None:
            lines["activations"] = lines["activations"].scaled(share, share)
            notes.append(f"checkpointing: {n} blocks; activations x{share:.2f} as measured at batch {split.batch}: "
                         f"what is saved outside the blocks and the blocks' inputs kept, one block's internals "
                         f"recomputed at a time; activation gradients ('other') unchanged")
        else:
            factor = min(1.0, 3.0 / n)
            lines["activations"] = lines["activations"].scaled(factor, factor)
            assumed = "" if what_if.checkpoint_layers else " assumed"
            notes.append(f"checkpointing: {n} blocks{assumed}; activations x{factor:.2f}: the block inputs kept, one "
                         f"block recomputed at a time, and the activations outside the blocks (embeddings, logits, "
                         f"loss) at most one block's worth; activation gradients ('other') unchanged")
    if what_if.shards > 1:
        n = what_if.shards
        for name in FIXED:
            lines[name] = lines[name].scaled(1.0 / n, 1.0 / n)
        # FSDP2 (fully_shard) gathers a unit's parameters into a new unsharded buffer beside the local shards and
        # frees it after the unit's forward (and again after its backward); the unit's gradients are created
        # unsharded and copied into a reduce-scatter buffer before only the shard is kept. The root unit is not
        # resharded after forward and its gradients are reduce-scattered last, so both live through backward.
        # At once: the root, the block computed and the one prefetched - as parameters and as gradients.
        if layout is not None:
            gathered = min(float(layout.gathered()), trainable_bytes)
            how = (f"the gathered parameters and unsharded gradients of the root ({layout.root / 2**20:.0f} MiB) "
                   f"and two blocks (the largest: {layout.largest_unit / 2**20:.0f} MiB of {layout.units}) added "
                   f"to both")
        else:
            gathered = trainable_bytes
            how = ("how the model is wrapped is not known: the whole model's parameters and gradients counted "
                   "unsharded once more beside the shards (no wrapping gathers more at once; an upper bound)")
        lines["parameters"] = lines["parameters"] + Line(gathered, 0.0)
        lines["gradients"] = lines["gradients"] + Line(gathered, 0.0)
        notes.append(f"sharded over {n} GPUs (FSDP2/ZeRO-3): parameters, gradients and optimizer state / {n} per "
                     f"GPU; {how}; activations per GPU unchanged (the batch is per GPU); communication buffers "
                     f"outside the allocator not counted")
    if what_if.accumulation_steps > 1:
        notes.append(f"{what_if.accumulation_steps} accumulation steps: activations follow the micro-batch, "
                     f"gradients and optimizer state the full batch")
    return lines, notes
