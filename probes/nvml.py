"""NVML device probe: one truthful sample of every GPU, with NA (None) for what a driver does not support.

(Types are fixed here; the probe implementation follows below them. Over 400 lines on purpose: every field's
NA rule sits next to the one NVML call that may not support it, and the types every front end reads are the
probe's output; split, each field would be defined in one file and made sure of in another.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping


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


# ----------------------------------------------------------------------------------------------- the probe

#: NVML's "not available" sentinel for unsigned long long fields (per-process memory under WDDM, MIG, ...)
NOT_AVAILABLE_ULL = (1 << 64) - 1

# error kinds, by pynvml class name without the "NVMLError_" prefix
_UNSUPPORTED = frozenset({"NotSupported", "FunctionNotFound", "NoPermission", "NVMLLibraryMismatchError"})
_LOST = frozenset({"GpuIsLost", "Unknown"})
_STICKY_LOST = frozenset({"GpuIsLost"})  # a lost GPU needs a reset; Unknown may pass, so it is retried

def _kind(exc: BaseException) -> str:
    name = type(exc).__name__
    return name[len("NVMLError_"):] if name.startswith("NVMLError_") else name


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().replace("\n", " ") or _kind(exc)
    return text[:200]


def _init_reason(exc: BaseException) -> str:
    """One line a person can act on, for an NVML init failure."""
    kind = _kind(exc)
    if isinstance(exc, ImportError):
        return "nvidia-ml-py (pynvml) is not installed"
    if kind == "LibraryNotFound":
        return "libnvidia-ml.so.1 not found (no NVIDIA driver on this machine)"
    if kind == "DriverNotLoaded":
        return "NVIDIA driver is not loaded"
    if kind == "NoPermission":
        return "no permission to access the NVIDIA driver"
    if kind == "LibRmVersionMismatch":
        return "NVML library and kernel driver versions differ (reload the driver or reboot)"
    return f"NVML init failed: {_one_line(exc)}"


#: the per-device pynvml functions a sample uses, looked up once
_PROBE_FUNCTIONS = (
    "nvmlDeviceGetName", "nvmlDeviceGetUUID", "nvmlDeviceGetMemoryInfo", "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetTemperature", "nvmlDeviceGetPowerUsage", "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses", "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetGraphicsRunningProcesses_v2",
)

_UNSUPPORTED_CALL = object()  # _try's answer for "the driver does not support this call"


class _DeviceLost(Exception):
    def __init__(self, exc: BaseException) -> None:
        super().__init__(_one_line(exc))
        self.sticky = _kind(exc) in _STICKY_LOST


class _Device:
    """Per-device state kept across samples: handle, cached identity, what the driver does not support."""

    __slots__ = ("index", "handle", "name", "uuid", "unsupported", "mem_v2", "procs_v2", "lost_error", "lost",
                 "errors")

    def __init__(self, index: int, handle: Any, error: str | None = None, lost: bool = True) -> None:
        self.index = index
        self.handle = handle
        self.name: str | None = None
        self.uuid: str | None = None
        self.unsupported: set[str] = set()
        self.mem_v2: bool | None = None  # None: not tried yet
        self.procs_v2: set[str] = set()  # process lists this driver answers only through the _v2 call
        self.lost_error = error  # set: lost for good (or no handle), never called again
        self.lost = lost  # with lost_error: False when the handle was refused for another reason (permission)
        self.errors: list[str] = []  # transient errors in the current sample


class NvmlProbe:
    """One NVML sample of every GPU per call, with None for anything the driver does not support.

    `backend` is the pynvml module (default, imported lazily) or anything with the same functions, such as
    batchmon.probes.nvml_recording's RecordingBackend / ReplayBackend. Handles are fetched once; each field
    is one NVML call per sample; fields that answer NotSupported are not asked again. sample() never raises.
    Not thread-safe: one probe belongs to one sampling thread.
    """

    def __init__(self, backend: Any = None, *, indices: Iterable[int] | None = None) -> None:
        self._backend = backend
        self._indices = None if indices is None else tuple(indices)
        self._nvml: Any = None
        self._started = False
        self._error: str | None = None
        self._driver: str | None = None
        self._devices: list[_Device] = []
        self._nvml_error: type[BaseException] = Exception
        self._begin: Callable[[], None] | None = None
        self._fns: dict[str, Callable[..., Any] | None] = {}
        self._mem_v2: Any = None
        self._lists: Any = None  # nvml_lists.ProcessLists where the backend is pynvml itself: one call a list
        self._temp_sensor: Any = 0

    # -------------------------------------------------------------------------------------------- setup

    def _start(self) -> None:
        self._started = True
        try:
            nvml: Any = self._backend
            if nvml is None:
                import pynvml  # nvidia-ml-py; imported only when a probe first samples

                nvml = pynvml
            self._nvml = nvml
            self._nvml_error = getattr(nvml, "NVMLError", Exception)
            self._begin = getattr(nvml, "begin_sample", None)
            nvml.nvmlInit()
        except Exception as exc:  # no library, no driver, no permission, no pynvml: unavailable, with why
            self._error = _init_reason(exc)
            return
        try:
            self._driver = str(nvml.nvmlSystemGetDriverVersion())
        except Exception:
            self._driver = None
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            self._error = f"cannot count GPUs: {_one_line(exc)}"
            return
        self._fns = {name: getattr(nvml, name, None) for name in _PROBE_FUNCTIONS}
        self._mem_v2 = getattr(nvml, "nvmlMemory_v2", None)
        from batchmon.probes.nvml_lists import ProcessLists

        lists = ProcessLists(nvml)
        self._lists = lists if lists.available else None
        self._temp_sensor = getattr(nvml, "NVML_TEMPERATURE_GPU", 0)
        wanted = range(count) if self._indices is None else [i for i in self._indices if 0 <= i < count]
        for index in wanted:
            try:
                self._devices.append(_Device(index, nvml.nvmlDeviceGetHandleByIndex(index)))
            except Exception as exc:  # a GPU lost (or refused) before we met it: shown so, the others go on
                self._devices.append(_Device(index, None, _one_line(exc), lost=_kind(exc) in _LOST))

    def close(self) -> None:
        """Shut NVML down (once). The probe reports unavailable afterwards."""
        if self._nvml is not None and self._error is None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:
                pass
        self._started = True
        self._error = self._error or "probe closed"
        self._devices = []

    def __enter__(self) -> "NvmlProbe":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def available(self) -> bool:
        if not self._started:
            self._start()
        return self._error is None

    # -------------------------------------------------------------------------------------------- sampling

    def sample(self) -> NvmlSample:
        """Read every device now. Never raises: problems become None fields, lost devices or unavailable."""
        try:
            if not self._started:
                self._start()
            now = time.time()
            if self._error is not None:
                return NvmlSample(available=False, error=self._error, driver=None, devices=(), time=now)
            if self._begin is not None:
                self._begin()
            devices = tuple(self._sample_device(dev) for dev in self._devices)
            return NvmlSample(available=True, error=None, driver=self._driver, devices=devices, time=now)
        except Exception as exc:  # a bug or a backend we do not know: still never raise into the caller
            return NvmlSample(available=False, error=f"NVML probe failed: {_one_line(exc)}", driver=None,
                              devices=(), time=time.time())

    def _try(self, dev: _Device, field: str, fn: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> Any:
        """One NVML call: its value; None after a transient error; _UNSUPPORTED_CALL; or raise _DeviceLost."""
        if fn is None:
            return _UNSUPPORTED_CALL
        try:
            return fn(dev.handle, *args, **kwargs)
        except Exception as exc:  # NVMLError subclasses, NVMLLibraryMismatchError, TypeError of an old binding
            kind = _kind(exc)
            if isinstance(exc, self._nvml_error) and kind in _LOST:
                raise _DeviceLost(exc) from None
            if kind in _UNSUPPORTED or isinstance(exc, (TypeError, AttributeError)):
                return _UNSUPPORTED_CALL
            dev.errors.append(f"{field}: {_one_line(exc)}")
            return None

    def _call(self, dev: _Device, field: str, fn: Callable[..., Any] | None, *args: Any, **kwargs: Any) -> Any:
        """One NVML call for one field: its value, or None; an unsupported field is never asked again."""
        value = self._try(dev, field, fn, *args, **kwargs)
        if value is _UNSUPPORTED_CALL:
            dev.unsupported.add(field)
            return None
        return value

    def _sample_device(self, dev: _Device) -> DeviceSample:
        if dev.lost_error is not None:
            return DeviceSample(dev.index, dev.name, dev.uuid, None, None, None, None, (), lost=dev.lost,
                                error=dev.lost_error)
        dev.errors = []
        fns = self._fns
        skip = dev.unsupported
        utilization = temperature = None
        power = memory = None
        try:
            if dev.name is None and "name" not in skip:
                value = self._call(dev, "name", fns["nvmlDeviceGetName"])
                dev.name = None if value is None else _text(value)
            if dev.uuid is None and "uuid" not in skip:
                value = self._call(dev, "uuid", fns["nvmlDeviceGetUUID"])
                dev.uuid = None if value is None else _text(value)
            if "memory" not in skip:
                memory = self._memory(dev)
            if "utilization" not in skip:
                rates = self._call(dev, "utilization", fns["nvmlDeviceGetUtilizationRates"])
                utilization = None if rates is None else _uint(getattr(rates, "gpu", None), 100)
            if "temperature" not in skip:
                value = self._call(dev, "temperature", fns["nvmlDeviceGetTemperature"], self._temp_sensor)
                temperature = _uint(value, 1000)
            if "power" not in skip:
                value = _uint(self._call(dev, "power", fns["nvmlDeviceGetPowerUsage"]), 1 << 31)
                power = None if value is None else value / 1000.0
            processes = self._processes(dev)
        except _DeviceLost as lost:
            if lost.sticky:
                dev.lost_error = str(lost)
            return DeviceSample(dev.index, dev.name, dev.uuid, None, None, None, None, (), lost=True,
                                error=str(lost))
        error = "; ".join(dev.errors) if dev.errors else None
        return DeviceSample(dev.index, dev.name, dev.uuid, memory, utilization, temperature, power, processes,
                            lost=False, error=error)

    def _memory(self, dev: _Device) -> DeviceMemory | None:
        """The v2 struct (with reserved) where the driver has it, else v1; which one is remembered per device."""
        fn = self._fns["nvmlDeviceGetMemoryInfo"]
        if dev.mem_v2 is not False:
            version = self._mem_v2
            mem = _UNSUPPORTED_CALL if version is None else self._try(dev, "memory", fn, version=version)
            if mem is not _UNSUPPORTED_CALL:
                if mem is not None:
                    dev.mem_v2 = True
                return None if mem is None else _memory(mem, v2=True)
            if dev.mem_v2:  # it worked before: a hiccup, not a missing function
                return None
            dev.mem_v2 = False
        mem = self._call(dev, "memory", fn)
        return None if mem is None else _memory(mem, v2=False)

    def _processes(self, dev: _Device) -> tuple[GpuProcess, ...]:
        """Compute and graphics lists merged by pid; per-process bytes None where NVML cannot tell."""
        merged: dict[int, GpuProcess] = {}
        for kind in ("compute", "graphics"):
            if kind in dev.unsupported:
                continue
            for proc in self._process_list(dev, kind) or ():
                pid = _uint(getattr(proc, "pid", None), 1 << 32)
                if pid is None:
                    continue
                used = _uint(getattr(proc, "usedGpuMemory", None), NOT_AVAILABLE_ULL - 1)
                old = merged.get(pid)
                if old is None:
                    merged[pid] = GpuProcess(pid, used, kind)
                elif old.kind == kind:  # one entry per MIG instance: one process, add the instances up
                    parts = [u for u in (old.used, used) if u is not None]
                    merged[pid] = GpuProcess(pid, sum(parts) if parts else None, kind)
                else:  # in both lists: the same memory seen twice, not twice the memory
                    parts = [u for u in (old.used, used) if u is not None]
                    merged[pid] = GpuProcess(pid, max(parts) if parts else None, "compute+graphics")
        if len(merged) < 2:
            return tuple(merged.values())
        return tuple(sorted(merged.values(), key=lambda p: p.pid))

    def _process_list(self, dev: _Device, kind: str) -> Any:
        name = "nvmlDeviceGetComputeRunningProcesses" if kind == "compute" else "nvmlDeviceGetGraphicsRunningProcesses"
        if kind not in dev.procs_v2:
            if self._lists is not None and self._fns[name] is not None:
                procs = self._try(dev, kind, self._lists.get, kind)  # the same list, one driver call
            else:
                procs = self._try(dev, kind, self._fns[name])
            if procs is not _UNSUPPORTED_CALL:
                return procs
            if self._fns[name + "_v2"] is None:
                dev.unsupported.add(kind)
                return None
            dev.procs_v2.add(kind)  # the unversioned (v3) call is newer than this driver
        return self._call(dev, kind, self._fns[name + "_v2"])


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _uint(value: Any, maximum: int) -> int | None:
    """An int in [0, maximum], else None (sentinels, garbage)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = int(value)
    except (TypeError, ValueError):
        return None
    return number if 0 <= number <= maximum else None


