"""What-ifs applied to the fitted component lines, each with the assumptions it rests on.

AMP and checkpointing are derived from what the agent measured when it did (``SavedSplit``: the saved bytes
inside the repeated blocks and their inputs, and what the saved tensors would take under autocast from the ops
that save them); they are then applied to each segment's measured own-peak line (forward, loss's backward,
model's backward, optimizer step: ``SegmentDelta``), because each segment holds a different part of what the
what-if changes: at the forward's end and through the loss's backward every saved tensor is alive, the model's
backward recomputes one block at a time, the optimizer's step holds no activation. Without a measurement they
fall back to documented rules that bound the gain from below (each says so).
"""

from __future__ import annotations

from batchmon.formulas import OPTIMIZER_STATES, optimizer_kind
from batchmon.memory_model.observations import FIXED, Line, ParamLayout, SavedSplit
from batchmon.memory_model.prediction import WhatIf

DEFAULT_CHECKPOINT_LAYERS = 12
MIB = 2**20
#: the segments a derived what-if changes, and those it leaves alone (the optimizer's step holds no activation)
ACTIVE_SEGMENTS = ("forward", "loss_backward", "backward")

SegmentDelta = dict[str, Line]
#: the allocator's pool beyond the peak at the OOM boundary under Hugging Face's checkpointing on the H200 (zoo run
#: 7): T5-small 24.7% of its real peak (reserved 25.76 GB for a 20.66 GB peak at 321, 31% at every smaller batch:
#: blocks of unequal size - the encoder's over 512 tokens, the decoder's over 128 - recomputed in turn, so the
#: cache holds the freed internals of one size in segments the other cannot reuse), GPT-2 3.8% (12 equal blocks).
#: Where the measured blocks are unequal and no checkpointed step was recorded to simulate the allocator on
#: (MemoryModel.recompute_trace: the derived answer), the checkpointing what-if falls back to keeping 1.2 x that
#: share of its peak free: the plain run's fragmentation (phi) says nothing about a recomputation it never did.
RECOMPUTE_FRAG = 0.30
#: blocks count as unequal when the largest one's saved bytes x the block count exceed the blocks' total by this
UNEQUAL_BLOCKS = 1.2


