"""Coalesced steps: at high step rates one message stands for a window of steps (issue 14 point 2).

A job at 1000 steps/s would send 1000 lines a second to every monitor, which redraws at most 4 times a second
and whose memory model keeps one point per batch size (its highest peak). The agent's socket thread
(batchmon.agent.transport) therefore sends a window of steps as one ``step`` message:

- ``steps``: how many steps the message stands for (protocol v1 added field, default 1: older agents' steps
  are windows of one; older monitors ignore it);
- ``step``, ``time``: the window's last step (the step count the monitor shows stays right);
- ``step_seconds``: the mean step time over the window (so rates stay right: steps / sum of step_seconds);
- the memory figures (``components``, ``allocated``, ``peak_allocated``, ``reserved``, ``device_used``,
  ``micro_batches``): those of the window's peak step (highest ``peak_allocated``, else highest sum of the
  components; the latest on ties);
- ``num_alloc_retries``, ``num_ooms`` (cumulative counters): the last step's;
- ``peak_phase``, ``phase_peaks``, ``phase_own_peaks``, ``segment_peaks`` (set on sampled steps only): the peak
  step's if it has them, else those of the window's last step that has them (None if no step of the window was sampled);
  ``saved_split`` and ``inactive_split`` likewise (each the peak step's, else the window's last step's that has
  one).

A window never spans two batch sizes, and is sent at once (never held back) when: it is one of the first
FIRST_STEPS steps of the run (a new run shows at once); its batch size (or batch source) differs from the
previous step's (then the step is a window of its own, sent at once, after the previous window); an event is
about to be sent (the window goes first, so events stay in step order); the agent says bye; or its time passed
since the last message: WINDOW_SECONDS, and - where a steady window is asked for (``steady_interval``; off by
default, see STEADY_DEFAULT) - once STEADY_AFTER windows in a row were sent on their time (nothing forced one out: no
batch change, event, monitor connecting), a steady window of 0.8-1.0 x that, until a window is forced out again. So
a monitor gets at most about 1/WINDOW_SECONDS step messages a second, every batch size's peak, every batch change
and every event. Why a steady window of about a second: beside 16 fast jobs, reading, decoding and keeping ~80 step
messages a second was the largest part of the monitor's hub thread (issue 14 point 3), and a monitor shows a
job's step counter once a second (--interval 1) - 4 times at --interval 0.25, where a steady job's counter now
moves about once a second. The lengths vary (a golden-ratio sequence over [0.8, 1.0] of it, no random state):
a window that is a multiple of the hub's tick (1 s = 4 x 0.25 s) would keep each agent at one phase of the tick
(the 0.25 s note below).

No torch here (the module runs on the agent's socket thread).
"""

from __future__ import annotations

from batchmon.protocol import Step, new_step, with_added

HISTORY_STEPS = 2000  # step messages an agent keeps for a monitor that connects later (and handle.steps)
HISTORY_EVENTS = 200
WINDOW_SECONDS = 0.2  # at most ~5 step messages a second per agent in steady training: the monitor draws at most
# 4 frames a second (--interval 0.25), and every message costs its hub thread a read, a decode and a history entry
# (16 fast agents at 10 a second were the largest part of its work; bench/ab_monitor.py). Not 0.25: a window as long
# as the hub's fastest tick keeps each agent's messages at one phase of the tick for tens of seconds, and the agents
# whose phase falls just after the tick's read wait a whole tick every time (bench/load.py, 64 agents at 200
# steps/s, dev box: p99 0.29 s at 0.1 and 0.2, 0.34-0.46 s at 0.25). A window is sent when a step finds it due,
# stamped with that step's time, so the step-to-snapshot latency does not grow with it
FIRST_STEPS = 3  # the run's first steps are sent one by one
STEADY_WINDOW_SECONDS = 1.0  # a steady agent's window, where one is asked for: between 0.8 and 1.0 of this (below)
# Off by default (None: the 0.2 s window always). Measured on the H200 (bench/load.py, 64 agents at 1000 steps/s,
# --interval 0.25, the same lease, one after the other; bench/results/load64_window_{on,off}_h200.json): with the
# steady window p99 step-to-snapshot 0.29 s, without it 0.24 s, the monitor's CPU 1.59 vs 1.56 s; and beside 16
# fast jobs (fast16 run 6) the monitor's CPU did not fall with it (1.75-1.87x nvitop's, 1.78x before). A window of
# ~1 s that ends when a step finds it due is stamped with that step's time, but fewer, later messages make the
# hub's ticks see each agent less often: the latency tail grows. Kept as an option for the benches, and used while
# every connected monitor says it refreshes at most once a second (batchmon.agent.pace: the monitor -> agent
# ``refresh`` line; the load64 target is measured at --interval 0.25, which keeps the short window).
STEADY_DEFAULT: float | None = None
STEADY_AFTER = 10  # windows sent on time in a row (~2 s at WINDOW_SECONDS) before the window stretches
_GOLDEN = 0.6180339887498949  # the stretched windows' lengths step through [0.8, 1.0] by the golden ratio


def _peak(step: Step) -> int:
    return step.peak_allocated if step.peak_allocated is not None else sum(step.components.values())


