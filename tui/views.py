"""What each panel shows, built from a Snapshot: pure functions and plain dataclasses, no Textual.

The app (tui/app.py) owns the widgets and the state the keys change; everything it draws is computed here
first, so it can be tested without a terminal (tests/test_tui_views.py). A snapshot may carry other boxes
(`--host`): their agents, GPUs and processes are read from their own snapshot (``box_of``), and they are named
by the name the user typed (``box_name``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

from batchmon.jobs import Job, group_jobs, run_order
from batchmon.memory_model import Prediction
from batchmon.probes.host import HostSample, ProcessInfo
from batchmon.probes.nvml import DeviceSample, NvmlSample
from batchmon.snapshot import AgentFigures, AgentView, Snapshot
from batchmon.tui.chart import ChartInput
from batchmon.tui.predict import Predictor, fit_steps, measured_total
from batchmon.tui.state import WhatIfState

CHART_POINTS = 64  # observed (batch, total) points the chart shows, the latest


@dataclass(frozen=True)
class ProcRow:
    """A process on a GPU: its NVML figure, what the host probe knows of it, and whether an agent runs in it."""

    pid: int
    used: int | None
    info: ProcessInfo | None
    agent: bool
    figures: AgentFigures | None = None  # what its agent reported that splits its NVML figure (where_used)
    ended: bool = False  # an agent ran in it, and its run ended (the process is exiting, or went on without it)


@dataclass
class GpuView:
    """Everything one GPU panel shows."""

    device: DeviceSample
    history: list[int] = field(default_factory=list)  # used bytes, oldest first (the sparkline)
    procs: list[ProcRow] = field(default_factory=list)
    host: str = ""  # the remote box (--host) it is on, as the user named it; "" when local
    history_rows: int = 1  # rows of the memory history (the app gives one or two GPUs more when there is room)


@dataclass(frozen=True)
class HostView:
    """A box without a GPU to show (no NVML, or none found): why, and its memory. ``host`` as in GpuView."""

    nvml: NvmlSample
    sample: HostSample
    host: str = ""


class _Deferred:
    """A value made when first read: a job's chart input (its observed points: a measured total per fitted step)
    is read only by the one job panel drawn in full, so the compact ones (15 of 16 jobs) never make theirs."""

    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


class _DeferredField:
    """A dataclass field that may be given a _Deferred: made on first read, then kept."""

    def __init__(self, default: Any = None) -> None:
        self.default = default  # hashable: the dataclass reads it as the field's default

    def __set_name__(self, owner: type, name: str) -> None:
        self.slot = "_" + name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        if obj is None:
            return self.default  # the field's default (what the dataclass reads from the class)
        value = obj.__dict__[self.slot]
        if type(value) is _Deferred:
            value = obj.__dict__[self.slot] = value.make()
        return value

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__[self.slot] = value


@dataclass
class JobView:
    """Everything one job panel shows, computed from the snapshot, the what-if and the model."""

    key: str
    ranks: list[AgentView]
    devices: dict[str, DeviceSample | None]  # agent key -> its GPU
    what_if: WhatIfState
    # prediction, chart, user and notes are made when first read: a panel below the fold that waits to be built
    # when it shows (LinesPanel.waits_off_screen) reads none of them (16 jobs: ~7 such panels every refresh)
    prediction: Prediction | None = _DeferredField()  # type: ignore[assignment]  # at the what-if batch
    chart: ChartInput | None = _DeferredField()  # type: ignore[assignment]
    user: str | None = _DeferredField()  # type: ignore[assignment]
    notes: list[str] | tuple[str, ...] = _DeferredField(())  # type: ignore[assignment]  # model errors, "waiting for steps"
    host: str = ""  # the remote box (--host) it runs on, named in its title as in its GPU's panel; "" when local

    @property
    def lead(self) -> AgentView:
        return self.ranks[0]

    @property
    def observed_batch(self) -> int | None:
        return self.lead.observed_batch


# ------------------------------------------------------------------------------------------------ boxes


def boxes(snap: Snapshot) -> tuple[Snapshot, ...]:
    """This box and the --host boxes, in the order given."""
    return (snap, *snap.remote)


def box_of(snap: Snapshot, agent: AgentView) -> Snapshot:
    """The snapshot of the box an agent runs on: its devices and processes are there."""
    for box in snap.remote:
        if any(a is agent for a in box.agents):
            return box
    return snap


def box_name(snap: Snapshot, box: Snapshot) -> str:
    """How a panel names the box: "" for this one; for a --host box the name the user typed (the remote
    snapshot's source), which is what they know it by, whatever the box calls itself."""
    if box is snap:
        return ""
    return box.source or box.host.hostname or "?"


def agent_count(snap: Snapshot) -> int:
    """Running agents on every box shown (the header's count; ended runs are listed, not counted)."""
    return sum(len(box.running) for box in boxes(snap))


# ------------------------------------------------------------------------------------------------ devices


def history_key(box: Snapshot, dev: DeviceSample) -> str:
    """What a GPU's panel and sparkline are kept under: its box, and its UUID (else host name and index)."""
    return f"{box.source}|{dev.uuid or f'{box.host.hostname}:{dev.index}'}"


def memory_samples(snap: Snapshot) -> Iterable[tuple[str, int]]:
    """(history key, used bytes) of every GPU of every box that reports its memory."""
    for box in boxes(snap):
        for dev in box.nvml.devices:
            if dev.memory is not None:
                yield history_key(box, dev), dev.memory.used


def device_views(snap: Snapshot, history: Mapping[str, Iterable[int]]) -> list[tuple[str, GpuView]]:
    """One (key, view) per GPU of every box, this box's first."""
    out = []
    for box in boxes(snap):
        # every agent of this box's snapshot runs on this box, whatever alias --host gave it
        agent_devices = {a.hello.pid: box.device_of(a) for a in box.running}
        figures_on = box.figures_by_device()
        ended = {a.hello.pid for a in box.agents if a.ended is not None}
        for dev in box.nvml.devices:
            procs = []
            figures = figures_on.get((dev.index, dev.uuid), {})
            for p in dev.processes:
                found = p.pid in agent_devices
                on = agent_devices.get(p.pid)
                procs.append(ProcRow(p.pid, p.used, box.process(p.pid),
                                     agent=found and (on is None or on.index == dev.index),
                                     figures=figures.get(p.pid), ended=p.pid in ended and p.pid not in figures))
            key = history_key(box, dev)
            out.append((key, GpuView(dev, list(history.get(key, ())), procs, host=box_name(snap, box))))
    return out


def host_views(snap: Snapshot, *, any_gpu: bool) -> list[tuple[str, HostView]]:
    """Boxes with no GPU to show get a host panel: a --host box always, this box when no box has a GPU."""
    out = []
    for box in boxes(snap):
        if box.nvml.devices or (box is snap and any_gpu):
            continue
        name = box_name(snap, box)
        out.append((f"host:{name}", HostView(box.nvml, box.host, name)))
    return out


# ------------------------------------------------------------------------------------------------ jobs


def ordered_jobs(snap: Snapshot) -> list[tuple[str, list[AgentView]]]:
    """batchmon.jobs' grouping of every box's agents (ranks by rank, then pid), jobs in the order of their
    box (this one first), their lead's GPU, then pid."""

    def order(job: Job) -> tuple:
        dev = box_of(snap, job.lead).device_of(job.lead)
        return (*run_order(job), job.lead.source != "local", dev.index if dev else 1 << 20, job.lead.hello.pid)

    agents = [a for box in boxes(snap) for a in box.agents]
    return [(job.key, list(job.ranks)) for job in sorted(group_jobs(agents), key=order)]


def job_view(snap: Snapshot, key: str, ranks: list[AgentView], state: WhatIfState, predictor: Predictor) -> JobView:
    """One job's panel: the lead rank's prediction under the what-if, the chart's points and curve, notes."""
    lead = ranks[0]
    box = box_of(snap, lead)
    made: list[tuple[Prediction | None, list[str], Any, str | None]] = []

    def parts() -> tuple[Prediction | None, list[str], Any, str | None]:
        """The prediction, notes, chart input and user, made together on the first read of any of them (the
        notes read what the prediction left in the predictor's errors)."""
        if not made:
            made.append(_job_parts(box, lead, state, predictor))
        return made[0]

    deferred: Any = _Deferred  # JobView's deferred fields take one in place of their value
    return JobView(key, ranks, {a.key: box.device_of(a) for a in ranks}, state,
                   deferred(lambda: parts()[0]), deferred(lambda: _made(parts()[2])),
                   user=deferred(lambda: parts()[3]), notes=deferred(lambda: parts()[1]), host=box_name(snap, box))


def _made(value: Any) -> Any:
    """A deferred value's value (the chart input is itself made when first read)."""
    return value.make() if type(value) is _Deferred else value


def _job_parts(box: Snapshot, lead: AgentView, state: WhatIfState,
               predictor: Predictor) -> tuple[Prediction | None, list[str], Any, str | None]:
    """job_view's prediction, notes, chart input (a _Deferred, or None) and user."""
    dev = box.device_of(lead)
    device_total = dev.memory.total if dev is not None and dev.memory is not None else None
    observed = lead.observed_batch
    prediction = predictor.predict(lead, state.to_what_if(observed), device_total) if lead.last_step else None
    notes = []
    if lead.key in predictor.errors:
        notes.append(predictor.errors[lead.key])
    elif lead.last_step is not None and prediction is None:
        notes.append("not enough steps to fit yet")
    chart: Any = None
    if prediction is not None:

        def make_chart() -> ChartInput:
            seen: set[tuple[int, int]] = set()
            points = []
            for s in fit_steps(lead):  # the steps the model was fitted on: bounded, not the whole history
                if s.batch_size:
                    pt = (s.batch_size, measured_total(s))
                    if pt not in seen:
                        seen.add(pt)
                        points.append(pt)

            def predict_total(b: int) -> int | None:
                return predictor.total(lead, state.to_what_if(observed, b), device_total)

            def predict_high(b: int) -> int | None:
                pred = predictor.predict(lead, state.to_what_if(observed, b), device_total)
                return pred.band.high if pred is not None and pred.band is not None else None

            shown = tuple(points[-CHART_POINTS:])
            return ChartInput(predict_total, shown, device_total, prediction.max_batch, prediction.batch_size,
                              key=(lead.key, shown, device_total, prediction.max_batch, prediction.batch_size, state),
                              predict_high=predict_high)

        chart = _Deferred(make_chart)
    proc = box.process(lead.hello.pid)
    return prediction, notes, chart, proc.user if proc else None


def job_signature(view: JobView, level: str = "full") -> tuple:
    """Everything a job panel draws at ``level``, comparable: equal signatures draw the same lines. A running
    job's compact panel draws no history (its last step, events, title and prediction), so its signature leaves
    out the last 64 steps that the other levels' timeline and phase lines read (a panel whose level changes is
    rebuilt anyway)."""
    history = level != "compact"
    ranks = tuple((a.key, a.last_step, a.events, a.connected, a.detached,
                   a.history[-64:] if a.history and (history or a.ended is not None) else (), a.state, a.ended, a.oom)
                  for a in view.ranks)
    devices = tuple((k, d.index, d.memory.total if d and d.memory else None) if d else (k,)
                    for k, d in view.devices.items())
    return (ranks, devices, view.what_if, view.prediction, view.user, tuple(view.notes))


def job_on_device(jobs: dict[str, JobView], device: DeviceSample) -> str | None:
    """The key of the first job whose lead runs on ``device``."""
    for key, view in jobs.items():
        dev = view.devices.get(view.lead.key)
        if dev is not None and dev.index == device.index and dev.uuid == device.uuid:
            return key
    return None
