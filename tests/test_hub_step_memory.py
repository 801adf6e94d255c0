"""The hub's step history stores each step compactly (step_history.compact_step): equal to the decoded Step in
every field - whatever fields protocol.Step has - and a third of its memory (issue 14 point 3: RSS beside 16 fast
agents was the histories, ~1.1 KB a step)."""

from __future__ import annotations

import copy
import dataclasses
import gc
import pickle
import time
import tracemalloc

from batchmon import protocol
from batchmon.monitor.hub_state import HISTORY_LIMIT
from batchmon.monitor.step_history import StepHistory, compact_step
from batchmon.protocol import Step

NAMES = ("parameters", "gradients", "optimizer", "activations", "batch", "other")


def wire_step(i: int) -> bytes:
    """A step as an agent sends it: steady components that cycle through a few values, allocator figures, a
    coalesced window; every 50th a sampled step with the peak's phase."""
    comps = {n: 4_000_000 * (k + 1) + (i % 7) * 4096 for k, n in enumerate(NAMES)}
    sampled = i % 50 == 0
    step = Step(step=i * 10, time=1_700_000_000.0 + i, step_seconds=0.1 + (i % 3) * 1e-3, batch_size=16,
                components=comps, allocated=10**9 + i % 5, peak_allocated=2 * 10**9 + i % 3, reserved=3 * 10**9,
                num_alloc_retries=0, num_ooms=0, device_used=4 * 10**9 + i % 11, batch_source="input dim 0",
                micro_batches=1, steps=10, peak_phase="backward" if sampled else None,
                phase_peaks={"forward": 10**9, "backward": 2 * 10**9} if sampled else None)
    return protocol.encode(step)


def fields(step: Step) -> dict:
    return {f.name: getattr(step, f.name) for f in dataclasses.fields(Step)}


def test_a_compact_step_equals_the_decoded_one_in_every_field():
    decoded = [protocol.decode(wire_step(i)) for i in range(200)]
    h = StepHistory(1000)
    kept = [h.append(s) for s in decoded]
    for a, b in zip(decoded, kept):
        assert a is not b and a == b and fields(a) == fields(b) and hash(a.step) == hash(b.step)
        assert protocol.encode(a) == protocol.encode(b)  # what record/stream/export write
    assert list(h) == decoded and h.window() == tuple(decoded)
    assert h.model_steps() == [decoded[i] for i in range(len(decoded)) if kept[i] in h.model_steps()]
    # equal dicts are one object, shared between the steps that hold them
    assert kept[0].components is kept[7].components and kept[0].components is not kept[1].components
    assert kept[50].phase_peaks is kept[100].phase_peaks


def test_a_field_protocol_adds_is_kept():
    step = protocol.decode(wire_step(50))
    extra = object.__new__(Step)
    extra.__dict__.update(step.__dict__, a_new_field={"forward": 1})  # a field a later protocol adds
    out = compact_step(extra, {})
    assert out.a_new_field == {"forward": 1} and out == step  # type: ignore[attr-defined]


