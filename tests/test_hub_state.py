"""HubState: records in, immutable Snapshots out; never raises, whatever the records hold."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchmon import memory_model
from batchmon.records import record_line
from batchmon.monitor.hub_state import HubState
from batchmon.probes.host import HostSample, ProcessInfo
from batchmon.probes.host import sample_to_dict as host_to_dict
from agent_helpers import agent_dir  # noqa: F401 - fixture
from batchmon.probes.nvml import DeviceMemory, DeviceSample, GpuProcess, NvmlSample
from batchmon.probes.nvml import sample_to_dict as nvml_to_dict
from batchmon.protocol import Bye, Event
from hub_peer import make_hello, make_step

KEY = "box:4242"
GIB = 1 << 30


def agent(message, key=KEY, t=1.0, source="local"):
    d = message.to_dict()
    d["v"] = 1
    return {"t": t, "kind": "agent", "source": source, "key": key, "data": d}


def nvml_record(total=80 * GIB, used=10 * GIB, pids=(4242,), t=1.0, source="local"):
    dev = DeviceSample(index=0, name="NVIDIA H200", uuid="GPU-1", memory=DeviceMemory(total, used, 0, total - used),
                       utilization=50, temperature=40, power=300.0,
                       processes=tuple(GpuProcess(pid, 5 * GIB) for pid in pids))
    return {"t": t, "kind": "nvml", "source": source,
            "data": nvml_to_dict(NvmlSample(True, None, "550.1", (dev,), time=t))}


def host_record(t=1.0, source="local"):
    sample = HostSample("box", 64 * GIB, 8 * GIB, {4242: ProcessInfo(4242, "me", "python train.py", 99.0, GIB)}, t)
    return {"t": t, "kind": "host", "source": source, "data": host_to_dict(sample)}


def test_agent_messages_build_an_agent_view():
    s = HubState()
    s.ingest(agent(make_hello(4242, device="cuda:0", nvml_uuid="GPU-1")))
    for n in range(1, 4):
        s.ingest(agent(make_step(n)))
    s.ingest(agent(Event(kind="oom", message="boom")))
    s.ingest(nvml_record())
    s.ingest(host_record())
    snap = s.snapshot(2.0, 0.5)
    (view,) = snap.agents
    assert view.key == KEY and view.source == "local" and view.hello.pid == 4242
    assert [x.step for x in view.history] == [1, 2, 3] and view.last_step.step == 3
    assert view.events[0].kind == "oom"
    assert snap.time == 2.0 and snap.interval == 0.5 and snap.source == "live"
    assert snap.nvml.available and snap.nvml.devices[0].memory.total == 80 * GIB
    assert snap.host.processes[4242].command == "python train.py"
    assert snap.device_of(view).uuid == "GPU-1"
    s.ingest(agent(Bye()))
    # a bye ends the run: it stays, as an ended run (tests/test_ended_runs.py), and its connection's end and
    # removal change nothing more
    ended = s.snapshot(3.0).agents[0]
    assert ended.detached and ended.state == "ended" and ended.ended.how == "detached"
    s.ingest({"t": 4.0, "kind": "agent_eof", "source": "local", "key": KEY})
    s.ingest({"t": 5.0, "kind": "agent_gone", "source": "local", "key": KEY})
    assert s.snapshot(5.0).agents == (ended,) and s.agent_keys() == []


def test_resent_history_after_reconnect_is_kept_once():
    s = HubState()
    s.ingest(agent(make_hello(4242)))
    for n in range(1, 6):
        s.ingest(agent(make_step(n)))
    s.ingest(agent(make_hello(4242)))  # reconnect: hello and the same history again, then a new step
    for n in range(1, 7):
        s.ingest(agent(make_step(n)))
    assert [x.step for x in s.snapshot(1.0).agents[0].history] == [1, 2, 3, 4, 5, 6]


def test_announced_history_burst_is_counted_to_its_end():
    s = HubState()
    assert s.history_received(KEY) is False  # nothing yet
    s.ingest(agent(dataclasses.replace(make_hello(4242), history=3)))
    s.ingest(agent(make_step(1)))
    s.ingest({"t": 1, "kind": "agent", "source": "local", "key": KEY, "data": None, "error": "line is not JSON"})
    assert s.history_received(KEY) is False  # two of three lines (an invalid one counts: it was sent)
    s.ingest(agent(make_step(2)))
    assert s.history_received(KEY) is True
    s.ingest(agent(make_step(3)))  # live lines after the burst change nothing
    assert s.history_received(KEY) is True
    s.ingest(agent(make_hello(4242)))  # a hello without the count (an older agent): unknown, wait for quiet
    assert s.history_received(KEY) is None
    s.ingest(agent(dataclasses.replace(make_hello(4242), history=0)))
    assert s.history_received(KEY) is True


def test_invalid_messages_counted_per_agent_with_one_warning():
    s = HubState()
    s.ingest(agent(make_hello(4242)))
    s.ingest({"t": 1, "kind": "agent", "source": "local", "key": KEY, "data": None, "error": "line is not JSON"})
    s.ingest({"t": 1, "kind": "agent", "source": "local", "key": KEY, "data": {"v": 1, "type": "step"}})
    s.ingest({"t": 1, "kind": "agent", "source": "local", "key": KEY, "data": {"v": 1, "type": "new-thing"}})
    snap = s.snapshot(1.0)
    assert snap.agents[0].invalid_lines == 2
    (w,) = snap.warnings
    assert w.source == f"agent {KEY}" and w.count == 2 and w.message.startswith("invalid lines dropped")


def test_prediction_uses_the_agents_device_total():
    s = HubState()
    s.ingest(agent(make_hello(4242, device="cuda:0", nvml_uuid="GPU-1")))
    steps = [make_step(n, batch=8 if n % 2 else 16) for n in range(1, 9)]
    for st_ in steps:
        s.ingest(agent(st_))
    s.ingest(nvml_record(total=40 * GIB))
    view = s.snapshot(1.0).agents[0]
    expected = memory_model.predict_from_steps(tuple(steps), 40 * GIB, optimizer="Adam")
    assert view.prediction == expected
    assert view.prediction is None or view.prediction.device_total == 40 * GIB


def test_a_failing_memory_model_costs_the_prediction_not_the_snapshot(monkeypatch):
    calls = []

    def broken(*a, **kw):  # the failure path of the guard, not the thing under test
        calls.append(a)
        raise ZeroDivisionError("bad fit")

    monkeypatch.setattr(memory_model, "fit", broken, raising=False)
    s = HubState()
    s.ingest(agent(make_hello(4242)))
    s.ingest(agent(make_step(1)))
    first = s.snapshot(1.0)
    assert first.agents[0].prediction is None
    s.snapshot(2.0)  # same steps: not recomputed, not counted again
    s.ingest(agent(make_step(2)))
    snap = s.snapshot(3.0)
    (w,) = [w for w in snap.warnings if w.source == "memory model"]
    assert w.count == 2 == len(calls) and "ZeroDivisionError" in w.message


def test_snapshot_does_not_change_when_state_moves_on():
    s = HubState()
    s.ingest(agent(make_hello(4242)))
    s.ingest(agent(make_step(1)))
    old = s.snapshot(1.0)
    s.ingest(agent(make_step(2)))
    s.ingest({"t": 2, "kind": "agent", "source": "local", "key": KEY, "data": None, "error": "x"})
    assert [x.step for x in old.agents[0].history] == [1] and old.agents[0].invalid_lines == 0
    assert old.warnings == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        old.agents = ()  # type: ignore[misc]


def test_remote_sources_become_remote_snapshots():
    s = HubState()
    s.ingest(nvml_record(source="gpu2"))
    s.ingest(agent(make_hello(77), key="gpu2:77", source="gpu2"))
    s.ingest(host_record())
    snap = s.snapshot(1.0)
    assert snap.agents == () and len(snap.remote) == 1
    assert snap.remote[0].agents[0].source == "gpu2" and snap.remote[0].nvml.available


def test_bad_samples_and_records_are_warnings():
    s = HubState()
    for rec in ({"kind": "nvml", "data": {"available": "yes"}}, {"kind": "host", "data": 5}, 17, None,
                {"kind": "agent", "data": {}}, {"kind": "mystery"}):
        s.ingest(rec)
    snap = s.snapshot(1.0)
    counts = sorted((w.source, w.message.split(":")[0], w.count) for w in snap.warnings)
    assert counts == [("host", "bad host sample", 1), ("nvml", "bad NVML sample", 1),
                      ("recording", "agent record without key", 1), ("recording", "bad record", 2)]
    assert not snap.nvml.available and snap.nvml.error


def test_agents_without_hello_are_not_shown_but_pids_come_from_hellos():
    s = HubState()
    s.ingest(agent(make_step(1)))
    assert s.snapshot(1.0).agents == ()
    s.ingest(agent(make_hello(4242)))
    assert s.agent_pids() == [4242] and s.history_received(KEY) is not False
    assert [x.step for x in s.snapshot(1.0).agents[0].history] == [1]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
message_like = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 2, None]), "type": st.sampled_from(["hello", "step", "event", "bye", "x"])},
    optional={k: json_values for k in ("pid", "step", "time", "components", "argv", "kind", "batch_size")},
)
records = st.one_of(
    json_values,
    st.fixed_dictionaries({
        "kind": st.sampled_from(["nvml", "host", "agent", "agent_eof", "agent_gone", "warning", "tick", "meta", "?"]),
        "key": st.one_of(st.none(), st.sampled_from(["a:1", "b:2"]), json_values),
        "source": st.one_of(st.sampled_from(["local", "remote"]), json_values),
        "data": st.one_of(message_like, json_values),
    }),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(records, max_size=20))
def test_ingest_never_raises_and_snapshot_always_builds(batch):
    s = HubState()
    for rec in batch:
        s.ingest(rec)
    snap = s.snapshot(1.0)
    assert isinstance(snap.agents, tuple) and isinstance(snap.warnings, tuple)
    assert record_line({"kind": "tick"}).endswith("\n")


def test_model_steps_bounds_a_long_history_and_keeps_what_the_fit_needs():
    from batchmon.monitor.step_history import model_steps
    from batchmon.protocol import COMPONENTS, Step

    def step(n: int, batch: int, peak: int) -> Step:
        return Step(step=n, time=float(n), step_seconds=0.1, batch_size=batch,
                    components={c: 1 for c in COMPONENTS}, peak_allocated=peak, num_alloc_retries=n // 500)

    history = tuple(step(n, 8 if n % 100 == 0 else 32, 1000 + n % 7) for n in range(1, 2001))
    kept = model_steps(history)
    assert len(kept) <= 1 + 32 + 32
    assert kept[0] is history[0]  # baseline of the cumulative counters
    assert list(kept[-32:]) == list(history[-32:])  # the current state
    assert [s.step for s in kept] == sorted(s.step for s in kept)
    for batch in (8, 32):  # each batch size's largest peak is there
        top = max(p.peak_allocated for p in history if p.batch_size == batch)
        assert any(s.batch_size == batch and s.peak_allocated == top for s in kept)
    short = history[:50]
    assert model_steps(short) == list(short)


def _history_step(n: int, batch: int | None, peak: int | None):
    from batchmon.protocol import COMPONENTS, Step

    return Step(step=n, time=float(n), step_seconds=0.1, batch_size=batch,
                components={c: 1 + n % 3 for c in COMPONENTS}, peak_allocated=peak)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 40), st.lists(st.tuples(st.sampled_from([None, 1, 2, 3, 4, 8, 16, 64]),
                                              st.one_of(st.none(), st.integers(0, 6))), max_size=200),
       st.integers(0, 6), st.integers(1, 6))
def test_step_history_keeps_model_steps_exact_under_eviction(limit, spec, recent, sizes):
    """StepHistory's incremental summary equals the reference model_steps on the window, after every append
    (small limits, few sizes and many equal peaks: evictions, ties and sizes leaving the window all happen)."""
    from batchmon.monitor.step_history import model_steps
    from batchmon.monitor.step_history import StepHistory

    h = StepHistory(limit)
    for n, (batch, peak) in enumerate(spec, 1):
        h.append(_history_step(n, batch, peak))
        window = tuple(h)
        assert len(window) == min(n, limit) and h.window() == window and tuple(h.window()) == window
        assert [s.step for s in window] == list(range(max(1, n - limit + 1), n + 1))
        got = h.model_steps(recent, sizes)
        want = model_steps(window, recent, sizes)
        assert [s.step for s in got] == [s.step for s in want]
        assert [s.step for s in h.window().model_steps()] == [s.step for s in model_steps(window)]
        assert h.batch_sizes() == frozenset(s.batch_size for s in window)


def test_unchanged_agent_keeps_its_view_object_between_snapshots():
    """O(changed) snapshots: an agent with no new message is the very same AgentView in the next snapshot; a new
    step, an event or a disconnect gives a new one (and the old snapshot still shows what it showed)."""
    s = HubState()
    s.ingest(agent(make_hello(pid=4242)))
    s.ingest(agent(make_step(1)))
    first = s.snapshot(1.0).agents[0]
    assert s.snapshot(1.1).agents[0] is first
    s.ingest(agent(make_step(2)))
    second = s.snapshot(1.2).agents[0]
    assert second is not first and [x.step for x in second.history] == [1, 2]
    assert [x.step for x in first.history] == [1] and first.last_step.step == 1
    s.ingest(agent(Event(time=1.3, kind="oom", message="m")))
    third = s.snapshot(1.3).agents[0]
    assert len(third.events) == 1 and second.events == () and third.history is second.history
    s.ingest({"t": 1.4, "kind": "agent_eof", "source": "local", "key": KEY})
    fourth = s.snapshot(1.4).agents[0]
    assert not fourth.connected and third.connected and fourth.history is third.history


def test_step_window_is_immutable_across_appends_and_compaction_and_acts_like_a_tuple():
    from batchmon.monitor.step_history import model_steps
    from batchmon.monitor.step_history import COMPACT_EVERY, StepHistory, StepWindow

    h = StepHistory(10)
    steps = [_history_step(n, 16 + n % 50, n % 7) for n in range(1, 3 * COMPACT_EVERY + 30)]
    old_windows = []
    kept = []  # the Steps the history stores (compact copies, equal to what was appended)
    for i, step in enumerate(steps):
        kept.append(h.append(step))
        assert kept[-1] == step and h.last is kept[-1]
        w = h.window()
        assert h.window() is w  # the same object until the next append
        old_windows.append((w, tuple(steps[max(0, i - 9): i + 1]), kept[max(0, i - 9)]))
    for w, want, first in old_windows:  # every earlier window still holds exactly its steps, after 3 compactions
        assert w == want and tuple(w) == want and list(reversed(w)) == list(reversed(want))
        assert w[0] is first and w[-1] == want[-1] and w[-3:] == want[-3:] and w[::2] == want[::2]
        assert w[5:2] == () and w[-100:] == want and len(w) == len(want) and bool(w)
        assert w + () == want and () + w == want and w != want[:-1] and not (w == list(want))
    bare = StepWindow(steps, 3, 80)  # made without a summary: the reference definition answers
    assert bare.model_steps() == model_steps(tuple(steps[3:80])) and len(bare.model_steps()) < 77
    with pytest.raises(IndexError):
        old_windows[-1][0][10]
    assert StepHistory(5).window() == () and not StepHistory(5).window()


def test_step_window_carries_the_summary_of_its_own_steps():
    """What the UI fits on: every window's model_steps() is the reference summary of exactly its steps, also
    after later appends, evictions and compactions changed the history's own summary."""
    from batchmon.monitor.step_history import model_steps
    from batchmon.monitor.step_history import StepHistory

    h = StepHistory(150)
    windows = []
    for n in range(1, 400):
        h.append(_history_step(n, 1 + (n * 7) % 45, (n * 13) % 11))
        if n % 9 == 0:
            windows.append(h.window())
    long = [w for w in windows if len(w) > 1 + 32 + 32]
    assert long  # the summary is shorter than the window there
    for w in windows:
        want = model_steps(tuple(w))
        assert [x.step for x in w.model_steps()] == [x.step for x in want]
    assert len(long[-1].model_steps()) < len(long[-1])


