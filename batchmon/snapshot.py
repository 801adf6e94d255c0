"""Immutable Snapshot: everything every front end (TUI, --once, --json, export) renders, in one object.

The hub builds one per refresh; front ends never look anywhere else, so they cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from batchmon.memory_model import MemoryModel, Prediction
from batchmon.probes.host import HostSample, ProcessInfo
from batchmon.probes.nvml import DeviceSample, NvmlSample
from batchmon.protocol import Event, Hello, Step


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
    """
    h = agent.hello
    if h.world_size <= 1:
        return f"{agent.source}|{h.host}|pid {h.pid}"
    who = f"id {h.job}" if h.job else f"argv {' '.join(h.argv)}"
    return f"{agent.source}|{h.host}|{who}|world {h.world_size}"


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
        if agent.hello.nvml_uuid:
            for dev in self.nvml.devices:
                if dev.uuid == agent.hello.nvml_uuid:
                    return dev
        if agent.hello.device.startswith("cuda"):
            _, _, idx = agent.hello.device.partition(":")
            index = int(idx) if idx.isdigit() else 0
            for dev in self.nvml.devices:
                if dev.index == index:
                    return dev
        return None
