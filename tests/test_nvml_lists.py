"""probes/nvml_lists: a device's process lists in one driver call (pynvml makes two), the same entries, the same
errors; and the probe's lists through it where the backend is pynvml itself."""

from __future__ import annotations

from typing import Any

import pytest

pynvml = pytest.importorskip("pynvml")

from batchmon.probes.nvml import NOT_AVAILABLE_ULL, NvmlProbe  # noqa: E402
from batchmon.probes.nvml_lists import FUNCTIONS, ProcessLists  # noqa: E402


class FakeDriver:
    """The driver's nvmlDeviceGet*RunningProcesses_v3 contract: with too small a buffer (or none) it says the
    count and NVML_ERROR_INSUFFICIENT_SIZE; else it fills the buffer and says how many it wrote."""

    def __init__(self, processes: dict[str, list[tuple[int, int]]], error: int = 0) -> None:
        self.processes = processes
        self.error = error
        self.calls: list[str] = []

    def pointer(self, name: str) -> Any:
        kind = next(k for k, f in FUNCTIONS.items() if f == name)

        def fn(handle: Any, count_ref: Any, buf: Any) -> int:
            self.calls.append(kind)
            if self.error:
                return self.error
            count, entries = count_ref._obj, self.processes[kind]
            if not entries:
                count.value = 0
                return 0
            if buf is None or count.value < len(entries):
                count.value = len(entries)
                return 7
            for i, (pid, used) in enumerate(entries):
                buf[i].pid, buf[i].usedGpuMemory = pid, used
            count.value = len(entries)
            return 0

        return fn


class FakePynvml:
    """What ProcessLists reads of pynvml (its struct and error class are the real ones)."""

    c_nvmlProcessInfo_v3_t = pynvml.c_nvmlProcessInfo_v3_t
    NVMLError = pynvml.NVMLError

    def __init__(self, driver: FakeDriver) -> None:
        self._nvmlGetFunctionPointer = driver.pointer


def test_one_driver_call_a_list_once_the_buffer_fits():
    driver = FakeDriver({"compute": [(100 + i, (i + 1) << 20) for i in range(16)], "graphics": []})
    lists = ProcessLists(FakePynvml(driver))
    assert lists.available
    first = lists.get("h", "compute")
    assert [(p.pid, p.usedGpuMemory) for p in first] == driver.processes["compute"]
    assert driver.calls == ["compute", "compute"]  # no buffer yet: the count, then the list (as pynvml does)
    driver.calls.clear()
    for _ in range(3):
        assert lists.get("h", "compute") == first
    assert driver.calls == ["compute"] * 3  # then one call each
    assert lists.get("h", "graphics") == [] and driver.calls[-1] == "graphics"
    driver.processes["compute"] += [(500 + i, 1) for i in range(40)]  # more than the buffer (16 * 2 + 5) holds
    driver.calls.clear()
    assert len(lists.get("h", "compute")) == 56 and driver.calls == ["compute", "compute"]


def test_errors_are_pynvmls():
    driver = FakeDriver({"compute": [], "graphics": []}, error=pynvml.NVML_ERROR_NOT_SUPPORTED)
    lists = ProcessLists(FakePynvml(driver))
    with pytest.raises(pynvml.NVMLError_NotSupported):
        lists.get("h", "compute")


def test_not_pynvml_is_not_used():
    assert not ProcessLists(object()).available


def test_the_probe_reads_its_lists_through_it():
    """NvmlProbe over a backend that is pynvml as far as the lists go: one call a list, the not-available
    sentinel still None, compute and graphics merged as before."""
    driver = FakeDriver({"compute": [(7, 5 << 20), (3, NOT_AVAILABLE_ULL)], "graphics": [(7, 1 << 20)]})

    class Memory:
        total, used, free, reserved = 100 << 30, 10 << 30, 90 << 30, 1 << 30

    class Backend(FakePynvml):
        NVML_TEMPERATURE_GPU = 0
        nvmlMemory_v2 = 2

        def nvmlInit(self) -> None: ...
        def nvmlSystemGetDriverVersion(self) -> str: return "1"
        def nvmlDeviceGetCount(self) -> int: return 1
        def nvmlDeviceGetHandleByIndex(self, i: int) -> str: return "h"
        def nvmlDeviceGetName(self, h: str) -> str: return "GPU"
        def nvmlDeviceGetUUID(self, h: str) -> str: return "GPU-1"
        def nvmlDeviceGetMemoryInfo(self, h: str, version: int = 0) -> Memory: return Memory()
        def nvmlDeviceGetComputeRunningProcesses(self, h: str) -> list: raise AssertionError("pynvml's two calls")
        def nvmlDeviceGetGraphicsRunningProcesses(self, h: str) -> list: raise AssertionError("pynvml's two calls")

    probe = NvmlProbe(Backend(driver))
    for _ in range(2):
        driver.calls.clear()
        procs = probe.sample().devices[0].processes
        assert [(p.pid, p.used, p.kind) for p in procs] == [(3, None, "compute"), (7, 5 << 20, "compute+graphics")]
    assert driver.calls == ["compute", "graphics"]  # the second sample: one call a list
