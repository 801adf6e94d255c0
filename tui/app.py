"""The Textual monitor: one panel per GPU, one per training job, what-if keys, at most 4 refreshes a second.

Threads never touch the UI: a source calls ``deliver(snapshot)`` from its own thread, which only posts a
SnapshotArrived message; newer ones replace older ones still queued, and rendering is throttled on the
app's own loop (a timer, not a thread). What the panels show is built in views.py (pure, tested without
Textual); the widgets draw it.

Over 400 lines, as one class: the App is where Textual's lifecycle (mount, signals, resize, focus), the mounting
of panels, their sizes and every key's action meet; each part is short and needs the others' state.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Protocol

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Container, VerticalScroll
from textual.css.query import NoMatches
from textual.widget import Widget
from textual.widgets import Footer

from batchmon.errors import CliError
from batchmon.snapshot import AgentView, Snapshot
from batchmon.tui.fmt import fmt_interval
from batchmon.tui import palette, views
from batchmon.tui.gpu_panel import GpuPanel
from batchmon.tui.header import HeaderBar
from batchmon.tui.ended_panel import clear_ended_runs
from batchmon.tui.job_panel import JobPanel
from batchmon.tui.messages import PanelFocused, SnapshotArrived
from batchmon.tui.notices import NoAgentsPanel, NoGpuPanel, WarningsPanel
from batchmon.tui.panel import LinesPanel
from batchmon.tui.predict import Predictor
from batchmon.tui.app_signals import QUIT_SIGNALS, SignalsApp  # noqa: F401 - QUIT_SIGNALS: the app's API
from batchmon.tui.app_memory import HISTORY, MemoryViewsApp  # noqa: F401 - HISTORY: its old home
from batchmon.tui.app_cost import CostApp
from batchmon.tui.replay_bar import ReplayBar
from batchmon.tui.timeline_panel import TimelinePanel
from batchmon.tui.advisor import AdvisorPrompt
from batchmon.tui.screens import EXTRA_KEYS, HELP, HelpScreen
from batchmon.tui.state import WhatIfState, cycle_interval, next_interval
from batchmon.tui.views import JobView
from batchmon.tui.whatif_bar import PanelColumn, WhatIfBar

NARROW_WIDTH = 120
SHORT_HEIGHT = 28



class Source(Protocol):
    """What the app runs on: Hub, ReplaySource (batchmon.monitor) and the tests' ListSource all are one. The app
    sets ``on_snapshot`` (called from the source's thread) before ``start()``, and stops it when it closes."""

    on_snapshot: Callable[[Snapshot], None] | None

    def start(self) -> object: ...

    def stop(self) -> None: ...

    def snapshot(self) -> Snapshot | None: ...

    def set_interval(self, seconds: float) -> None: ...


class BatchmonApp(SignalsApp, MemoryViewsApp, CostApp):
    """The monitor, on a ``Source`` (the hub, a replay, a test's list of snapshots) or one fixed snapshot."""

    CSS_PATH = "batchmon.tcss"
    TITLE = "batchmon"
    ENABLE_COMMAND_PALETTE = False
    BINDINGS = [
        Binding("q", "quit", "quit"),
        # Ctrl-C quits, as in nvitop, htop and gpustat (Textual's default only says "press ctrl+q")
        Binding("ctrl+c", "quit", "quit", show=False, priority=True),
        Binding("question_mark", "help", "help", key_display="?"),
        Binding("p", "pause", "pause"),
        Binding("plus,equals_sign", "batch(1)", "batch+", key_display="+"),
        Binding("minus,underscore", "batch(-1)", "batch-", key_display="-"),
        Binding("b", "type_batch", "batch"),
        Binding("a", "toggle_amp", "AMP"),
        Binding("c", "toggle_ckpt", "ckpt"),
        Binding("g", "cycle_accum", "accum"),
        Binding("o", "cycle_optimizer", "optim"),
        Binding("r", "reset_what_if", "reset", show=False),
        Binding("x", "clear_ended", "clear ended", show=False),
        Binding("left_square_bracket", "interval(-1)", "faster", key_display="[", show=False),
        Binding("right_square_bracket", "interval(1)", "slower", key_display="]", show=False),
        Binding("i", "cycle_interval", "interval", show=False),
        Binding("up,k", "select(-1)", "previous", key_display="↑", show=False),
        Binding("down,j", "select(1)", "next", key_display="↓", show=False),
        Binding("h", "column('devices')", "GPUs", show=False),
        Binding("l", "column('jobs')", "processes", show=False),
        # on a replay ← / → seek (the position bar says so); live they select a column, as h / l do
        Binding("left", "arrow(-1)", "GPUs / seek back", key_display="←", show=False),
        Binding("right", "arrow(1)", "processes / seek on", key_display="→", show=False),
        Binding("home", "seek_start", "replay start", show=False),
        Binding("end", "seek_end", "replay end", show=False),
    ]

    def __init__(
        self,
        source: Source | None = None,
        *,
        snapshot: Snapshot | None = None,
        interval: float = 1.0,
        title: str | None = None,
        max_fps: float = 4.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.source = source
        self.interval = float(interval)
        self.title_text = title
        self.min_frame = 1.0 / max_fps if max_fps > 0 else 0.0
        self.clock = clock
        self.paused = False
        self.latest: Snapshot | None = snapshot
        self.shown: Snapshot | None = None
        self.what_ifs: dict[str, WhatIfState] = {}
        self.predictor = Predictor()
        self.renders = 0  # frames drawn (tests check throttling and coalescing with it)
        self.received = 0  # SnapshotArrived messages handled (after coalescing)
        self._last_render = -1e9
        self._render_scheduled = False
        self._job_order: list[str] = []
        self._dev_order: list[str] = []
        self._jobs: dict[str, JobView] = {}
        self._focused_once = False
        # the panels mounted now, kept here so a refresh does not query the DOM (a query walks and matches it)
        self._gpu_panels: list[GpuPanel] = []
        self._job_panels: list[JobPanel] = []
        self._host_panels: list[NoGpuPanel] = []
        self._warnings_panel: WarningsPanel | None = None
        self._levels_key: tuple | None = None  # what _apply_levels last laid out for
        self._init_memory_views()
        if snapshot is not None:
            self._record_history(snapshot)

    def get_css_variables(self) -> dict[str, str]:
        """Textual's variables plus the palette's ($bm-bg, $bm-accent ...): batchmon.tcss uses only those."""
        return {**super().get_css_variables(), **palette.CSS_VARIABLES}

    def get_driver_class(self) -> Any:
        """Textual's driver for the platform, except on Linux: the same driver without its 10 Hz input poll
        (batchmon.tui.driver), when Textual's internals look as that driver expects."""
        driver_class = super().get_driver_class()
        try:
            from textual.drivers.linux_driver import LinuxDriver

            from batchmon.tui import driver as quiet

            if driver_class is LinuxDriver and quiet.available():
                return quiet.QuietLinuxDriver
        except Exception:  # noqa: BLE001 - any doubt: Textual's own driver
            pass
        return driver_class

    # ------------------------------------------------------------------------------------------- layout

    def compose(self) -> ComposeResult:
        yield HeaderBar(title=self.title_text, id="header")
        with Container(id="body"):
            yield PanelColumn(id="devices", can_focus=False)
            yield PanelColumn(id="jobs", can_focus=False)
        yield ReplayBar(id="replay")
        yield WhatIfBar(id="whatif")
        yield Footer()

    async def on_mount(self) -> None:
        self._catch_signals()
        self._update_size_classes()
        header = self.query_one(HeaderBar)
        header.interval = self.interval
        self.query_one(ReplayBar).display = self._replay_position() is not None
        if self.latest is not None:
            await self._render_now()
        else:
            header.refresh()
        if self.source is not None:
            self._start_source(self.source)

    def _start_source(self, src: Source) -> None:
        src.on_snapshot = self.deliver
        src.set_interval(self.interval)
        src.start()
        first = src.snapshot()
        if first is not None:
            self.deliver(first)

    def on_unmount(self) -> None:
        self._release_signals()
        if self.source is not None:
            try:
                self.source.stop()
            except Exception:  # noqa: BLE001 - quitting must not fail because a source did
                pass

    def on_resize(self) -> None:
        self._update_size_classes()
        self._apply_levels()

    def _update_size_classes(self) -> None:
        w, h = self.size
        self.screen.set_class(w < NARROW_WIDTH, "-narrow")
        self.screen.set_class(h < SHORT_HEIGHT, "-short")

    # ------------------------------------------------------------------------------------------- delivery

    def deliver(self, snapshot: Snapshot) -> None:
        """Thread-safe: hand a new Snapshot to the UI. Call from any thread."""
        self.post_message(SnapshotArrived(snapshot))

    async def on_snapshot_arrived(self, message: SnapshotArrived) -> None:
        self.received += 1
        self.latest = message.snapshot
        self._record_history(message.snapshot)
        if self.paused or self._render_scheduled:
            return
        if self._frame_delay() <= 0:
            await self._render_now()  # here, not through call_later: one message per snapshot, not two
        else:
            self._schedule_render()

    def _schedule_render(self) -> None:
        if self._render_scheduled:
            return
        self._render_scheduled = True
        delay = self._frame_delay()
        if delay <= 0:
            self.call_later(self._render_now)
        else:
            self.set_timer(delay, self._render_now)

    def _frame_delay(self) -> float:
        """Seconds until the next render may run (max_fps); <= 0: now."""
        return self._last_render + self.min_frame - self.clock()

    async def _render_now(self) -> None:
        self._render_scheduled = False
        if self.latest is None or self.paused:
            return
        self._last_render = self.clock()
        self.renders += 1
        self.shown = self.latest
        await self._apply(self.shown)

    # ------------------------------------------------------------------------------------------- views

    async def _apply(self, snap: Snapshot) -> None:
        try:
            header = self.query_one(HeaderBar)
        except NoMatches:  # the app is closing (q, a signal): its widgets are gone before a due render ran
            return
        header.snapshot, header.paused, header.interval = snap, self.paused, self.interval
        header.update_text()
        await self._apply_devices(snap)
        await self._apply_jobs(snap)
        # panel sizes depend on the panels, the focus (on_focus/on_blur re-run it), and the room: only when one
        # of those changed, not on every refresh
        if self._levels_inputs() != self._levels_key:
            self._apply_levels()
        if not self._focused_once:
            panels: list[LinesPanel] = [*self._job_panels] or [*self._gpu_panels]
            if panels:
                panels[0].focus(scroll_visible=False)
                self._focused_once = True
        self._update_whatif_bar()
        self._update_timeline()
        pos = self._replay_position()
        if pos is not None:
            self.query_one(ReplayBar).update_position(pos)

    async def _apply_devices(self, snap: Snapshot) -> None:
        """A panel per GPU of every box; a host panel per box with no GPU to show (a --host box always, this
        box when no box has one). Remounted only when the list of panels changes."""
        try:
            box = self.query_one("#devices", VerticalScroll)
        except NoMatches:  # closing: a callback after a refresh (app_memory._refresh_devices) found it gone
            return
        gpus = views.device_views(snap, self.history)
        hosts = views.host_views(snap, any_gpu=bool(gpus))
        keys = [k for k, _ in gpus] + [k for k, _ in hosts]
        if keys != self._dev_order or len(box.children) != len(keys) + 1:
            focused_key = self._focused_key()
            await box.remove_children()
            self._gpu_panels = [GpuPanel(v) for _, v in gpus]
            self._host_panels = [NoGpuPanel(v) for _, v in hosts]
            self._timeline = TimelinePanel(id="timeline")
            self._timeline.display = False  # until _apply_levels finds it room
            await box.mount_all([*self._gpu_panels, *self._host_panels, self._timeline])
            self._dev_order = keys
            self._restore_focus(focused_key)
        for panel, (_, view) in zip(self._gpu_panels, gpus):
            view.history_rows = self._history_rows if panel.level == "full" else 1
            panel.view = view
            panel.update_if_changed((view.device, tuple(view.history[-200:]), tuple(view.procs), panel.level,
                                     view.history_rows))
        for host_panel, (_, host_view) in zip(self._host_panels, hosts):
            host_panel.view = host_view
            host_panel.update_if_changed(host_view)

    def _job_view(self, snap: Snapshot, key: str, ranks: list[AgentView]) -> JobView:
        return views.job_view(snap, key, ranks, self.what_ifs.get(key, WhatIfState()), self.predictor)

    async def _apply_jobs(self, snap: Snapshot) -> None:
        try:
            box = self.query_one("#jobs", VerticalScroll)
        except NoMatches:  # closing
            return
        groups = views.ordered_jobs(snap)
        self._jobs = {key: self._job_view(snap, key, ranks) for key, ranks in groups}
        keys = [k for k, _ in groups]
        if keys != self._job_order or not box.children or self._warnings_panel is None:
            focused_key = self._focused_key()
            await box.remove_children()
            self._job_panels = [JobPanel(self._jobs[k]) for k in keys]
            self._warnings_panel = WarningsPanel(id="warnings")
            widgets: list[Widget] = list(self._job_panels) or [NoAgentsPanel(id="no-agents")]
            widgets.append(self._warnings_panel)
            await box.mount_all(widgets)
            self._job_order = keys
            self._restore_focus(focused_key)
        for panel in self._job_panels:
            panel.view = self._jobs[panel.view.key]
            if not panel.waits_off_screen():  # below the fold, built when it shows: its view is not read now
                panel.update_if_changed(views.job_signature(panel.view, panel.level))
        warn = self._warnings_panel
        if warn.warnings != snap.warnings or warn.display != bool(snap.warnings):
            warn.warnings = snap.warnings
            warn.display = bool(snap.warnings)
            warn.update_if_changed(snap.warnings)

    def _focused_key(self) -> str | None:
        f = self.focused
        if isinstance(f, JobPanel):
            return "job:" + f.view.key
        if isinstance(f, GpuPanel):
            return f"gpu:{f.view.device.uuid or f.view.device.index}"
        return None

    def _restore_focus(self, key: str | None) -> None:
        if key is None:
            return
        for panel in self.query(LinesPanel):
            if isinstance(panel, JobPanel) and key == "job:" + panel.view.key:
                panel.focus(scroll_visible=False)
            elif isinstance(panel, GpuPanel) and key == f"gpu:{panel.view.device.uuid or panel.view.device.index}":
                panel.focus(scroll_visible=False)

    def _levels_inputs(self) -> tuple:
        """What the panel sizes depend on: the panels, the focus and the room."""
        return (tuple(map(id, self._gpu_panels)), tuple(map(id, self._job_panels)), self.focused, self.size,
                self.query_one("#jobs").size, self.query_one("#devices").size,
                tuple(g.outer_size.height for g in self._gpu_panels))

    def _apply_levels(self) -> None:
        """Panel sizes: the selected GPU and job expand, the rest shrink when there are many or little room."""
        if not self.screen_stack:  # a focus message can arrive while shutting down
            return
        w, h = self.size
        narrow, short = w < NARROW_WIDTH, h < SHORT_HEIGHT
        gpus = list(self._gpu_panels)
        jobs = list(self._job_panels)
        focused = self.focused
        self._levels_key = self._levels_inputs()
        for g in gpus:
            if len(gpus) == 1 and not short:
                level = "full"
            elif short:
                level = "dense" if g is focused else "line"
            elif narrow:
                level = "dense" if g is focused or len(gpus) <= 2 else "line"
            else:
                level = "full" if len(gpus) <= 2 or g is focused else "dense"
            if g.level != level:
                g.level = level
                g.set_class(level != "full", "-dense")
                g.changed()
        self._size_memory_views(gpus, narrow, short)
        current = self._current_job_key()  # the job the what-if keys act on is the one shown in full
        expanded = next((j for j in jobs if j.view.key == current), jobs[0] if jobs else None)
        # rows left for a chart in the expanded job when space is short: what the jobs column has, less
        # the other jobs' two lines each and the expanded job's ~9 lines of bars and text
        box_h = self.query_one("#jobs").size.height or h // 2
        spare = box_h - 3 * (len(jobs) - 1) - 11
        for j in jobs:
            big = len(jobs) == 1 or j is expanded
            level = ("medium" if short else "full") if big else "compact"
            rows = 10 if level == "full" else (min(10, spare) if spare >= 5 else 0)
            if j.level != level or j.chart_rows != rows:
                j.level, j.chart_rows = level, rows
                j.set_class(level == "compact", "-dense")
                j.changed()

    def _update_whatif_bar(self) -> None:
        bar = self.query_one(WhatIfBar)
        key = self._current_job_key()
        view = self._jobs.get(key) if key else None
        bar.update_view(view)

    @on(PanelFocused)
    def _panel_focused(self) -> None:
        if not self.screen_stack:  # the app is closing: nothing left to lay out
            return
        self._apply_levels()
        self._update_whatif_bar()
        self._update_timeline()
        focused = self.focused
        if isinstance(focused, JobPanel):  # it grew to its full size: show all of it once laid out again
            self.call_after_refresh(focused.scroll_visible, animate=False)
        if isinstance(self.focused, GpuPanel):  # show the job the what-if keys now act on
            key = self._current_job_key()
            for job in self.query(JobPanel):
                if job.view.key == key:
                    job.scroll_visible(animate=False)

    # ------------------------------------------------------------------------------------------- actions

    def _current_job_key(self) -> str | None:
        f = self.focused
        if isinstance(f, JobPanel):
            return f.view.key
        if isinstance(f, GpuPanel):
            key = views.job_on_device(self._jobs, f.view.device)
            if key is not None:
                return key
        return self._job_order[0] if self._job_order else None

    def _change_what_if(self, change: Callable[[WhatIfState, int | None], WhatIfState]) -> None:
        key = self._current_job_key()
        if key is None or key not in self._jobs:
            self.notify("No training process attached: nothing to predict.", severity="warning", timeout=3)
            return
        self.what_ifs[key] = change(self.what_ifs.get(key, WhatIfState()), self._jobs[key].observed_batch)
        self._refresh_jobs()

    def _refresh_jobs(self) -> None:
        """Recompute the job views from what is shown (also while paused) after a what-if change."""
        snap = self.shown
        if snap is None:
            return
        for key, ranks in views.ordered_jobs(snap):
            self._jobs[key] = self._job_view(snap, key, ranks)
        for panel in self._job_panels:
            if panel.view.key in self._jobs:
                panel.view = self._jobs[panel.view.key]
                panel.update_if_changed(views.job_signature(panel.view, panel.level))
        self._update_whatif_bar()

    def action_batch(self, direction: int) -> None:
        self._change_what_if(lambda s, obs: s.step_batch(direction, obs))

    def action_type_batch(self) -> None:
        key = self._current_job_key()
        if key is None or key not in self._jobs:
            self.notify("No training process attached: nothing to predict.", severity="warning", timeout=3)
            return
        current = self.what_ifs.get(key, WhatIfState()).effective_batch(self._jobs[key].observed_batch)

        def done(value: int | None) -> None:
            if value is not None:
                self.what_ifs[key] = self.what_ifs.get(key, WhatIfState()).with_batch(value)
                self._refresh_jobs()

        self.push_screen(AdvisorPrompt.for_job(self._jobs[key], current), done)  # the prompt + the fit advisor

    def action_toggle_amp(self) -> None:
        self._change_what_if(lambda s, _: s.toggle_amp())

    def action_toggle_ckpt(self) -> None:
        self._change_what_if(lambda s, _: s.toggle_checkpointing())

    def action_cycle_accum(self) -> None:
        self._change_what_if(lambda s, _: s.cycle_accumulation())

    def action_cycle_optimizer(self) -> None:
        self._change_what_if(lambda s, _: s.cycle_optimizer())

    def action_reset_what_if(self) -> None:
        self._change_what_if(lambda s, _: WhatIfState())

    def action_clear_ended(self) -> None:
        clear_ended_runs(self.source)  # tui/ended_panel.py: the source forgets them; the next snapshot shows it

    def action_pause(self) -> None:
        self.paused = not self.paused
        header = self.query_one(HeaderBar)
        header.paused = self.paused
        header.refresh()
        if not self.paused and self.latest is not None and self.latest is not self.shown:
            self._schedule_render()

    def _set_interval(self, seconds: float) -> None:
        self.interval = seconds
        if self.source is not None:
            self.source.set_interval(seconds)
        header = self.query_one(HeaderBar)
        header.interval = seconds
        header.refresh()
        self.notify(f"refresh every {fmt_interval(seconds)}", timeout=1.5)

    def action_interval(self, direction: int) -> None:
        self._set_interval(next_interval(self.interval, direction))

    def action_cycle_interval(self) -> None:
        self._set_interval(cycle_interval(self.interval))

    def help_rows(self) -> list[tuple[str, str]]:
        rows = []
        for b in self.BINDINGS:
            assert isinstance(b, Binding)
            keys = [self.get_key_display(Binding(k.strip(), b.action)) for k in b.key.split(",")]
            rows.append((" / ".join(keys), HELP.get(b.action, b.description)))
        return rows + list(EXTRA_KEYS)

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen(self.help_rows()))

    def _column(self, name: str) -> list[LinesPanel]:
        if name == "devices":
            return list(self.query(GpuPanel)) + [p for p in self.query(NoGpuPanel)]
        return list(self.query(JobPanel))

    def action_select(self, direction: int) -> None:
        f = self.focused
        column = "devices" if isinstance(f, (GpuPanel, NoGpuPanel)) else "jobs"
        panels = self._column(column) or self._column("devices" if column == "jobs" else "jobs")
        if not panels:
            return
        idx = panels.index(f) if f in panels else (-1 if direction > 0 else len(panels))
        panels[max(0, min(len(panels) - 1, idx + direction))].focus()

    def action_column(self, name: str) -> None:
        f = self.focused
        if name == "devices":
            gpus = list(self.query(GpuPanel))
            target: LinesPanel | None = gpus[0] if gpus else None
            if isinstance(f, JobPanel):
                dev = f.view.devices.get(f.view.lead.key)
                for g in gpus:
                    if dev is not None and g.view.device.index == dev.index and g.view.device.uuid == dev.uuid:
                        target = g
            if isinstance(f, GpuPanel):
                return
        else:
            jobs = list(self.query(JobPanel))
            target = jobs[0] if jobs else None
            if isinstance(f, GpuPanel):
                for j in jobs:
                    dev = j.view.devices.get(j.view.lead.key)
                    if dev is not None and dev.index == f.view.device.index and dev.uuid == f.view.device.uuid:
                        target = j
                        break
            if isinstance(f, JobPanel):
                return
        if target is not None:
            target.focus()


def run_monitor(source: Source, *, interval: float, mouse: bool, title: str | None = None,
                on_app: Callable[["BatchmonApp"], None] | None = None) -> int:
    """Run the monitor on ``source`` until the user quits; starts and stops the source. Returns an exit code.

    Raises CliError (one line, no traceback) when stdin is not a terminal (`batchmon < /dev/null`, cron): the
    app reads its keys there, and Textual's driver would fail deep inside with a traceback."""
    if not _is_terminal(sys.stdin):
        raise CliError("the live monitor needs a terminal to read keys from, and stdin is not one "
                       "(for one snapshot without a terminal: batchmon --once)")
    app = BatchmonApp(source, interval=interval, title=title)
    if on_app is not None:  # e.g. the demo routes its signals to quit_from_signal from here on
        on_app(app)
    app.run(mouse=mouse)
    return int(app.return_code or 0)


def _is_terminal(stream: Any) -> bool:
    try:
        return stream is not None and os.isatty(stream.fileno())
    except (AttributeError, OSError, ValueError):  # closed, or no file descriptor at all
        return False
