"""The hub's refit rule on the real messages of 16 fast jobs (issue 14 point 3).

tests/fixtures/fast16_h200_15s.jsonl.gz is the first 15 s of bench/results/fast16_rec_h200_run1.jsonl.gz: a
`batchmon record` beside 16 examples/train_mlp.py jobs on CUDA at ~101 steps/s each on the H200 (the hellos, each
agent's history burst, then a window of steps every 0.2 s per agent, NVML and host samples, a tick a second).
A real fast agent samples a step at most every 0.25 s, so its windows alternate between ones that carry a sampled
step's own peaks and ones that do not. Compared step by step (the rule before 70a4c56), every such change made a
refit: all 16 agents were refitted at most snapshots, for the same prediction. The figures are now compared as
the fit reads them (memory_model.fit.fit_figures); this replays the recording through the hub's own state, a
snapshot at each tick as the live hub and replay make them, and counts the fits.
"""

from __future__ import annotations

import importlib

import pytest

from batchmon import memory_model
from batchmon.monitor.hub_state import HubState
from recordings import FAST16_15S, FAST16_GROWTH, read_records

FIXTURE = FAST16_15S
WARM = 3  # the first ticks: hellos, history bursts, the first fits (each agent once, more while its figures fill)


def _records() -> list[dict]:
    return read_records(FIXTURE)


def _step_by_step(summary, memo=None) -> tuple:
    """The rule before 70a4c56: every sampled step's own peaks compared as they are, step by step (no memo)."""
    return tuple((s.batch_size, tuple(s.components.values()), s.allocated, s.peak_allocated, s.reserved,
                  s.num_alloc_retries, s.num_ooms, s.device_used, s.micro_batches,
                  tuple(s.phase_own_peaks.items()) if s.phase_own_peaks else None,
                  tuple(s.segment_peaks.items()) if s.segment_peaks else None) for s in summary)


def _fits_per_tick(monkeypatch: pytest.MonkeyPatch, records: list[dict]) -> tuple[list[int], int]:
    """Each record ingested, a snapshot at each tick (its time, interval 1 s): fits made by each snapshot, and
    the agents the last snapshot shows with a prediction."""
    real_fit = memory_model.fit
    fits: list[int] = []

    def counted(*args, **kwargs):
        fits.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(memory_model, "fit", counted)
    state = HubState()
    per_tick: list[int] = []
    snap = None
    for rec in records:
        state.ingest(rec)
        if rec.get("kind") == "tick":
            before = len(fits)
            snap = state.snapshot(float(rec["t"]), 1.0)
            per_tick.append(len(fits) - before)
    assert snap is not None
    return per_tick, sum(a.prediction is not None for a in snap.agents)


def test_the_fixture_is_the_real_stream_it_claims():
    """16 agents at ~100 steps/s on CUDA, in windows; sampled and plain windows interleaved per agent."""
    records = _records()
    hellos = {r["key"] for r in records if r["kind"] == "agent" and r["data"].get("type") == "hello"}
    assert len(hellos) == 16
    ticks = [r for r in records if r["kind"] == "tick"]
    assert 14 <= len(ticks) <= 16
    per_agent: dict[str, list[bool]] = {}
    for r in records:
        d = r["data"] if r["kind"] == "agent" else {}
        if d.get("type") == "step" and (d.get("steps") or 1) > 1:
            per_agent.setdefault(r["key"], []).append(d.get("phase_own_peaks") is not None)
    assert len(per_agent) == 16
    for key, sampled in per_agent.items():
        changes = sum(a != b for a, b in zip(sampled, sampled[1:]))
        assert changes >= len(sampled) // 4, key  # they do alternate: what made the old rule refit


def test_sixteen_real_fast_agents_are_not_refitted_at_every_snapshot(monkeypatch):
    """After the first ticks, at most a quarter of the agent-snapshots refit (the figures the fit reads change
    when a sampled step with a larger own peak enters or leaves the bounded summary); every agent has a
    prediction. The rule before 70a4c56, on the same records, refitted at every comparison of the figures (every
    second snapshot at --interval 1: PREDICT_EVERY_S plus half an interval), more than a third of them: the
    recording tells the two apart."""
    records = _records()
    per_tick, predicted = _fits_per_tick(monkeypatch, records)
    steady = per_tick[WARM:]
    assert predicted == 16
    assert len(steady) >= 10
    assert sum(per_tick[:WARM]) >= 16  # each agent fitted once at least
    assert sum(steady) <= 16 * len(steady) // 4, per_tick

    fit_module = importlib.import_module("batchmon.memory_model.fit")
    monkeypatch.setattr(fit_module, "fit_figures", _step_by_step)
    old_per_tick, old_predicted = _fits_per_tick(monkeypatch, records)
    assert old_predicted == 16
    assert sum(old_per_tick[WARM:]) > 16 * len(steady) // 3, old_per_tick


GROWTH_FIXTURE = FAST16_GROWTH


def test_a_summary_that_only_grows_is_refitted_at_most_every_few_seconds(monkeypatch):
    """tests/fixtures/fast16_h200_50s_growth.jsonl.gz: 50 s of `batchmon record --interval 1` beside 16
    examples/train_mlp.py jobs on the H200 (bench/results/fast16_rec_h200_run2_microbatches0.jsonl.gz, made with
    agents that said 0 micro-batches on their allocator-read steps; put back to 1 here, as the agent sends since
    67cc58c). The jobs were 10-60 s old: each agent's summary was still its whole history and grew by one window a
    second, every window's figures like those it held - and each growth was a refit (every agent, every second).
    Now at most one per PREDICT_GROWTH_S while it only grows, and the kept answer is the one a fit now gives."""
    from batchmon.monitor import hub_state

    records = read_records(GROWTH_FIXTURE)
    per_tick, predicted = _fits_per_tick(monkeypatch, records)
    steady = per_tick[WARM:]
    assert predicted == 16 and len(steady) >= 40
    seconds = len(steady)
    assert sum(steady) <= 16 * (seconds / hub_state.PREDICT_GROWTH_S + 2), per_tick

    monkeypatch.setattr(hub_state, "PREDICT_GROWTH_S", 0.0)  # the rule before: every growth a refit
    old_per_tick, _ = _fits_per_tick(monkeypatch, records)
    assert sum(old_per_tick[WARM:]) >= 2 * sum(steady), (old_per_tick, per_tick)


def test_what_a_grown_summary_keeps_is_what_a_fit_of_it_answers(monkeypatch):
    """The answers kept while summaries only grew are the fits' answers on the summaries as they are at the end."""
    from batchmon import memory_model

    records = read_records(GROWTH_FIXTURE)
    state = HubState()
    snap = None
    for rec in records:
        state.ingest(rec)
        if rec.get("kind") == "tick":
            snap = state.snapshot(float(rec["t"]), 1.0)
    assert snap is not None
    assert [w.message for w in snap.warnings if w.source == "hub"] == []  # every record kept (block_seq splits too)
    kept = {a.key: a.prediction.max_batch for a in snap.agents if a.prediction is not None}
    assert len(kept) == 16
    total = snap.nvml.devices[0].memory.total
    agents = [agent for src in state._sources.values() for agent in src.agents.values()]
    assert len(agents) == 16
    for agent in agents:
        model = memory_model.fit(agent.history.window().model_steps(), optimizer=agent.hello.optimizer)
        fresh = model.predict(memory_model.WhatIf(), device_total=total).max_batch
        assert agent.prediction.max_batch == fresh and fresh in kept.values(), agent.key
