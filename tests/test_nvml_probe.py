"""NvmlProbe: the real probe code against this machine (no driver) and against recorded NVML readings.

Every tests/fixtures/nvml_*_recording.json is replayed through NvmlProbe and checked for consistency with its
own raw readings; errors are injected into replays with pynvml's real exception classes.
"""

from __future__ import annotations

import ctypes
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from batchmon.probes.nvml import (
    NOT_AVAILABLE_ULL,
    DeviceSample,
    NvmlProbe,
    NvmlSample,
    sample_from_dict,
    sample_to_dict,
)
from nvml_recording import RecordingBackend, ReplayBackend, check_recording, load_recording

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("nvml_*_recording.json"))
SYNTHETIC = Path(__file__).parent / "fixtures" / "nvml_synthetic_recording.json"


def _has_libnvidia_ml() -> bool:
    try:
        ctypes.CDLL("libnvidia-ml.so.1")
        return True
    except OSError:
        return False


def replay_all(path: Path, **kwargs: Any) -> tuple[ReplayBackend, list[NvmlSample]]:
    replay = ReplayBackend(path, **kwargs)
    probe = NvmlProbe(backend=replay)
    return replay, [probe.sample() for _ in range(len(replay))]


def raw_calls(path: Path, sample: int, fn: str, device: int) -> list[dict[str, Any]]:
    data = json.loads(path.read_text())
    return [c for c in data["samples"][sample]["calls"] if c["fn"] == fn and c.get("device") == device]


# ----------------------------------------------------------------------------------------------- no driver


@pytest.mark.skipif(_has_libnvidia_ml(), reason="this machine has an NVIDIA driver")
def test_no_driver_here_is_a_typed_unavailable_state() -> None:
    probe = NvmlProbe()
    for _ in range(2):  # the second sample must not retry into an exception either
        s = probe.sample()
        assert s.available is False
        assert s.driver is None and s.devices == ()
        assert s.error and "\n" not in s.error and len(s.error) < 200
        assert "libnvidia-ml" in s.error
    assert probe.available is False


@pytest.mark.parametrize(
    ("error", "words"),
    [("LibraryNotFound", "libnvidia-ml"), ("DriverNotLoaded", "driver is not loaded"),
     ("NoPermission", "permission"), ("LibRmVersionMismatch", "versions differ"),
     ("Uninitialized", "NVML init failed")],
)
def test_init_failures_give_one_line_reasons(error: str, words: str) -> None:
    replay = ReplayBackend(SYNTHETIC)
    replay.inject(error, fn="nvmlInit", start=-1)
    s = NvmlProbe(backend=replay).sample()
    assert not s.available and s.devices == ()
    assert words in s.error and "\n" not in s.error
    assert replay.calls[0] == ["nvmlInit"]  # nothing else was asked after init failed


def test_device_count_failure_is_unavailable() -> None:
    replay = ReplayBackend(SYNTHETIC)
    replay.inject("Unknown", fn="nvmlDeviceGetCount", start=-1)
    s = NvmlProbe(backend=replay).sample()
    assert not s.available and "count" in s.error