def apply_what_if(observed: dict[str, Line], what_if: WhatIf, *, trainable_bytes: float, state_bytes: float,
                  observed_amp: bool, split: SavedSplit | None = None, layout: ParamLayout | None = None,
                  segments: dict[str, Line] | None = None,
                  pool_simulated: bool = False) -> tuple[dict[str, Line], list[str], SegmentDelta | None]:
    """The component lines under ``what_if``, the assumptions each change rests on, and - for what-ifs derived
    from the measured split - the change of each segment's peak line caused by the activations and 'other'
    (None: the what-if changes every segment alike, by the components' change). ``split``: the measured make-up
    of the saved activations; ``layout``: how the parameters split into FSDP units (the sharding what-if);
    ``segments``: each segment's (or phase's) own measured peak line, where the steps carried them;
    ``pool_simulated``: the checkpointing what-if's allocator pool is simulated on a recorded step (the model's
    ``recompute_trace``), so no share of the peak is assumed for it."""
    lines = dict(observed)
    notes: list[str] = []
    delta: SegmentDelta | None = None
    if what_if.optimizer is not None:
        kind = optimizer_kind(what_if.optimizer)
        if kind is None:
            raise ValueError(f"unknown optimizer {what_if.optimizer!r} (expected one of {', '.join(OPTIMIZER_STATES)})")
        lines["optimizer"] = Line(OPTIMIZER_STATES[kind] * state_bytes, 0.0)
        notes.append(f"optimizer {kind}: {OPTIMIZER_STATES[kind]} state(s) per trainable parameter of the measured "
                     f"state size; the old optimizer's temporaries in 'other' kept")
    amp = what_if.amp and not observed_amp
    act_per_sample = observed["activations"].per_sample  # the split's shares apply to what the steps measured
    cut_share = split.amp_cut_share() if amp and split is not None else None
    cut = None if cut_share is None else cut_share * act_per_sample
    drop_share = split.dropped_share() if what_if.checkpointing and split is not None else None
    dropped = None if drop_share is None else drop_share * act_per_sample
    if (amp and cut is not None) or (what_if.checkpointing and dropped is not None):
        delta = {name: Line() for name in ACTIVE_SEGMENTS}
    if amp:
        act = lines["activations"]
        copies = 0.5 * trainable_bytes
        if cut is not None and cut_share is not None and split is not None and split.amp_saved is not None \
                and delta is not None:
            both = what_if.checkpointing and dropped is not None
            shed = 0.0 if both else cut
            unknown_share = split.unknown_share()
            recast = 0.5 * unknown_share * act_per_sample
            lines["activations"] = Line(act.fixed + copies, max(0.0, act.per_sample - shed))
            lines["other"] = lines["other"] + Line(copies, recast)
            for name in ACTIVE_SEGMENTS:
                delta[name] = delta[name] + Line(2 * copies, recast - shed)
            notes.append(f"amp: saved activations x{1 - cut_share:.2f} ({split.amp_saved / MIB:.0f} of "
                         f"{split.saved / MIB:.0f} MiB at batch {split.batch}) as measured from the ops that save "
                         f"them (matmul/conv inputs 16-bit, a cast per op that reads an fp32 input, no copy of an "
                         f"attention output that the device's 16-bit kernel lays out contiguously already, softmax, "
                         f"norms, pow and losses fp32, elementwise ops in their inputs' dtype; {unknown_share:.0%} "
                         f"under ops not classified, kept fp32"
                         + (f" and counted once more as a 16-bit cast ({recast / MIB:.1f} MiB a sample: an op the "
                            f"walk does not know may upcast its 16-bit inputs, as sdpa's math fallback does with q, "
                            f"k and v, or be fed a cast copy)" if recast > 0 else "") + ")"
                         + ("; with checkpointing the kept tensors assumed not to shrink" if both else "")
                         + "; the 16-bit weight copies counted twice (autocast's cached casts through forward and "
                         "backward, and their 16-bit gradients in the backward: half the trainable bytes each); "
                         "fp32 master weights, gradients and optimizer kept; activation gradients and the loss's "
                         "fp32 logits ('other') assumed not to shrink; applied to each segment's measured peak line "
                         "(the optimizer's step unchanged)")
            _loss_boundary_cast(observed, segments or {}, split, delta, notes)
        else:
            # what autocast lowers is not measured (which saved tensors feed matmuls, which stay fp32): no shrink
            # is assumed, only what is sure to be added - the 16-bit weight copies saved for backward
            lines["activations"] = Line(act.fixed + copies, act.per_sample)
            notes.append("amp (not measured: an older agent, a compiled graph): fp32 master weights, gradients and "
                         "optimizer kept; +16-bit weight copies (half the trainable bytes); saved activations and "
                         "activation gradients assumed not to shrink (autocast keeps softmax, norms and upcast logits "
                         "in fp32 and saves a cast tensor in both dtypes where an fp32 op feeds a 16-bit one): a lower "
                         "bound of the gain")
    if what_if.checkpointing:
        n = what_if.checkpoint_layers or (split.blocks if split is not None and split.blocks else None) \
            or DEFAULT_CHECKPOINT_LAYERS
        if dropped is not None and split is not None and delta is not None:
            largest = split.largest_block_share()
            if largest is not None:  # the largest block recomputed once; its gradients as the plain backward held
                held = largest * act_per_sample
                how = (f"holds the largest block's saved bytes once more ({held / MIB:.1f} MiB a sample as "
                       f"measured: recomputed one block at a time), the gradients inside it assumed no larger than "
                       f"the transients the measured backward held beyond its saved tensors (at the last block's "
                       f"backward nearly every saved tensor is still alive)")
            else:  # an older agent: the blocks' average, twice (recomputed, and their gradients)
                held = 2 * (split.block_share() or 0.0) * act_per_sample / max(1, n)
                how = (f"holds one block's internals twice ({held / MIB:.1f} MiB a sample: recomputed, and their "
                       f"gradients; the blocks' average, the largest not measured)")
            freed = _output_gradient_freed(observed, segments or {}, split) if largest is not None else 0.0
            if freed > 0:
                how += (f"; less the output's gradient ({freed / MIB:.1f} MiB a sample, within the transients the "
                        f"measured model's backward held at its start: freed by the head's backward, before any "
                        f"block is recomputed)")
            # the head's backward comes first and still holds the output's gradient beside the kept tensors (the
            # measured segment's own moment, less what the checkpoint drops): the segment peaks at the larger of
            # that moment and the recomputation's (GPT-2 on the H200, run 10: its model's backward peaked at the
            # head, 10239 MiB at 71, where the recomputation's moment alone said 6452)
            recompute = held - freed
            if recompute < 0:
                how += (f"; the head's backward, with the output's gradient, is the larger moment "
                        f"({-recompute / MIB:.1f} MiB a sample above the recomputation's): the segment keeps it")
            # inputs that do not grow with the batch (T5's position biases): kept by the checkpoint as they are,
            # where the plain forward freed them - fixed bytes, not a share of each sample's
            fixed_inputs = float(split.fixed_inputs)
            act = lines["activations"]
            lines["activations"] = Line(act.fixed + fixed_inputs, max(0.0, act.per_sample - dropped))
            lines["other"] = lines["other"] + Line(0.0, held)
            delta["forward"] = delta["forward"] + Line(fixed_inputs, -dropped)
            delta["loss_backward"] = delta["loss_backward"] + Line(fixed_inputs, -dropped)
            delta["backward"] = delta["backward"] + Line(fixed_inputs, -dropped + max(0.0, recompute))
            notes.append(f"checkpointing: {n} blocks ({split.blocks} measured); the saved bytes inside the blocks "
                         f"less their inputs ({drop_share:.0%} of the saved activations as measured at batch "
                         f"{split.batch}: {dropped / MIB:.1f} MiB a sample) dropped from the forward's and the loss's "
                         f"backward's peak lines"
                         + (f", the blocks' inputs that do not grow with the batch ({fixed_inputs / MIB:.1f} MiB as "
                            f"measured: shaped as one sample's and saved by no op, so the plain forward freed them) "
                            f"kept beside as fixed bytes" if fixed_inputs > 0 else "")
                         + f"; the model's backward also drops them and {how}, assuming its "
                         f"peak comes while the kept tensors are alive, as in a stack of blocks; the "
                         f"optimizer's step and activation gradients unchanged")
            if pool_simulated:
                notes.append("checkpointing: the allocator's pool simulated on the recorded step's allocations "
                             "(PyTorch's caching allocator with its default settings: 2 MiB and 20 MiB segments, "
                             "best fit, splitting and merging, cached segments released and the allocation retried "
                             "at the limit): a batch fits when its predicted peak fits beside the observed run's "
                             "fragmentation and the step runs in the pool the device leaves")
            if recompute_fragmentation(what_if, split) > 0 and split.block_max is not None:
                unequal = (f"checkpointing: blocks of unequal size (the largest {split.block_max / MIB:.0f} MiB "
                           f"at batch {split.batch}, the average {split.in_blocks / split.blocks / MIB:.0f}): ")
                notes.append(unequal + (
                    f"{RECOMPUTE_FRAG:.0%} of the peak also kept free beyond it (T5-small's recomputation on "
                    f"the H200: 24.7% x 1.2), the lower answer kept - the real pool under such recomputation "
                    f"depends on the steps run before (a T5-small job starting at 321 ran out of memory where one "
                    f"that ran 303 and 312 first ran 346), which the simulation, from one pool, does not follow"
                    if pool_simulated else
                    f"the allocator assumed to hold {RECOMPUTE_FRAG:.0%} of the peak beyond it, as under "
                    f"T5-small's recomputation on the H200 (24.7% x 1.2), not the observed run's share: no "
                    f"checkpointed step recorded to simulate the pool on (a fallback rule)"))
        else:
            factor = min(1.0, 3.0 / n)
            lines["activations"] = lines["activations"].scaled(factor, factor)
            assumed = "" if what_if.checkpoint_layers else " assumed"
            notes.append(f"checkpointing (not measured): {n} blocks{assumed}; activations x{factor:.2f}: the block "
                         f"inputs kept, one block recomputed at a time, and the activations outside the blocks "
                         f"(embeddings, logits, loss) at most one block's worth; activation gradients ('other') "
                         f"unchanged")
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
    return lines, notes, delta