def test_the_history_of_a_steady_run_takes_a_third_of_the_decoded_steps_memory():
    lines = [wire_step(i) for i in range(HISTORY_LIMIT)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        decoded = [protocol.decode(line) for line in lines]
        as_decoded = tracemalloc.get_traced_memory()[0] - before
        h = StepHistory(HISTORY_LIMIT)
        for s in decoded:
            h.append(s)
        del decoded, s
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    per_decoded, per_kept = as_decoded / HISTORY_LIMIT, kept / HISTORY_LIMIT
    assert per_decoded > 900  # what the hub kept before
    assert per_kept < 400, f"{per_kept:.0f} B a step kept (decoded: {per_decoded:.0f})"


def test_compacting_is_cheap_beside_decoding():
    lines = [wire_step(i) for i in range(2000)]
    t0 = time.thread_time()
    decoded = [protocol.decode(line) for line in lines]
    t1 = time.thread_time()
    h = StepHistory(HISTORY_LIMIT)
    for s in decoded:
        h.append(s)
    t2 = time.thread_time()
    assert t2 - t1 < 1.5 * (t1 - t0)  # appending (compaction and the model summary) under decoding's cost x 1.5


def steady_wire_step(i: int) -> bytes:
    """A step of a steady CUDA job (bench/load.py --gpu): the same figures step after step, step times that
    jitter, coalesced windows of 40-44 steps, the peak's phase on every 16th step, the saved split on those."""
    comps = {n: 4_000_000 * (k + 1) for k, n in enumerate(NAMES)}
    peak = sum(comps.values())
    sampled = i % 16 == 0
    step = protocol.new_step(i, 1_700_000_000.0 + i * 0.01, 0.01 * (1 + (i % 13) / 1000), 256, comps,
                             peak - comps["activations"], peak, 2**30, None, None, 2**31, "input dim 0", 1,
                             40 + i % 5, "optimizer" if sampled else None,
                             {"forward": peak - 10, "backward": peak - 6, "optimizer": peak} if sampled else None)
    if sampled:
        step = protocol.with_added(step, saved_split={"batch": 256, "saved": 5, "in_blocks": 0, "block_inputs": 0,
                                                      "blocks": 0}, inactive_split=3 * 2**20)
    return protocol.encode(step)


def test_steady_steps_share_their_other_fields_and_answer_as_the_decoded_steps():
    decoded = [protocol.decode(steady_wire_step(i)) for i in range(1, 200)]
    h = StepHistory(1000)
    kept = [h.append(s) for s in decoded]
    shared = [k for k in kept if type(k) is not Step]
    assert len(shared) >= 190  # all but the first of each kind (plain and sampled) share a template
    for a, b in zip(decoded, kept):
        assert a == b and b == a and not (a != b) and fields(a) == fields(b)
        assert a.saved_split == b.saved_split and protocol.encode(a) == protocol.encode(b)
        assert a.inactive_split == b.inactive_split  # every added field (protocol.ADDED_FIELDS) is kept
        assert repr(a) == repr(b) and isinstance(b, Step)
    assert kept[20] != kept[21] and kept[20] != decoded[21] and decoded[21] != kept[20]
    assert h.window() == tuple(decoded) and list(reversed(h.window())) == decoded[::-1]
    other = dataclasses.replace(shared[5], batch_size=8)  # what the what-ifs may do with a step
    assert type(other) is Step and other.batch_size == 8 and other.step == shared[5].step
    try:
        shared[5].batch_size = 3  # type: ignore[misc]
    except (AttributeError, dataclasses.FrozenInstanceError):
        pass
    else:
        raise AssertionError("a kept step must stay frozen")
    again = StepHistory(10).append(shared[5])  # a kept step kept again (a replay's history built from a view)
    assert again == shared[5] and protocol.encode(again) == protocol.encode(shared[5])
    sampled = next(k for k in shared if k.saved_split is not None)
    for kept_step in (shared[5], sampled):  # copied or pickled: the plain Step it stands for
        for made in (copy.copy(kept_step), copy.deepcopy(kept_step), pickle.loads(pickle.dumps(kept_step))):
            assert type(made) is Step and made == kept_step and made.saved_split == kept_step.saved_split
            assert made.inactive_split == kept_step.inactive_split
    assert sampled.inactive_split == 3 * 2**20 and protocol.encode(sampled) == protocol.encode(decoded[sampled.step - 1])


def test_the_history_of_a_steady_cuda_job_keeps_under_200_bytes_a_step():
    lines = [steady_wire_step(i) for i in range(1, HISTORY_LIMIT + 1)]
    gc.collect()
    tracemalloc.start()
    try:
        h = StepHistory(HISTORY_LIMIT)
        before = tracemalloc.get_traced_memory()[0]
        for line in lines:
            h.append(protocol.decode(line))
        gc.collect()
        kept = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert kept / HISTORY_LIMIT < 200, f"{kept / HISTORY_LIMIT:.0f} B a step kept"  # was ~350 (plain compact)
