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
* peak allocated (the allocator's high-water mark in the step) is fitted the same way, on the steps after the
  optimizer state exists, one point per batch size: the largest peak seen at it (a first step at a size peaks
  lower than the steady ones: lazy optimizer state, warm-up); ``other`` = fitted peak - the five components above, so the components always sum to
  the fitted peak (with ``other`` clamped at 0). With one batch size, ``other`` (workspaces, temporaries,
  activation gradients, foreach-optimizer intermediates) is split between fixed and per-sample in proportion to
  the measured fixed (parameters+gradients+optimizer) and batch-dependent (activations+batch) bytes: temporaries
  at the peak are copies of whatever dominates — parameter-sized optimizer intermediates when the model
  dominates, activation gradients when activations dominate — so the split is exact at both extremes. A
  second batch size replaces the rule with least squares. Without an allocator (CPU) the reported ``other`` is
  fitted like a component.
* cache (reserved - peak allocated) is a measured fixed part (median over the steps at the largest batch
  size). context (device used - reserved: CUDA context, lazily loaded kernels, libraries outside the
  allocator) likewise, from the readings that are consistent (device used >= reserved: the reading saw the
  pool it is compared with). The agent reads NVML once a second, so a reading can predate a step's pool growth
  (device used < reserved, seen on the H200 for the first architecture of a run): the process then used
  ``device_used`` while its pool held at least the parameters, so ``device_used - parameters`` bounds the
  context from above and is taken (the safe side; the basis says so). 0 when not measured at all.

Margin (bytes kept free on top of the predicted total, all from measurements):

* fragmentation growth: the allocator wasted ``phi = cache / peak_allocated`` of its pool at the observed
  batch size. Most of that is whole cached segments, which the allocator frees and retries with when a
  cudaMalloc fails (num_alloc_retries), so it does not scale up to the limit: on the H200 (run 1) the
  allocator kept 4-14% of its pool cached at the small observed batches and at batch 900-4000 in the middle of
  the range, yet at the OOM boundary every architecture reached within 0.8-1.4 GiB of the device (context
  included). What survives the flush is the free space inside segments that still hold live blocks; its
  measured share of the proportional estimate, ``FRAG_SURVIVAL``, is derived from the run-1 boundary trials
  by ``bench/recalibrate_margin.py --derive`` (the largest share over the four architectures, doubled for
  safety as it rests on one run; see FRAG_SURVIVAL). The term is ``FRAG_SURVIVAL * phi * max(0, peak(B) - peak(B_observed))``: it still
  rises with the measured fragmentation and vanishes at the observed batch, where the measured cache is all.
* growth of reserved over the steady steps at one batch size (fragmentation still creeping): added once.
* allocation retries: num_alloc_retries is cumulative for the process, so only its increase across the
  observed steps counts (a process that ran out earlier, e.g. a finder's OOM trials, reports old retries).
  An increase means the allocator already had to flush its cache to satisfy a step at the observed batch, so
  the measured cache understates what it wants; the cache is added once more.

``max_batch`` is the largest B with ``total(B) + margin(B) <= device_total``, found by exact integer search
over the (monotone) prediction, so it agrees with ``predict`` by construction: 0 when not even batch 1 fits,
None when unknown (no device size, or nothing grows with the batch).

What-ifs (``WhatIf``), applied to the fitted lines:

* optimizer swap: states per trainable parameter sgd 0, sgd-momentum 1, adam/adamw 2; the bytes of one state
  are the observed optimizer bytes / the observed kind's count when known, else the gradient bytes (states have
  the dtype of the parameters, as torch.optim keeps them).
* amp (observed run fp32, autocast to fp16/bf16): activations and the per-sample part of ``other`` halve (saved
  tensors and their gradients are 16-bit; ops autocast keeps in fp32, softmax and norms, make this a slight
  underestimate); autocast's cache of 16-bit weight copies adds half the trainable parameter bytes to ``other``;
  parameters, gradients, optimizer (fp32 master copies) and batch (inputs as loaded) are unchanged. A no-op when
  the observed run already used AMP (``fit(..., amp=True)``).
* checkpointing: every one of n blocks wrapped in a checkpoint (the classic example, and what
  ``gradient_checkpointing_enable()`` does): forward keeps only each block's input, backward recomputes one
  block at a time, so about one block's activations plus the boundaries are alive: ``2/n`` of the
  activations (one block ~ A/n, the n boundary inputs ~ A/n for a transformer, whose blocks save ~17 tensors
  of the size of their input). Activations outside the blocks (embeddings, logits, loss) are treated like the
  blocks', a slight underestimate where logits are large. n is ``WhatIf.checkpoint_layers``; unknown, 12 is
  assumed (factor 1/6) and the basis says so.
* gradient accumulation: ``batch_size`` is the effective batch; activations, batch and the per-sample ``other``
  follow the micro-batch ceil(batch_size / accumulation_steps); gradients and optimizer see the full batch
  (unchanged). ``max_batch`` then answers in effective batch (largest micro-batch x steps).
* sharding over N GPUs (ZeRO-3 / FSDP): parameters, gradients and optimizer states / N per GPU; the batch is
  per GPU; the layer-at-a-time gather buffers of FSDP are not modelled (one layer, small against the rest).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field, replace
from typing import Iterable, Sequence

from batchmon.formulas import OPTIMIZER_STATES, optimizer_kind
from batchmon.protocol import ALL_COMPONENTS, COMPONENTS, Step


@dataclass(frozen=True)
class WhatIf:
    """A hypothetical change to the observed run. Defaults mean 'as observed'."""

    batch_size: int | None = None  # None: the last observed batch size
    amp: bool = False  # mixed precision (bf16/fp16 autocast) where the run was fp32
    checkpointing: bool = False  # activation checkpointing
    accumulation_steps: int = 1  # gradient accumulation: batch_size is split into this many micro-batches
    optimizer: str | None = None  # "sgd", "sgd-momentum", "adam", "adamw"; None: as observed
    shards: int = 1  # ZeRO/FSDP-style sharding of parameters, gradients and optimizer states over N GPUs
    checkpoint_layers: int | None = None  # blocks wrapped in checkpoints; None: 12 assumed


@dataclass(frozen=True)
class Basis:
    """What a prediction rests on, as fields: front ends format them (``text``), never parse them."""

    steps: int  # observed steps the model was fitted on
    batch_sizes: tuple[int, ...]  # distinct observed batch sizes, ascending
    step_range: tuple[int, int]  # first and last fitted step
    notes: tuple[str, ...] = ()  # assumptions of the fit (one batch size, optimizer state not yet seen, ...)
    what_if: tuple[str, ...] = ()  # assumptions of each what-if applied
    extrapolation: float | None = None  # the largest batch / the largest observed batch size (None: unknown)
    conservative: bool = False  # the largest batch comes from the band's high side, not the central fit
    conservative_why: tuple[str, ...] = ()  # why the observations cannot support the central extrapolation
    margin_source: str = "measured"  # "measured" (fragmentation, growth, retries) or "given" (an override)

    @property
    def largest_observed(self) -> int:
        return self.batch_sizes[-1] if self.batch_sizes else 0

    def observed_text(self, *, step_range: bool = True) -> str:
        """'3 steps at batch 16, 32 (steps 1-40)'; without the step range for a display that must not move."""
        sizes = ", ".join(str(b) for b in self.batch_sizes)
        text = f"{self.steps} step{'s' if self.steps != 1 else ''} at batch {sizes}"
        if step_range:
            lo, hi = self.step_range
            text += f" (step {lo})" if lo == hi else f" (steps {lo}-{hi})"
        return text

    def text(self, *, step_range: bool = True) -> str:
        """The whole basis on one line (--once, --json): observations; fit notes; conservative; what-ifs."""
        parts = [self.observed_text(step_range=step_range), *self.notes]
        if self.conservative:
            parts.append("largest batch conservative: " + ", ".join(self.conservative_why))
        parts.extend(f"what-if: {n}" for n in self.what_if)
        if self.margin_source != "measured":
            parts.append(f"margin {self.margin_source}")
        return "; ".join(parts)


@dataclass(frozen=True)
class Band:
    """Low and high predicted device use (bytes) at one batch size: what the observations can support."""

    low: int
    high: int


@dataclass(frozen=True)
class Prediction:
    """Predicted breakdown at one batch size, and the largest batch that fits."""

    batch_size: int
    components: dict[str, int]  # every name in protocol.ALL_COMPONENTS (the central fit)
    total: int  # predicted peak device use of the process: allocator peak + cache + context (central)
    peak_allocated: int  # predicted allocator peak (central)
    max_batch: int | None  # largest batch that fits the device (from the band's high side), None when unknown
    device_total: int | None
    headroom: int | None  # device_total - margin - band.high at batch_size; negative: will not fit
    margin: int  # bytes kept free, derived from measured fragmentation, retries and context
    basis_fields: Basis  # which observations this rests on, and every assumption made
    band: Band | None = None  # total's low/high at batch_size; None: low == high == total
    max_batch_central: int | None = None  # the largest batch of the central fit (>= max_batch)
    what_if: WhatIf = field(default_factory=WhatIf)
    micro_batch: int | None = None  # batch per forward pass (differs from batch_size with accumulation)

    @property
    def basis(self) -> str:
        """The basis as one line, e.g. '3 steps at batch 16, 32 (steps 1-40); what-if: amp ...'."""
        return self.basis_fields.text()


FIXED = ("parameters", "gradients", "optimizer")
PER_SAMPLE = ("activations", "batch")
DEFAULT_CHECKPOINT_LAYERS = 12
#: share of the proportional fragmentation estimate (phi x pool growth) that the caching allocator could not
#: release at the OOM boundary, measured on the H200 (bench/results/predict_accuracy_h200_run1.json, derived by
#: bench/recalibrate_margin.py --derive: the largest share over MLP, CNN, GPT, GPT-AMP-tied was 0.076 (AMP;
#: the others needed none beyond context and cache), using the model's own peak prediction at the first failing
#: batch so that peak error is covered too; doubled, as it rests on one run of four models: the doubling costs
#: at most 1.5% of the largest batch on those four)
FRAG_SURVIVAL = 0.16


# ----------------------------------------------------------------------------------------------- observations


@dataclass(frozen=True)
class Observation:
    """One measured training step, reduced to what the model needs."""

    step: int
    batch_size: int
    components: dict[str, int]
    peak_allocated: int | None = None
    reserved: int | None = None
    device_used: int | None = None
    num_alloc_retries: int | None = None

    @classmethod
    def from_step(cls, step: Step) -> "Observation | None":
        """None for a step the model cannot use (no batch size, or no components)."""
        if not step.batch_size or step.batch_size < 1 or not step.components:
            return None
        comps = {name: max(0, int(step.components.get(name, 0) or 0)) for name in COMPONENTS}
        return cls(step.step, step.batch_size, comps, step.peak_allocated, step.reserved, step.device_used,
                   step.num_alloc_retries)

    @property
    def cache(self) -> int | None:
        if self.reserved is None or self.peak_allocated is None:
            return None
        return max(0, self.reserved - self.peak_allocated)

    @property
    def context(self) -> int | None:
        """device used - reserved; None when unmeasured or when the reading predates the step's pool
        (device used < reserved: see stale_context)."""
        if self.reserved is None or self.device_used is None or self.device_used < self.reserved:
            return None
        return self.device_used - self.reserved

    @property
    def stale_context(self) -> int | None:
        """For a reading taken before the pool grew (device used < reserved): device used - parameters, an
        upper bound of the context (the pool held at least the parameters then). None otherwise."""
        if self.reserved is None or self.device_used is None or self.device_used >= self.reserved:
            return None
        return max(0, self.device_used - self.components.get("parameters", 0))


@dataclass(frozen=True)
class Line:
    """value(B) = fixed + per_sample * B."""

    fixed: float = 0.0
    per_sample: float = 0.0

    def at(self, batch: float) -> float:
        return self.fixed + self.per_sample * batch

    def __add__(self, other: "Line") -> "Line":
        return Line(self.fixed + other.fixed, self.per_sample + other.per_sample)

    def __sub__(self, other: "Line") -> "Line":
        return Line(self.fixed - other.fixed, self.per_sample - other.per_sample)

    def scaled(self, fixed: float = 1.0, per_sample: float = 1.0) -> "Line":
        return Line(self.fixed * fixed, self.per_sample * per_sample)


def fit_line(points: Sequence[tuple[int, int]], *, through_origin_when_single: bool = True) -> Line:
    """Least squares over (batch, bytes). One distinct batch size: per-sample only (value / B), or fixed only.

    A negative slope (noise) falls back to the mean as a fixed value, so every line is non-decreasing in B."""
    if not points:
        return Line()
    xs = [float(b) for b, _ in points]
    ys = [float(v) for _, v in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        if through_origin_when_single:
            return Line(0.0, mean_y / mean_x)
        return Line(mean_y, 0.0)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sxx
    if slope < 0:
        return Line(mean_y, 0.0)
    return Line(mean_y - slope * mean_x, slope)


# ----------------------------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class MemoryModel:
    """Fitted lines per component plus the measured fixed parts and margin ingredients. Build with fit()."""

    lines: dict[str, Line]  # every name in COMPONENTS
    cache: int
    context: int
    frag_ratio: float  # cache / peak allocated at the reference batch
    reserved_growth: int
    alloc_retries: int  # increase of num_alloc_retries across the observed steps
    reference_batch: int  # largest steady observed batch size
    last_batch: int  # batch size of the latest observation (WhatIf.batch_size default)
    batch_sizes: tuple[int, ...]
    step_range: tuple[int, int]
    count: int
    optimizer: str | None  # observed kind
    observed_amp: bool = False
    notes: tuple[str, ...] = ()
    measured_peak: bool = True
    _max_batch_cache: dict = field(default_factory=dict, compare=False, repr=False)

    # -- description

    def basis_fields(self, what_if_notes: Sequence[str] = (), **extra: object) -> Basis:
        """The structured basis of a prediction from this model (extra: Basis fields set by the prediction)."""
        return Basis(steps=self.count, batch_sizes=self.batch_sizes, step_range=self.step_range,
                     notes=self.notes, what_if=tuple(what_if_notes), **extra)  # type: ignore[arg-type]

    @property
    def basis(self) -> str:
        """The fit's basis as one line (no what-if)."""
        return self.basis_fields().text()

    @property
    def peak_line(self) -> Line:
        total = Line()
        for name in COMPONENTS:
            total = total + self.lines[name]
        return total

    @property
    def trainable_bytes(self) -> float:
        """Bytes of the parameters that get gradients (the optimizer's parameters)."""
        grads = self.lines["gradients"].fixed
        return grads if grads > 0 else self.lines["parameters"].fixed

    def _state_bytes(self) -> float:
        """Bytes of one optimizer state per trainable parameter set."""
        k = OPTIMIZER_STATES.get(self.optimizer or "", 0)
        observed = self.lines["optimizer"].fixed
        if k and observed > 0:
            return observed / k
        return self.trainable_bytes

    # -- prediction

    def _lines_for(self, what_if: WhatIf) -> tuple[dict[str, Line], list[str]]:
        """Component lines in the micro-batch after the what-ifs; and notes on the assumptions used."""
        lines = dict(self.lines)
        notes: list[str] = []
        if what_if.optimizer is not None:
            kind = optimizer_kind(what_if.optimizer)
            if kind is None:
                raise ValueError(f"unknown optimizer {what_if.optimizer!r} (expected one of {', '.join(OPTIMIZER_STATES)})")
            lines["optimizer"] = Line(OPTIMIZER_STATES[kind] * self._state_bytes(), 0.0)
            notes.append(f"optimizer {kind}")
        if what_if.amp and not self.observed_amp:
            other = lines["other"]
            lines["activations"] = lines["activations"].scaled(0.5, 0.5)
            lines["other"] = Line(other.fixed + 0.5 * self.trainable_bytes, 0.5 * other.per_sample)
            notes.append("amp: 16-bit activations, +16-bit weight copies")
        if what_if.checkpointing:
            n = what_if.checkpoint_layers or DEFAULT_CHECKPOINT_LAYERS
            factor = min(1.0, 2.0 / n)
            lines["activations"] = lines["activations"].scaled(factor, factor)
            assumed = "" if what_if.checkpoint_layers else " assumed"
            notes.append(f"checkpointing: {n} blocks{assumed}, activations x{factor:.2f}")
        if what_if.shards > 1:
            n = what_if.shards
            for name in FIXED:
                lines[name] = lines[name].scaled(1.0 / n, 1.0 / n)
            notes.append(f"sharded over {n} GPUs")
        if what_if.accumulation_steps > 1:
            notes.append(f"{what_if.accumulation_steps} accumulation steps")
        return lines, notes

    def _check(self, what_if: WhatIf) -> None:
        if what_if.batch_size is not None and (isinstance(what_if.batch_size, bool) or what_if.batch_size < 1):
            raise ValueError(f"batch_size must be >= 1, got {what_if.batch_size}")
        if what_if.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {what_if.accumulation_steps}")
        if what_if.shards < 1:
            raise ValueError(f"shards must be >= 1, got {what_if.shards}")
        if what_if.checkpoint_layers is not None and what_if.checkpoint_layers < 1:
            raise ValueError(f"checkpoint_layers must be >= 1, got {what_if.checkpoint_layers}")

    def _evaluate(self, lines: dict[str, Line], batch: int, steps: int) -> tuple[dict[str, int], int]:
        micro = -(-batch // steps)
        comps = {name: max(0, round(lines[name].at(micro))) for name in COMPONENTS}
        return comps, micro

    def _margin(self, peak: int, override: int | float | None, device_total: int | None) -> int:
        if override is not None:
            if isinstance(override, float) and 0 <= override < 1:
                return round(override * device_total) if device_total else 0
            return max(0, int(override))
        reference_peak = self.peak_line.at(self.reference_batch)
        margin = FRAG_SURVIVAL * self.frag_ratio * max(0.0, peak - reference_peak) + self.reserved_growth
        if self.alloc_retries > 0:
            margin += self.cache
        return round(margin)

    def _total(self, lines: dict[str, Line], batch: int, steps: int, margin: int | float | None,
               device_total: int | None) -> tuple[int, int]:
        comps, _ = self._evaluate(lines, batch, steps)
        peak = sum(comps.values())
        return peak + self.cache + self.context, self._margin(peak, margin, device_total)

    def predict(self, what_if: WhatIf = WhatIf(), *, device_total: int | None = None,
                margin: int | float | None = None) -> Prediction:
        """Breakdown at what_if.batch_size (default: the last observed). margin overrides the derived margin:
        int bytes, or a float in [0, 1) as a fraction of device_total. Raises ValueError for a bad WhatIf."""
        self._check(what_if)
        batch = what_if.batch_size or self.last_batch
        lines, notes = self._lines_for(what_if)
        comps, micro = self._evaluate(lines, batch, what_if.accumulation_steps)
        peak = sum(comps.values())
        comps["cache"] = self.cache
        comps["context"] = self.context
        total = peak + self.cache + self.context
        kept = self._margin(peak, margin, device_total)
        max_batch = self.max_batch(device_total, what_if, margin=margin) if device_total else None
        headroom = device_total - kept - total if device_total else None
        basis = self.basis_fields(notes, margin_source="measured" if margin is None else "given")
        return Prediction(batch_size=batch, components={n: comps[n] for n in ALL_COMPONENTS}, total=total,
                          peak_allocated=peak, max_batch=max_batch, device_total=device_total, headroom=headroom,
                          margin=kept, basis_fields=basis, band=Band(total, total), max_batch_central=max_batch,
                          what_if=what_if, micro_batch=micro)

    def max_batch(self, device_total: int | None, what_if: WhatIf = WhatIf(), *,
                  margin: int | float | None = None) -> int | None:
        """Largest (effective) batch with total + margin <= device_total. 0: not even batch 1 fits.
        None: unknown (no device size, or no per-sample bytes measured, so nothing bounds the batch)."""
        if not device_total:
            return None
        self._check(what_if)
        key = (device_total, replace(what_if, batch_size=None), margin)
        if key in self._max_batch_cache:
            return self._max_batch_cache[key]
        lines, _ = self._lines_for(what_if)
        steps = what_if.accumulation_steps
        if sum(lines[n].per_sample for n in COMPONENTS) <= 0:
            result = None
        else:
            def fits(micro: int) -> bool:
                total, kept = self._total(lines, micro, 1, margin, device_total)
                return total + kept <= device_total

            if not fits(1):
                result = 0
            else:
                lo, hi = 1, 2
                while fits(hi):  # exponential search, then bisection: exact on the integer prediction
                    lo, hi = hi, hi * 2
                    if hi > 1 << 50:
                        break
                if hi > 1 << 50:
                    result = None
                else:
                    while hi - lo > 1:
                        mid = (lo + hi) // 2
                        if fits(mid):
                            lo = mid
                        else:
                            hi = mid
                    result = lo * steps
        if len(self._max_batch_cache) > 256:
            self._max_batch_cache.clear()
        self._max_batch_cache[key] = result
        return result


# ----------------------------------------------------------------------------------------------- fitting


def _as_observations(steps: Iterable[Step | Observation]) -> list[Observation]:
    out = []
    for s in steps:
        obs = s if isinstance(s, Observation) else Observation.from_step(s)
        if obs is not None:
            out.append(obs)
    return out


def _median_int(values: Iterable[int | None]) -> int | None:
    vals = [v for v in values if v is not None]
    return round(statistics.median(vals)) if vals else None


def fit(steps: Iterable[Step | Observation], *, optimizer: str | None = None, amp: bool = False) -> MemoryModel | None:
    """Fit the memory equation to measured steps (protocol.Step or Observation). None when no step is usable.

    optimizer: the observed optimizer's class or kind name (hello's ``optimizer``), used for the lazy-state rule
    and the optimizer what-if; amp: the observed run already used autocast (the AMP what-if is then a no-op)."""
    obs = _as_observations(steps)
    if not obs:
        return None
    obs.sort(key=lambda o: o.step)
    kind = optimizer_kind(optimizer)
    notes: list[str] = []
    lines: dict[str, Line] = {}

    for name in FIXED:
        lines[name] = Line(float(max(o.components[name] for o in obs)), 0.0)
    if lines["optimizer"].fixed == 0 and OPTIMIZER_STATES.get(kind or "", 0) and lines["gradients"].fixed > 0:
        k = OPTIMIZER_STATES[kind]  # type: ignore[index]
        lines["optimizer"] = Line(k * lines["gradients"].fixed, 0.0)
        notes.append(f"optimizer state not yet seen: {k} x gradients assumed ({kind})")
    if kind == "sgd" and lines["optimizer"].fixed > 0:
        kind = "sgd-momentum"  # SGD with state is SGD with momentum

    # steady steps: optimizer state allocated (step 1 of Adam creates it during its own step)
    max_opt = max(o.components["optimizer"] for o in obs)
    steady = [o for o in obs if o.components["optimizer"] >= max_opt] or obs

    act_obs = [o for o in obs if o.components["activations"] > 0] or obs  # a step without counting is a gap
    lines["activations"] = fit_line([(o.batch_size, o.components["activations"]) for o in act_obs])
    lines["batch"] = fit_line([(o.batch_size, o.components["batch"]) for o in obs])

    with_peak = [o for o in steady if o.peak_allocated is not None]
    measured_peak = bool(with_peak)
    basis_obs = with_peak or steady
    distinct = sorted({o.batch_size for o in basis_obs})
    known = Line()
    for name in FIXED + PER_SAMPLE:
        known = known + lines[name]
    if with_peak:
        peaks = _largest_per_batch((o.batch_size, o.peak_allocated) for o in with_peak)  # type: ignore[misc]
        if len(distinct) >= 2:
            lines["other"] = fit_line(peaks) - known
        else:
            b, peak = peaks[0]
            lines["other"] = _split_other(max(0.0, peak - known.at(b)), known, b)
            notes.append("other split by fixed/batch share (one batch size)")
    else:
        others = _largest_per_batch((o.batch_size, o.components["other"]) for o in steady)
        if len(distinct) >= 2:
            lines["other"] = fit_line(others)
        else:
            b, other = others[0]
            lines["other"] = _split_other(other, known, b)
        notes.append("no allocator peak (CPU): peak = sum of components")

    reference = max(distinct)
    at_ref = [o for o in basis_obs if o.batch_size == reference]
    cache = _median_int(o.cache for o in at_ref)
    context = _median_int(o.context for o in at_ref) if any(o.context is not None for o in at_ref) else \
        _median_int(o.context for o in basis_obs)
    if context is None:
        context = _median_int(o.stale_context for o in basis_obs)
        if context is not None:
            notes.append("context bounded by a device reading older than the pool")
    if context is None and measured_peak:
        notes.append("context not measured")
    reference_peak = sum(lines[n].at(reference) for n in COMPONENTS)
    frag_ratio = (cache or 0) / reference_peak if reference_peak > 0 else 0.0
    reserved = [o.reserved for o in at_ref if o.reserved is not None]
    growth = max(0, reserved[-1] - reserved[0]) if len(reserved) >= 2 else 0
    counters = [o.num_alloc_retries for o in obs if o.num_alloc_retries is not None]
    retries = max(0, counters[-1] - counters[0]) if len(counters) >= 2 else 0  # cumulative: the increase
    if retries:
        notes.append(f"{retries} allocator retries during the observed steps: cache kept twice")

    return MemoryModel(
        lines=lines, cache=cache or 0, context=context or 0, frag_ratio=frag_ratio, reserved_growth=growth,
        alloc_retries=retries, reference_batch=reference, last_batch=obs[-1].batch_size,
        batch_sizes=tuple(sorted({o.batch_size for o in obs})), step_range=(obs[0].step, obs[-1].step),
        count=len(obs), optimizer=kind, observed_amp=amp, notes=tuple(notes), measured_peak=measured_peak,
    )


def _largest_per_batch(points: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """One point per batch size, the largest value seen: a run's first step at a size (lazy optimizer state,
    allocator and library warm-up) peaks lower than its steady steps, never higher."""
    best: dict[int, int] = {}
    for b, v in points:
        best[b] = max(v, best.get(b, v))
    return sorted(best.items())


def _split_other(other: float, known: Line, batch: int) -> Line:
    """One batch size: split 'other' between fixed and per-sample in the measured fixed : per-sample ratio."""
    fixed, variable = known.fixed, known.per_sample * batch
    share = variable / (fixed + variable) if fixed + variable > 0 else 1.0
    return Line(other * (1.0 - share), other * share / batch)


def predict_from_steps(steps: Sequence[Step], device_total: int | None, what_if: WhatIf = WhatIf(),
                       optimizer: str | None = None, *, amp: bool = False) -> Prediction | None:
    """fit + predict in one call (the hub and the agent use this). None when no step is usable."""
    model = fit(steps, optimizer=optimizer, amp=amp)
    return model.predict(what_if, device_total=device_total) if model else None