def _output_gradient_freed(observed: dict[str, Line], segments: dict[str, Line], split: SavedSplit) -> float:
    """Bytes a sample of the model output's gradient that the measured model's backward held at its start and
    a checkpointed backward no longer holds when it recomputes a block. The model's backward segment (measured
    apart from the loss's since the agent splits the backward at the output's gradient) peaks at its start, with
    every saved tensor alive and the output's gradient (fp32, the output's size: ``SavedSplit.output``) beside
    them; under a checkpoint per block the head's backward runs first and frees that gradient, so no block's
    recomputation sees it. Bounded by the transients the segment held beyond the saved activations and the batch
    (what else it held is kept as the allowance for the gradients inside the recomputed block). 0 without a
    measured output or a model's backward segment of its own (fitted per phase, it includes the loss's)."""
    if not split.output or split.batch < 1 or "backward" not in segments or "loss_backward" not in segments:
        return 0.0
    saved = observed["activations"].per_sample + observed["batch"].per_sample
    transient = max(0.0, segments["backward"].per_sample - saved)
    return min(split.output / split.batch, transient)


def recompute_fragmentation(what_if: WhatIf, split: SavedSplit | None) -> float:
    """The share of the predicted peak the allocator is assumed to hold beyond it under the checkpointing
    what-if when its pool is not simulated (RECOMPUTE_FRAG, a fallback rule, where the measured blocks are of
    unequal size, else 0: the plain run's fragmentation applies). 0 without a measured largest block (an older
    agent's split)."""
    if not what_if.checkpointing or split is None or split.block_max is None or split.blocks < 2 \
            or split.in_blocks <= 0:
        return 0.0
    return RECOMPUTE_FRAG if split.block_max * split.blocks > UNEQUAL_BLOCKS * split.in_blocks else 0.0


