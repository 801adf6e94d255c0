"""NVML device probe: one truthful sample of every GPU, with NA (None) for what a driver does not support.

(Types are fixed here; the probe implementation follows below them.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class DeviceMemory:
    total: int
    used: int
    reserved: int | None  # v2 struct only; None where the driver gives v1
    free: int


@dataclass(frozen=True)
class GpuProcess:
    pid: int
    used: int | None  # bytes; None where the driver does not report per-process memory
    kind: str = "compute"  # "compute" or "graphics"


@dataclass(frozen=True)
class DeviceSample:
    index: int
    name: str | None
    uuid: str | None
    memory: DeviceMemory | None
    utilization: int | None  # GPU busy percent
    temperature: int | None  # degrees C
    power: float | None  # watts
    processes: tuple[GpuProcess, ...] = ()
    lost: bool = False
    error: str | None = None


@dataclass(frozen=True)
class NvmlSample:
    available: bool
    error: str | None
    driver: str | None
    devices: tuple[DeviceSample, ...] = field(default_factory=tuple)
    time: float = 0.0
