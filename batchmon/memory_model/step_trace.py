"""A training step's allocations and frees as lines in the batch size, run through the caching allocator's model
(``allocator_sim``): what the pool needs beyond the step's peak at a given batch, and the largest batch that
runs under a limit.

A trace is what one step asks of the allocator, in order: ``persistent`` blocks that live across steps
(parameters, optimizer state: allocated before the step and never freed), then ``events`` - an allocation
``(key, fixed, per_sample)`` of ``fixed + per_sample x batch`` bytes, or a free ``(key, -1, 0)`` of an earlier
allocation. The step runs from a pool holding only the persistent blocks (after ``torch.cuda.empty_cache()``),
as the first step at a new batch size does after a change of batch (and as the zoo bench's trials do).
"""

from __future__ import annotations

from dataclasses import dataclass

from batchmon.memory_model.allocator_sim import ROUND_LARGE, Block, CachingAllocator, SimOutOfMemory

FREE = -1


@dataclass(frozen=True)
class StepTrace:
    persistent: tuple[int, ...]  # bytes of each block alive across steps, in the order allocated
    events: tuple[tuple[int, float, float], ...]  # (key, fixed, per_sample) alloc; (key, FREE, 0) free

    def sizes(self, batch: int) -> list[tuple[int, int]]:
        """The events at ``batch``: (key, bytes) allocations and (key, FREE) frees."""
        return [(key, FREE if fixed == FREE else max(1, round(fixed + per * batch)))
                for key, fixed, per in self.events]


@dataclass(frozen=True)
class SimStep:
    """One simulated step: did it run, its peaks (allocated and reserved bytes, persistent blocks included)."""

    ok: bool
    peak_allocated: int
    peak_reserved: int
    retries: int

    @property
    def fragmentation(self) -> float:
        """The pool beyond the peak, as a share of the peak (reserved / allocated - 1)."""
        return self.peak_reserved / self.peak_allocated - 1 if self.peak_allocated > 0 else 0.0


def simulate(trace: StepTrace, batch: int, limit: int | None = None) -> SimStep:
    """Run one step at ``batch`` under ``limit`` reserved bytes (None: no limit)."""
    alloc = CachingAllocator(limit)
    try:
        for size in trace.persistent:
            alloc.malloc(size)
        alloc.release_cached()
        alloc.reset_peaks()
        live: dict[int, Block] = {}
        for key, size in trace.sizes(batch):
            if size == FREE:
                block = live.pop(key, None)
                if block is not None:
                    alloc.free(block)
            else:
                live[key] = alloc.malloc(size)
    except SimOutOfMemory:
        return SimStep(False, alloc.peak_allocated, alloc.peak_reserved, alloc.retries)
    return SimStep(True, alloc.peak_allocated, alloc.peak_reserved, alloc.retries)


def required_limit(trace: StepTrace, batch: int) -> tuple[int, SimStep]:
    """The smallest limit (to 2 MiB) under which the step at ``batch`` runs, and that run. Between the step's
    peak allocated (no pool can be smaller) and what it reserves without a limit (a limit that large never
    triggers the release-and-retry)."""
    free_run = simulate(trace, batch)
    lo = free_run.peak_allocated - 1  # fails below the peak
    hi = -(-free_run.peak_reserved // ROUND_LARGE) * ROUND_LARGE
    best = free_run
    while hi - lo > ROUND_LARGE:
        mid = (lo + hi) // 2
        run = simulate(trace, batch, mid)
        if run.ok:
            hi, best = mid, run
        else:
            lo = mid
    return hi, best


def pool_share(trace: StepTrace, batch: int) -> float:
    """What the pool needs beyond the step's peak at ``batch``, as a share of that peak: the smallest limit it
    runs under / its peak allocated - 1. The share a prediction must keep free beyond its peak there."""
    limit, run = required_limit(trace, batch)
    return limit / run.peak_allocated - 1 if run.peak_allocated > 0 else 0.0


#: the simulated pool is not monotone in the batch: a batch counts as fitting only where the batches down to
#: (1 - POOL_SCAN) x it run too (the answer is below the smallest failure found there) - every one of them up to
#: POOL_SCAN_PROBES, else that many evenly spaced from the answer down (a search of a ~5 ms simulation each: every
#: batch of 10% below 48849, a tiny GPT's answer on a 24 GiB device, was 27 s in the monitor's what-if)
POOL_SCAN = 0.10
POOL_SCAN_PROBES = 40


def scan_batches(answer: int, scan: float = POOL_SCAN) -> range:
    """The batches the non-monotone pool's check simulates below a search's ``answer`` (see POOL_SCAN)."""
    floor = max(1, int(answer * (1 - scan)))
    stride = max(1, -(-(answer - floor + 1) // POOL_SCAN_PROBES))
    return range(answer, floor - 1, -stride)


def largest_batch(trace: StepTrace, limit: int, start: int = 1, scan: float = POOL_SCAN) -> int:
    """The largest batch whose step runs under ``limit`` (0: not even batch 1), conservatively: exponential search
    from ``start``, then bisection, then the batches down to (1 - ``scan``) x the answer simulated (scan_batches),
    the answer put below the smallest that fails (a step that runs at a batch need not run at every smaller one: the
    segments' sizes move with the batch)."""
    if not simulate(trace, 1, limit).ok:
        return 0
    lo, hi = 1, max(2, start)
    while simulate(trace, hi, limit).ok:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if simulate(trace, mid, limit).ok:
            lo = mid
        else:
            hi = mid
    for b in scan_batches(lo, scan):
        if not simulate(trace, b, limit).ok:
            lo = b - 1
    return lo