def _memory(mem: Any, *, v2: bool) -> DeviceMemory | None:
    total = _uint(getattr(mem, "total", None), NOT_AVAILABLE_ULL - 1)
    used = _uint(getattr(mem, "used", None), NOT_AVAILABLE_ULL - 1)
    free = _uint(getattr(mem, "free", None), NOT_AVAILABLE_ULL - 1)
    reserved = _uint(getattr(mem, "reserved", None), NOT_AVAILABLE_ULL - 1) if v2 else None
    if total is None or used is None or free is None:
        return None
    return DeviceMemory(total=total, used=used, reserved=reserved, free=free)


# ----------------------------------------------------------------------------------------------- dict form


def sample_to_dict(sample: NvmlSample) -> dict[str, Any]:
    """JSON-able form of a sample (recordings, streams). Bytes stay ints."""
    return {
        "available": sample.available,
        "error": sample.error,
        "driver": sample.driver,
        "time": sample.time,
        "devices": [_device_to_dict(d) for d in sample.devices],
    }


def _device_to_dict(d: DeviceSample) -> dict[str, Any]:
    m = d.memory
    return {
        "index": d.index,
        "name": d.name,
        "uuid": d.uuid,
        "memory": None if m is None else {"total": m.total, "used": m.used, "reserved": m.reserved, "free": m.free},
        "utilization": d.utilization,
        "temperature": d.temperature,
        "power": d.power,
        "processes": [{"pid": p.pid, "used": p.used, "kind": p.kind} for p in d.processes],
        "lost": d.lost,
        "error": d.error,
    }