# ----------------------------------------------------------------------------------------------- recordings


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_recording_replays_consistently(path: Path) -> None:
    replay, samples = replay_all(path)
    assert replay.missing == []  # the probe asked nothing the recording lacks
    assert len(samples) == len(replay) > 0
    for k, s in enumerate(samples):
        assert s.available and s.error is None and s.devices
        assert s.driver and isinstance(s.driver, str)
        for dev in s.devices:
            assert not dev.lost
            assert dev.name and dev.uuid
            m = dev.memory
            assert m is not None
            assert m.used + m.free <= m.total
            assert m.reserved is None or 0 <= m.reserved <= m.total
            assert dev.utilization is None or 0 <= dev.utilization <= 100
            assert dev.temperature is None or 0 < dev.temperature < 150
            assert dev.power is None or dev.power >= 0
            # the probe's figures are the raw readings of that sample
            mem_calls = [c for c in raw_calls(path, k, "nvmlDeviceGetMemoryInfo", dev.index) if "value" in c]
            assert mem_calls and mem_calls[-1]["value"]["used"] == m.used
            assert (m.reserved is not None) == ("reserved" in mem_calls[-1]["value"])
            # processes: one per distinct pid of the raw lists, bytes int or None, never the sentinel
            pids = set()
            for fn in ("nvmlDeviceGetComputeRunningProcesses", "nvmlDeviceGetGraphicsRunningProcesses"):
                for c in raw_calls(path, k, fn, dev.index):
                    pids.update(p["pid"] for p in c.get("value") or [])
            assert sorted(p.pid for p in dev.processes) == sorted(pids)
            for p in dev.processes:
                assert p.used is None or (isinstance(p.used, int) and 0 <= p.used < NOT_AVAILABLE_ULL)
                assert p.kind in ("compute", "graphics", "compute+graphics")


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_one_nvml_call_per_field_per_sample(path: Path) -> None:
    replay, samples = replay_all(path)
    assert replay.calls[0][0] == "nvmlInit"
    assert sum(c.startswith("nvmlDeviceGetHandleByIndex") for c in replay.calls[0]) == len(samples[0].devices)
    for k, calls in enumerate(replay.calls[1:]):
        counts = Counter(calls)
        for call, n in counts.items():
            # the first sample may try the v2 memory struct and fall back to v1 once
            allowed = 2 if k == 0 and call.startswith("nvmlDeviceGetMemoryInfo") else 1
            assert n <= allowed, f"sample {k}: {call} called {n} times"
        assert not any(c.startswith("nvmlDeviceGetHandleByIndex") for c in calls)  # handles fetched once
        if k > 0:
            assert not any(c.startswith(("nvmlDeviceGetName", "nvmlDeviceGetUUID")) for c in calls)  # cached


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_sample_dict_round_trip(path: Path) -> None:
    _, samples = replay_all(path)
    for s in samples:
        d = sample_to_dict(s)
        assert sample_from_dict(json.loads(json.dumps(d, allow_nan=False))) == s


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_recording_a_replay_reproduces_it(path: Path) -> None:
    """RecordingBackend captures everything the probe needs: record a replay, replay the copy, same samples."""
    original = ReplayBackend(path)
    rec = RecordingBackend(original, meta={"note": "test"})
    probe = NvmlProbe(backend=rec)
    first = [probe.sample() for _ in range(len(original))]
    data = json.loads(json.dumps(rec.to_dict()))
    check_recording(data)
    assert data["meta"]["note"] == "test"
    assert len(data["samples"]) == len(first)
    copy = ReplayBackend(data)
    probe2 = NvmlProbe(backend=copy)
    second = [probe2.sample() for _ in range(len(copy))]
    strip = lambda s: sample_to_dict(s) | {"time": 0}  # noqa: E731
    assert [strip(s) for s in second] == [strip(s) for s in first]
    assert copy.missing == []


# ----------------------------------------------------------------------------------------------- the synthetic fixture's quirks


def test_v1_only_device_and_unsupported_fields() -> None:
    replay, samples = replay_all(SYNTHETIC)
    v2 = [d for d in samples[0].devices if d.memory and d.memory.reserved is not None]
    v1 = [d for d in samples[0].devices if d.memory and d.memory.reserved is None]
    assert v2 and v1  # the fixture has one of each
    v1_index = v1[0].index
    assert v1[0].power is None  # NotSupported: null, not an exception
    assert any(p.used is None for p in v1[0].processes)  # memory NVML cannot tell
    # after the first sample: v1 only, and power never asked again
    for calls in replay.calls[2:]:
        assert calls.count(f"nvmlDeviceGetMemoryInfo[{v1_index}]") == 1
        assert f"nvmlDeviceGetPowerUsage[{v1_index}]" not in calls
    for s in samples:
        dev = next(d for d in s.devices if d.index == v1_index)
        assert dev.memory is not None and dev.memory.reserved is None and dev.power is None


def test_not_available_sentinel_becomes_none() -> None:
    data = json.loads(SYNTHETIC.read_text())
    sentinel_pids = {p["pid"] for s in data["samples"] for c in s["calls"] if c["fn"].endswith("RunningProcesses")
                     for p in c.get("value") or [] if p.get("usedGpuMemory") == NOT_AVAILABLE_ULL}
    assert sentinel_pids
    _, samples = replay_all(SYNTHETIC)
    seen = [p for s in samples for d in s.devices for p in d.processes if p.pid in sentinel_pids]
    assert seen and all(p.used is None for p in seen)


def test_process_in_both_lists_counts_once() -> None:
    data = json.loads(SYNTHETIC.read_text())
    calls = data["samples"][0]["calls"]
    compute = {(c["device"], p["pid"]): p["usedGpuMemory"] for c in calls
               if c["fn"] == "nvmlDeviceGetComputeRunningProcesses" for p in c["value"]}
    graphics = {(c["device"], p["pid"]) for c in calls
                if c["fn"] == "nvmlDeviceGetGraphicsRunningProcesses" for p in c["value"]}
    both = set(compute) & graphics
    assert both
    _, samples = replay_all(SYNTHETIC)
    for dev_index, pid in both:
        dev = next(d for d in samples[0].devices if d.index == dev_index)
        entries = [p for p in dev.processes if p.pid == pid]
        assert len(entries) == 1 and entries[0].kind == "compute+graphics"
        assert entries[0].used == compute[(dev_index, pid)]


