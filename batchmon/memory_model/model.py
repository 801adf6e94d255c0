"""The fitted memory model: component lines, measured fixed parts, margin, band; predict and search the largest
batch (module docstring of batchmon.memory_model says every rule and why)."""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import Sequence

from batchmon.formulas import OPTIMIZER_STATES
from batchmon.memory_model.ckpt_trace import synthesise
from batchmon.memory_model.observations import Line, ParamLayout, SavedSplit
from batchmon.memory_model.prediction import Band, Basis, Prediction, WhatIf
from batchmon.memory_model.step_trace import StepTrace, required_limit, scan_batches, simulate
from batchmon.memory_model.what_ifs import apply_what_if, recompute_fragmentation
from batchmon.protocol import ALL_COMPONENTS, COMPONENTS

#: share of the allocator's measured free bytes (phi = cache / peak at the observed batch) that survives its
#: flush-and-retry at the limit, as a share of the pool: at batch B the model keeps FRAG_SURVIVAL x phi x
#: peak(B) free (see "Margin" in batchmon.memory_model). Each OOM boundary recorded on the H200 needs a share,
#: computed on the model's own central peak at the first failing batch (so peak error is covered too) with the
#: margin the model keeps (the cache's growth): predict_accuracy's four at most 0.096 (GPT, AMP), the zoo's eleven
#: recorded before it kept its steps at most 0.197 (UNet, projected), zoo run 5 refitted at most 0.209 (the GRU
#: seq2seq; UNet 0.192, the rest <= 0.08). 0.25 keeps a stated margin above the largest, 1.2 x 0.209 (the
#: fragmentation surviving at a boundary not recorded here may be a fifth worse than the worst seen and still stay
#: out), instead of a constant that just covers the recordings; it costs EfficientNet-B0 3 batches (270 of 286: 0.944).
#: tests/test_predict_zoo.py pins the derivation; bench/recalibrate_margin.py --derive prints the shares.
FRAG_SURVIVAL = 0.25
#: beyond this multiple of the largest observed batch, no fixed byte of 'other' is trusted to stay fixed
FAR_EXTRAPOLATION = 100
#: the phase of each segment that is not a phase of its own (protocol.SEGMENTS)
SEGMENT_PHASE = {"loss_backward": "backward"}



