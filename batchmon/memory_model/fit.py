"""Fitting the memory model to measured steps (the rules are in batchmon.memory_model's docstring)."""

from __future__ import annotations

import operator
import statistics
from typing import Any, Iterable, Sequence

from batchmon.formulas import OPTIMIZER_STATES, optimizer_kind
from batchmon.memory_model.model import FRAG_SURVIVAL, MemoryModel
from batchmon.memory_model.observations import FIXED, PER_SAMPLE, Line, Observation, ParamLayout, SavedSplit, fit_line
from batchmon.memory_model.prediction import Prediction, WhatIf
from batchmon.memory_model.step_trace import StepTrace
from batchmon.protocol import COMPONENTS, PHASES, SEGMENTS, Step

#: the fitted peak's batch-independent part above parameters + optimizer state, as a share of the batch-dependent
#: bytes at the largest observed batch, that a workspace and noise explain: on the four H200 run-1/2
#: architectures it was 2.8% (MLP), 3.2% (CNN), 3.3% (GPT), 4.7% (GPT, AMP); in issue 13's LSTM, 197%
INTERCEPT_SHARE = 0.05
#: a secant of the observed peaks this much steeper than the fitted slope is curvature, not noise
CURVATURE_TOLERANCE = 1.02




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


def fit(steps: Iterable[Step | Observation], *, optimizer: str | None = None, amp: bool = False,
        saved_split: SavedSplit | None = None, param_layout: ParamLayout | None = None,
        recompute_trace: StepTrace | None = None) -> MemoryModel | None:
    """Fit the memory equation to measured steps (protocol.Step or Observation). None when no step is usable.

    optimizer: the observed optimizer's class or kind name (hello's ``optimizer``), used for the lazy-state rule
    and the optimizer what-if; amp: the observed run already used autocast (the AMP what-if is then a no-op);
    saved_split: the measured make-up of the saved activations, from which the checkpointing and AMP what-ifs
    are derived (without it they rest on documented conservative rules); param_layout: how the parameters split
    into FSDP units, from which the sharding what-if counts what FSDP holds unsharded (without it, an upper
    bound: the whole model); recompute_trace: the allocations of one step under activation checkpointing, as lines
    in the batch (``step_trace.StepTrace``, recorded from the user's model), through which the checkpointing
    what-if's pool is simulated instead of assumed (without it, the one the agent's block sequence gives:
    MemoryModel.recompute_trace)."""
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

    segment_lines = _own_lines([(o.batch_size, o.segment_peaks) for o in with_peak], SEGMENTS)
    if saved_split is None:  # the agent's own measurement, carried by its sampled steps (the latest one)
        saved_split = next((s for s in (SavedSplit.from_wire(o.saved_split) for o in reversed(obs)) if s), None)
    phase_lines, per_segment = _segment_lines(with_peak), True
    if not phase_lines:
        phase_lines, per_segment = _phase_lines(with_peak), False
    if phase_lines:
        sizes = sorted({o.batch_size for o in with_peak if (o.segment_peaks if per_segment else o.own_peaks)})
        what = "segment" if per_segment else "phase"
        notes.append(f"peak fitted per {what} ({', '.join(phase_lines)}: each {what}'s own peak at batch "
                     f"{', '.join(map(str, sizes))})")
    band = _band_inputs(lines, with_peak or steady,
                        _largest_per_batch((o.batch_size, o.peak_allocated) for o in with_peak)  # type: ignore[misc]
                        if with_peak else
                        _largest_per_batch((o.batch_size, sum(o.components.values())) for o in steady),
                        phase_lines, amp)

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
    inactive = _median_int(o.inactive_split for o in at_ref)
    split_ratio = inactive / reference_peak if inactive is not None and reference_peak > 0 else None
    if split_ratio is not None and split_ratio < FRAG_SURVIVAL * frag_ratio:
        notes.append(f"fragmentation at the limit: {split_ratio:.1%} of the peak (the allocator's free bytes inside "
                     f"segments with live blocks at batch {reference}), below {FRAG_SURVIVAL} x the cache's share "
                     f"({frag_ratio:.1%}: whole cached segments, given back at the limit)")
    growth = _cache_growth(at_ref)
    counters = [o.num_alloc_retries for o in obs if o.num_alloc_retries is not None]
    retries = max(0, counters[-1] - counters[0]) if len(counters) >= 2 else 0  # cumulative: the increase
    if retries:
        notes.append(f"{retries} allocator retries during the observed steps: cache kept twice")

    return MemoryModel(
        lines=lines, cache=cache or 0, context=context or 0, frag_ratio=frag_ratio, split_ratio=split_ratio,
        reserved_growth=growth,
        alloc_retries=retries, reference_batch=reference, last_batch=obs[-1].batch_size,
        batch_sizes=tuple(sorted({o.batch_size for o in obs})), step_range=(obs[0].step, obs[-1].step),
        count=len(obs), optimizer=kind, observed_amp=amp, notes=tuple(notes), measured_peak=measured_peak,
        time_line=_time_line(obs), saved_split=saved_split, param_layout=param_layout, phase_lines=phase_lines,
        segment_lines=segment_lines, recorded_trace=recompute_trace,
        per_segment=bool(phase_lines) and per_segment,
        **band,
    )