# ----------------------------------------------------------------------------------------------- injected failures


def _device(s: NvmlSample, index: int) -> DeviceSample:
    return next(d for d in s.devices if d.index == index)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_gpu_lost_mid_run_marks_that_device_only(path: Path) -> None:
    replay = ReplayBackend(path, loop=True)
    probe = NvmlProbe(backend=replay)
    before = probe.sample()
    lost_index = before.devices[-1].index
    replay.inject("GpuIsLost", device=lost_index, start=1)
    after = [probe.sample() for _ in range(3)]
    for s in after:
        assert s.available
        lost = _device(s, lost_index)
        assert lost.lost and lost.error == "GPU is lost"
        assert lost.name == _device(before, lost_index).name  # still says which GPU it was
        assert lost.memory is None and lost.processes == ()
        for dev in s.devices:
            if dev.index != lost_index:
                assert not dev.lost and dev.memory is not None
    # a lost GPU is not asked again (each call could hang on a dead device)
    assert sum(c.endswith(f"[{lost_index}]") for c in replay.calls[2]) == 1
    assert not any(c.endswith(f"[{lost_index}]") for calls in replay.calls[3:] for c in calls)


def test_unknown_error_marks_lost_for_that_sample_only() -> None:
    replay = ReplayBackend(SYNTHETIC, loop=True)
    probe = NvmlProbe(backend=replay)
    replay.inject("Unknown", device=0, start=1, stop=2)
    s0, s1, s2 = probe.sample(), probe.sample(), probe.sample()
    assert not _device(s0, 0).lost
    assert _device(s1, 0).lost and _device(s1, 0).error == "Unknown Error"
    assert not _device(s1, 1).lost
    assert not _device(s2, 0).lost and _device(s2, 0).memory is not None


def test_gpu_lost_before_its_handle() -> None:
    replay = ReplayBackend(SYNTHETIC)
    replay.inject("GpuIsLost", fn="nvmlDeviceGetHandleByIndex", device=0, start=-1)
    s = NvmlProbe(backend=replay).sample()
    assert s.available
    assert _device(s, 0).lost and _device(s, 0).name is None
    assert not _device(s, 1).lost and _device(s, 1).memory is not None


def test_handle_refused_is_an_error_not_lost() -> None:
    replay = ReplayBackend(SYNTHETIC, loop=True)
    replay.inject("NoPermission", fn="nvmlDeviceGetHandleByIndex", device=1, start=-1)
    probe = NvmlProbe(backend=replay)
    for _ in range(2):
        dev = _device(probe.sample(), 1)
        assert not dev.lost and dev.error == "Insufficient Permissions" and dev.memory is None
    assert not any(c.endswith("[1]") for calls in replay.calls[1:] for c in calls)


def test_injected_not_supported_is_null_and_not_asked_again() -> None:
    replay = ReplayBackend(SYNTHETIC, loop=True)
    replay.inject("NotSupported", fn="nvmlDeviceGetUtilizationRates", device=0)
    probe = NvmlProbe(backend=replay)
    samples = [probe.sample() for _ in range(3)]
    assert all(_device(s, 0).utilization is None and _device(s, 0).error is None for s in samples)
    assert all(_device(s, 1).utilization is not None for s in samples)
    assert sum(calls.count("nvmlDeviceGetUtilizationRates[0]") for calls in replay.calls) == 1


def test_transient_error_is_null_with_reason_then_recovers() -> None:
    replay = ReplayBackend(SYNTHETIC, loop=True)
    replay.inject("Timeout", fn="nvmlDeviceGetPowerUsage", device=0, start=1, stop=2)
    probe = NvmlProbe(backend=replay)
    s0, s1, s2 = probe.sample(), probe.sample(), probe.sample()
    assert _device(s0, 0).power is not None
    assert _device(s1, 0).power is None and "power" in (_device(s1, 0).error or "")
    assert _device(s2, 0).power is not None and _device(s2, 0).error is None


def test_non_nvml_exception_never_escapes() -> None:
    replay = ReplayBackend(SYNTHETIC)
    replay.inject(RuntimeError, fn="nvmlDeviceGetMemoryInfo", device=1)
    s = NvmlProbe(backend=replay).sample()
    assert s.available
    assert _device(s, 1).memory is None and "RuntimeError" in (_device(s, 1).error or "")
    assert _device(s, 0).memory is not None


# ----------------------------------------------------------------------------------------------- driver versions


def _one_device_recording(calls: list[dict[str, Any]]) -> dict[str, Any]:
    return {"format": "batchmon-nvml-recording", "version": 1, "meta": {},
            "init": [{"fn": "nvmlInit", "value": None}, {"fn": "nvmlSystemGetDriverVersion", "value": "470.1"},
                     {"fn": "nvmlDeviceGetCount", "value": 1},
                     {"fn": "nvmlDeviceGetHandleByIndex", "device": 0, "value": None}],
            "samples": [{"time": 0.0, "calls": calls}] * 2}


