"""Where NVML's "used" goes: per GPU, the processes' share and what no process accounts for; per attached
process, the caching allocator's pool and what lies outside it (CUDA context, loaded kernels, NCCL buffers and
other libraries' own allocations). Processes without an agent are named as such.

NVML gives the device's used bytes and each compute process's usedGpuMemory (probes/nvml.py); the agent gives
its process's allocator ``reserved`` at each step. So, per GPU::

    used = sum of the processes' usedGpuMemory + unattributed (driver, processes NVML does not list to us)

and per attached process::

    usedGpuMemory = reserved (tensors + allocator cache; cuBLAS/cuDNN workspaces come from this pool)
                    + outside the allocator (CUDA context, kernels, NCCL buffers, other libraries)

``reserved`` is the agent's figure at its last step and ``usedGpuMemory`` the latest NVML sample; when the pool
grew after that sample (used < reserved) the outside share is unknown (None), not negative.
Pure: a function of a DeviceSample and what the agents reported; every front end calls it through the Snapshot
(``Snapshot.agent_figures``, ``Snapshot.where_used``), which re-exports these types for the UI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

from batchmon.probes.nvml import DeviceSample


@dataclass(frozen=True)
class AgentFigures:
    """What an attached process's agent reported that splits its NVML figure."""

    reserved: int | None
    distributed: bool = False  # a rank of a distributed job: NCCL's buffers are part of the outside share


@dataclass(frozen=True)
class ProcessUse:
    pid: int
    used: int | None  # NVML usedGpuMemory (None: the driver does not say)
    agent: bool  # a batchmon agent runs in it
    reserved: int | None = None  # allocator pool (agents only)
    outside: int | None = None  # used - reserved: CUDA context, kernels, NCCL, libraries (agents only)
    outside_label: str = "context + libraries"


@dataclass(frozen=True)
class DeviceUse:
    index: int
    used: int | None  # NVML device used
    processes_total: int  # sum of the known per-process figures
    unattributed: int | None  # used - processes_total (driver, processes not visible here); None: unknown
    processes: tuple[ProcessUse, ...]  # the device's processes, largest first

    @property
    def without_agent(self) -> tuple[ProcessUse, ...]:
        return tuple(p for p in self.processes if not p.agent)


def device_use(dev: DeviceSample, agents: Mapping[int, AgentFigures]) -> DeviceUse:
    """``agents``: pid -> figures of the attached processes on this device (running ones only)."""
    rows = []
    for p in sorted(dev.processes, key=lambda p: (p.used is None, -(p.used or 0), p.pid)):
        figures = agents.get(p.pid)
        if figures is None:
            rows.append(ProcessUse(p.pid, p.used, False))
            continue
        reserved = figures.reserved
        outside = None if reserved is None or p.used is None or p.used < reserved else p.used - reserved
        rows.append(ProcessUse(p.pid, p.used, True, reserved, outside,
                               "context + NCCL + libraries" if figures.distributed else "context + libraries"))
    total = sum(p.used or 0 for p in dev.processes)
    used = dev.memory.used if dev.memory is not None else None
    known = all(p.used is not None for p in dev.processes)
    unattributed = None if used is None or not known else max(used - total, 0)
    return DeviceUse(dev.index, used, total, unattributed, tuple(rows))