class StepCoalescer:
    """Turns the agent's stream of steps into window messages. ``add``/``flush``/``due`` take a monotonic now."""

    __slots__ = ("interval", "first_steps", "steady_interval", "_peak_step", "_peak", "_last", "_count", "_seconds",
                 "_timed", "_last_sent", "sent", "seen", "_phased", "_window", "_on_time", "_turn", "_split",
                 "_inactive")

    def __init__(self, interval: float = WINDOW_SECONDS, first_steps: int = FIRST_STEPS,
                 steady_interval: float | None = STEADY_DEFAULT) -> None:
        """``steady_interval``: the window once steady (None: ``interval`` always; never below ``interval``)."""
        self.interval = interval
        self.first_steps = first_steps
        self.steady_interval = steady_interval if interval > 0 else None
        self._window = interval  # the open window's length: interval, or a steady window
        self._on_time = 0  # windows sent on their time since one was forced out
        self._turn = 0.0
        self._peak_step: Step | None = None  # the open window's peak step
        self._peak = 0
        self._last: Step | None = None  # the open window's last step
        self._phased: Step | None = None  # the open window's last step with a peak phase (a sampled step)
        self._split: Step | None = None  # the open window's last step with a saved_split (a sampled step)
        self._inactive: Step | None = None  # the open window's last step with an inactive_split (a sampled step)
        self._count = 0  # steps in the open window
        self._seconds = 0.0  # sum of the window's step_seconds
        self._timed = 0  # steps in the window with a step_seconds
        self._last_sent = float("-inf")
        self.sent = 0  # step messages made
        self.seen = 0  # steps taken in

    def add(self, step: Step, now: float) -> list[Step]:
        """Take one step (a window of ``step.steps``); returns the messages to send now, in order."""
        self.seen += step.steps
        last = self._last
        changed = last is not None and (step.batch_size != last.batch_size or step.batch_source != last.batch_source)
        if step.step <= self.first_steps or changed:
            out = self.flush(now)  # the previous window first: it ends here
            self._take(step)
            out.extend(self.flush(now))
            return out
        self._take(step)
        return self.flush(now) if now - self._last_sent >= self._window else []

    def _take(self, step: Step) -> None:
        peak = _peak(step)
        if self._peak_step is None or peak >= self._peak:
            self._peak_step, self._peak = step, peak
        self._last = step
        if step.peak_phase is not None:
            self._phased = step
        if step.saved_split is not None:
            self._split = step
        if step.inactive_split is not None:
            self._inactive = step
        self._count += step.steps
        if step.step_seconds is not None:
            self._seconds += step.step_seconds * step.steps
            self._timed += step.steps

    def _next_window(self, on_time: bool) -> None:
        """The next window's length: ``interval`` after a window forced out (a batch change, an event, a monitor
        connecting, the first steps) and until STEADY_AFTER were sent on time; then a steady window."""
        self._on_time = self._on_time + 1 if on_time else 0
        steady = self.steady_interval
        if steady is None or self._on_time < STEADY_AFTER:
            self._window = self.interval
            return
        self._turn = (self._turn + _GOLDEN) % 1.0
        self._window = max(self.interval, steady * (0.8 + 0.2 * self._turn))

    def set_steady(self, seconds: float | None) -> None:
        """Ask for a steady window (or none) from now on (batchmon.agent.pace: what the monitors allow). Turned
        off, the open window ends at ``interval``; turned on, it stretches once STEADY_AFTER windows went on time."""
        steady = seconds if self.interval > 0 else None
        if steady == self.steady_interval:
            return
        self.steady_interval = steady
        if steady is None:
            self._window = self.interval

    def due(self, now: float) -> bool:
        """Whether an open window has waited its time (the socket thread checks on every poll)."""
        return self._count > 0 and now - self._last_sent >= self._window

    def flush(self, now: float) -> list[Step]:
        """The open window as one message (none if no step is waiting)."""
        peak, last, count, phased, split = self._peak_step, self._last, self._count, self._phased, self._split
        inactive = self._inactive
        if peak is None or last is None or count == 0:
            return []
        seconds = self._seconds / self._timed if self._timed else None
        self._peak_step, self._peak, self._count, self._seconds, self._timed = None, 0, 0, 0.0, 0
        self._phased = self._split = self._inactive = None
        self._next_window(now - self._last_sent >= self._window)
        self._last_sent = now
        self.sent += 1
        if count == last.steps and peak is last:
            return [last]  # a window of one step (or one the agent already made): sent as it is
        phased = peak if peak.peak_phase is not None else phased
        split = peak if peak.saved_split is not None else split
        inactive = peak if peak.inactive_split is not None else inactive
        made = new_step(last.step, last.time, seconds, last.batch_size, peak.components, peak.allocated,
                         peak.peak_allocated, peak.reserved, last.num_alloc_retries, last.num_ooms,
                         peak.device_used, last.batch_source, peak.micro_batches, count,
                         phased.peak_phase if phased is not None else None,
                         phased.phase_peaks if phased is not None else None,
                         phased.phase_own_peaks if phased is not None else None,
                         phased.segment_peaks if phased is not None else None)
        added: dict[str, object] = {}
        if split is not None:
            added["saved_split"] = split.saved_split
        if inactive is not None:
            added["inactive_split"] = inactive.inactive_split
        return [with_added(made, **added) if added else made]