def test_old_driver_process_lists_fall_back_to_v2_calls() -> None:
    proc = {"pid": 77, "usedGpuMemory": 3 << 30}
    data = _one_device_recording([
        {"fn": "nvmlDeviceGetMemoryInfo", "device": 0, "kwargs": {"version": 0x02000028},
         "error": "NVMLError_FunctionNotFound"},
        {"fn": "nvmlDeviceGetMemoryInfo", "device": 0, "value": {"total": 16 << 30, "free": 13 << 30, "used": 3 << 30}},
        {"fn": "nvmlDeviceGetComputeRunningProcesses", "device": 0, "error": "NVMLLibraryMismatchError"},
        {"fn": "nvmlDeviceGetComputeRunningProcesses_v2", "device": 0, "value": [proc]},
        {"fn": "nvmlDeviceGetGraphicsRunningProcesses", "device": 0, "error": "NVMLLibraryMismatchError"},
    ])
    replay = ReplayBackend(data)
    probe = NvmlProbe(backend=replay)
    s0, s1 = probe.sample(), probe.sample()
    for s in (s0, s1):
        dev = s.devices[0]
        assert dev.memory is not None and dev.memory.reserved is None
        assert [(p.pid, p.used, p.kind) for p in dev.processes] == [(77, proc["usedGpuMemory"], "compute")]
    # second sample: straight to the calls that work, one each; graphics has no v2 here: not asked again
    # (functions this recording never saw do not exist in its replay, so they are not asked at all)
    assert Counter(replay.calls[2]) == Counter(["nvmlDeviceGetMemoryInfo[0]", "nvmlDeviceGetComputeRunningProcesses_v2[0]"])


def test_mig_style_duplicate_entries_add_up() -> None:
    data = _one_device_recording([
        {"fn": "nvmlDeviceGetComputeRunningProcesses", "device": 0,
         "value": [{"pid": 5, "usedGpuMemory": 1 << 30}, {"pid": 5, "usedGpuMemory": 2 << 30}, {"pid": 6, "usedGpuMemory": None}]},
        {"fn": "nvmlDeviceGetGraphicsRunningProcesses", "device": 0, "value": []},
    ])
    dev = NvmlProbe(backend=ReplayBackend(data)).sample().devices[0]
    assert {p.pid: p.used for p in dev.processes} == {5: 3 << 30, 6: None}


# ----------------------------------------------------------------------------------------------- malformed input


@pytest.mark.parametrize(
    ("mutate", "words"),
    [
        (lambda d: d.update(available="yes"), "available"),
        (lambda d: d["devices"][0]["memory"].update(total="80G"), "devices[0].memory.total"),
        (lambda d: d["devices"][0]["memory"].pop("used"), "devices[0].memory.used: missing"),
        (lambda d: d["devices"][1].update(processes={"pid": 1}), "devices[1].processes"),
        (lambda d: d["devices"][0]["processes"][0].update(pid=-3), "processes[0].pid"),
        (lambda d: d["devices"][0].update(utilization=True), "utilization"),
        (lambda d: d.update(devices="none"), "devices"),
    ],
)
def test_sample_from_dict_rejects_malformed_input(mutate: Any, words: str) -> None:
    _, samples = replay_all(SYNTHETIC)
    d = json.loads(json.dumps(sample_to_dict(samples[0])))
    sample_from_dict(d)  # the unmodified dict parses
    mutate(d)
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        sample_from_dict(d)


def test_sample_from_dict_is_tolerant_of_missing_optional_and_unknown_keys() -> None:
    s = sample_from_dict({"available": True, "devices": [{"index": 0, "extra": 1}], "future": {}})
    assert s.available and s.devices[0].memory is None and s.devices[0].processes == () and not s.devices[0].lost
    assert sample_from_dict({"available": False, "error": "no driver"}).error == "no driver"
    with pytest.raises(ValueError):
        sample_from_dict([1, 2])


def test_load_recording_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not JSON"):
        load_recording(bad)
    with pytest.raises(ValueError, match="cannot read"):
        load_recording(tmp_path / "missing.json")
    data = json.loads(SYNTHETIC.read_text())
    with pytest.raises(ValueError, match="format"):
        load_recording({**data, "format": "other"})
    data["samples"][0]["calls"][0]["error"] = "NoSuchError"
    data["samples"][0]["calls"][0].pop("value", None)
    with pytest.raises(ValueError, match=r"samples\[0\]\.calls\[0\]\.error"):
        load_recording(data)
