"""The caching allocator's model (batchmon.memory_model.allocator_sim) and the step traces run through it."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from batchmon.memory_model.allocator_sim import CachingAllocator, SimOutOfMemory, round_size, segment_size
from batchmon.memory_model.step_trace import FREE, StepTrace, largest_batch, pool_share, required_limit, simulate

MIB = 2**20
BENCH = Path(__file__).resolve().parent.parent / "bench"


def test_sizes_follow_the_cuda_allocator():
    assert round_size(1) == 512 and round_size(513) == 1024 and round_size(4096) == 4096
    assert segment_size(600 * 1024) == 2 * MIB  # small pool
    assert segment_size(5 * MIB) == 20 * MIB  # large pool, under 10 MiB
    assert segment_size(11 * MIB + 1) == 12 * MIB  # rounded up to 2 MiB


def test_small_requests_share_a_segment_and_large_ones_split_theirs():
    a = CachingAllocator()
    a.malloc(600 * 1024)
    a.malloc(600 * 1024)
    assert a.reserved == 2 * MIB
    a.malloc(5 * MIB)
    a.malloc(5 * MIB)  # the rest of the first 20 MiB segment
    assert a.reserved == 22 * MIB
    big = a.malloc(int(19.5 * MIB))  # its own 20 MiB segment; a rest of 0.5 MiB is not split off (<= 1 MiB)
    assert big.size == 20 * MIB and a.reserved == 42 * MIB


def test_freed_neighbours_merge_and_serve_a_larger_request():
    a = CachingAllocator()
    x, y = a.malloc(6 * MIB), a.malloc(6 * MIB)
    a.free(x)
    a.free(y)
    a.malloc(12 * MIB)  # served from the merged free blocks of the 20 MiB segment, not a new 12 MiB one
    assert a.reserved == 20 * MIB


def test_the_limit_releases_free_segments_then_runs_out_where_live_blocks_pin_them():
    a = CachingAllocator(limit=100 * MIB)
    big = a.malloc(60 * MIB)
    a.free(big)  # a whole free segment: released on the retry
    a.malloc(80 * MIB)
    assert a.retries == 1 and a.reserved == 80 * MIB
    b = CachingAllocator(limit=100 * MIB)
    seg = b.malloc(60 * MIB)
    b.free(seg)
    pin = b.malloc(30 * MIB)  # best fit: splits the free 60 MiB segment, pinning it with 30 MiB free inside
    assert b.reserved == 60 * MIB and pin.size == 30 * MIB
    with pytest.raises(SimOutOfMemory):  # 70 MiB free in all (30 inside the pinned segment, 40 never reserved)
        b.malloc(50 * MIB)


def _trace() -> StepTrace:
    # a forward keeping an 8 MiB x batch activation, with transients of 1 MiB x batch made and freed in turn
    events: list[tuple[int, float, float]] = [(0, 0.0, 8 * MIB)]
    for k in range(1, 7):
        events.append((k, 0.0, 1 * MIB))
        if k > 1:
            events.append((k - 1, FREE, 0.0))
    events.append((6, FREE, 0.0))
    events.append((7, 0.0, 16 * MIB))  # the loss's backward: a large gradient beside the activation
    return StepTrace((100 * MIB,), tuple(events))


def test_a_step_runs_below_its_required_limit_and_not_below_its_peak():
    trace = _trace()
    limit, run = required_limit(trace, 10)
    assert run.ok and run.peak_allocated <= limit
    assert simulate(trace, 10, limit).ok
    assert not simulate(trace, 10, run.peak_allocated - 1).ok
    assert pool_share(trace, 10) >= 0
    best = largest_batch(trace, 1024 * MIB)
    assert simulate(trace, best, 1024 * MIB).ok and not simulate(trace, best + 1, 1024 * MIB).ok


def test_a_real_step_recorded_at_three_batches_scales_to_a_fourth():
    """bench/step_alloc_trace.py on a real torch step: each allocation is a line in the batch, and the line
    through batch 2 and 3 gives batch 5's recorded sizes exactly (scaled raises where it does not)."""
    torch = pytest.importorskip("torch")
    sys.path.insert(0, str(BENCH))
    from step_alloc_trace import record, scaled

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    opt = torch.optim.AdamW(model.parameters(), foreach=True)

    def step(b: int) -> None:
        x = torch.randn(b, 32)
        torch.nn.functional.cross_entropy(model(x), torch.zeros(b, dtype=torch.long)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(1)
    runs = {b: record(step, b) for b in (2, 3, 5)}
    trace = scaled([], runs)
    assert any(per > 0 for _, fixed, per in trace.events if fixed != FREE)  # some grow with the batch
    assert sum(1 for _, fixed, _ in trace.events if fixed == FREE) > 0  # and are freed within the step
    with pytest.raises(ValueError):
        scaled([], {2: runs[2], 3: runs[3], 5: runs[2]})
