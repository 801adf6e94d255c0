"""Raw NVML readings, recorded on a real GPU and replayed anywhere, through the real NvmlProbe code.

RecordingBackend wraps the pynvml module and keeps every call the probe makes (arguments, result or error
class) per sample, as JSON-able data. ReplayBackend serves those calls back, sample by sample, with objects
carrying pynvml's struct attributes and raising pynvml's own NVMLError subclasses (importing pynvml needs no
driver), so CI exercises NvmlProbe on readings made on an H200 rather than on a hand-written fake. Errors
(GPU lost, NotSupported, ...) can be injected into a replay to test how the probe survives them.

Recording format (JSON object):
    {"format": "batchmon-nvml-recording", "version": 1, "meta": {...},
     "init": [CALL, ...],                       calls made before the first sample (nvmlInit, handles, ...)
     "samples": [{"time": unix, "calls": [CALL, ...]}, ...]}
    CALL = {"fn": "nvmlDeviceGetMemoryInfo", "device": 0, "args": [], "kwargs": {"version": 33554472},
            "value": {...}}  or  {..., "error": "NVMLError_NotSupported", "message": "Not Supported"}
    "device" is the index behind the handle argument (absent for system calls); "us" is the call's duration.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Mapping

FORMAT = "batchmon-nvml-recording"
FORMAT_VERSION = 1

#: the pynvml functions NvmlProbe calls; every nvmlDevice* one but the two below takes a handle first
FUNCTIONS: tuple[str, ...] = (
    "nvmlInit",
    "nvmlShutdown",
    "nvmlSystemGetDriverVersion",
    "nvmlDeviceGetCount",
    "nvmlDeviceGetHandleByIndex",
    "nvmlDeviceGetName",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetGraphicsRunningProcesses",
    "nvmlDeviceGetComputeRunningProcesses_v2",
    "nvmlDeviceGetGraphicsRunningProcesses_v2",
)
_NO_HANDLE = {"nvmlInit", "nvmlShutdown", "nvmlSystemGetDriverVersion", "nvmlDeviceGetCount", "nvmlDeviceGetHandleByIndex"}
#: errors a recording may name besides pynvml's NVMLError_* classes
_OTHER_ERRORS = {"NVMLLibraryMismatchError", "TypeError", "AttributeError"}


_PYNVML: Any = None


def _pynvml() -> Any:
    """The real pynvml module (for its error classes and constants; importing it loads no driver)."""
    global _PYNVML
    if _PYNVML is None:
        import pynvml

        _PYNVML = pynvml
    return _PYNVML


def _jsonable(value: Any) -> Any:
    """pynvml results as JSON: ctypes structs and pynvml's friendly objects become objects, bytes text."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    fields = getattr(type(value), "_fields_", None)
    if fields is not None:  # a ctypes Structure
        return {f[0]: _jsonable(getattr(value, f[0])) for f in fields}
    if hasattr(value, "__dict__"):  # pynvml.nvmlFriendlyObject
        return {k: _jsonable(v) for k, v in vars(value).items() if not k.startswith("_")}
    if hasattr(value, "value"):  # a ctypes scalar
        return _jsonable(value.value)
    return repr(value)


def _key(fn: str, device: int | None, args: Any, kwargs: Any) -> str:
    return json.dumps([fn, device, args or [], kwargs or {}], sort_keys=True, separators=(",", ":"))


# ----------------------------------------------------------------------------------------------- recording


class RecordingBackend:
    """pynvml, with every call the probe makes written down. Pass it to NvmlProbe(backend=...)."""

    def __init__(self, nvml: Any = None, *, meta: Mapping[str, Any] | None = None) -> None:
        self._nvml = _pynvml() if nvml is None else nvml
        self._handles: list[tuple[Any, int]] = []
        self.init: list[dict[str, Any]] = []
        self.samples: list[dict[str, Any]] = []
        self._calls = self.init
        self.meta: dict[str, Any] = {"created": time.time(), **(meta or {})}
        for name in FUNCTIONS:
            fn = getattr(nvml, name, None)
            if fn is not None:
                setattr(self, name, self._wrap(name, fn))

    def __getattr__(self, name: str) -> Any:  # constants, error classes, anything not recorded
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._nvml, name)

    def begin_sample(self) -> None:
        """Called by NvmlProbe at the start of every sample: later calls belong to a new sample."""
        self.samples.append({"time": time.time(), "calls": []})
        self._calls = self.samples[-1]["calls"]

    def _device(self, handle: Any) -> int | None:
        for known, index in self._handles:
            if known is handle:
                return index
        for known, index in self._handles:
            try:
                if known == handle:
                    return index
            except Exception:
                pass
        return None

    def _wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        takes_handle = name not in _NO_HANDLE

        def call(*args: Any, **kwargs: Any) -> Any:
            record: dict[str, Any] = {"fn": name}
            rest = args
            if takes_handle and args:
                record["device"] = self._device(args[0])
                rest = args[1:]
            elif name == "nvmlDeviceGetHandleByIndex" and args:
                record["device"] = int(args[0])
                rest = args[1:]
            if rest:
                record["args"] = _jsonable(list(rest))
            if kwargs:
                record["kwargs"] = _jsonable(kwargs)
            start = time.perf_counter_ns()
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                record["us"] = round((time.perf_counter_ns() - start) / 1000, 2)
                record["error"] = type(exc).__name__
                record["message"] = str(exc)[:300]
                self._calls.append(record)
                raise
            record["us"] = round((time.perf_counter_ns() - start) / 1000, 2)
            if name == "nvmlDeviceGetHandleByIndex":
                self._handles.append((result, int(args[0])))
                record["value"] = None  # a pointer: meaningless elsewhere; replay hands out its own handles
            else:
                record["value"] = _jsonable(result)
            self._calls.append(record)
            return result

        call.__name__ = name
        return call

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, "meta": dict(self.meta), "init": list(self.init),
                "samples": list(self.samples)}

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------------------------- replay


