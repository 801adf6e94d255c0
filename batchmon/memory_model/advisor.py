"""The fit advisor: which change to the run makes a target batch fit, and what it costs in step time.

Every strategy of the memory equation (gradient accumulation 2/4/8, mixed precision, activation checkpointing,
an optimizer with less state, sharding over N GPUs) and their combinations are asked of the fitted model as
``WhatIf``s: the largest batch each allows is the model's own conservative ``max_batch`` (the band's high side
plus the measured margin), so the advisor never promises more than the prediction does and has no predictor of
its own. Each carries an estimated step-time factor (time per sample relative to the run as observed) and how
that factor was estimated (``factor_basis``): measured where the observed steps give a basis, else the
published rule of thumb, named as such.

Ranking: with a target batch, the strategies that reach it first, cheapest step time first (ties: the change
that leaves the training's numerics alone first, then the fewest changes); then those that do not, largest
batch first. Without a target, the strategies that are not dominated (another allows at least as large a
batch at no more cost) by largest batch per cost.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from batchmon.formulas import OPTIMIZER_STATES
from batchmon.memory_model.model import MemoryModel
from batchmon.memory_model.prediction import WhatIf

ACCUMULATION_STEPS = (2, 4, 8)
SHARD_COUNTS = (2, 4, 8)  # GPUs a single-GPU run is told it would need
#: checkpointing re-runs each block's forward in the backward: + the forward's share of the step; backward
#: costs about twice the forward (two matmuls per forward matmul), so forward ~ 1/3 of forward + backward
CHECKPOINT_FACTOR = 1.0 + 1.0 / 3.0
#: bf16/fp16 autocast on a tensor-core GPU: matmuls at the 16-bit rate, elementwise ops move half the bytes;
#: published training speed-ups are 1.3-3x: 1/1.25 taken, the low end (a factor that promises less speed)
AMP_FACTOR = 0.8
#: FSDP/ZeRO-3 at the per-GPU batch: compute per sample unchanged, 3 x the parameter bytes moved per step
#: (all-gather forward and backward, reduce-scatter gradients), mostly overlapped with compute
SHARD_FACTOR = 1.1
#: strategies listed that fall short of a target (the closest), after every one that reaches it
SHORT_OF_TARGET = 5


@dataclass(frozen=True)
class Advice:
    """One strategy (or combination) and what it buys: the largest batch, and the step-time cost."""

    what_if: str  # e.g. "amp + 4 accumulation steps"; "as observed" for the run unchanged
    max_batch: int | None  # largest (effective) batch it allows, conservative; None: unknown
    step_time_factor: float  # time per sample relative to the observed run (<1: faster)
    factor_basis: str  # how the factor was estimated (measured / rule of thumb, and which)
    fits_target: bool | None = None  # None: no target asked
    assumptions: tuple[str, ...] = ()  # the what-if's assumptions (the prediction's basis notes)
    spec: WhatIf | None = None  # the WhatIf asked of the model (batch_size None)


@dataclass(frozen=True)
class _Option:
    spec: WhatIf
    label: str
    factor: float
    basis: tuple[str, ...]
    numerics: int  # changes that alter the training's numerics (amp, optimizer): ranked after exact ones
    changes: int


def _accumulation_factor(model: MemoryModel, steps: int, batch: int | None) -> tuple[float, str]:
    """k micro-batches of B/k: per-sample time unchanged, the per-pass overhead paid k times. Measured when the
    observed steps at two or more batch sizes fit step time = overhead + per-sample x B."""
    timing = model.time_line
    if timing is not None and timing.fixed > 0 and timing.per_sample > 0:
        b = max(batch or 0, steps, 1)
        full = timing.at(b)
        factor = (steps * timing.fixed + timing.per_sample * b) / full
        return factor, (f"measured: step time {timing.fixed * 1e3:.1f} ms + {timing.per_sample * 1e6:.1f} us x "
                        f"batch over the observed steps; {steps} passes pay the per-pass part {steps} times "
                        f"(at batch {b})")
    return 1.0, (f"estimated: {steps} micro-batches of batch/{steps} take about the time of one full batch "
                 f"(per-pass overhead not measured; small micro-batches use the GPU less well)")


def _options(model: MemoryModel, gpus: int, shard_choices: tuple[int, ...]) -> list[_Option]:
    """Every combination, with its label, its batch-independent step-time factor and that factor's basis: only
    optimizers with less state than the observed one, no AMP where the run already uses it."""
    observed_states = OPTIMIZER_STATES.get(model.optimizer or "", None)
    optimizers: list[str | None] = [None]
    if observed_states:
        optimizers += [k for k in ("sgd-momentum", "sgd") if OPTIMIZER_STATES[k] < observed_states]
    amps = [False] if model.observed_amp else [False, True]
    out: list[_Option] = []
    for acc, amp, ckpt, opt, shards in itertools.product((1, *ACCUMULATION_STEPS), amps, (False, True),
                                                         optimizers, shard_choices):
        spec = WhatIf(amp=amp, checkpointing=ckpt, accumulation_steps=acc, optimizer=opt, shards=shards)
        labels: list[str] = []
        basis: list[str] = []
        factor = 1.0
        if amp:
            labels.append("amp")
            factor *= AMP_FACTOR
            basis.append(f"amp x{AMP_FACTOR:g} estimated (tensor-core 16-bit matmuls; none on a GPU without them)")
        if ckpt:
            labels.append("checkpointing")
            factor *= CHECKPOINT_FACTOR
            basis.append(f"checkpointing x{CHECKPOINT_FACTOR:.2f} estimated (forward re-run: forward ~1/3 of "
                         f"forward + backward)")
        if opt is not None:
            labels.append(opt)
            basis.append(f"{opt} x1 (the update is a small share of the step; changes the training: re-tune)")
        if acc > 1:
            labels.append(f"{acc} accumulation steps")  # its factor depends on the batch: set in advise()
        if shards > 1:
            need = "" if shards == gpus else f" (needs {shards} GPUs)"
            labels.append(f"sharded over {shards} GPUs{need}")
            factor *= SHARD_FACTOR
            basis.append(f"sharding x{SHARD_FACTOR:g} estimated (3 x parameter bytes over NVLink per step, mostly "
                         f"overlapped)")
        out.append(_Option(spec, " + ".join(labels) or "as observed", factor,
                           tuple(basis), int(amp) + int(opt is not None), len(labels)))
    return out


def advise(model: MemoryModel, *, capacity: int, target_batch: int | None = None,
           gpus: int = 1) -> tuple[Advice, ...]:
    """The strategies ranked for ``target_batch`` on a device of ``capacity`` bytes (module docstring)."""
    if target_batch is not None and target_batch < 1:
        raise ValueError(f"target batch must be >= 1, got {target_batch}")
    if gpus < 1:
        raise ValueError(f"gpus must be >= 1, got {gpus}")
    rows = _evaluate(model, _options(model, gpus, (1, gpus) if gpus > 1 else (1,)), capacity, target_batch)
    if target_batch is not None and not any(a.fits_target for _, a in rows):
        # nothing on the run's own GPUs reaches the target: the fewest GPUs that would, sharded
        for n in (n for n in SHARD_COUNTS if n > gpus):
            more = _evaluate(model, _options(model, gpus, (n,)), capacity, target_batch)
            if any(a.fits_target for _, a in more):
                rows += more
                break
    return tuple(a for _, a in _rank(rows, gpus, target_batch))


def _evaluate(model: MemoryModel, options: list[_Option], capacity: int,
              target_batch: int | None) -> list[tuple[_Option, Advice]]:
    """Each option asked of the model: its largest batch, whether it reaches the target, its final factor."""
    rows: list[tuple[_Option, Advice]] = []
    for opt in options:
        pred = model.predict(opt.spec, device_total=capacity)
        best = pred.max_batch
        fits = None if target_batch is None else (best is not None and best >= target_batch)
        if opt.spec.accumulation_steps > 1:  # at the batch the user would run: the target, else the largest
            f, why = _accumulation_factor(model, opt.spec.accumulation_steps, target_batch or best)
            opt = replace(opt, factor=opt.factor * f, basis=(*opt.basis, f"accumulation x{f:.2f} {why}"))
        advice = Advice(what_if=opt.label, max_batch=best, step_time_factor=round(opt.factor, 3),
                        factor_basis="; ".join(opt.basis) or "the observed run", fits_target=fits,
                        assumptions=pred.basis_fields.what_if + pred.basis_fields.conservative_why, spec=opt.spec)
        rows.append((opt, advice))
    return rows


def _rank(rows: list[tuple[_Option, Advice]], gpus: int,
          target: int | None) -> list[tuple[_Option, Advice]]:
    if target is not None:
        # more GPUs than the run has are named only when no change on its own GPUs reaches the target, and then
        # only the fewest that do
        on_own = [r for r in rows if r[0].spec.shards <= gpus]
        if not any(a.fits_target for _, a in on_own):
            fewest = min((o.spec.shards for o, a in rows if a.fits_target), default=None)
            on_own += [r for r in rows if r[0].spec.shards == fewest and fewest is not None]
        reach = sorted((r for r in on_own if r[1].fits_target), key=lambda r: _cost(r[0]))
        short = sorted((r for r in on_own if not r[1].fits_target),
                       key=lambda r: (-(r[1].max_batch or 0), _cost(r[0])))
        return _undominated(reach, by_batch=False) + _undominated(short, by_batch=True)[:SHORT_OF_TARGET]
    rows = [(o, a) for o, a in rows if o.spec.shards <= gpus]
    return sorted(_undominated(rows, by_batch=True, coarse=True),
                  key=lambda r: (-(r[1].max_batch or 0) / r[0].factor, _cost(r[0])))


def _cost(o: _Option) -> tuple:
    """Cheapest first: step time, then fewer GPUs, numerics left alone, fewer changes, fewer micro-batches."""
    return (round(o.factor, 3), o.spec.shards, o.numerics, o.changes, o.spec.accumulation_steps)


def _undominated(rows: list[tuple[_Option, Advice]], *, by_batch: bool,
                 coarse: bool = False) -> list[tuple[_Option, Advice]]:
    """Drop a row when another is no more costly in every respect (_cost's terms; ``coarse``: step time and
    numerics only) and, when ``by_batch``, allows at least its batch; strictly better in one of them (order
    kept). Without ``by_batch`` (strategies that all reach the target) a larger batch buys nothing."""
    def cost(o: _Option) -> tuple:
        return (round(o.factor, 3), o.numerics) if coarse else _cost(o)

    def no_worse(p: _Option, b: Advice, o: _Option, a: Advice) -> bool:
        return (all(x <= y for x, y in zip(cost(p), cost(o), strict=True))
                and (not by_batch or (b.max_batch or 0) >= (a.max_batch or 0)))

    out = []
    for o, a in rows:
        dominated = any(no_worse(p, b, o, a) and (cost(p) != cost(o) or (by_batch and (b.max_batch or 0) >
                                                                         (a.max_batch or 0)))
                        for p, b in rows if p is not o)
        if not dominated:
            out.append((o, a))
    return out


def advice_for(model: MemoryModel | None, device_total: int | None, *, target_batch: int | None = None,
               gpus: int = 1) -> tuple[Advice, ...]:
    """advise() for a front end: () without a fitted model or a device size (nothing to advise on)."""
    if model is None or not device_total:
        return ()
    return advise(model, capacity=device_total, target_batch=target_batch, gpus=max(1, gpus))


def advice_json(advice: tuple[Advice, ...]) -> list[dict]:
    """`--once --json`'s prediction.advice: [{what_if, max_batch, step_time_factor, factor_basis, ...}]."""
    return [{"what_if": a.what_if, "max_batch": a.max_batch, "step_time_factor": a.step_time_factor,
             "factor_basis": a.factor_basis, "fits_target": a.fits_target, "assumptions": list(a.assumptions),
             # max_batch is the effective batch; with accumulation each forward sees this many samples
             "micro_batch": None if a.max_batch is None or a.spec is None else
             a.max_batch // a.spec.accumulation_steps}
            for a in advice]


def advice_text(advice: tuple[Advice, ...], count: int = 2) -> str | None:
    """The best ``count`` as one line for `--once`: 'amp + checkpointing: batch 3235 at step time x1.07; ...'."""
    if not advice:
        return None
    return "; ".join(f"{a.what_if}: batch {'?' if a.max_batch is None else a.max_batch} at step time "
                     f"x{a.step_time_factor:.2f}" for a in advice[:count])
