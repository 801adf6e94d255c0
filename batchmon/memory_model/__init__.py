"""The memory equation, fitted to measured steps: predict any batch size, the largest batch, what-ifs.

Pure: no torch, no textual. Everything here is integer bytes in, integer bytes out, and cheap: fitting is a
handful of least-squares sums, predicting is a few multiplications, so a UI may call ``predict`` for a hundred
batch sizes per frame.

API (all a caller needs)::

    model = fit(steps, optimizer="AdamW")            # protocol.Step (or Observation) sequence -> MemoryModel | None
    p = model.predict(WhatIf(batch_size=256), device_total=141 * 2**30)   # -> Prediction
    p.components["activations"], p.peak_allocated, p.total, p.max_batch, p.headroom, p.margin
    p.band.low, p.band.high                          # what the observations support at p.batch_size
    p.basis_fields (Basis: steps, batch_sizes, step_range, notes, what_if, extrapolation, conservative, ...)
    p.basis                                          # the same as one line, for --once/--json
    model.max_batch(device_total, WhatIf(amp=True))  # -> int | None
    predict_from_steps(steps, device_total, WhatIf(), optimizer=None)    # fit + predict, None without data

The calculator's closed forms (no measurement) are in batchmon.formulas.

The fit (documented rules, each chosen for what it predicts, not for convenience):

* parameters, gradients, optimizer: batch-independent; the largest value seen (they never shrink in a run, and
  an early step may precede lazily created optimizer state). If the optimizer is Adam-like (or SGD with
  momentum) and no state was seen yet, its states are taken as 2 (1) x the gradient bytes.
* activations, batch: per-sample. One batch size seen: value / B (no fixed part). Two or more: least squares
  ``fixed + per_sample * B`` over every step; a negative slope falls back to the mean.
* peak allocated (the allocator's high-water mark in the step; per phase when the steps carry each phase's own
  peak: see "Per phase" below) is fitted the same way, on the steps after the
  optimizer state exists, one point per batch size: the largest peak seen at it (a first step at a size peaks
  lower than the steady ones: lazy optimizer state, warm-up); ``other`` = fitted peak - the five components above,
  so the components always sum to the fitted peak (with ``other`` clamped at 0). With one batch size, ``other``
  (workspaces, temporaries, activation gradients, foreach-optimizer intermediates) is split between fixed and
  per-sample in proportion to the measured fixed (parameters+gradients+optimizer) and batch-dependent
  (activations+batch) bytes: temporaries at the peak are copies of whatever dominates — parameter-sized optimizer
  intermediates when the model dominates, activation gradients when activations dominate — so the split is exact
  at both extremes. A second batch size replaces the rule with least squares. Without an allocator (CPU) the
  reported ``other`` is fitted like a component.
* cache (reserved - peak allocated) is a measured fixed part (median over the steps at the largest batch
  size). context (device used - reserved: CUDA context, lazily loaded kernels, libraries outside the
  allocator) likewise, from the readings that are consistent (device used >= reserved: the reading saw the
  pool it is compared with). The agent reads NVML once a second, so a reading can predate a step's pool growth
  (device used < reserved, seen on the H200 for the first architecture of a run): the process then used
  ``device_used`` while its pool held at least the parameters, so ``device_used - parameters`` bounds the
  context from above and is taken (the safe side; the basis says so). 0 when not measured at all.

Cache and margin at the limit (all from measurements):

* fragmentation: the allocator held ``phi = cache / peak allocated`` of its pool free at the observed batch.
  Most of that is whole cached segments, which the caching allocator gives back when a cudaMalloc would fail
  (it frees its cached blocks and retries before raising: num_alloc_retries), so the measured cache is not
  kept at the limit as such (zoo: GPT-2, BERT, EfficientNet had 140-370 MiB to spare at their real
  boundaries where the cache measured at the small batch was 0.7-1.2 GiB). What survives is the free space
  inside segments that still hold live blocks, and it grows with the pool (zoo: UNet and the GRU seq2seq, with
  the largest phi, ran out with ~2 GiB free of 24). So at batch B the model keeps ``FRAG_SURVIVAL * phi *
  peak(B)`` free; FRAG_SURVIVAL (0.25) is 1.2 x the largest share any OOM boundary recorded on the H200 left
  room for with the margin below (the GRU seq2seq of zoo run 5: 0.209; UNet 0.19): a stated safety margin, not a
  constant that just covers the recordings (bench/recalibrate_margin.py --derive / --project-zoo,
  tests/test_predict_zoo.py). phi counts whole cached segments too, which the flush gives back: where the agent
  reports the allocator's inactive-split bytes (``Step.inactive_split``: free bytes inside segments that hold
  live blocks, at a sampled step's end, when only tensors that outlive the step pin them; not the peak over the
  step, whose transient splits inside the activations' segments the step's own allocations reuse: EfficientNet-B0
  0.10 of the peak over the step, 0.046 at its end, zoo run 11), its share of the peak, psi, bounds what survives
  as well (zoo runs 5-8 read it as the bench did, after each step), and the smaller
  of ``FRAG_SURVIVAL * phi`` and ``psi`` is kept (``MemoryModel.frag_share``): every boundary of zoo runs 5-8
  left room for at most 0.72 psi x peak (the GRU seq2seq of run 6), so psi itself, with no factor;
  EfficientNet-B0 (phi 0.218, psi 0.046) 270 -> 273 of 286. The
  predicted ``cache`` component at B on a device is the measured cache, shrunk to the room left near the
  limit but never below that fragmentation; without a device, the measured cache. A batch fits when peak +
  context + fragmentation + margin <= device.
* ``margin`` (Prediction.margin, bytes kept free on top of the cache): growth of the cache (reserved - peak)
  over the steps at the reference batch size (fragmentation still creeping), added once - not the growth of
  reserved, which also follows the peak: a run's first step peaks without the optimizer state it creates at its
  end, so the pool's growth to the next step is that state again (H200 zoo GPT-2: 1184 MiB of reserved growth,
  946 of it AdamW's state, already in the steady peak; it alone made the largest batch 26 of 28, now 27);
  allocation retries: num_alloc_retries is
  cumulative for the process, so only its increase across the observed steps counts (a process that ran out
  earlier, e.g. a finder's OOM trials, reports old retries). An increase means the allocator already had to
  flush its cache to satisfy a step at the observed batch, so the measured cache understates what it wants;
  the cache is added once more.

The band (``Prediction.band``: low = the central fit, high = what the observations cannot rule out):

A step's peak is the maximum over its phases (forward, loss, backward, optimizer step), each about
``fixed_i + slope_i * B``: a convex function of B whose steepest phase wins at large batches. Issue 13's LSTM
LM (observed at 20, 20, 20, 10) peaked in the forward at some observed batch (the previous step's logits and
gradients still alive; on CPU at the short last batch 10, which holds the batch-20 logits of the step before)
and in the loss's backward at large ones (several logits-sized tensors): the line through the steps' peaks at
10 and 20 mixed the two phases, was too flat, 38% low at 160, and the largest batch 1.9x the real one.
Reproduced on CPU with real torch in tests/test_memory_model_lstm.py. The step's peak hides a phase that is
not the peak yet; each phase's own peak does not.

Per phase (the fix): on sampled CUDA steps the agent reads each phase's own peak (``Step.phase_own_peaks``: the
allocator's peak reset at backward's start and end). When the observed steps carry own peaks at two batch sizes
or more, each phase's own peak is fitted as its own line (the largest own peak per batch size, like the
step's), and the central peak at B is the largest of those lines and the steps' peak line (which equals their
maximum at the observed batches): the phase that wins at large batches decides there
(``MemoryModel.deciding_phase``; the basis says "peak fitted per phase" and "peak in backward at batch N").
'other' at B is that peak minus the other five components. What-ifs change the components and keep each phase's
lift over the step's line. Without own peaks (CPU, an older agent, one batch size) the step's peak is one line,
as before, and the band below guards it.

Per segment (issue 13's LSTM on the H200): the crossing can lie *within* the backward. The LSTM LM's backward
peaked in the model's backward at batch 10 (where the embedding's gradient is made: fixed bytes) and in the
loss's backward from 20 on (the logits' gradient: ~19 MiB a sample), so the backward's own line through 492 and
636 MiB (14.4 MiB a sample) was 22% low at 361. The agent therefore also splits the backward where the model
output's gradient arrives (``Step.segment_peaks``: forward, loss_backward, backward, optimizer). When the
observed steps carry segment peaks at two batch sizes or more, each segment is fitted as its own line instead of
each phase (the basis says "peak fitted per segment" and "peak in the loss's backward at batch N";
``MemoryModel.deciding_segment``): on the H200's figures within 0.5% from batch 40 to 6000. Beyond the observed
batches the largest segment line is never below the largest phase line (the backward phase's own peak is the
larger of its segments' at each observed batch, and the max of two lines lies above the line through their
maxima outside them), so the per-segment fit can only lower a largest batch the per-phase fit gave. The band
below applies unchanged (the slope bound counts the steepest segment).

The band:

* every phase holds at least the parameters and the optimizer state (the floor), and peaked at most at the
  step's measured peak, so no phase grows faster than ``(peak - floor) / B`` of any observed step (the slope
  bound; each step's own floor: the agent reports the optimizer state at the step's end, so the step that
  created it - the first observed, or one after which it grew, e.g. Adam's first step - is bounded with the
  state reported before it; with the state at its end the bound came out below the real slope and the high
  side was no higher than the central fit for Adam-like runs: the guard never engaged for them);
* the high side follows ``floor + slope_bound * B`` beyond the largest observed batch when the peak was not
  fitted per phase and the fitted peak's batch-independent part above the floor is more than
  ``INTERCEPT_SHARE`` of the batch-dependent bytes at the largest observed batch (suspect: a phase that is not
  the peak yet may be hiding; 2.8-4.7% on the four H200 architectures of run 1/2, 197% for the LSTM), or when
  the central largest batch lies beyond ``FAR_EXTRAPOLATION`` (100) x the largest observed batch; with three
  or more batch sizes whose peaks curve upward (a secant ``CURVATURE_TOLERANCE`` steeper than the fit), the
  steepest secant's slope is used too;
* fitted per phase, a forward line whose fixed part exceeds parameters + gradients + optimizer state (+ the
  16-bit weight copies under autocast: all that is batch-independent and can be alive) by more than
  ``INTERCEPT_SHARE`` of its per-sample bytes at the largest observed batch holds bytes no component explains -
  typically a previous, larger step's output still alive in a short batch's forward (``output = model(x)``
  frees it only when the new forward returns), which flattens the line: beyond the largest observed batch the
  high side follows the forward's line through that floor and its own peak there (``phase_bounds``). Only the
  forward: the other phases' fixed bytes (the optimizer's temporaries, DDP's buckets) are fixed by nature;
* below the largest observed batch the band is the central fit (the observations hold there).

``max_batch`` is the largest B with ``high(B) + margin(B) <= device_total`` (the conservative answer;
``Prediction.max_batch_central`` is the central fit's), found by exact integer search over the (monotone)
prediction, so it agrees with ``predict`` by construction: 0 when not even batch 1 fits, None when unknown
(no device size, or nothing grows with the batch). When it is below the central one, ``Basis.conservative``
is set and ``Basis.conservative_why`` names the extrapolation (``Basis.extrapolation``: largest batch /
largest observed batch).

What-ifs (``WhatIf``), applied to the fitted lines:

* optimizer swap: states per trainable parameter sgd 0, sgd-momentum 1, adam/adamw 2; the bytes of one state
  are the observed optimizer bytes / the observed kind's count when known, else the gradient bytes (states have
  the dtype of the parameters, as torch.optim keeps them).
* derived what-ifs (AMP, checkpointing) rest on ``SavedSplit``, what the agent measured once on a sampled step
  (batchmon.agent.saved_split, carried by ``Step.saved_split``; ``fit`` takes the latest one from the steps, or
  ``fit(..., saved_split=...)``): the saved bytes inside the repeated blocks and their inputs, and what the saved
  tensors would take under autocast, from the ops that save them (a walk of the autograd graph). Its shares are
  applied to the fitted activations' per-sample bytes (the split says what the saved bytes are made of, the
  steps how many), and each segment's own-peak line is changed by what that segment holds (``segment_lines``,
  fitted whenever the steps carry segment peaks at two batch sizes; the peak is the largest changed line;
  fitted per phase only, the backward takes the larger of its two segments' changes; with neither, the
  components change and 'other' takes the rest).
* amp (observed run fp32, autocast to fp16/bf16): parameters, gradients, optimizer (fp32 master copies) and
  batch (inputs as loaded) unchanged. Derived: the saved activations x amp_saved / saved (matmul/conv inputs
  16-bit, softmax, norms, pow and losses fp32, elementwise ops in their inputs' dtype, anything not classified
  fp32) in the forward, the loss's backward and the model's backward; the 16-bit weight copies (half the
  trainable bytes) counted twice in each (autocast's cached casts, saved for backward, and their 16-bit
  gradients in the backward; on the H200 GPT-2 under bf16 peaked 376 MB above the fp32 run's fixed part where
  one set is 249 MB); the optimizer's step unchanged; activation gradients and the loss's fp32 logits ('other')
  not assumed to shrink. The saved bytes under ops the walk cannot classify are kept fp32 and counted once more
  as a 16-bit cast (+half of them in each active segment): such an op may upcast its 16-bit inputs, as sdpa's
  math fallback does with q, k and v (HF T5 on the H200: 26% of its saved bytes, and its real AMP peak at 79 was
  0.9 GB above what the shrink alone said: 82 predicted where 79 ran). At the loss's fp32/16-bit boundary the
  output's fp32 gradient and its 16-bit cast (1.5 x the measured output) are added to the loss's backward only
  beyond the transients it already held (cross entropy holds three output-sized tensors there - log-softmax
  result, nll gradient, logits gradient - freed before the cast; so +0 for the zoo's LMs). This replaced "+half of
  the loss's backward transients" (last session's bound for T5), which had no per-op basis and cost GPT-2 AMP
  26 of 32. Not measured (an older agent, a compiled graph): the copies once, no shrink - a lower
  bound of the gain (issue 13: the old "activations halve" rule predicted 285 for HF GPT-2 where 185 ran). A
  no-op when the observed run already used AMP (``fit(..., amp=True)``).
* checkpointing: every one of n blocks wrapped in a checkpoint (what ``gradient_checkpointing_enable()``
  does): forward keeps each block's input, backward recomputes one block at a time. Derived: the bytes saved
  inside the blocks less their inputs leave the forward's and the loss's backward's lines (every saved tensor is
  alive at the forward's end and through the loss's backward) and the model's backward's, which holds the
  largest block's saved bytes once more (recomputed; ``SavedSplit.block_max``), the gradients inside it taken as
  no larger than the transients the measured backward held beyond its saved tensors (at the last block's
  backward nearly every saved tensor is still alive) - assuming its peak comes while the kept tensors are alive,
  as in a stack of blocks; the optimizer's step unchanged. The blocks are every layer
  ``gradient_checkpointing_enable()`` wraps (both stacks of an encoder-decoder; their inputs counted once: the
  decoder's blocks share the encoder's output and T5's position bias). An older agent's split (one stack, no
  block_max): one average block twice (recomputed, and its gradients).
  Not measured: what stays outside the blocks (embeddings, logits, loss) is taken as at most one block's
  worth: ``3/n`` of the activations (issue 13: 2/n predicted 337 for HF GPT-2 where 332 ran). n is
  ``WhatIf.checkpoint_layers``, else the measured block count; unknown, 12 is assumed and the basis says so.
  Both AMP and checkpointing: the kept tensors are not assumed to shrink under autocast.
* gradient accumulation: ``batch_size`` is the effective batch; activations, batch and the per-sample ``other``
  follow the micro-batch ceil(batch_size / accumulation_steps); gradients and optimizer see the full batch
  (unchanged). ``max_batch`` then answers in effective batch (largest micro-batch x steps).
* sharding over N GPUs (FSDP2 ``fully_shard`` / ZeRO-3): parameters, gradients and optimizer states / N per
  GPU; the batch is per GPU (activations unchanged). FSDP2 gathers a unit's parameters into an unsharded
  buffer beside the shards, creates its gradients unsharded and copies them into a reduce-scatter buffer before
  keeping the shard; the root unit is not resharded after forward and is reduce-scattered last, so its
  parameters and gradients live unsharded through backward. So the root, the block computed and the one
  prefetched are added once as parameters and once as gradients (``fit(..., param_layout=ParamLayout(root,
  largest_unit, units))``, per-block wrapping). Without a layout the whole model's parameters and gradients
  are added (no wrapping gathers more at once: an upper bound, and the basis says so). Checked against a real
  FSDP2 run by bench/fsdp_predict.py.
"""