def test_probe_sample_objects_are_taken_as_they_are_and_equal_their_dict_form():
    """A live hub without a recorder hands its probes' objects over ("sample"); the state shows the same as from
    the dict form a recording holds. Anything else under "sample" is ignored and "data" parsed as always."""
    from batchmon.probes.host import sample_from_dict as host_from_dict
    from batchmon.probes.nvml import sample_from_dict as nvml_from_dict

    by_dict, by_object = HubState(), HubState()
    for rec in (nvml_record(), host_record()):
        by_dict.ingest(rec)
        parse = nvml_from_dict if rec["kind"] == "nvml" else host_from_dict
        obj = parse(rec["data"])
        by_object.ingest({k: v for k, v in rec.items() if k != "data"} | {"sample": obj})
    a, b = by_dict.snapshot(2.0), by_object.snapshot(2.0)
    assert a == b and b.nvml.devices[0].memory.total == 80 * GIB and b.host.processes[4242].user == "me"
    odd = HubState()
    odd.ingest({**nvml_record(), "sample": {"not": "a sample"}})  # the data is still read
    assert odd.snapshot(2.0).nvml.available
    odd.ingest({"t": 1.0, "kind": "host", "source": "local", "sample": "junk"})  # no data: a counted warning
    assert any("bad host sample" in w.message for w in odd.snapshot(2.0).warnings)


