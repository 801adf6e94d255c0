"""NVML's per-process used memory for the agent's own pid (``device_used`` in step messages).

Read on the agent's thread, never the training thread: an NVML process query takes a driver call. pynvml is
imported lazily; anything NVML cannot answer (no driver, a container whose pids NVML does not see, a
driver that does not report per-process memory) is None, and a failed initialisation is not retried.
"""

from __future__ import annotations

import os
from typing import Any


class ProcessMemory:
    """Per-process used bytes of one pid on the GPU with this NVML UUID."""

    def __init__(self, uuid: str, pid: int | None = None) -> None:
        self.uuid = uuid
        self.pid = os.getpid() if pid is None else pid
        self._nvml: Any = None
        self._handle: Any = None
        self.failed: str | None = None

    def read(self) -> int | None:
        if self.failed is not None:
            return None
        try:
            if self._handle is None:
                import pynvml

                pynvml.nvmlInit()
                self._nvml = pynvml
                self._handle = pynvml.nvmlDeviceGetHandleByUUID(self.uuid)
        except Exception as exc:  # noqa: BLE001 - no NVML: device_used stays null
            self.failed = f"{type(exc).__name__}: {exc}"
            return None
        nvml = self._nvml
        for query in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
            try:
                processes = getattr(nvml, query)(self._handle)
            except Exception:  # noqa: BLE001 - one query unsupported: try the other
                continue
            for proc in processes:
                if getattr(proc, "pid", None) == self.pid:
                    used = getattr(proc, "usedGpuMemory", None)
                    return int(used) if isinstance(used, int) and 0 <= used < (1 << 62) else None
        return None
