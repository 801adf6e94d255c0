"""The hub's refit test (memory_model.fit.fit_figures): a fast agent's windows, with and without a sampled step, are not a change.

A real fast agent (issue 14 point 3) sends a window every 0.2 s and samples a step at most every 0.25 s, so its
windows alternate between ones that carry the sampled step's own peaks and ones that do not. The summary's figures
are compared with those of the last fit; compared step by step, every new window was a change and 16 such agents
were refitted every second for the same prediction. The own peaks are compared as what the fit reads of them:
the largest per batch size (per group of steps the fit could select apart).
"""

from __future__ import annotations

import dataclasses
import random

from batchmon import memory_model
from batchmon.memory_model.fit import fit_figures as _fit_figures
from batchmon.monitor.hub_state import HubState
from batchmon.protocol import PHASES, SEGMENTS
from conftest import make_step
from hub_peer import make_hello
from test_hub_state import GIB, agent, nvml_record
from recordings import FAST16_GROWTH, read_records

MIB = 1 << 20


def _step(n: int, batch: int, own: int | None) -> object:
    """A CUDA step at ``batch``: the same memory figures at each batch size; with ``own`` (a sampled step) its
    phases' and segments' own peaks, larger with ``own``."""
    comps = {"parameters": 40 * MIB, "gradients": 40 * MIB, "optimizer": 80 * MIB, "activations": batch * MIB,
             "batch": batch * MIB // 8, "other": 60 * MIB}
    peak = sum(comps.values())
    step = make_step(n, batch, components=comps, allocated=peak - comps["activations"], peak_allocated=peak,
                     reserved=peak + 64 * MIB, device_used=peak + 600 * MIB, num_alloc_retries=0, num_ooms=0,
                     micro_batches=1)
    if own is None:
        return step
    fwd = 160 * MIB + batch * MIB + own * MIB
    return dataclasses.replace(
        step, phase_own_peaks={"forward": fwd, "backward": fwd + batch * MIB // 2, "optimizer": 200 * MIB + own},
        segment_peaks={"forward": fwd, "loss_backward": fwd + batch * MIB // 3, "backward": fwd + batch * MIB // 2,
                       "optimizer": 200 * MIB + own})


def _shown(model) -> tuple:
    """A fit's prediction, apart from its basis (the step range it read), at the observed and a larger batch."""
    out = []
    for batch in (None, 256):
        p = model.predict(memory_model.WhatIf(batch_size=batch), device_total=80 * GIB)
        out.append((p.batch_size, tuple(p.components.items()), p.total, p.peak_allocated, p.max_batch, p.headroom,
                    p.band, p.max_batch_central))
    return tuple(out)


def test_own_peaks_moved_between_windows_keep_the_figures_and_the_fit():
    """Two summaries whose steps differ only in which of them carry the own peaks (and in dominated own peaks
    dropped), with the same largest per batch size, have the same figures, and the fit answers the same for both;
    a larger own peak at one batch size is a changed figure and a different answer (so the test can fail)."""
    rnd = random.Random(7)
    changed = 0
    for trial in range(20):
        steps = [_step(n, 16 if n % 3 else 32, rnd.choice((None, 1, 2, 3))) for n in range(1, 40)]
        for batch in (16, 32):  # each batch size's largest own peaks on a step of it
            i = next(k for k, s in enumerate(steps) if s.batch_size == batch)
            steps[i] = _step(steps[i].step, batch, 5)
        moved = []
        for s in steps:  # the dominated own peaks dropped or moved to another step of the same batch size
            if s.phase_own_peaks is not None and s.phase_own_peaks["optimizer"] != 200 * MIB + 5:
                moved.append(_step(s.step, s.batch_size, rnd.choice((None, 1, 2, 3))))
            else:
                moved.append(s)
        assert _fit_figures(steps) == _fit_figures(moved), trial
        a, b = memory_model.fit(steps, optimizer="Adam"), memory_model.fit(moved, optimizer="Adam")
        assert a is not None and b is not None
        assert _shown(a) == _shown(b), trial
        assert a.phase_lines, "the fit must read the own peaks here (two batch sizes with own peaks)"
        changed += [x.phase_own_peaks for x in steps] != [x.phase_own_peaks for x in moved]
    assert changed >= 15  # the own peaks did move in most trials
    larger = [_step(s.step, s.batch_size, 40) if s.batch_size == 32 and s.phase_own_peaks else s for s in steps]
    assert _fit_figures(larger) != _fit_figures(steps)
    assert _shown(memory_model.fit(larger, optimizer="Adam")) != _shown(memory_model.fit(steps, optimizer="Adam"))


def test_alternating_windows_of_a_fast_agent_are_not_refitted_every_second(monkeypatch):
    """Windows every 0.2 s, every seventh without a sampled step (not in step with the snapshots, as the real ones), snapshots once a second for 20 s: the steady
    agent is fitted at its first snapshot and not again (the figures are those of the last fit)."""
    real_fit = memory_model.fit
    fits: list[int] = []
    monkeypatch.setattr(memory_model, "fit", lambda *a, **kw: (fits.append(1), real_fit(*a, **kw))[1])
    s = HubState()
    s.ingest(agent(make_hello(4242, device="cuda:0", nvml_uuid="GPU-1")))
    s.ingest(nvml_record(total=40 * GIB))
    n = 0
    for n in range(1, 101):
        s.ingest(agent(_step(n, 16, 1 if n % 7 else None)))
    s.snapshot(1.0)
    assert len(fits) == 1
    for second in range(2, 22):
        for _ in range(5):
            n += 1
            s.ingest(agent(_step(n, 16, 1 if n % 7 else None)))
        view = s.snapshot(float(second)).agents[0]
        assert view.prediction is not None and view.last_step.step == n
    assert len(fits) == 1, len(fits)
    # a new own peak (larger than any of the summary's at that batch size) is a change: refitted within a second
    n += 1
    s.ingest(agent(_step(n, 16, 9)))
    s.snapshot(23.0)
    assert len(fits) == 2


def test_the_phase_and_segment_names_are_all_compared():
    """Every phase's and segment's own peak is part of the figures: raising any one of them is a change."""
    base = [_step(n, 16, 1) for n in range(1, 5)]
    for field, names in (("phase_own_peaks", PHASES), ("segment_peaks", SEGMENTS)):
        for name in names:
            last = base[-1]
            raised = dict(getattr(last, field), **{name: getattr(last, field)[name] + MIB})
            changed = base[:-1] + [dataclasses.replace(last, **{field: raised})]
            assert _fit_figures(changed) != _fit_figures(base), (field, name)


def test_figures_that_come_back_within_the_steady_time_reuse_their_fit(monkeypatch):
    """A summary whose figures alternate between two (a sampled step with a larger own peak in the recent steps at
    one second, gone at the next, as the H200's fast jobs do) is fitted once for each, then answered from those
    fits until PREDICT_STEADY_S has passed since each; a third set of figures is fitted at once."""
    from batchmon.monitor.hub_state import PREDICT_STEADY_S
    from batchmon.monitor.step_history import RECENT_STEPS

    real_fit = memory_model.fit
    fits: list[int] = []

    def counted(*args, **kwargs):
        fits.append(1)
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(memory_model, "fit", counted)
    s = HubState()
    s.ingest(agent(make_hello(4242, device="cuda:0", nvml_uuid="GPU-1")))
    s.ingest(nvml_record(total=40 * GIB))
    n = 0
    for n in range(1, 101):  # a history longer than the summary: its first step, then the recent ones
        s.ingest(agent(_step(n, 16, 1)))

    def second(t: float, own_peak: int) -> object:  # RECENT_STEPS steps: the summary's recent part, all new
        nonlocal n
        for k in range(RECENT_STEPS):
            n += 1
            s.ingest(agent(_step(n, 16, own_peak if k == RECENT_STEPS // 2 else 1)))
        # (t counts the comparisons: snapshots 2 s apart at --interval 1, each one due to compare the figures again
        # after PREDICT_EVERY_S plus half an interval)
        view = s.snapshot(2 * t).agents[0]
        assert view.last_step.step == n
        return view.prediction

    answers = {1: second(1.0, 1), 3: second(2.0, 3)}
    assert len(fits) == 2 and answers[1] is not None and answers[3] is not None
    for t in range(3, 30):
        own = 1 if t % 2 else 3
        assert second(float(t), own) is answers[own], t  # the fit of these figures, not a new one
    assert len(fits) == 2
    second(30.0, 7)  # figures not seen before: fitted at once
    assert len(fits) == 3
    second(1.0 + PREDICT_STEADY_S / 2 + 1, 1)  # the first fit is too old now: fitted again
    assert len(fits) == 4


def test_figures_kept_between_calls_answer_as_taken_afresh_and_stay_bounded():
    """fit_figures with the hub's per-agent memo (the steps' figures kept between snapshots) gives exactly what it
    gives without, as a sliding summary gains steps, loses them and meets a new batch size; the memo holds only
    about one summary's steps."""
    rnd = random.Random(3)
    steps = [_step(n, 32 if n < 120 else 48, rnd.choice((None, 1, 2))) for n in range(1, 200)]
    memo: dict = {}
    for end in range(10, len(steps)):
        summary = [steps[0], *steps[max(1, end - 30):end]]
        assert _fit_figures(summary, memo) == _fit_figures(summary)
        assert len(memo) <= 2 * len(summary) + 16 + 1
    # a new step object with the same id as none kept, same figures: the same answer; a changed figure: another
    changed = dataclasses.replace(steps[-1], peak_allocated=steps[-1].peak_allocated + MIB)
    assert _fit_figures([*steps[-30:-1], changed], memo) != _fit_figures(steps[-30:], memo)


def _figures_step_by_step(summary) -> tuple:
    """fit_figures as a plain loop over the steps (its definition before the memo's lookups moved into C): each
    step's figures, and per group the largest own peak of each name, the names in the order the steps give them."""
    own: dict = {}
    figures = []
    for s in summary:
        figures.append(((s.batch_size, s.allocated, s.peak_allocated, s.reserved, s.num_alloc_retries, s.num_ooms,
                         s.device_used, s.micro_batches), tuple(s.components.values())))
        if not (s.phase_own_peaks or s.segment_peaks):
            continue
        group = own.setdefault((s.batch_size, s.components.get("optimizer"), s.peak_allocated is None), ({}, {}))
        for best, peaks in zip(group, (s.phase_own_peaks, s.segment_peaks)):
            for name, value in (peaks or {}).items():
                best[name] = max(value, best.get(name, value))
    return tuple(figures), tuple((key, tuple(p.items()), tuple(g.items()))
                                 for key, (p, g) in sorted(own.items(), key=lambda kv: repr(kv[0])))


def test_the_figures_are_a_loop_over_the_steps_on_the_h200_recording():
    """Every summary the hub reads on 16 real fast jobs (the fast16 growth recording, a snapshot at each tick), and
    its summary_key: fit_figures with the agent's memo is exactly the plain loop's answer, the own peaks' names in
    the same order; and on synthetic summaries whose sampled steps carry names in different orders."""
    from batchmon.monitor.step_history import summary_key

    records = read_records(FAST16_GROWTH)
    state = HubState()
    memos: dict = {}
    checked = sampled = 0
    for rec in records:
        state.ingest(rec)
        if rec.get("kind") != "tick":
            continue
        for src in state._sources.values():
            for a in src.agents.values():
                summary = a.history.window().model_steps()
                for steps in (summary, summary_key(summary)):
                    got = _fit_figures(steps, memos.setdefault((a.key, steps is summary), {}))
                    assert got == _figures_step_by_step(steps)
                    assert [tuple(n for n, _ in p) for _, p, _ in got[1]] == \
                        [tuple(n for n, _ in p) for _, p, _ in _figures_step_by_step(steps)[1]]
                    checked += 1
                    sampled += bool(got[1])
    assert checked >= 16 * 40 and sampled >= checked // 2
    rnd = random.Random(11)
    steps = [_step(n, rnd.choice((32, 48)), rnd.choice((None, 1, 2, 3))) for n in range(1, 120)]
    reordered = [dataclasses.replace(s, phase_own_peaks=dict(reversed(list(s.phase_own_peaks.items()))))
                 if s.phase_own_peaks and rnd.random() < 0.5 else s for s in steps]
    memo: dict = {}
    for end in range(5, len(reordered)):
        summary = reordered[max(0, end - 40):end]
        assert _fit_figures(summary, memo) == _figures_step_by_step(summary)
        assert _fit_figures(summary) == _figures_step_by_step(summary)