def _steady_cuda_agent() -> tuple[HubState, int]:
    """A hub state with one CUDA agent that sent 100 steps at batch 16, past the summary's bound (first + sizes +
    recent steps): from then on its figures stay the same. Also the number of the last step."""
    s = HubState()
    s.ingest(agent(make_hello(4242, device="cuda:0", nvml_uuid="GPU-1")))
    s.ingest(nvml_record(total=40 * GIB))
    for n in range(1, 101):
        s.ingest(agent(make_step(n, batch=16)))
    return s, 100


def test_steady_steps_are_refitted_every_few_seconds_and_a_changed_figure_at_once(monkeypatch):
    """A refit reads the memory figures of a bounded summary; while they stay the same (steady training) it would
    give the same answer, so it happens only every PREDICT_STEADY_S; a new figure is fitted within
    PREDICT_EVERY_S, a new batch size at once."""
    from batchmon.monitor import hub_state

    real_fit = memory_model.fit
    fits: list[float] = []

    def counting_fit(*a, **kw):  # the real fit, counted
        fits.append(now[0])
        return real_fit(*a, **kw)

    monkeypatch.setattr(memory_model, "fit", counting_fit)
    now = [1.0]
    s, n = _steady_cuda_agent()
    s.snapshot(now[0])
    assert len(fits) == 1
    steady_s = hub_state.PREDICT_STEADY_S
    assert steady_s == 120.0
    for t in range(2, int(steady_s) + 1):  # steady: same figures at every step, a snapshot a second
        now[0] = float(t)
        n += 1
        s.ingest(agent(make_step(n, batch=16)))
        view = s.snapshot(now[0]).agents[0]
    assert len(fits) == 1 and view.prediction is not None
    now[0] = steady_s + 1.5  # PREDICT_STEADY_S after the last fit: refitted (its basis' step range moves on)
    n += 1
    s.ingest(agent(make_step(n, batch=16)))
    s.snapshot(now[0])
    assert len(fits) == 2
    grown = make_step(n + 1, batch=16)
    grown = dataclasses.replace(grown, components={**grown.components, "other": grown.components["other"] + GIB})
    now[0] = steady_s + 2.6  # a figure changed, 1.1 s after the last fit: not before PREDICT_EVERY_S plus half
    s.ingest(agent(grown))  # the interval (1 s here) has passed ...
    s.snapshot(now[0])
    assert len(fits) == 2
    now[0] = steady_s + 3.1  # ... then refitted
    s.ingest(agent(dataclasses.replace(grown, step=n + 2)))
    view = s.snapshot(now[0]).agents[0]
    assert len(fits) == 3
    now[0] = steady_s + 3.3  # a new batch size: at once
    s.ingest(agent(make_step(n + 3, batch=32)))
    s.snapshot(now[0])
    assert len(fits) == 4