def _cache_growth(at_ref: Sequence[Observation]) -> int:
    """How much the allocator's cache (reserved - peak) grew over the steps at the reference batch size: the
    fragmentation still creeping, kept free as the margin. Not the growth of reserved itself: the pool also
    grows with the peak, and the peak of a run's first step lacks the optimizer state that step creates (Adam's
    state is made in its first optimizer step and is alive through every later forward and backward). The
    steady peak already counts that state; counting the pool's growth too kept it twice (H200 zoo: GPT-2's
    1184 MiB of reserved growth was 946 MiB of peak growth, AdamW's state, and 238 MiB of cache growth; ViT 706
    of which 36 was cache, BERT 958 of which 109)."""
    caches = [o.reserved - o.peak_allocated for o in at_ref if o.reserved is not None and o.peak_allocated is not None]
    return max(0, caches[-1] - caches[0]) if len(caches) >= 2 else 0


def _time_line(obs: Sequence[Observation]) -> Line | None:
    """Step time against batch size, for the advisor's measured factors: the median step time per batch size
    (a run's first step is left out: allocator, cuDNN and compile warm-up), fitted as overhead + per-sample x B.
    None unless two batch sizes at least 1.5x apart are timed, or when the fit is not physical (a slope <= 0,
    a negative overhead: timing noise larger than the batch's effect)."""
    timed: dict[int, list[float]] = {}
    for o in obs[1:]:
        if o.step_seconds is not None and o.step_seconds > 0:
            timed.setdefault(o.batch_size, []).append(o.step_seconds)
    if len(timed) < 2 or max(timed) < 1.5 * min(timed):
        return None
    xs = sorted(timed)
    ys = [statistics.median(timed[b]) for b in xs]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    overhead = mean_y - slope * mean_x
    if slope <= 0 or overhead < 0:
        return None
    return Line(overhead, slope)


def _phase_lines(with_peak: Sequence[Observation]) -> dict[str, Line]:
    """Each phase's own peak as its own line (PHASES order), from the largest own peak at each batch size, for
    the phases measured at two batch sizes or more; {} when the steps carry no own peaks at two batch sizes (an
    older agent, CPU, one batch size): the step's peak is then fitted as one line."""
    return _own_lines([(o.batch_size, o.own_peaks) for o in with_peak], PHASES)


def _segment_lines(with_peak: Sequence[Observation]) -> dict[str, Line]:
    """Each segment's own peak as its own line (SEGMENTS order: the backward split where the model output's
    gradient arrives, issue 13's LSTM), exactly as _phase_lines does with phases, when the steps carry segment
    peaks at two batch sizes or more; else {} (the phases' lines are fitted instead). Beyond the observed batches
    the largest of these lines is never below the largest of the phase lines: at each observed batch the
    backward phase's own peak is the larger of its two segments', and the max of two lines lies above the line
    through their maxima outside the observed range (it is convex)."""
    if not _backward_crossing([(o.batch_size, o.segment_peaks) for o in with_peak]):
        return {}
    return _own_lines([(o.batch_size, o.segment_peaks) for o in with_peak], SEGMENTS)


def _backward_crossing(readings: Sequence[tuple[int, dict[str, int] | None]]) -> bool:
    """Did the backward's peak move between its two segments across the observed batch sizes (the loss's
    backward above the model's at some batch size, below it at another)? Only then is the backward fitted as two
    lines. Where one segment holds the backward's peak at every observed batch, the other one's line is a
    two-point extrapolation of a segment that never decided, and a short last batch's rounding steepens it: the
    GRU seq2seq's model backward (H200 zoo run 5: 342 MiB at batch 32, 524 at 64, always below the loss's
    backward) extrapolated 17% above the real peak at batch 4165, where the backward's one line was within 1%."""
    points = _largest_own(readings)
    head, rest = points.get("loss_backward", {}), points.get("backward", {})
    return len({head[b] >= rest[b] for b in head.keys() & rest.keys()}) > 1


