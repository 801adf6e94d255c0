"""A device's running processes in one NVML call where pynvml makes two, and without its per-entry objects.

pynvml's ``nvmlDeviceGet{Compute,Graphics}RunningProcesses`` asks the driver for the count with an empty buffer,
then again with a buffer of twice that plus five, and turns every entry into a Python object field by field.
Beside 16 jobs on the H200 the compute list was ~0.8 ms of the NVML probe's ~1.9 ms a sample (the hub thread,
issue 14 point 3). Here a buffer kept per list, sized as pynvml sizes it from the largest count seen, is passed at
once: the driver answers in that one call while the processes fit (a new one that does not fit answers
INSUFFICIENT_SIZE with the count, and the buffer grows before the second call, as pynvml's). What it answers is
the same list, read from the same ``nvmlDeviceGet*RunningProcesses_v3`` function, errors raised as pynvml raises
them (so the probe's NotSupported and GpuIsLost rules apply unchanged).
"""

from __future__ import annotations

import ctypes
from typing import Any, NamedTuple

#: the driver functions, by the probe's list kind (pynvml's unversioned functions call these)
FUNCTIONS = {"compute": "nvmlDeviceGetComputeRunningProcesses_v3",
             "graphics": "nvmlDeviceGetGraphicsRunningProcesses_v3"}
_SUCCESS, _INSUFFICIENT_SIZE = 0, 7  # NVML_SUCCESS, NVML_ERROR_INSUFFICIENT_SIZE


class Process(NamedTuple):
    """One list entry, as the probe reads it (pynvml's object has these two attributes, and more)."""

    pid: int
    usedGpuMemory: int  # bytes, or NVML's not-available sentinel (the probe turns it into None)  # noqa: N815


class ProcessLists:
    """The two process lists of every device through pynvml's own function pointers and entry struct.

    ``available`` is False where the backend is not pynvml as we know it (a test's fake NVML, a recording's
    replay, another pynvml): the probe then calls pynvml's functions as before."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._pointer = getattr(nvml, "_nvmlGetFunctionPointer", None)
        self._struct = getattr(nvml, "c_nvmlProcessInfo_v3_t", None)
        self._error = getattr(nvml, "NVMLError", None)
        self.available = (callable(self._pointer) and isinstance(self._struct, type)
                          and issubclass(self._struct, ctypes.Structure) and isinstance(self._error, type))
        self._buffers: dict[str, Any] = {}  # kind -> entry array (grown, never shrunk: bounded by the processes)

    def get(self, handle: Any, kind: str) -> list[Process]:
        """The device's ``kind`` ("compute" or "graphics") processes; raises what pynvml's call would raise."""
        fn = self._pointer(FUNCTIONS[kind])  # type: ignore[misc]  # pynvml caches it; raises FunctionNotFound
        buf = self._buffers.get(kind)
        count = ctypes.c_uint(0 if buf is None else len(buf))
        ret = fn(handle, ctypes.byref(count), buf)
        if ret == _INSUFFICIENT_SIZE:  # more processes than the buffer holds (or no buffer yet): grow, ask again
            buf = self._buffers[kind] = (self._struct * (count.value * 2 + 5))()  # type: ignore[operator]
            count.value = len(buf)
            ret = fn(handle, ctypes.byref(count), buf)
        if ret != _SUCCESS:
            raise self._error(ret)  # type: ignore[misc]  # pynvml's class for this return code
        if buf is None or not count.value:
            return []
        return [Process(e.pid, e.usedGpuMemory) for e in buf[:count.value]]
