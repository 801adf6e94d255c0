"""psutil host probe: host memory and, for each GPU process, who runs it and what it costs the host.

(Types are fixed here; the probe implementation follows below them.)
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ProcessInfo:
    pid: int
    user: str | None
    command: str | None
    cpu_percent: float | None
    rss: int | None
    state: str = "ok"  # "ok", "gone" (vanished), "denied" (cannot be read)


@dataclass(frozen=True)
class HostSample:
    hostname: str
    memory_total: int | None
    memory_used: int | None
    processes: dict[int, ProcessInfo] = field(default_factory=dict)
    time: float = 0.0
