"""The monitor's memory-over-time views and replay keys, as the part of the App they are (BatchmonApp derives
from MemoryViewsApp): the GPU memory history sampled one value per 5 s, the room the GPU column gives to a
taller history and to the selected job's timeline, and ← / → / home / end on a replay.

Split from app.py to keep that module under 600 lines; it reads the panels and the job views BatchmonApp keeps.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Iterable

from textual.app import App

from batchmon.snapshot import Snapshot
from batchmon.tui import views
from batchmon.tui.gpu_panel import GpuPanel
from batchmon.tui.job_panel import command_text
from batchmon.tui.notices import NoGpuPanel
from batchmon.tui.replay_bar import SEEK_SECONDS
from batchmon.tui.timeline_panel import TimelinePanel
from batchmon.tui.views import JobView

HISTORY = 240  # GPU memory history: samples kept per GPU, one per HISTORY_SECONDS (20 minutes)
HISTORY_SECONDS = 5  # the history shifts once per this many seconds: a taller history repaints that often
HISTORY_ROWS = 6  # a full GPU panel's history rows, with one or two GPUs and room
TIMELINE_MAX_ROWS = 16
TIMELINE_OVERHEAD = 12  # the timeline panel's lines besides its plot rows, its frame, and a spare line


class MemoryViewsApp(App[int]):
    """State and steps of the memory views; BatchmonApp sets the panels and calls these from its refresh."""

    source: Any
    shown: Snapshot | None
    latest: Snapshot | None
    _gpu_panels: list[GpuPanel]
    _host_panels: list[NoGpuPanel]
    _jobs: dict[str, JobView]
    _levels_key: tuple | None

    def _init_memory_views(self) -> None:
        self.history: dict[str, deque[int]] = {}
        self._timeline: TimelinePanel | None = None  # the selected job's memory over steps, under the GPUs
        self._history_rows = 1  # rows of a full GPU panel's memory history (more when the column has room)
        self._timeline_rows = 0  # 0: no room, hidden
        self._seeks_seen = 0  # the replay's seek count the GPU histories were sampled for
        self._last_sampled: Snapshot | None = None
        self._sampled_second: int | None = None

    # what BatchmonApp provides
    def _levels_inputs(self) -> tuple:
        raise NotImplementedError

    def _apply_levels(self) -> None:
        raise NotImplementedError

    async def _apply_devices(self, snap: Snapshot) -> None:
        raise NotImplementedError

    def _current_job_key(self) -> str | None:
        raise NotImplementedError

    def action_column(self, name: str) -> None:
        raise NotImplementedError

    def add_history(self, snapshots: Iterable[Snapshot]) -> None:
        """Sample the GPUs' memory history from earlier snapshots (a screenshot of a recording's moment shows
        the history up to it, as the monitor would have)."""
        self.history.clear()
        self._sampled_second = None
        for snap in snapshots:
            self._record_history(snap)
        if self.latest is not None:
            self._last_sampled = None
            self._record_history(self.latest)

    def _replay_position(self) -> Any:
        """The replay's position (ReplaySource.position()), None when the source is not a replay."""
        position = getattr(self.source, "position", None)
        return position() if callable(position) else None

    def _record_history(self, snapshot: Snapshot) -> None:
        pos = self._replay_position()
        if pos is not None and pos.seeks != self._seeks_seen:  # a seek: the samples so far are another time's
            self._seeks_seen = pos.seeks
            self.history.clear()
            self._sampled_second = None
        if snapshot is self._last_sampled:  # the same snapshot again (a replay's end): not a new sample
            return
        self._last_sampled = snapshot
        bucket = int(snapshot.time) // HISTORY_SECONDS
        same_bucket = bucket == self._sampled_second
        self._sampled_second = bucket
        for key, used in views.memory_samples(snapshot):
            samples = self.history.setdefault(key, deque(maxlen=HISTORY))
            if same_bucket and samples:  # one sample per HISTORY_SECONDS (aligned on the clock), its highest:
                samples[-1] = max(samples[-1], used)  # refreshes in between change the last column only
            else:
                samples.append(used)

    def _size_memory_views(self, gpus: list[GpuPanel], narrow: bool, short: bool) -> None:
        """The GPU column's free rows go to memory over time: a taller history in one or two full GPU panels,
        and the selected job's timeline under them (hidden when narrow, short, or without room)."""
        history_rows = 6 if not (narrow or short) and 0 < len(gpus) <= 2 else 1
        if history_rows != self._history_rows:
            self._history_rows = history_rows
            self._levels_key = None  # the panels' heights change: look again once laid out
            if self.shown is not None:
                self.call_after_refresh(self._refresh_devices)
        column = self.query_one("#devices").size.height
        used = 0
        for g in gpus:  # what each GPU panel takes: its laid-out height, else an estimate until it is laid out
            estimate = (10 + history_rows + len(g.view.procs)) if g.level == "full" else 3
            used += g.outer_size.height or estimate
        used += sum(p.outer_size.height for p in self._host_panels)
        rows = min(16, column - used - 12) if not (narrow or short) and column else 0
        rows = rows if rows >= 4 else 0
        if rows != self._timeline_rows:
            self._timeline_rows = rows
            self._update_timeline()
        if any(g.outer_size.height == 0 for g in gpus):  # not laid out yet: size again once they are
            self.call_after_refresh(self._relevel)

    def _relevel(self) -> None:
        if self.screen_stack and self._levels_inputs() != self._levels_key:
            self._apply_levels()

    async def _refresh_devices(self) -> None:
        if self.shown is not None:
            await self._apply_devices(self.shown)

    def _update_timeline(self) -> None:
        """The timeline shows the job the what-if keys act on (its lead rank), repainting on its new steps."""
        panel = self._timeline
        if panel is None:
            return
        key = self._current_job_key()
        view = self._jobs.get(key) if key else None
        show = self._timeline_rows > 0 and view is not None
        if panel.display != show:
            panel.display = show
        if not show or view is None:
            return
        dev = view.devices.get(view.lead.key)
        total = dev.memory.total if dev is not None and dev.memory is not None else None
        name = f"{command_text(view.lead)[:40]} (pid {view.lead.hello.pid})"
        panel.show(view.lead, name, total, self._timeline_rows, self.shown.time if self.shown else 0.0)

    def action_arrow(self, direction: int) -> None:
        """← / →: seek a replay by SEEK_SECONDS; live, select the GPUs' or the processes' column."""
        seek_by = getattr(self.source, "seek_by", None)
        if self._replay_position() is not None and callable(seek_by):
            seek_by(direction * SEEK_SECONDS)
        else:
            self.action_column("devices" if direction < 0 else "jobs")

    def action_seek_start(self) -> None:
        seek = getattr(self.source, "seek_start", None)
        if callable(seek):
            seek()

    def action_seek_end(self) -> None:
        seek = getattr(self.source, "seek_end", None)
        if callable(seek):
            seek()
