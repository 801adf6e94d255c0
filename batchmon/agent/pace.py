"""The step window a monitor's refresh allows: the agent's side of the ``refresh`` line (issue 14 point 3).

Beside 16 fast jobs, reading, decoding and keeping ~80 step messages a second was a large part of a monitor's hub
thread, and a monitor at ``--interval 1`` shows each job once a second: windows of ~1 s (coalesce's steady window)
instead of 0.2 s cut its hub thread's CPU by a quarter to a third (dev box, 16 peers at 100 steps/s, 20 s rounds:
0.080/0.084 -> 0.062/0.059 CPU s; bench/results/ab_fast16_monitor_session14_pace_devbox.json). A monitor at
``--interval 0.25`` needs the short window (the load64 latency target, p99 <= 250 ms step-to-snapshot), so the
agent stretches its window only when told every monitor can wait. The rule, exactly:

- a monitor says how often it refreshes with a ``refresh`` line (protocol.refresh_line), on connecting and when
  its interval changes; its latest valid line counts (an invalid one is ignored, the previous value kept);
- the agent uses the steady window (coalesce.STEADY_WINDOW_SECONDS) while at least one monitor is connected and
  every connected monitor's latest interval is at least STEADY_MIN_INTERVAL; otherwise (no monitor, a monitor
  that said nothing - an older monitor, or one that just connected - or one faster than that) the short window
  as before (coalesce.STEADY_DEFAULT: none);
- a steady window still starts only after coalesce.STEADY_AFTER windows in a row were sent on time, and every
  batch change, event and connecting monitor still forces a window out at once (batchmon.agent.coalesce).

The same rule sets how often the training thread reads the allocator's figures (a nested stats dict and a new Step:
on the H200's 2.7 ms MLP step the reads every 0.25 s were ~4.4 us a step, bench/results/spy_h200_s14_after/):
every READ_SECONDS while some connected monitor refreshes faster than STEADY_MIN_INTERVAL (or has not said),
every READ_STEADY_SECONDS otherwise - no monitor, or only monitors that draw once a second or slower and get
windows of about a second. The allocator's peak accumulates between reads (reset only when read), so no peak is
lost; a read only says it later.

No torch here (runs on the agent's socket thread and in bench/load.py's peers).
"""

from __future__ import annotations

from typing import Iterable

from batchmon.agent.coalesce import STEADY_DEFAULT, STEADY_WINDOW_SECONDS
from batchmon.protocol import REFRESH_LINE_BYTES, decode_refresh

STEADY_MIN_INTERVAL = 1.0  # a monitor refreshing at least this slowly gets steady windows
READ_SECONDS = 0.25  # the allocator's figures read at least this often while a monitor wants them soon (above)
READ_STEADY_SECONDS = 0.5  # ... and this often otherwise: half a steady window


class MonitorLines:
    """What one monitor wrote, framed into lines: keeps only its latest refresh interval, and at most one short
    unfinished line (a longer one is skipped up to its newline)."""

    __slots__ = ("interval", "_partial", "_skipping")

    def __init__(self) -> None:
        self.interval: float | None = None  # None: it has not said
        self._partial = b""
        self._skipping = False

    def feed(self, data: bytes) -> bool:
        """Take bytes the monitor sent; True when its interval changed."""
        before = self.interval
        lines = data.split(b"\n")
        rest = lines.pop()
        for line in lines:
            if self._skipping:
                self._skipping = False
                continue
            line, self._partial = self._partial + line, b""
            value = decode_refresh(line)
            if value is not None:
                self.interval = value
        if not self._skipping:
            self._partial += rest
            if len(self._partial) > REFRESH_LINE_BYTES:
                self._partial, self._skipping = b"", True
        return self.interval != before


def _all_slow(intervals: Iterable[float | None]) -> tuple[bool, bool]:
    """(any monitor connected, every one said an interval of at least STEADY_MIN_INTERVAL): the module's rule."""
    seen = False
    for interval in intervals:
        if interval is None or interval < STEADY_MIN_INTERVAL:
            return True, False
        seen = True
    return seen, True


def steady_window(intervals: Iterable[float | None]) -> float | None:
    """The coalescer's steady window for the connected monitors' refresh intervals (see the module's rule)."""
    seen, slow = _all_slow(intervals)
    return STEADY_WINDOW_SECONDS if seen and slow else STEADY_DEFAULT


def allocator_read_seconds(intervals: Iterable[float | None]) -> float:
    """How often the training thread reads the allocator's figures for the connected monitors (the module's rule):
    READ_SECONDS while one refreshes faster than STEADY_MIN_INTERVAL or has not said, else READ_STEADY_SECONDS."""
    return READ_STEADY_SECONDS if _all_slow(intervals)[1] else READ_SECONDS