def _own_lines(readings: Sequence[tuple[int, dict[str, int] | None]], names: Sequence[str]) -> dict[str, Line]:
    """A line per name through the largest own peak at each batch size, for the names measured at two batch
    sizes or more (in ``names`` order); {} unless the readings span two batch sizes."""
    if len({b for b, own in readings if own}) < 2:
        return {}
    points = _largest_own(readings)
    return {n: fit_line(sorted(points[n].items())) for n in names if len(points.get(n, ())) >= 2}


def fit_figures(summary: Sequence[Step], memo: dict[int, tuple] | None = None) -> tuple:
    """What of a model summary ``fit`` could answer differently on (the hub refits when it changes): every memory
    figure of its steps, not their step numbers, times or step times. Next to ``fit`` because it says what ``fit``
    reads: a change there that reads more must be compared here.

    The own peaks of the sampled steps (``phase_own_peaks``, ``segment_peaks``) are not compared step by step: the
    fit reads them only as the largest own peak per name at each batch size over the steps it selects (by batch
    size, optimizer state and whether the step has an allocator peak; _largest_own below, the
    reference batch's largest forward, the batch sizes that have any), so they are compared as that largest per
    (batch size, optimizer bytes, has a peak) group. A fast agent's windows alternate between ones that hold a
    sampled step and ones that do not (samples at most every 0.25 s, windows every 0.2 s): compared step by step,
    every new window changed the figures, and 16 fast jobs were refitted every second for the same prediction
    (bench/hub_apply_cost.py --synthetic real: 640 refits in 40 s, 624 with the same prediction).

    ``memo``: a dict the caller keeps between calls on one agent's summaries (id(step) -> (step, its figures)):
    a summary keeps most of its steps from one snapshot to the next (16 fast agents: each second ~70 steps
    read, ~1-5 of them new), so their figures are taken once, and comparing two results meets the same tuples."""
    if memo is None:
        memo = {}
    # each step's entry looked up in C (the memo holds its step, so an id found is that step's: no other live
    # object has it); a steady summary of ~65 steps is then a handful of Python operations, not a loop per step
    ids = list(map(id, summary))
    hits: list[Any] = list(map(memo.get, ids))
    if not all(hits):
        for i, s in enumerate(summary):
            if hits[i] is None:
                phases, segments = s.phase_own_peaks, s.segment_peaks
                hits[i] = memo[id(s)] = (
                    s, (_FIGURES(s), tuple(s.components.values())),
                    (s.batch_size, s.components.get("optimizer"), s.peak_allocated is None)
                    if phases or segments else None)
    # the own peaks of the distinct steps, in order of first occurrence (a summary_key holds a steady job's few
    # templates over and over): merged in the order the steps give them, as a loop over every step would
    own: dict[tuple, list] = {}
    for step_id in dict.fromkeys(ids):
        s, _, key = memo[step_id]
        if key is None:
            continue
        phases, segments = s.phase_own_peaks, s.segment_peaks
        group = own.get(key)
        if group is None:
            group = own[key] = [{}, {}, set()]
        pair = (id(phases), id(segments))  # the steps hold them during this call: ids are theirs alone
        if pair in group[2]:
            continue  # the same dicts again (steady sampled steps share them, step_history.compact_step)
        group[2].add(pair)
        for best, peaks in ((group[0], phases), (group[1], segments)):
            for name, value in (peaks or {}).items():
                was = best.get(name)
                best[name] = value if was is None or value > was else was
    if len(memo) > 2 * len(summary) + 16:  # bounded: only this summary's steps stay
        kept = set(map(id, summary))
        for k in [k for k in memo if k not in kept]:
            del memo[k]
    return tuple(map(_SECOND, hits)), tuple((key, tuple(phases.items()), tuple(segments.items()))
                                             for key, (phases, segments, _) in sorted(own.items(),
                                                                                    key=lambda kv: repr(kv[0])))


_SECOND = operator.itemgetter(1)


def only_grew(old: tuple | None, new: tuple) -> bool:
    """Whether ``new`` figures (fit_figures) are ``old`` with steps appended whose figures ``old`` already held, the
    own peaks unchanged: a steady job's summary while it is still its whole history (the first 1 + RECENT_STEPS +
    RECENT_SIZES windows, batchmon.monitor.step_history), where the fit's answer moves only with how many times a
    figure is held (medians, least squares over several batch sizes)."""
    if old is None or old[1] != new[1]:
        return False
    before, after = old[0], new[0]
    if len(after) <= len(before) or after[:len(before)] != before:
        return False
    held = set(before)
    return all(figures in held for figures in after[len(before):])


_FIGURES = operator.attrgetter("batch_size", "allocated", "peak_allocated", "reserved", "num_alloc_retries", "num_ooms",
                               "device_used", "micro_batches")