def test_new_own_phase_peaks_alone_are_a_changed_figure(monkeypatch):
    """The per-phase fit reads each phase's own peak: a sampled step whose own peaks differ while every other
    figure stays the same is refitted within PREDICT_EVERY_S, not held for PREDICT_STEADY_S."""
    real_fit = memory_model.fit
    fits: list[int] = []

    def counting_fit(*a, **kw):
        fits.append(1)
        return real_fit(*a, **kw)

    monkeypatch.setattr(memory_model, "fit", counting_fit)
    s, n = _steady_cuda_agent()
    s.snapshot(1.0)  # (snapshots 1.6 s apart: a figure is compared once PREDICT_EVERY_S plus half the 1 s interval
    assert len(fits) == 1  # has passed)
    base = make_step(n + 1, batch=16)
    own = {"forward": 3 * GIB, "backward": 5 * GIB, "optimizer": 2 * GIB}
    s.ingest(agent(dataclasses.replace(base, phase_own_peaks=own)))
    s.snapshot(2.6)
    assert len(fits) == 2
    # the per-segment fit reads each segment's own peak (the backward split at the output's gradient) likewise:
    # steady steps with the same own peaks are held, one whose segment peaks alone are new is refitted
    for k in range(n + 2, n + 40):
        s.ingest(agent(dataclasses.replace(base, step=k, phase_own_peaks=own)))
    s.snapshot(4.2)
    held = len(fits)
    s.ingest(agent(dataclasses.replace(base, step=n + 40, phase_own_peaks=own)))
    s.snapshot(5.8)
    assert len(fits) == held
    segments = {"forward": 3 * GIB, "loss_backward": 5 * GIB, "backward": 4 * GIB, "optimizer": 2 * GIB}
    s.ingest(agent(dataclasses.replace(base, step=n + 41, phase_own_peaks=own, segment_peaks=segments)))
    s.snapshot(7.4)
    assert len(fits) == held + 1