class ReplayStruct(SimpleNamespace):
    """Stands in for a pynvml struct or friendly object: the same attribute names, plain values."""


class ReplayHandle:
    """A device handle of a replay: just the index it was fetched for."""

    __slots__ = ("index",)

    def __init__(self, index: int) -> None:
        self.index = index

    def __repr__(self) -> str:
        return f"ReplayHandle({self.index})"


def _struct(value: Any) -> Any:
    if isinstance(value, dict):
        return ReplayStruct(**{k: _struct(v) for k, v in value.items()})
    if isinstance(value, list):
        return [_struct(v) for v in value]
    return value


def _error_class(name: str) -> type[BaseException]:
    pynvml = _pynvml()
    if name.startswith("NVMLError_"):
        # a class this pynvml does not know (a newer recording) still raises as an NVML error
        return getattr(pynvml, name, pynvml.NVMLError_Unknown)
    if name == "NVMLLibraryMismatchError":
        return pynvml.NVMLLibraryMismatchError
    if name == "TypeError":
        return TypeError
    if name == "AttributeError":
        return AttributeError
    raise ValueError(f"unknown error class {name!r}")


def _raise(name: str, message: str = "") -> None:
    cls = _error_class(name)
    if issubclass(cls, _pynvml().NVMLError):
        raise cls()  # the subclasses carry their own error code
    raise cls(message)