def _loss_boundary_cast(observed: dict[str, Line], segments: dict[str, Line], split: SavedSplit,
                        delta: SegmentDelta, notes: list[str]) -> None:
    """AMP from an fp32 run, at the fp32/16-bit boundary of the loss: the loss is computed in fp32 on the upcast
    logits. In the forward the 16-bit output, its fp32 cast and the loss's first result are alive at once: +half
    the output beyond the fp32 run's output and result. In the loss's backward its gradient (fp32, the output's
    size) is cast to 16-bit for the model's last 16-bit op, both alive at once: 1.5 x the output's bytes
    (``SavedSplit.output``, measured by the agent). The loss's backward already held its own transients beyond
    the saved activations (cross entropy: the log-softmax result, the nll gradient and the logits' gradient, 3 x
    the output, freed as the loss's backward goes on), so only what the cast needs beyond them is added there.
    Without a measured output (an older agent) nothing is added: the transients measured are at least the fp32
    gradient."""
    if not split.output or split.batch < 1:
        return
    # in the forward, at the loss: the 16-bit output (held by the caller), its fp32 cast and the loss's first fp32
    # result (cross entropy's log-softmax) are alive at once, where the fp32 run held the output and that result:
    # +half the output's fp32 bytes (GPT-2 on the H200 under bf16: its forward peaked 1.3 GB above the forward's
    # line shrunk by the saved bytes alone at 32, where half its output is 1.57 GB)
    forward_cast = 0.5 * split.output / split.batch
    if "forward" in delta:
        delta["forward"] = delta["forward"] + Line(0.0, forward_cast)
    name = "loss_backward" if "loss_backward" in segments else "backward" if "backward" in segments else None
    if name is None:
        return
    saved = observed["activations"].per_sample + observed["batch"].per_sample
    transient = max(0.0, segments[name].per_sample - saved)
    needed = 1.5 * split.output / split.batch
    extra = max(0.0, needed - transient)
    if extra > 0:
        delta[name] = delta.get(name, Line()) + Line(0.0, extra)
    where = f"+{extra / MIB:.1f} MiB a sample beyond" if extra > 0 else "within"
    notes.append(f"amp: in the forward, at the loss, the 16-bit output beside its fp32 cast and the loss's first "
                 f"fp32 result (+{forward_cast / MIB:.1f} MiB a sample: half the output's fp32 bytes) in the forward's "
                 f"line; in the loss's backward the fp32 gradient of the output and its 16-bit cast alive at once "
                 f"({needed / MIB:.1f} MiB a sample), {where} the loss's backward's measured transients "
                 f"({transient / MIB:.1f} MiB a sample)")