def test_a_steady_agents_figures_are_compared_at_most_once_a_second(monkeypatch):
    """At --interval 0.25 a steady agent's summary is compared with the last fit's once per PREDICT_EVERY_S, not
    at every snapshot; a changed figure is still refitted within PREDICT_EVERY_S of the last comparison."""
    import importlib

    model_fit = importlib.import_module("batchmon.memory_model.fit")  # the module (the package's ``fit`` is the function)

    real = model_fit.fit_figures
    compared: list[int] = []
    monkeypatch.setattr(model_fit, "fit_figures", lambda summary, *memo: (compared.append(1), real(summary, *memo))[1])
    s, n = _steady_cuda_agent()
    s.snapshot(1.0)
    assert len(compared) == 1  # the first fit
    for k in range(1, 17):  # 4 s of snapshots at 0.25 s, a new steady step before each
        n += 1
        s.ingest(agent(make_step(n, batch=16)))
        s.snapshot(1.0 + 0.25 * k, 0.25)
    assert 2 <= len(compared) <= 5, compared  # about once a second, not 16 times
    grown = make_step(n + 1, batch=16)
    grown = dataclasses.replace(grown, components={**grown.components, "other": grown.components["other"] + GIB})
    s.ingest(agent(grown))
    view = s.snapshot(6.1, 0.25).agents[0]
    assert view.prediction is not None and view.prediction.components["other"] >= GIB


