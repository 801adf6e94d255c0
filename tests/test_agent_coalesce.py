"""Coalesced steps (issue 14 point 2): a fast job sends windows of steps, and the monitor loses nothing it uses.

The end-to-end case is a real attached agent on a tiny CPU model making thousands of steps, batch-size changes
and out-of-memory errors, served over its real unix socket to a real Hub (batchmon.monitor.hub) that connects
before training starts. The rule itself (batchmon.agent.coalesce) is also checked directly on Step values.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn as nn

import batchmon
from batchmon.agent.coalesce import FIRST_STEPS, STEADY_AFTER, STEADY_WINDOW_SECONDS, WINDOW_SECONDS, StepCoalescer
from batchmon.monitor.hub import Hub
from batchmon.monitor.step_history import StepHistory, step_peak
from batchmon.protocol import Event, Step, decode, encode
from agent_helpers import agent_dir, wait_for  # noqa: F401 - fixture
from conftest import make_step

D, H = 8, 32


# ------------------------------------------------------------------------------------------------ the rule


def test_first_steps_go_alone_then_a_window_carries_its_peak_and_mean_time():
    c = StepCoalescer(interval=10.0)  # nothing is due by time in this test
    out = []
    for n in range(1, FIRST_STEPS + 1):
        out += c.add(make_step(n, 16), now=0.0)
    assert [s.step for s in out] == list(range(1, FIRST_STEPS + 1)) and all(s.steps == 1 for s in out)
    peaks = {4: 100, 5: 900, 6: 300, 7: 900, 8: 200}  # step 7 ties step 5: the latest wins
    for n, extra in peaks.items():
        step = make_step(n, 16, step_seconds=0.01 * n, peak_allocated=10_000 + extra, allocated=5, reserved=20_000,
                         num_alloc_retries=n, num_ooms=0)
        assert c.add(step, now=0.001) == []
    (window,) = c.flush(now=0.002)
    assert (window.step, window.steps, window.batch_size) == (8, 5, 16)
    assert window.peak_allocated == 10_900 and window.time == make_step(8, 16).time  # peak of 5..8, time of 8
    assert window.num_alloc_retries == 8  # a cumulative counter: the last step's
    assert window.step_seconds == pytest.approx(sum(0.01 * n for n in peaks) / 5)
    assert window.components == make_step(7, 16).components
    assert c.flush(now=0.003) == [] and not c.due(now=100.0)


def test_a_batch_change_ends_the_window_and_goes_alone():
    c = StepCoalescer(interval=10.0)
    for n in range(1, 10):
        c.add(make_step(n, 32), now=0.0)
    out = c.add(make_step(10, 8), now=0.0)
    assert [(s.step, s.steps, s.batch_size) for s in out] == [(9, 6, 32), (10, 1, 8)]
    assert c.add(make_step(11, 8), now=0.0) == []
    out = c.add(make_step(12, 32), now=0.0)
    assert [(s.step, s.steps, s.batch_size) for s in out] == [(11, 1, 8), (12, 1, 32)]


def test_a_window_is_sent_once_its_time_has_passed():
    c = StepCoalescer(interval=WINDOW_SECONDS)
    for n in range(1, FIRST_STEPS + 1):
        c.add(make_step(n), now=0.0)
    assert c.add(make_step(4), now=0.01) == [] and not c.due(now=0.02)
    assert c.due(now=WINDOW_SECONDS + 0.001)
    (window,) = c.add(make_step(5), now=WINDOW_SECONDS + 0.001)
    assert (window.step, window.steps) == (5, 2)


def _gaps(c: StepCoalescer, first: int, steps: int, t0: float, rate: float = 1000.0,
          batch: int = 16) -> tuple[list[float], float]:
    """Feed ``steps`` steps at ``rate`` from time t0; returns the gaps between the messages sent, and the end."""
    sent = []
    for k in range(steps):
        now = t0 + k / rate
        sent += [now] * len(c.add(make_step(first + k, batch), now=now))
    return [b - a for a, b in zip(sent, sent[1:])], t0 + steps / rate


def test_the_agents_window_does_not_stretch_by_default():
    """The steady window is off by default (coalesce.STEADY_DEFAULT: on the H200 it lengthened the latency tail)."""
    c = StepCoalescer()
    for n in range(1, FIRST_STEPS + 1):
        c.add(make_step(n), now=0.0)
    gaps, _ = _gaps(c, FIRST_STEPS + 1, 5000, 0.001)
    assert gaps and all(WINDOW_SECONDS <= g < WINDOW_SECONDS + 0.002 for g in gaps)


def test_a_steady_agent_stretches_its_window_and_any_forced_window_brings_the_short_one_back():
    c = StepCoalescer(steady_interval=STEADY_WINDOW_SECONDS)
    for n in range(1, FIRST_STEPS + 1):
        c.add(make_step(n), now=0.0)
    gaps, end = _gaps(c, FIRST_STEPS + 1, 20_000, 0.001)  # 20 s at 1000 steps/s, one batch size
    short, steady = gaps[:STEADY_AFTER - 1], gaps[STEADY_AFTER:]
    assert all(WINDOW_SECONDS <= g < WINDOW_SECONDS + 0.002 for g in short)
    assert steady and all(0.8 * STEADY_WINDOW_SECONDS <= g < STEADY_WINDOW_SECONDS + 0.002 for g in steady)
    # not one length: a multiple of the hub's tick would keep the agent at one phase of it
    assert max(steady) - min(steady) > 0.1 * STEADY_WINDOW_SECONDS
    # a batch change is sent at once (the open window, then the step), and the windows are short again
    out = c.add(make_step(30_000, 8), now=end)
    assert [(s.step, s.batch_size) for s in out][-1] == (30_000, 8)
    gaps, end = _gaps(c, 30_001, 2000, end + 0.001, batch=8)
    assert all(g < WINDOW_SECONDS + 0.002 for g in gaps[:STEADY_AFTER - 1])
    # a window flushed for an event (forced, before its time) does the same
    _gaps(c, 40_000, 20_000, end + 0.001, batch=8)
    assert c._window >= 0.8 * STEADY_WINDOW_SECONDS
    c.add(make_step(60_001, 8), now=end + 20.5)
    assert c.flush(now=end + 20.5)  # the event's flush
    assert c._window == WINDOW_SECONDS


def test_a_window_carries_the_saved_split_of_its_peak_step_else_of_its_last_step_that_has_one():
    from batchmon.protocol import with_saved_split

    split_a = {"batch": 16, "saved": 4096, "in_blocks": 3072, "block_inputs": 512, "blocks": 4}
    split_b = {"batch": 16, "saved": 4100, "in_blocks": 3070, "block_inputs": 510, "blocks": 4}
    c = StepCoalescer(interval=10.0)
    for n in range(1, FIRST_STEPS + 1):
        c.add(make_step(n, 16), now=0.0)
    c.add(with_saved_split(make_step(4, 16, peak_allocated=100), split_a), now=0.0)
    c.add(with_saved_split(make_step(5, 16, peak_allocated=100), split_b), now=0.0)  # the latest sampled
    c.add(make_step(6, 16, peak_allocated=900), now=0.0)  # the peak, not sampled
    c.add(make_step(7, 16, peak_allocated=100), now=0.0)
    (window,) = c.flush(now=0.0)
    assert window.peak_allocated == 900 and window.saved_split == split_b
    assert decode(encode(window)).saved_split == split_b  # and it goes over the wire
    c.add(make_step(8, 16, peak_allocated=100), now=0.0)
    c.add(with_saved_split(make_step(9, 16, peak_allocated=900), split_a), now=0.0)  # the peak carries its own
    c.add(with_saved_split(make_step(10, 16, peak_allocated=100), split_b), now=0.0)
    (window,) = c.flush(now=0.0)
    assert window.saved_split == split_a
    c.add(make_step(11, 16), now=0.0)
    c.add(make_step(12, 16), now=0.0)
    (window,) = c.flush(now=0.0)
    assert window.saved_split is None  # no sampled step in it: none (the previous window's is not carried over)


def test_a_window_carries_the_inactive_split_of_its_peak_step_else_of_its_last_step_that_has_one():
    from batchmon.protocol import with_added

    c = StepCoalescer(interval=10.0)
    for n in range(1, FIRST_STEPS + 1):
        c.add(make_step(n, 16), now=0.0)
    c.add(with_added(make_step(4, 16, peak_allocated=100), inactive_split=300), now=0.0)
    c.add(with_added(make_step(5, 16, peak_allocated=100), inactive_split=500), now=0.0)  # the latest sampled
    c.add(make_step(6, 16, peak_allocated=900), now=0.0)  # the peak, not sampled
    (window,) = c.flush(now=0.0)
    assert window.peak_allocated == 900 and window.inactive_split == 500
    assert decode(encode(window)).inactive_split == 500 and window.saved_split is None
    c.add(with_added(make_step(7, 16, peak_allocated=900), inactive_split=70), now=0.0)  # the peak's own
    c.add(with_added(make_step(8, 16, peak_allocated=100), inactive_split=800), now=0.0)
    (window,) = c.flush(now=0.0)
    assert window.inactive_split == 70
    c.add(make_step(9, 16), now=0.0)
    c.add(make_step(10, 16), now=0.0)
    (window,) = c.flush(now=0.0)
    assert window.inactive_split is None  # no sampled step in it


def test_no_window_sends_every_step():
    c = StepCoalescer(interval=0.0)
    gaps, _ = _gaps(c, 1, 5000, 0.0)
    assert len(gaps) == 4999


def test_steps_field_round_trips_and_old_lines_read_as_one_step():
    window = make_step(40, 16, steps=25)
    assert decode(encode(window)) == window
    old = encode(make_step(3)).replace(b',"steps":1', b"")
    assert b"steps" not in old and decode(old).steps == 1
    for odd in (b'"steps":0', b'"steps":true', b'"steps":"9"', b'"steps":-4'):
        assert decode(encode(make_step(3)).replace(b'"steps":1', odd)).steps == 1


def test_step_history_counts_steps_and_rate_with_windows():
    history = StepHistory(limit=3)
    history.append(make_step(1, time=100.0))
    history.append(make_step(51, time=101.0, steps=50))
    assert (len(history), history.steps, history.covered) == (2, 51, 51)
    assert history.step_rate() == pytest.approx(50.0)
    history.append(make_step(151, time=102.0, steps=100))
    history.append(make_step(152, time=102.01))  # evicts step 1
    assert (len(history), history.steps, history.covered) == (3, 151, 152)
    assert history.step_rate() == pytest.approx((152 - 51) / 1.01)


# ------------------------------------------------------------------------------------------------ end to end


class Net(nn.Module):
    """A tiny MLP that raises a real torch.OutOfMemoryError on chosen forward calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(D, H)
        self.b = nn.Linear(H, 4)
        self.calls = 0
        self.oom_calls: set[int] = set()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.calls in self.oom_calls:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 MiB.")
        return self.b(torch.relu(self.a(x)))


