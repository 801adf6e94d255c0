"""The selected job's memory timeline, in the GPU column's free rows (tui/timeline.py draws it)."""

from __future__ import annotations

from rich.text import Text

from batchmon.snapshot import AgentView
from batchmon.tui.palette import DIM
from batchmon.tui.panel import LinesPanel
from batchmon.tui.timeline import legend, timeline_lines

MIN_REDRAW_S = 5.0  # new steps of the shown job redraw the timeline at most this often (as the GPU history moves)


class TimelinePanel(LinesPanel):
    """Not focusable (the keys act on the job it shows); the app sets the job with ``show`` and its rows."""

    can_focus = False

    def __init__(self, *, id: str | None = None) -> None:
        super().__init__(id=id, classes="timeline")
        self.agent: AgentView | None = None
        self.job_name = ""
        self.device_total: int | None = None
        self.rows = 8
        self._shown_for: tuple | None = None
        self._drawn_at = float("-inf")

    def show(self, agent: AgentView | None, name: str, device_total: int | None, rows: int, now: float) -> None:
        """Repaints only when what it draws changed (a new step of the job, another job, other rows), and for new
        steps of the same job at most every MIN_REDRAW_S of snapshot time ``now``: redrawing a 16-row chart for
        every refresh of a fast run was half the monitor's CPU beside one job."""
        shown_for = (agent.key if agent else None, name, device_total, rows)
        if shown_for == self._shown_for and agent is not None and 0 <= now - self._drawn_at < MIN_REDRAW_S:
            return
        self._shown_for, self._drawn_at = shown_for, now
        self.agent, self.job_name, self.device_total, self.rows = agent, name, device_total, rows
        step = agent.last_step if agent is not None else None
        self.update_if_changed((shown_for, step, len(agent.history) if agent else 0))

    def build(self, width: int) -> list[Text]:
        a = self.agent
        if a is None:
            return [Text().append("memory over steps: no training process attached", style=DIM)]
        head = Text().append(self.job_name, style="bold")
        if not a.history and not a.connected:
            return [head, Text().append("memory over steps: it ended before its first step did", style=DIM)]
        return [head, *timeline_lines(a.history, width, self.rows, device_total=self.device_total), *legend(width)]