def test_a_real_agents_steps_with_a_nested_split_are_kept_whole(agent_dir):
    """A real agent on a model of repeated blocks sends its saved split with the block sequence (a dict holding
    lists): the hub keeps every step (none rejected), the split as sent."""
    import json

    torch = pytest.importorskip("torch")
    import batchmon
    from batchmon import protocol

    nn = torch.nn
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 16), nn.ReLU()) for _ in range(4)], nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters())
    handle = batchmon.attach(model, opt, activation_every=1)
    try:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(8, 16)).sum().backward()
            opt.step()
        sent = [json.loads(protocol.encode(s)) for s in handle.steps]
        hello = json.loads(protocol.encode(handle._hello()))
    finally:
        handle.detach()
    assert any(isinstance((d.get("saved_split") or {}).get("block_seq"), dict) for d in sent)
    s = HubState()
    s.ingest({"t": 1, "kind": "agent", "source": "local", "key": KEY, "data": hello})
    for d in sent:
        s.ingest({"t": 2, "kind": "agent", "source": "local", "key": KEY, "data": d})
    snap = s.snapshot(3.0)
    assert [w.message for w in snap.warnings if w.source == "hub"] == []
    (view,) = snap.agents
    assert [x.step for x in view.history] == [d["step"] for d in sent]
    assert [x.saved_split for x in view.history] == [d.get("saved_split") for d in sent]