@dataclass(frozen=True)
class MemoryModel:
    """Fitted lines per component plus the measured fixed parts and margin ingredients. Build with fit()."""

    lines: dict[str, Line]  # every name in COMPONENTS
    cache: int
    context: int
    frag_ratio: float  # cache / peak allocated at the reference batch
    reserved_growth: int  # the cache's growth (reserved - peak) over the steps at the reference batch, not the
    # pool's (fit._cache_growth): the name is the protocol-era field's, kept for the benches and recordings
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
    # the band's high side (see "The band" in the module docstring)
    floor: float = 0.0  # parameters + optimizer state: alive in every phase of every step
    slope_bound: float = 0.0  # the tightest (peak - floor) / batch over the observed steps: no phase grows faster
    suspect: bool = False  # the fitted peak's fixed part above the floor is more than a workspace explains
    unexplained_fixed: float = 0.0  # that fixed part, when suspect (for the basis)
    curvature_slope: float = 0.0  # steepest observed secant of the peak minus the fitted slope (>= 0)
    steepest_between: tuple[int, int] | None = None  # the batch sizes of that secant
    time_line: Line | None = None  # step seconds = fixed + per_sample x B (two or more batch sizes timed)
    saved_split: SavedSplit | None = None  # measured make-up of the saved activations (derived what-ifs)
    param_layout: ParamLayout | None = None  # how the parameters split into FSDP units (the sharding what-if)
    # each phase's own peak as its own line (forward, backward, optimizer; {}: not fitted per phase), or each
    # segment's (forward, loss_backward, backward, optimizer) when per_segment: the step's central peak is the
    # largest of these and the step's line (see "Per phase" in batchmon.memory_model)
    phase_lines: dict[str, Line] = field(default_factory=dict)
    per_segment: bool = False  # phase_lines are the segments' (the backward split at the output's gradient)
    # each segment's own line whenever the steps carry segment peaks at two batch sizes (even where the plain
    # peak is fitted per phase): what the derived AMP and checkpointing what-ifs change segment by segment
    segment_lines: dict[str, Line] = field(default_factory=dict)
    # a forward line with a fixed part no component explains: {"forward": (those bytes, the high line)}
    phase_bounds: dict[str, tuple[float, Line]] = field(default_factory=dict)
    # the allocator's peak free bytes inside segments holding live blocks / peak allocated at the reference batch
    # (Observation.inactive_split; None: not reported): a second bound of what survives a flush at the limit
    split_ratio: float | None = None
    # the allocations of one step under activation checkpointing, recorded from the model (None: not recorded):
    # the checkpointing what-if's pool is then simulated (allocator_sim) instead of assumed (recompute_trace)
    recorded_trace: StepTrace | None = None
    _max_batch_cache: dict = field(default_factory=dict, compare=False, repr=False)

    def share_searches(self, other: MemoryModel | None) -> bool:
        """Take ``other``'s largest-batch searches (its search cache, shared from now on) when the two models
        are equal in every field but those only the basis reads (BASIS_ONLY): each search's answer depends
        on nothing else, so it is the same. A steady job's refit is that model again with a later step range
        and step-time line (on the H200 fast16 recording looped to steady state every refit after the first
        minute), and its three searches were ~0.9 ms of a ~1 ms prediction. True when shared."""
        if other is None or other is self:
            return False
        if _SEARCHED(self) != _SEARCHED(other):
            return False
        object.__setattr__(self, "_max_batch_cache", other._max_batch_cache)
        return True

    # -- description

    def basis_fields(self, what_if_notes: Sequence[str] = (), **extra: object) -> Basis:
        """The structured basis of a prediction from this model (extra: Basis fields set by the prediction)."""
        return Basis(steps=self.count, batch_sizes=self.batch_sizes, step_range=self.step_range,
                     notes=self.notes, what_if=tuple(what_if_notes), **extra)  # type: ignore[arg-type]

    @property
    def basis(self) -> str:
        """The fit's basis as one line (no what-if)."""
        return self.basis_fields().text()

    @cached_property
    def peak_line(self) -> Line:
        """The fitted peak allocated: the sum of the component lines (computed once; the model is frozen)."""
        total = Line()
        for name in COMPONENTS:
            total = total + self.lines[name]
        return total

    def _top_line(self, micro: float) -> Line:
        """The line of the central peak at ``micro``: the step's, or a phase's own line where one lies above it
        (the phase that wins at large batches)."""
        top, best = self.peak_line, self.peak_line.at(micro)
        for line in self.phase_lines.values():
            value = line.at(micro)
            if value > best:
                top, best = line, value
        return top

    def peak_at(self, micro: float) -> float:
        """The central peak allocated at micro-batch ``micro`` as observed (no what-if)."""
        return self._top_line(micro).at(micro)

    def phase_lift(self, micro: float) -> float:
        """Bytes a phase's own line lies above the step's line at ``micro`` (0 when not fitted per phase): what
        the per-phase fit adds to 'other' there."""
        return self.peak_at(micro) - self.peak_line.at(micro) if self.phase_lines else 0.0

    def deciding_phase(self, micro: float) -> str | None:
        """The phase whose own line is the highest at ``micro`` (None when not fitted per phase); fitted per
        segment, the phase of the highest segment (the loss's backward is part of the backward)."""
        name = self.deciding_segment(micro) if self.per_segment else self._highest_line(micro)
        return SEGMENT_PHASE.get(name, name) if name is not None else None

    def deciding_segment(self, micro: float) -> str | None:
        """The segment whose own line is the highest at ``micro`` (None when not fitted per segment)."""
        return self._highest_line(micro) if self.per_segment else None

    def _highest_line(self, micro: float) -> str | None:
        if not self.phase_lines:
            return None
        return max(self.phase_lines, key=lambda p: (self.phase_lines[p].at(micro), self.phase_lines[p].per_sample))

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

    def _lines_for(self, what_if: WhatIf) -> tuple[dict[str, Line], list[str], dict[str, Line] | None]:
        """Component lines in the micro-batch after the what-ifs; notes on the assumptions used; the derived
        what-ifs' change of each segment's line (None: every segment changes by the components' change)."""
        return apply_what_if(self.lines, what_if, trainable_bytes=self.trainable_bytes,
                             state_bytes=self._state_bytes(), observed_amp=self.observed_amp,
                             split=self.saved_split, layout=self.param_layout,
                             segments=self.segment_lines or self.phase_lines,
                             pool_simulated=self._pool_trace(what_if) is not None)

    @cached_property
    def recompute_trace(self) -> StepTrace | None:
        """The checkpointed step's allocations: the recorded one, else synthesised from the agent's measured blocks
        (the split's sequence: ckpt_trace) - on first use, not in the fit: the hub refits every job, and ~0.5-0.8 ms
        a fit (GPT-2, T5-small) went to a what-if few ask for. None: neither."""
        if self.recorded_trace is not None:
            return self.recorded_trace
        split = self.saved_split
        if split is None or split.sequence is None or split.output is None:
            return None
        return synthesise(split.sequence, split.batch, split.output, int(self.lines["parameters"].fixed),
                          int(self.lines["optimizer"].fixed), trainable=int(self.lines["gradients"].fixed) or None)

    def _pool_trace(self, what_if: WhatIf) -> StepTrace | None:
        """The recorded checkpointed step, where it is the step the what-if asks about: checkpointing alone (AMP,
        another optimizer, sharding or accumulation make another step than the one recorded)."""
        if not what_if.checkpointing or what_if.amp or what_if.optimizer or what_if.shards > 1 \
                or what_if.accumulation_steps > 1:
            return None
        return self.recompute_trace

    def _frag_floor(self, what_if: WhatIf) -> float:
        """The share of the peak a what-if keeps free on its own: RECOMPUTE_FRAG under checkpointing of unequal
        blocks, also where the pool is simulated. The real pool there is path dependent - on the H200 a T5-small job
        starting at 321 ran out of memory where one that had run 303 and 312 first ran 346
        (bench/results/zoo_boundary_h200_run1.json) - and the simulation, which starts from one pool, said 346:
        the lower of the two answers is kept."""
        return recompute_fragmentation(what_if, self.saved_split)

    def _pool_fits(self, trace: StepTrace, micro: int, limit: int) -> bool:
        """Does the recorded step at ``micro`` run in a pool of ``limit`` bytes (the allocator simulated)?"""
        key = ("pool", micro, limit)
        if key not in self._max_batch_cache:
            self._max_batch_cache[key] = simulate(trace, micro, limit).ok
        return bool(self._max_batch_cache[key])

    def pool_share(self, what_if: WhatIf, batch: int) -> float | None:
        """Under a what-if whose pool is simulated: the smallest pool the recorded step at ``batch`` runs in,
        beyond its peak, as a share of that peak (None: not simulated)."""
        trace = self._pool_trace(what_if)
        if trace is None:
            return None
        limit, run = required_limit(trace, batch)
        return limit / run.peak_allocated - 1 if run.peak_allocated > 0 else 0.0

    def _check(self, what_if: WhatIf) -> None:
        if what_if.batch_size is not None and (isinstance(what_if.batch_size, bool) or what_if.batch_size < 1):
            raise ValueError(f"batch_size must be >= 1, got {what_if.batch_size}")
        if what_if.accumulation_steps < 1:
            raise ValueError(f"accumulation_steps must be >= 1, got {what_if.accumulation_steps}")
        if what_if.shards < 1:
            raise ValueError(f"shards must be >= 1, got {what_if.shards}")
        if what_if.checkpoint_layers is not None and what_if.checkpoint_layers < 1:
            raise ValueError(f"checkpoint_layers must be >= 1, got {what_if.checkpoint_layers}")

    def _evaluate(self, lines: dict[str, Line], batch: int, steps: int,
                  delta: dict[str, Line] | None = None) -> tuple[dict[str, int], int]:
        micro = -(-batch // steps)
        comps = {name: max(0, round(lines[name].at(micro))) for name in COMPONENTS}
        segments = self.segment_lines or self.phase_lines
        if delta is not None and segments:
            comps["other"] = max(0, round(self._segment_peak(lines, micro, delta, segments)
                                          - sum(v for n, v in comps.items() if n != "other")))
        elif self.phase_lines:
            comps["other"] = max(0, round(lines["other"].at(micro) + self.phase_lift(micro)))
        return comps, micro

    def _segment_peak(self, lines: dict[str, Line], micro: float, delta: dict[str, Line],
                      segments: dict[str, Line]) -> float:
        """The peak under a derived what-if: the largest measured segment line, each changed by the what-if's
        own change of that segment (``delta``: the saved activations and 'other') and by what the what-if
        changes in the other components (an optimizer swap, sharding) alike."""
        return max([0.0, *self._segment_values(lines, micro, delta, segments).values()])

    def _segment_values(self, lines: dict[str, Line], micro: float, delta: dict[str, Line],
                        segments: dict[str, Line]) -> dict[str, float]:
        """Each segment's line at ``micro`` under a derived what-if (see _segment_peak). Fitted per phase only
        (an older agent), the backward phase takes the larger of the two backward segments' changes."""
        common = sum((lines[n] - self.lines[n]).at(micro) for n in COMPONENTS if n not in ("activations", "other"))
        out = {}
        for name, line in segments.items():
            if name == "backward" and "loss_backward" not in segments:
                change = max((delta[n].at(micro) for n in ("loss_backward", "backward") if n in delta), default=0.0)
            else:
                change = delta[name].at(micro) if name in delta else 0.0
            out[name] = line.at(micro) + change + common
        return out

    def segment_peaks(self, what_if: WhatIf | None = None, batch: int | None = None) -> dict[str, float]:
        """Each measured segment's (or phase's) own central peak at ``batch`` under ``what_if``, as the search
        compares them (each segment's line, changed by the what-if's own change of it and by what it changes in
        the other components): what a miss is compared with, segment by segment ({} when not fitted per phase)."""
        what_if = what_if or WhatIf()
        segments = self.segment_lines or self.phase_lines
        micro = -(-(batch or what_if.batch_size or self.last_batch) // what_if.accumulation_steps)
        lines, _, delta = self._lines_for(what_if)
        if delta is None:  # the what-if changes every segment alike, by the components' change
            change = sum((lines[n] - self.lines[n]).at(micro) for n in COMPONENTS)
            return {name: line.at(micro) + change for name, line in segments.items()}
        return self._segment_values(lines, micro, delta, segments)

    def _margin(self, override: int | float | None, device_total: int | None) -> int:
        """Bytes kept free beyond the predicted cache: an override, or what was measured to creep (the cache's
        growth over the steady steps, ``reserved_growth``; with allocator retries the measured cache once more)."""
        if override is not None:
            if isinstance(override, float) and 0 <= override < 1:
                return round(override * device_total) if device_total else 0
            return max(0, int(override))
        return self.reserved_growth + (self.cache if self.alloc_retries > 0 else 0)

    @property
    def frag_share(self) -> float:
        """The share of a predicted peak the allocator is assumed not to give back at the limit: FRAG_SURVIVAL x
        phi, or - where the agent reported the allocator's split free bytes - that share of the peak (psi) when
        lower. What a flush cannot release is free space inside segments that still hold live blocks: the
        allocator's inactive-split bytes, psi x the peak at the observed step's end. Every OOM
        boundary recorded with it on the H200 (zoo runs 5-8, 37) left room for at most 0.72 psi x peak (the GRU
        seq2seq of run 6; UNet 0.42): psi itself bounds it, no factor. EfficientNet-B0: phi 0.218 (its pool's
        cached whole segments, given back at the limit) but psi 0.046."""
        share = FRAG_SURVIVAL * self.frag_ratio
        return share if self.split_ratio is None else min(share, self.split_ratio)

    def fragmentation(self, peak: float) -> int:
        """What the allocator cannot give back at a predicted peak: frag_share x peak."""
        return round(self.frag_share * max(0.0, peak))

    def _cache(self, peak: int, kept: int, override: int | float | None, device_total: int | None,
               frag_floor: float = 0.0) -> int:
        """The allocator's cache (reserved - peak) at a predicted peak. Off the limit it holds what was measured
        (the cached bytes at the observed batch); near the limit it gives back whole free segments (the caching
        allocator frees its cached blocks and retries before it raises) down to the room left, but never below
        the fragmentation inside live segments, which it cannot give back. So a batch fits when peak + context +
        fragmentation + kept <= device. With a given margin the measured cache is kept as measured."""
        frag = max(self.fragmentation(peak), round(frag_floor * max(0, peak)))  # a what-if's own share
        if override is not None:
            return self.cache
        if not device_total:
            return self.cache  # no device, no limit: the cache as measured
        room = device_total - self.context - peak - kept
        return max(frag, min(max(self.cache, frag), room))

    def _extra(self, micro: int, far: bool, lines: dict[str, Line] | None = None) -> float:
        """Bytes the band's high side adds to the central peak at micro-batch ``micro``: 0 up to the reference
        batch, where the observations hold. Beyond it, when the fit's fixed part is suspect or the target lies
        beyond FAR_EXTRAPOLATION x the largest observed batch (far), the peak may grow at the slope bound from
        the floor; with upward curvature, at the steepest observed secant. ``lines``: a what-if's lines, whose
        per-sample bytes scale the extra (what shrinks the activations shrinks their uncertainty too)."""
        beyond = micro - self.reference_batch
        if beyond <= 0:
            return 0.0
        central = self.peak_at(micro)
        extra = self.curvature_slope * beyond
        if self.suspect or far:
            extra = max(extra, self.floor + self.slope_bound * micro - central)
        for _, high in self.phase_bounds.values():
            extra = max(extra, high.at(micro) - central)
        if lines is not None and extra > 0:
            observed = self._top_line(micro).per_sample  # the deciding line's; a phase's lift is kept
            changed = sum(lines[n].per_sample for n in COMPONENTS) + observed - self.peak_line.per_sample
            if observed > 0:
                extra *= min(1.0, max(0.0, changed / observed))
        return max(0.0, extra)

    def _total(self, lines: dict[str, Line], batch: int, steps: int, margin: int | float | None,
               device_total: int | None, high: bool | str = False,
               delta: dict[str, Line] | None = None, frag_floor: float = 0.0) -> tuple[int, int]:
        """(total, margin) at ``batch``; high: False (central), True (band's high side), 'far' (high, far)."""
        comps, micro = self._evaluate(lines, batch, steps, delta)
        peak = sum(comps.values())
        if high:
            peak += round(self._extra(micro, high == "far", lines))
        kept = self._margin(margin, device_total)
        return peak + self._cache(peak, kept, margin, device_total, frag_floor) + self.context, kept

    def _far(self, central_max: int | None, batch: int, steps: int) -> bool:
        """Is the extrapolation beyond FAR_EXTRAPOLATION x the largest observed batch? Judged on the central
        largest batch when there is one (the batch a user would try), else on the batch asked for."""
        target = -(-central_max // steps) if central_max else -(-batch // steps)
        return target > FAR_EXTRAPOLATION * self.reference_batch

    def _conservative_why(self, max_high: int | None, central: int | None, far: bool) -> tuple[str, ...]:
        """Why the largest batch is below the central fit's: what the observations cannot support."""
        if central is None or max_high is None or max_high >= central:
            return ()
        why: list[str] = []
        sizes = self.batch_sizes
        if self.unexplained_fixed > 0:
            close = len(sizes) == 2 and sizes[-1] <= 2 * sizes[0]
            source = (f"two close batch sizes ({sizes[0]}, {sizes[-1]})" if close
                      else "one batch size" if len(sizes) == 1 else f"batch sizes {', '.join(map(str, sizes))}")
            why.append(f"from {source}, {self.unexplained_fixed / 2**20:.0f} MiB of the peak look batch-independent "
                       f"but are not parameters or optimizer state: counted per-sample beyond batch "
                       f"{self.reference_batch} (a step's peak can move to another phase, e.g. from forward to "
                       f"backward, as the batch grows)")
        for phase, (excess, _) in self.phase_bounds.items():
            why.append(f"the {phase}'s own peak holds {excess / 2**20:.0f} MiB that are not parameters, gradients "
                       f"or optimizer state (a previous, larger step's tensors still alive?): counted per-sample "
                       f"beyond batch {self.reference_batch}")
        if self.curvature_slope > 0 and self.steepest_between:
            a, b = self.steepest_between
            why.append(f"the measured peak curves upward (steepest between batch {a} and {b}): that slope is "
                       f"used beyond batch {self.reference_batch}")
        if far:
            why.append(f"extrapolating {central / self.reference_batch:.0f}x beyond the largest observed batch "
                       f"({self.reference_batch}): the peak's fixed part above parameters and optimizer state "
                       f"counted per-sample")
        return tuple(why)

    def predict(self, what_if: WhatIf | None = None, *, device_total: int | None = None,
                margin: int | float | None = None) -> Prediction:
        """Breakdown at what_if.batch_size (default: the last observed). margin overrides the derived margin:
        int bytes, or a float in [0, 1) as a fraction of device_total. Raises ValueError for a bad WhatIf."""
        what_if = what_if or WhatIf()
        self._check(what_if)
        batch = what_if.batch_size or self.last_batch
        lines, notes, delta = self._lines_for(what_if)
        comps, micro = self._evaluate(lines, batch, what_if.accumulation_steps, delta)
        peak = sum(comps.values())
        kept = self._margin(margin, device_total)
        share = self.pool_share(what_if, micro)
        if share is not None:
            notes.append(f"checkpointing: at batch {micro} the recorded step runs in a pool {share:.1%} beyond its "
                         f"simulated peak, at the least")
        frag_floor = self._frag_floor(what_if)
        comps["cache"] = self._cache(peak, kept, margin, device_total, frag_floor)
        comps["context"] = self.context
        total = peak + comps["cache"] + self.context
        steps = what_if.accumulation_steps
        central_max = self._search(device_total, what_if, margin, high=False)
        far = self._far(central_max, batch, steps)
        high_peak = peak + round(self._extra(micro, far, lines))
        max_batch = self.max_batch(device_total, what_if, margin=margin) if device_total else None
        band = Band(total, high_peak + self._cache(high_peak, kept, margin, device_total, frag_floor) + self.context)
        headroom = device_total - kept - band.high if device_total else None
        why = self._conservative_why(max_batch, central_max, far)
        extrapolation = (max_batch / self.reference_batch) if max_batch else None
        decided_at = -(-max_batch // steps) if max_batch else micro
        basis = self.basis_fields(notes, margin_source="measured" if margin is None else "given",
                                  extrapolation=extrapolation, conservative=bool(why), conservative_why=why,
                                  deciding_phase=self.deciding_phase(decided_at),
                                  deciding_segment=self.deciding_segment(decided_at),
                                  decided_at=decided_at if self.phase_lines else None)
        return Prediction(batch_size=batch, components={n: comps[n] for n in ALL_COMPONENTS}, total=total,
                          peak_allocated=peak, max_batch=max_batch, device_total=device_total, headroom=headroom,
                          margin=kept, basis_fields=basis, band=band, max_batch_central=central_max,
                          what_if=what_if, micro_batch=micro)

    def max_batch(self, device_total: int | None, what_if: WhatIf | None = None, *,
                  margin: int | float | None = None) -> int | None:
        """Largest (effective) batch with the band's high side + margin <= device_total (the conservative
        answer; Prediction.max_batch_central is the central fit's). 0: not even batch 1 fits.
        None: unknown (no device size, or no per-sample bytes measured, so nothing bounds the batch)."""
        what_if = what_if or WhatIf()
        if not device_total:
            return None
        central = self._search(device_total, what_if, margin, high=False)
        far = self._far(central, 1, what_if.accumulation_steps)
        return self._search(device_total, what_if, margin, high="far" if far else True)

    def _search(self, device_total: int | None, what_if: WhatIf, margin: int | float | None,
                high: bool | str) -> int | None:
        """Exact integer search of the largest batch on the central (high=False) or high side."""
        if not device_total:
            return None
        self._check(what_if)
        key = (device_total, replace(what_if, batch_size=None), margin, high)
        if key in self._max_batch_cache:
            return self._max_batch_cache[key]
        lines, _, delta = self._lines_for(what_if)
        frag_floor = self._frag_floor(what_if)
        trace = self._pool_trace(what_if)
        steps = what_if.accumulation_steps
        if sum(lines[n].per_sample for n in COMPONENTS) <= 0:
            result = None
        else:
            def pool_ok(micro: int, kept: float | None = None) -> bool:
                """The step (recorded or synthesised) runs in the pool the device leaves at ``micro``."""
                if trace is None:
                    return True
                if kept is None:
                    kept = self._total(lines, micro, 1, margin, device_total, high, delta, frag_floor)[1]
                return self._pool_fits(trace, micro, int(device_total - self.context - kept))

            def fits(micro: int) -> bool:
                total, kept = self._total(lines, micro, 1, margin, device_total, high, delta, frag_floor)
                if total + kept > device_total:
                    return False
                # the recorded step must also run in the pool the device leaves (the allocator simulated)
                return pool_ok(micro, kept)

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
                    if trace is not None:
                        # the simulated pool is not monotone in the batch (the segments' sizes move with it, and
                        # at the limit a few MiB decide whether a cached segment is free to give back): the
                        # answer is below the smallest batch that fails within POOL_SCAN under it (at most
                        # POOL_SCAN_PROBES of them simulated: step_trace.scan_batches)
                        for micro in scan_batches(lo):
                            if not pool_ok(micro):
                                lo = micro - 1
                    result = lo * steps
        if len(self._max_batch_cache) > 2048:  # the advisor asks ~200 what-ifs x 3 searches
            self._max_batch_cache.clear()
        self._max_batch_cache[key] = result
        return result


#: MemoryModel fields only the basis (and Prediction.batch_size's default) reads, never a largest-batch search:
#: what a steady job's refit moves (share_searches)
BASIS_ONLY = frozenset({"step_range", "count", "time_line", "last_batch", "batch_sizes", "notes"})
_SEARCHED = operator.attrgetter(*(f.name for f in fields(MemoryModel) if f.compare and f.name not in BASIS_ONLY))