def _get(d: Mapping[str, Any], key: str, where: str, kinds: tuple[type, ...], *, nullable: bool = True,
         default: Any = None) -> Any:
    value = d.get(key, default)
    if value is None:
        if nullable:
            return None
        raise ValueError(f"{where}{key}: missing")
    if isinstance(value, bool) and bool not in kinds:
        raise ValueError(f"{where}{key}: expected {kinds[0].__name__}, got bool")
    if not isinstance(value, kinds):
        raise ValueError(f"{where}{key}: expected {kinds[0].__name__}, got {type(value).__name__}")
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ValueError(f"{where}{key}: negative value {value}")
    if isinstance(value, float) and not (value == value and abs(value) != float("inf")):
        raise ValueError(f"{where}{key}: not a finite number")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > MAX_NUMBER:
        # as the agent protocol caps its sizes: a JSON integer >= 2**1024 made float() raise OverflowError later
        raise ValueError(f"{where}{key}: out of range")
    return value


MAX_NUMBER = 1 << 62  # protocol.MAX_SIZE: no memory figure, pid, power or time a sample holds is larger


def _obj(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected an object, got {type(value).__name__}")
    return value


def sample_from_dict(d: Any) -> NvmlSample:
    """Parse sample_to_dict's output. Unknown keys are ignored; a malformed value raises ValueError naming it."""
    d = _obj(d, "nvml sample")
    devices_raw = d.get("devices") or []
    if not isinstance(devices_raw, list):
        raise ValueError("nvml sample devices: expected a list")
    devices = []
    for i, raw in enumerate(devices_raw):
        where = f"nvml devices[{i}]."
        dev = _obj(raw, where[:-1])
        mem_raw = dev.get("memory")
        memory = None
        if mem_raw is not None:
            mem = _obj(mem_raw, where + "memory")
            memory = DeviceMemory(
                total=_get(mem, "total", where + "memory.", (int,), nullable=False),
                used=_get(mem, "used", where + "memory.", (int,), nullable=False),
                reserved=_get(mem, "reserved", where + "memory.", (int,)),
                free=_get(mem, "free", where + "memory.", (int,), nullable=False),
            )
        procs_raw = dev.get("processes") or []
        if not isinstance(procs_raw, list):
            raise ValueError(f"{where}processes: expected a list")
        processes = []
        for j, p_raw in enumerate(procs_raw):
            pw = f"{where}processes[{j}]."
            p = _obj(p_raw, pw[:-1])
            processes.append(GpuProcess(pid=_get(p, "pid", pw, (int,), nullable=False),
                                        used=_get(p, "used", pw, (int,)),
                                        kind=_get(p, "kind", pw, (str,)) or "compute"))
        power = _get(dev, "power", where, (float, int))
        devices.append(DeviceSample(
            index=_get(dev, "index", where, (int,), nullable=False),
            name=_get(dev, "name", where, (str,)),
            uuid=_get(dev, "uuid", where, (str,)),
            memory=memory,
            utilization=_get(dev, "utilization", where, (int,)),
            temperature=_get(dev, "temperature", where, (int,)),
            power=None if power is None else float(power),
            processes=tuple(processes),
            lost=bool(_get(dev, "lost", where, (bool,), default=False)),
            error=_get(dev, "error", where, (str,)),
        ))
    available = _get(d, "available", "nvml sample ", (bool,), nullable=False)
    t = _get(d, "time", "nvml sample ", (float, int), default=0.0)
    return NvmlSample(available=available, error=_get(d, "error", "nvml sample ", (str,)),
                      driver=_get(d, "driver", "nvml sample ", (str,)), devices=tuple(devices), time=float(t))