from batchmon.formulas import OPTIMIZER_STATES, optimizer_kind
from batchmon.memory_model.fit import CURVATURE_TOLERANCE, INTERCEPT_SHARE, fit, predict_from_steps
from batchmon.memory_model.model import FAR_EXTRAPOLATION, FRAG_SURVIVAL, MemoryModel
from batchmon.memory_model.observations import FIXED, PER_SAMPLE, Line, Observation, ParamLayout, SavedSplit, fit_line
from batchmon.memory_model.prediction import Band, Basis, Prediction, WhatIf
from batchmon.memory_model.what_ifs import DEFAULT_CHECKPOINT_LAYERS, apply_what_if
from batchmon.memory_model.advisor import Advice, advice_for, advice_json, advice_text, advise

__all__ = ["Advice", "advice_for", "advice_json", "advice_text", "advise",
           "Band", "Basis", "CURVATURE_TOLERANCE", "DEFAULT_CHECKPOINT_LAYERS", "FAR_EXTRAPOLATION", "FIXED",
           "FRAG_SURVIVAL", "INTERCEPT_SHARE", "Line", "MemoryModel", "OPTIMIZER_STATES", "Observation", "PER_SAMPLE",
           "ParamLayout", "Prediction", "SavedSplit", "WhatIf", "apply_what_if", "fit", "fit_line", "optimizer_kind",
           "predict_from_steps"]