def load_recording(source: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """A recording from a file or an already parsed object, checked. Raises ValueError saying what is wrong."""
    if isinstance(source, Mapping):
        data = dict(source)
    else:
        try:
            data = json.loads(Path(source).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"cannot read NVML recording {source}: {exc.strerror or exc}") from exc
        except ValueError as exc:
            raise ValueError(f"NVML recording {source} is not JSON: {exc}") from exc
    check_recording(data)
    return data


def _check_call(call: Any, where: str) -> None:
    if not isinstance(call, Mapping):
        raise ValueError(f"{where}: expected an object")
    fn = call.get("fn")
    if not isinstance(fn, str) or not fn:
        raise ValueError(f"{where}.fn: expected a function name")
    device = call.get("device")
    if device is not None and (isinstance(device, bool) or not isinstance(device, int) or device < 0):
        raise ValueError(f"{where}.device: expected a device index")
    if not isinstance(call.get("args", []), list):
        raise ValueError(f"{where}.args: expected a list")
    if not isinstance(call.get("kwargs", {}), Mapping):
        raise ValueError(f"{where}.kwargs: expected an object")
    if "error" in call:
        if not isinstance(call["error"], str):
            raise ValueError(f"{where}.error: expected an error class name")
        try:
            _error_class(call["error"])
        except ValueError as exc:
            raise ValueError(f"{where}.error: {exc}") from None
    elif "value" not in call:
        raise ValueError(f"{where}: neither value nor error")


def check_recording(data: Any) -> None:
    """Raise ValueError naming the first thing in data that is not a v1 NVML recording."""
    if not isinstance(data, Mapping):
        raise ValueError("NVML recording: expected a JSON object")
    if data.get("format") != FORMAT:
        raise ValueError(f"NVML recording: format is {data.get('format')!r}, expected {FORMAT!r}")
    if data.get("version") != FORMAT_VERSION:
        raise ValueError(f"NVML recording: unsupported version {data.get('version')!r}")
    init = data.get("init", [])
    samples = data.get("samples")
    if not isinstance(init, list):
        raise ValueError("NVML recording init: expected a list of calls")
    if not isinstance(samples, list):
        raise ValueError("NVML recording samples: expected a list")
    for i, call in enumerate(init):
        _check_call(call, f"NVML recording init[{i}]")
    for s, sample in enumerate(samples):
        if not isinstance(sample, Mapping) or not isinstance(sample.get("calls"), list):
            raise ValueError(f"NVML recording samples[{s}]: expected an object with a calls list")
        for i, call in enumerate(sample["calls"]):
            _check_call(call, f"NVML recording samples[{s}].calls[{i}]")


def _index(calls: list[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {_key(c["fn"], c.get("device"), c.get("args"), c.get("kwargs")): c for c in calls}


class ReplayBackend:
    """Serves a recording's calls to NvmlProbe(backend=...), one recorded sample per probe sample.

    A call is answered from the current recorded sample, else from the init calls, else from the latest
    earlier sample that has it (names and UUIDs are asked once). A call the recording never saw raises
    NVMLError_NotSupported and is listed in .missing. Past the last recorded sample the last one repeats,
    or the recording starts over with loop=True. `calls` lists, per probe sample, the calls made (for tests).
    """

    def __init__(self, recording: str | Path | Mapping[str, Any], *, loop: bool = False) -> None:
        data = load_recording(recording)
        self.meta: dict[str, Any] = dict(data.get("meta") or {})
        self._init = _index(data.get("init", []))
        self._samples = [_index(s["calls"]) for s in data["samples"]]
        self.sample_times = [s.get("time") for s in data["samples"]]
        self.loop = loop
        self.sample = -1  # probe samples begun so far minus one; -1: the init phase
        self.position = -1  # which recorded sample answers now
        self.missing: list[str] = []
        self.calls: list[list[str]] = [[]]  # calls[0]: init phase; calls[k + 1]: probe sample k
        self._injections: list[tuple[type[BaseException], str | None, int | None, int, int | None]] = []
        seen = {c.get("fn") for c in data.get("init", [])}
        for s in data["samples"]:
            seen.update(c.get("fn") for c in s["calls"])
        for name in FUNCTIONS:
            if name in seen or name in ("nvmlInit", "nvmlShutdown"):
                setattr(self, name, self._replayer(name))

    def __len__(self) -> int:
        return len(self._samples)

    def __getattr__(self, name: str) -> Any:
        """pynvml's constants and error classes; its functions only as the recording has them."""
        if name.startswith("__"):
            raise AttributeError(name)
        value = getattr(_pynvml(), name)
        if callable(value) and not isinstance(value, type):
            raise AttributeError(f"{name} is not in this recording")
        return value

    def begin_sample(self) -> None:
        self.sample += 1
        self.calls.append([])
        if not self._samples:
            return
        nxt = self.position + 1
        if nxt >= len(self._samples):
            nxt = 0 if self.loop else len(self._samples) - 1
        self.position = nxt

    def inject(self, error: str | type[BaseException], *, fn: str | None = None, device: int | None = None,
               start: int = 0, stop: int | None = None) -> None:
        """Make matching calls raise `error` (e.g. "GpuIsLost", "NotSupported") from probe sample `start`
        (0-based; -1 includes the init phase) up to `stop` (exclusive; None: for good)."""
        if isinstance(error, str):
            name = error if error.startswith("NVMLError_") or error in _OTHER_ERRORS else f"NVMLError_{error}"
            cls = _error_class(name)
        else:
            cls = error
        self._injections.append((cls, fn, device, start, stop))

    def _lookup(self, key: str) -> Mapping[str, Any] | None:
        if self.position >= 0:
            found = self._samples[self.position].get(key)
            if found is not None:
                return found
        found = self._init.get(key)
        if found is not None:
            return found
        for sample in reversed(self._samples[: max(self.position, 0)]):
            found = sample.get(key)
            if found is not None:
                return found
        return None

    def _replayer(self, name: str) -> Callable[..., Any]:
        takes_handle = name not in _NO_HANDLE

        def call(*args: Any, **kwargs: Any) -> Any:
            device: int | None = None
            rest = list(args)
            if takes_handle:
                if not args or not isinstance(args[0], ReplayHandle):
                    raise TypeError(f"{name}: expected a ReplayHandle, got {args[:1]!r}")
                device, rest = args[0].index, list(args[1:])
            elif name == "nvmlDeviceGetHandleByIndex":
                device, rest = int(args[0]), list(args[1:])
            self.calls[-1].append(name if device is None else f"{name}[{device}]")
            for cls, fn, dev, start, stop in self._injections:
                if (fn is None or fn == name) and (dev is None or dev == device) and start <= self.sample \
                        and (stop is None or self.sample < stop):
                    raise cls() if _is_nvml_error(cls) else cls(f"injected {cls.__name__}")
            key = _key(name, device, _jsonable(rest), _jsonable(kwargs))
            record = self._lookup(key)
            if record is None:
                if name in ("nvmlInit", "nvmlShutdown"):
                    return None
                self.missing.append(key)
                _raise("NVMLError_NotSupported")
            if "error" in record:
                _raise(record["error"], record.get("message", ""))
            if name == "nvmlDeviceGetHandleByIndex":
                return ReplayHandle(device)  # type: ignore[arg-type]
            return _struct(record.get("value"))

        call.__name__ = name
        return call


def _is_nvml_error(cls: type[BaseException]) -> bool:
    return issubclass(cls, _pynvml().NVMLError)