def _largest_own(readings: Sequence[tuple[int, dict[str, int] | None]]) -> dict[str, dict[int, int]]:
    """{name: {batch size: the largest own peak read for it at that batch size}}."""
    points: dict[str, dict[int, int]] = {}
    for batch, own in readings:
        for name, value in (own or {}).items():
            best = points.setdefault(name, {})
            best[batch] = max(value, best.get(batch, value))
    return points


def _phase_bounds(lines: dict[str, Line], phase_lines: dict[str, Line], with_peak: Sequence[Observation],
                  reference: int, amp: bool) -> dict[str, tuple[float, Line]]:
    """A forward line whose fixed part exceeds everything batch-independent that can be alive (parameters,
    gradients, optimizer state; under autocast its 16-bit weight copies, half the trainable bytes) by more than
    INTERCEPT_SHARE of its per-sample bytes at the reference batch: bytes no component explains - typically a
    previous, larger step's tensors still alive in a short batch's forward (``output = model(x)`` frees the last
    output only when the new forward returns), which flattens the line. {"forward": (those bytes, the line
    through that floor at 0 and the forward's own peak at the reference batch)}: the band's high side follows
    it beyond the reference. Only the forward: a previous step's tensors are freed by the time its backward
    runs, and the other phases' fixed bytes (the optimizer's parameter-sized temporaries, DDP's buckets) are
    fixed by nature."""
    line = phase_lines.get("forward")
    at_ref = [o.own_peaks["forward"] for o in with_peak
              if o.batch_size == reference and o.own_peaks and "forward" in o.own_peaks]
    if line is None or not at_ref:
        return {}
    trainable = lines["gradients"].fixed or lines["parameters"].fixed
    held = sum(lines[n].fixed for n in FIXED) + (0.5 * trainable if amp else 0.0)
    excess = line.fixed - held
    if excess <= INTERCEPT_SHARE * line.per_sample * reference:
        return {}
    return {"forward": (excess, Line(held, max(line.per_sample, (max(at_ref) - held) / reference)))}


def _band_inputs(lines: dict[str, Line], with_peak: Sequence[Observation],
                 peaks: Sequence[tuple[int, int]], phase_lines: dict[str, Line], amp: bool = False) -> dict:
    """What the band's high side rests on (MemoryModel fields); see "The band" in the module docstring."""
    peak_line = Line()
    for name in COMPONENTS:
        peak_line = peak_line + lines[name]
    reference = max((b for b, _ in peaks), default=0) or 1
    floor = lines["parameters"].fixed + lines["optimizer"].fixed
    excess = max(0.0, peak_line.fixed - floor)
    # a fixed part no component explains may be a phase that is not the peak yet; with every phase's own peak
    # fitted, no phase is hidden: nothing is suspect
    suspect = not phase_lines and excess > INTERCEPT_SHARE * peak_line.per_sample * reference
    # every phase of a step is (fixed >= floor) + slope * B and peaks at most at the step's peak, so its slope is
    # at most (peak - floor) / B; the step's own floor: the agent reports the optimizer state at the step's end,
    # so a step that created it (the first observed, or one after which it grew: Adam's first step) held only the
    # state reported before it while its forward and backward ran
    bounds = []
    before = 0
    for o in with_peak:
        state = o.components["optimizer"]
        if o.peak_allocated is not None:
            bounds.append((o.peak_allocated - o.components["parameters"] - min(state, before)) / o.batch_size)
        before = state
    steepest_phase = max((line.per_sample for line in phase_lines.values()), default=0.0)
    out: dict = {"floor": floor,
                 "slope_bound": max(peak_line.per_sample, steepest_phase, min(bounds, default=0.0)),
                 "suspect": suspect, "unexplained_fixed": excess if suspect else 0.0,
                 "phase_bounds": _phase_bounds(lines, phase_lines, with_peak, reference, amp)}
    if len(peaks) >= 3:
        slope = fit_line(peaks).per_sample
        steepest, between = 0.0, None
        for (b1, v1), (b2, v2) in zip(peaks, peaks[1:], strict=False):
            if b2 >= 1.1 * b1 and (v2 - v1) / (b2 - b1) > steepest:
                steepest, between = (v2 - v1) / (b2 - b1), (b1, b2)
        if between is not None and steepest > CURVATURE_TOLERANCE * slope:
            out["curvature_slope"] = steepest - slope
            out["steepest_between"] = between
    return out


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


def predict_from_steps(steps: Sequence[Step], device_total: int | None, what_if: WhatIf | None = None,
                       optimizer: str | None = None, *, amp: bool = False) -> Prediction | None:
    """fit + predict in one call (the hub and the agent use this). None when no step is usable."""
    model = fit(steps, optimizer=optimizer, amp=amp)
    return model.predict(what_if or WhatIf(), device_total=device_total) if model else None
