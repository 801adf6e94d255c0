"""Immutable Snapshot: everything every front end (TUI, --once, --json, export) renders, in one object.

The hub builds one per refresh; front ends never look anywhere else, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from batchmon.memory_model import MemoryModel, Prediction
from batchmon.postmortem import OomReport
from batchmon.probes.host import HostSample, ProcessInfo
from batchmon.probes.nvml import DeviceSample, NvmlSample
from batchmon.protocol import PHASES, Event, Hello, Step
from batchmon.units import fmt_bytes
from batchmon.where_used import AgentFigures, DeviceUse, ProcessUse, device_use

__all__ = ["AgentFigures", "AgentView", "DeviceUse", "ENDED", "ENDED_LIMIT", "OOM", "OomReport", "ProcessUse",
           "RUNNING", "RunEnd", "Snapshot", "StepPhases", "Warning", "device_for", "device_use", "job_key"]

RUNNING, ENDED, OOM = "running", "ended", "oom"  # AgentView.state
ENDED_LIMIT = 20  # ended runs kept per box, newest first, until cleared


@dataclass(frozen=True)
class RunEnd:
    """How and when a run ended, as the monitor saw it: what the final summary of an ended run shows.

    ``how``: "oom" (its last event was an out-of-memory error and no step followed), "exited" (said bye at
    interpreter exit), "detached" (said bye, the process went on without the agent), "killed" (its process
    ended without a bye: SIGKILL, SIGTERM, a crash, os._exit), "lost" (no bye, process alive, silent past the
    grace time), "gone" (no bye; an older recording does not say why). The agent does not report an exit code
    or a signal (protocol v1's bye has only a reason), so ``exit_code`` and ``signal`` stay None unless a bye
    carries them."""

    time: float  # when it ended (the bye's time, else when the monitor saw it go)
    how: str
    text: str  # one line: "out of memory in forward at step 1", "exited (exit code not reported)", ...
    steps: int  # steps completed (the last step's number; 0 when none finished)
    peak: int | None  # the highest allocator peak (or measured total off CUDA) of any step or of the OOM moment
    exit_code: int | None = None
    signal: int | None = None


@dataclass(frozen=True)
class StepPhases:
    """Where in a training step the allocator's peak was reached, as of the agent's latest sampled step.

    The agent reads the allocator's peak at backward start, backward end and step end on its sampled steps only
    (every ~0.25 s and the first steps); the other steps' messages carry no phase. So this is the latest one
    known (``step``, ``batch_size``: of the step it was measured on), kept until a later sampled step replaces
    it, never blanked by an unsampled one. ``peaks``: the peak reached by the end of each phase (cumulative
    within the step, so forward <= backward <= optimizer, the step's peak), only the phases the agent sent."""

    step: int
    time: float
    batch_size: int | None
    peak_phase: str | None  # one of protocol.PHASES, None when only the peaks came
    peaks: Mapping[str, int]  # phase -> bytes, in PHASES order

    def text(self, *, short: bool = False) -> str:
        """'peak in backward (forward 10.2 GiB → backward 12.0 GiB → step 12.0 GiB)': the last phase's peak is
        the step's own, named so. ``short``: 'peak in backward (fwd 10.2 → bwd 12.0 → step 12.0 GiB)'."""
        head = f"peak in {self.peak_phase}" if self.peak_phase is not None else "step peak"
        if not self.peaks:
            return head
        names = list(self.peaks)
        labels = {"forward": "fwd", "backward": "bwd"} if short else {}
        parts = []
        for i, name in enumerate(names):
            label = "step" if name == "optimizer" else labels.get(name, name)  # the last phase's is the step's
            size = fmt_bytes(self.peaks[name])
            if short and i < len(names) - 1 and size.split()[-1] == fmt_bytes(self.peaks[names[-1]]).split()[-1]:
                size = size.split()[0]  # one unit for the whole line when they share it
            parts.append(f"{label} {size}")
        return f"{head} ({' → '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """`--once --json`'s agents[].peak_phase / phase_peaks / phase_step / phase_batch_size."""
        return {"peak_phase": self.peak_phase, "phase_peaks": dict(self.peaks) or None, "phase_step": self.step,
                "phase_batch_size": self.batch_size}


def phase_peaks(step: Step) -> dict[str, int]:
    """A step's ``phase_peaks`` in PHASES order ({} when it has none)."""
    given = step.phase_peaks or {}
    return {name: given[name] for name in PHASES if name in given}


@dataclass(frozen=True)
class AgentView:
    """One attached training process as the monitor last saw it."""

    key: str  # "<host>:<pid>", unique in a snapshot
    source: str  # "local" or the remote host name it came from
    hello: Hello
    last_step: Step | None = None
    # recent steps, oldest first (bounded): a tuple, or from the hub an immutable StepWindow
    # (batchmon.monitor.step_history)
    # that behaves like one (equal to the tuple of its steps, slices to tuples) and costs no copy of the steps
    history: Sequence[Step] = ()
    events: tuple[Event, ...] = ()  # recent events, oldest first (bounded)
    connected: bool = True
    detached: bool = False  # said bye
    invalid_lines: int = 0  # lines dropped from this agent as invalid
    prediction: Prediction | None = None
    # the fitted model the prediction came from (the hub's; None in recordings' own views): the TUI's what-ifs
    # and chart ask it instead of fitting the same steps again, so they agree with the prediction
    model: MemoryModel | None = field(default=None, compare=False, repr=False)
    state: str = RUNNING  # RUNNING, ENDED or OOM
    ended: RunEnd | None = None  # set once the run ended
    oom: OomReport | None = None  # the post-mortem of its last out-of-memory error, if it had one
    # where in the step the peak was reached, from its latest sampled step (None: no step sampled yet, or an
    # agent / recording from before the measurement)
    phases: StepPhases | None = None

    @property
    def observed_batch(self) -> int | None:
        """The batch size of its last step: what the run uses now (what-ifs start from it)."""
        return self.last_step.batch_size if self.last_step is not None else None

    @property
    def job(self) -> str:
        """Ranks of one job share this key (job_key says how)."""
        return job_key(self)


def job_key(agent: AgentView) -> str:
    """Agents with the same key are ranks of one job.

    Distributed ranks share the job id their agents report (torchrun's rendezvous address and run id); agents
    of an older protocol writer without one fall back to the command line and world size. A single process
    is a job of its own, even when another process runs the same command.

    An ended run is a job apart from a running one with the same key (a new run of the same pid or rendezvous
    after it): its ranks share the suffix "|ended"; a single process also keeps its end time, so two ended runs of
    one pid stay two.
    """
    h = agent.hello
    end = "" if agent.ended is None else "|ended"
    if h.world_size <= 1:
        if agent.ended is not None:
            end += f" {agent.ended.time:.6f}"
        return f"{agent.source}|{h.host}|pid {h.pid}{end}"
    who = f"id {h.job}" if h.job else f"argv {' '.join(h.argv)}"
    return f"{agent.source}|{h.host}|{who}|world {h.world_size}{end}"


@dataclass(frozen=True)
class Warning:
    """A counted problem the monitor survived: shown, never fatal."""

    source: str
    message: str
    count: int = 1


@dataclass(frozen=True)
class Snapshot:
    time: float
    host: HostSample
    nvml: NvmlSample
    agents: tuple[AgentView, ...] = ()
    warnings: tuple[Warning, ...] = ()
    interval: float = 1.0
    source: str = "live"  # "live" or "replay"
    remote: tuple["Snapshot", ...] = field(default_factory=tuple)  # other hosts (--host)

    def process(self, pid: int) -> ProcessInfo | None:
        return self.host.processes.get(pid)

    def device_of(self, agent: AgentView) -> DeviceSample | None:
        """The GPU an agent runs on: by NVML UUID, else by the index in its device string."""
        return device_for(agent.hello, self.nvml.devices)

    @property
    def running(self) -> tuple[AgentView, ...]:
        """The agents whose run has not ended (what the export and the GPU's process list count)."""
        return tuple(a for a in self.agents if a.state == RUNNING)

    def agent_figures(self, dev: DeviceSample) -> dict[int, AgentFigures]:
        """pid -> what the running agents on ``dev`` reported that splits their NVML figure (batchmon.where_used);
        an ended run's pid may be another process's now, so it is left out."""
        return self.figures_by_device().get((dev.index, dev.uuid), {})

    def figures_by_device(self) -> dict[tuple[int, str | None], dict[int, AgentFigures]]:
        """agent_figures for every GPU at once, keyed (index, uuid): one pass over the running agents."""
        out: dict[tuple[int, str | None], dict[int, AgentFigures]] = {}
        for a in self.agents:
            if a.state != RUNNING:
                continue
            on = self.device_of(a)
            if on is not None:
                step = a.last_step
                out.setdefault((on.index, on.uuid), {})[a.hello.pid] = AgentFigures(
                    step.reserved if step is not None else None, a.hello.world_size > 1)
        return out

    def where_used(self) -> tuple[DeviceUse, ...]:
        """Where each GPU's used bytes go (batchmon.where_used), this box's GPUs."""
        return tuple(device_use(dev, self.agent_figures(dev)) for dev in self.nvml.devices
                     if not dev.lost and dev.memory is not None)


def device_for(hello: Hello, devices: Sequence[DeviceSample]) -> DeviceSample | None:
    """The GPU of the process that said ``hello``: by NVML UUID, else by the index in its device string."""
    if hello.nvml_uuid:
        for dev in devices:
            if dev.uuid == hello.nvml_uuid:
                return dev
    if hello.device.startswith("cuda"):
        _, _, idx = hello.device.partition(":")
        index = int(idx) if idx.isdigit() else 0
        for dev in devices:
            if dev.index == index:
                return dev
    return None
