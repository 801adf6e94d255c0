"""The hub reads a summary's fit figures through step_history.summary_key (the steps its KeptSteps share their
fields with): on the real messages of 16 fast H200 jobs the figures are exactly those of the summary itself, and
fit_figures' memo then meets every step again at the next snapshot instead of a new KeptStep each window."""

from __future__ import annotations

from batchmon.memory_model.fit import fit_figures
from batchmon.monitor.hub_state import HubState
from batchmon.monitor.step_history import KeptStep, summary_key
from recordings import FAST16_GROWTH, read_records


def test_figures_through_the_shared_steps_are_the_summarys_own():
    records = read_records(FAST16_GROWTH)
    state = HubState()
    compared = kept = 0
    memos: dict[str, dict] = {}
    for record in records:
        state.ingest(record)
        if record.get("kind") != "tick":
            continue
        for agent in state._sources["local"].agents.values():
            summary = agent.history.window().model_steps()
            key = summary_key(summary)
            kept += sum(type(s) is KeptStep for s in summary)
            assert len(key) == len(summary) and not any(type(s) is KeptStep for s in key)
            memo = memos.setdefault(agent.key, {})
            assert fit_figures(key, memo) == fit_figures(summary)
            compared += 1
    assert compared > 500 and kept > 10 * compared  # the real stream: most of a summary's steps are KeptSteps


def test_a_changed_figure_changes_the_key():
    """Steps whose fields other than step, time, step time and window count differ do not share a key."""
    from conftest import make_step

    from batchmon.monitor.step_history import StepHistory

    history = StepHistory(100)
    for n in range(6):
        history.append(make_step(n, 32, peak_allocated=1000))
    before = summary_key(history.window().model_steps())
    assert len(set(map(id, before))) == 1  # one shared step behind all six
    history.append(make_step(6, 32, peak_allocated=1001))
    after = summary_key(history.window().model_steps())
    assert after[:6] == before and after[6] is not before[0] and after[6].peak_allocated == 1001
