"""A refit's largest-batch searches shared with the model before it (MemoryModel.share_searches).

A steady job's refit is the model before it with a later basis (step range, step-time line): the hub hands the new
model the old one's search cache, so its three searches are not run again. These tests hold that the answers are
those an unshared model gives, on the H200 fast16 recording, and that a model differing in anything a search reads
does not share."""

from __future__ import annotations

from dataclasses import replace

import pytest

from batchmon import memory_model
from batchmon.memory_model.model import BASIS_ONLY, MemoryModel
from batchmon.memory_model.observations import Line
from batchmon.monitor.hub_state import HubState
from recordings import FAST16_GROWTH, read_records

WHAT_IFS = (memory_model.WhatIf(), memory_model.WhatIf(amp=True), memory_model.WhatIf(checkpointing=True),
            memory_model.WhatIf(accumulation_steps=4), memory_model.WhatIf(optimizer="sgd"),
            memory_model.WhatIf(shards=2))


def _records() -> list[dict]:
    return read_records(FAST16_GROWTH)


def _replay_fits(monkeypatch: pytest.MonkeyPatch) -> tuple[list[tuple[list, str | None, MemoryModel]], int, int]:
    """The recording through the hub's state, a snapshot at each tick: each fit's (summary, optimizer, model), how
    many refits shared their searches, and the device's total."""
    real_fit = memory_model.fit
    real_share = MemoryModel.share_searches
    fits: list[tuple[list, str | None, MemoryModel]] = []
    shared: list[bool] = []

    def recorded(summary, **kwargs):
        model = real_fit(summary, **kwargs)
        fits.append((list(summary), kwargs.get("optimizer"), model))
        return model

    def counted(self, other):
        shared.append(real_share(self, other))
        return shared[-1]

    monkeypatch.setattr(memory_model, "fit", recorded)
    monkeypatch.setattr(MemoryModel, "share_searches", counted)
    state = HubState()
    snap = None
    for rec in _records():
        state.ingest(rec)
        if rec.get("kind") == "tick":
            snap = state.snapshot(float(rec["t"]), 1.0)
    assert snap is not None
    return fits, sum(shared), snap.nvml.devices[0].memory.total


def test_shared_searches_answer_as_an_unshared_model_on_the_h200_recording(monkeypatch):
    """Every fit the hub made on 16 real fast jobs: its prediction, and each what-if's, equal those of the same
    summary fitted afresh with a search cache of its own (the shared one holds what earlier models searched)."""
    fits, shares, total = _replay_fits(monkeypatch)
    assert shares >= 16, "no refit shared its searches: the test tests nothing"
    monkeypatch.undo()
    checked = 0
    for summary, optimizer, model in fits:
        if model is None:
            continue
        fresh = memory_model.fit(summary, optimizer=optimizer)
        assert fresh._max_batch_cache is not model._max_batch_cache
        for what_if in WHAT_IFS:
            assert model.predict(what_if, device_total=total) == fresh.predict(what_if, device_total=total)
        checked += 1
    assert checked == len(fits)


@pytest.fixture(scope="module")
def model() -> MemoryModel:
    """The last fit of the recording (a real H200 job's model, with its allocator's split ratio)."""
    patch = pytest.MonkeyPatch()
    try:
        fits, _, _ = _replay_fits(patch)
    finally:
        patch.undo()
    last = fits[-1][2]
    assert last is not None and last.split_ratio is not None
    return last


def test_a_model_that_differs_only_in_its_basis_shares_and_one_that_differs_in_a_search_input_does_not(model):
    later = replace(model, step_range=(model.step_range[0] + 100, model.step_range[1] + 100),
                    count=model.count + 1, time_line=Line(0.01, 0.0), _max_batch_cache={})
    assert later.share_searches(model)
    assert later._max_batch_cache is model._max_batch_cache
    for changed in (dict(cache=model.cache + 1), dict(reserved_growth=model.reserved_growth + 1),
                    dict(reference_batch=model.reference_batch + 1), dict(split_ratio=None),
                    dict(lines={**model.lines, "other": model.lines["other"] + Line(1.0, 0.0)})):
        other = replace(model, _max_batch_cache={}, **changed)
        assert not other.share_searches(model), changed
        assert other._max_batch_cache is not model._max_batch_cache
    assert not model.share_searches(None) and not model.share_searches(model)


def test_no_search_reads_a_basis_only_field(model):
    """The fields share_searches leaves out, all set to other values on a model with a cache of its own: every
    what-if's largest batches (conservative and central) are the same. A search that came to read one of them
    fails here, before a shared cache could answer for it."""
    assert set(BASIS_ONLY) == {"step_range", "count", "time_line", "last_batch", "batch_sizes", "notes"}
    other = replace(model, step_range=(1, 2), count=1, time_line=Line(1.0, 1.0), last_batch=1, batch_sizes=(1,),
                    notes=("another",), _max_batch_cache={})
    total = 150 * 2**30
    for what_if in WHAT_IFS:
        a = model.predict(replace(what_if, batch_size=64), device_total=total)
        b = other.predict(replace(what_if, batch_size=64), device_total=total)
        assert (a.max_batch, a.max_batch_central) == (b.max_batch, b.max_batch_central), what_if
        assert a.max_batch and a.max_batch > 64