def _schedule(total: int) -> list[int]:
    """Batch size of each step: long runs at 16, short bursts at 64 and 4 (single steps among them)."""
    sizes = []
    for n in range(1, total + 1):
        if 900 <= n < 905 or n == 2000:
            sizes.append(64)
        elif 1500 <= n < 1503 or n == 2001:
            sizes.append(4)
        else:
            sizes.append(16)
    return sizes


def _runs(values: list) -> list:
    """Consecutive duplicates removed: the sequence of batch sizes as it changed."""
    return [v for i, v in enumerate(values) if i == 0 or v != values[i - 1]]


@pytest.fixture
def one_thread():
    """Steadier step times on a shared box; restored after the test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_fast_agent_sends_few_messages_and_the_monitor_sees_every_batch_size_and_event(agent_dir, one_thread):
    torch.manual_seed(0)
    model = Net()
    model.oom_calls = {700, 2600}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt, name="fast")
    hub = Hub(interval=0.05, socket_dir=agent_dir).start()
    try:
        view = lambda: next(iter(hub.snapshot().agents), None)  # noqa: E731
        wait_for(lambda: view() is not None, what="the hub sees the agent")
        total = 3000
        inputs = {b: torch.randn(b, D) for b in (4, 16, 64)}
        t0 = time.monotonic()
        for size in _schedule(total):
            opt.zero_grad()
            try:
                loss = model(inputs[size]).square().mean()
            except torch.OutOfMemoryError:
                continue  # the step is retried with the next batch, as scripts that catch OOM do
            loss.backward()
            opt.step()
        seconds = time.monotonic() - t0
        steps = handle.steps  # the agent's own per-step history (the last 2000 steps)
        made = handle.last_step.step
        assert made == total - 2 and len(steps) == 2000  # two forwards were OOMs

        v = wait_for(lambda: (v := view()) and v.last_step and v.last_step.step == made and v, what="last window")
        history = list(v.history)
        # the bound: about 1/WINDOW_SECONDS messages a second, plus the first steps, plus a message for each
        # batch change and the window it ended, plus a window before each event
        changes = len(_runs([s.batch_size for s in steps])) + 8  # changes before the kept history too (900..905)
        bound = FIRST_STEPS + 2 * changes + 2 * len(model.oom_calls) + int(seconds / WINDOW_SECONDS) + 2
        assert len(history) <= bound, (len(history), bound, seconds)
        if made / seconds > 4 / WINDOW_SECONDS:  # a fast job (not a box so loaded that steps crawl)
            assert len(history) < made / 2, (len(history), made, seconds)
        # every step is covered once, in order
        assert sum(s.steps for s in history) == made
        assert [s.step - s.steps + 1 for s in history] == [1] + [s.step + 1 for s in history[:-1]]
        # every batch change reaches the monitor (the agent's steps since the first step kept)
        kept = [s for s in history if s.step > steps[0].step]
        assert _runs([s.batch_size for s in kept]) == _runs([s.batch_size for s in steps if s.step > steps[0].step])
        # the peak at each batch size is the agent's peak at that batch size
        for size in (4, 16, 64):
            agent_peak = max(step_peak(s) for s in steps if s.batch_size == size)
            monitor_peak = max(step_peak(s) for s in history if s.batch_size == size)
            assert monitor_peak == agent_peak, size
        # every event, in step order with the windows around it
        wait_for(lambda: len(view().events) == 2, what="both OOM events")
        events = view().events
        assert [e.kind for e in events] == ["oom", "oom"] == [e.kind for e in handle.events]
        assert [e.step for e in events] == [e.step for e in handle.events]
        handle.detach()
        wait_for(lambda: view().state == "ended", what="bye")
        assert view().ended.steps == made
    finally:
        hub.stop()


def test_a_slow_job_still_sends_every_step(agent_dir):
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt)
    hub = Hub(interval=0.05, socket_dir=agent_dir).start()
    try:
        wait_for(lambda: hub.snapshot().agents, what="the hub sees the agent")
        x = torch.randn(16, D)
        for _ in range(8):
            opt.zero_grad()
            model(x).sum().backward()
            opt.step()
            time.sleep(WINDOW_SECONDS * 1.5)  # a slow job (~13 steps/s): not a synchronisation
        v = wait_for(lambda: (v := hub.snapshot().agents[0]).last_step and v.last_step.step == 8 and v,
                     what="the 8th step")
        assert [s.step for s in v.history] == list(range(1, 9)) and all(s.steps == 1 for s in v.history)
        assert [s.components for s in v.history] == [s.components for s in handle.steps]
    finally:
        handle.detach()
        hub.stop()


def test_events_between_steps_keep_their_order(agent_dir):
    model = Net()
    model.oom_calls = {30}
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt)
    x = torch.randn(16, D)
    for _ in range(60):
        opt.zero_grad()
        try:
            model(x).sum().backward()
        except torch.OutOfMemoryError:
            continue
        opt.step()
    hub = Hub(interval=0.05, socket_dir=agent_dir).start()  # a late monitor: all of it from the history
    try:
        v = wait_for(lambda: (a := hub.snapshot().agents) and a[0].last_step and a[0].last_step.step == 59 and a[0],
                     what="the history")
        (event,) = v.events
        assert isinstance(event, Event) and event.step == 30 and handle.events[0].step == 30
        before = [s for s in v.history if s.time <= event.time]
        assert before and before[-1].step == 29  # the window before the OOM ended at the last step before it
    finally:
        handle.detach()
        hub.stop()


def test_window_of_a_real_cpu_step_is_a_step(agent_dir):
    """The window message is a plain protocol Step: what an older monitor reads, ignoring ``steps``."""
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    batchmon.attach(model, opt)
    c = StepCoalescer(interval=1.0)
    x = torch.randn(16, D)
    from batchmon.agent import handle as agent

    for _ in range(20):
        opt.zero_grad()
        model(x).sum().backward()
        opt.step()
    out: list[Step] = []
    for s in agent.current().steps:
        out += c.add(s, now=0.0)
    out += c.flush(now=0.0)
    assert [s.steps for s in out] == [1, 1, 1, 17] and out[-1].step == 20
    legacy = encode(out[-1]).replace(b',"steps":17', b"")
    assert decode(legacy).step == 20 and decode(legacy).components == out[-1].components
