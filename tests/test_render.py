"""render: the --once --json object and the --once table, from Snapshots built of replayed NVML recordings,
real host samples and protocol messages."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from batchmon.memory_model import Basis, Prediction
from batchmon.probes.host import HostProbe, HostSample, ProcessInfo
from batchmon.probes.nvml import DeviceSample, NvmlProbe, NvmlSample
from conftest import make_step
from nvml_recording import ReplayBackend
from batchmon.protocol import ALL_COMPONENTS, COMPONENTS, Event, Hello, ModelInfo, Step, step_components
from batchmon.monitor.render import NO_AGENTS, format_table, snapshot_to_json, text_bar
from batchmon.units import clean_text as clean
from batchmon.units import fmt_bytes, fmt_used_total
from batchmon.snapshot import AgentView, Snapshot, Warning

FIXTURES = sorted((Path(__file__).parent / "fixtures").glob("nvml_*_recording.json"))
SYNTHETIC = Path(__file__).parent / "fixtures" / "nvml_synthetic_recording.json"

TOP_KEYS = {"nvml", "host", "devices", "agents"}
DEVICE_KEYS = {"index", "name", "uuid", "memory", "utilization", "temperature", "power", "lost", "processes"}
MEMORY_KEYS = {"total", "used", "reserved", "free"}
PROCESS_KEYS = {"pid", "used", "user", "command"}
STEP_KEYS = {"step", "time", "step_seconds", "batch_size", "components", "allocated", "peak_allocated", "reserved",
             "num_alloc_retries", "num_ooms", "device_used",
             "peak_phase", "phase_peaks", "phase_step", "phase_batch_size"}  # the latest sampled step's phase
HELLO_KEYS = {"pid", "host", "argv", "python", "torch", "device", "nvml_uuid", "rank", "local_rank", "world_size",
              "model", "optimizer"}
PREDICTION_KEYS = {"max_batch", "batch_size", "total", "headroom", "margin", "basis", "components"}


def replayed(path: Path) -> list[NvmlSample]:
    replay = ReplayBackend(path)
    probe = NvmlProbe(backend=replay)
    return [probe.sample() for _ in range(len(replay))]


def hello(pid: int, **kw: Any) -> Hello:
    base = dict(pid=pid, host="box", argv=("train.py", "--lr", "3e-4"), python="3.11.7", torch="2.13.0",
                device="cuda:0", nvml_uuid=None, rank=0, local_rank=0, world_size=1,
                model=ModelInfo("GPT", 124_000_000, 496_000_000), optimizer="AdamW")
    base.update(kw)
    return Hello(**base)  # type: ignore[arg-type]


def step(n: int = 7, batch: int = 32, **fields: Any) -> Step:
    comps = {"parameters": 496_000_000, "gradients": 496_000_000, "optimizer": 992_000_000,
             "activations": 3_100_000_000, "batch": 12_582_912, "other": 301_000_000}
    allocated = sum(comps.values())
    return make_step(n, batch, time=1_767_225_600.5, step_seconds=0.21, components=comps, allocated=allocated,
                     peak_allocated=allocated + 50_000_000, reserved=allocated + 400 << 20, num_alloc_retries=0,
                     num_ooms=0, device_used=allocated + 900 << 20, **fields)


def prediction(max_batch: int | None = 96) -> Prediction:
    return Prediction(batch_size=32, components={n: 1 << 20 for n in ALL_COMPONENTS}, total=6 << 30,
                      peak_allocated=5 << 30, max_batch=max_batch, device_total=80 << 30, headroom=70 << 30,
                      margin=1 << 30, basis_fields=Basis(steps=3, batch_sizes=(32,), step_range=(5, 7)))


def snapshot(nvml: NvmlSample, agents: tuple[AgentView, ...] = (), host: HostSample | None = None,
             **kw: Any) -> Snapshot:
    pids = [p.pid for d in nvml.devices for p in d.processes] + [os.getpid()]
    return Snapshot(time=1_767_225_600.0, host=host or HostProbe().sample(pids), nvml=nvml, agents=agents, **kw)


def unavailable() -> NvmlSample:
    return NvmlSample(available=False, error="libnvidia-ml.so.1 not found (no NVIDIA driver on this machine)",
                      driver=None, devices=())


def check_ints(value: Any, where: str) -> None:
    assert value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0), where


# ----------------------------------------------------------------------------------------------- formatting helpers


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, "n/a"), (0, "0 B"), (1023, "1023 B"), (1024, "1.0 KiB"), (1536, "1.5 KiB"), ((1 << 20) - 1, "1.0 MiB"),
     (int(10.5 * (1 << 30)), "10.5 GiB"), (-(3 << 30), "-3.0 GiB"), (5 << 40, "5.0 TiB")],
)
def test_fmt_bytes(n: int | None, text: str) -> None:
    assert fmt_bytes(n) == text


def test_fmt_used_total_and_bar() -> None:
    assert fmt_used_total(int(10.5 * (1 << 30)), int(139.8 * (1 << 30))) == "10.5/139.8 GiB"
    assert fmt_used_total(None, 1 << 30) == "?/1.0 GiB"
    assert text_bar(0, 100) == "[..........]"
    assert text_bar(50, 100) == "[#####.....]"
    assert text_bar(1, 10**9) == "[#.........]"  # something in use is never drawn empty
    assert text_bar(300, 100, 4) == "[####]"
    assert text_bar(None, 100, 3) == "[???]"
    assert clean("a\nb\x1b[31mc") == "a b [31mc"


# ----------------------------------------------------------------------------------------------- JSON


def check_schema(d: dict[str, Any]) -> None:
    assert TOP_KEYS <= set(d)
    assert set(d["nvml"]) >= {"available", "error", "driver"}
    assert set(d["host"]) >= {"hostname", "memory_total", "memory_used"}
    check_ints(d["host"]["memory_total"], "host.memory_total")
    for dev in d["devices"]:
        assert DEVICE_KEYS <= set(dev)
        assert set(dev["memory"]) == MEMORY_KEYS
        for k in MEMORY_KEYS:
            check_ints(dev["memory"][k], f"memory.{k}")
        assert isinstance(dev["lost"], bool)
        for key in ("utilization", "temperature"):
            check_ints(dev[key], key)
        assert dev["power"] is None or isinstance(dev["power"], float)
        for p in dev["processes"]:
            assert PROCESS_KEYS <= set(p)
            check_ints(p["pid"], "pid")
            check_ints(p["used"], "process used")
    for a in d["agents"]:
        assert HELLO_KEYS | STEP_KEYS | {"prediction"} <= set(a)
        assert set(a["components"]) == set(ALL_COMPONENTS)
        for k in ("allocated", "peak_allocated", "reserved", "device_used"):
            check_ints(a[k], k)
        for v in a["components"].values():
            check_ints(v, "component")
        if a["prediction"] is not None:
            assert PREDICTION_KEYS <= set(a["prediction"])
    json.dumps(d, allow_nan=False)


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_json_schema_from_recordings(path: Path) -> None:
    for nvml in replayed(path):
        snap = snapshot(nvml)
        d = json.loads(json.dumps(snapshot_to_json(snap)))
        check_schema(d)
        assert d["nvml"] == {"available": True, "error": None, "driver": nvml.driver}
        assert [dev["index"] for dev in d["devices"]] == [dev.index for dev in nvml.devices]
        for jd, dev in zip(d["devices"], nvml.devices):
            assert jd["memory"]["used"] == dev.memory.used and jd["uuid"] == dev.uuid  # type: ignore[union-attr]
            assert [p["pid"] for p in jd["processes"]] == [p.pid for p in dev.processes]
            for p in jd["processes"]:
                info = snap.process(p["pid"])
                assert p["user"] == (info.user if info else None)


def test_json_nulls_where_unsupported() -> None:
    nvml = replayed(SYNTHETIC)[0]
    d = snapshot_to_json(snapshot(nvml))
    v1 = [dev for dev in d["devices"] if dev["memory"]["reserved"] is None]
    assert v1 and all("reserved" in dev["memory"] for dev in d["devices"])
    assert any(dev["power"] is None for dev in d["devices"])
    assert any(p["used"] is None for dev in d["devices"] for p in dev["processes"])
    lost = DeviceSample(5, "NVIDIA H200", "GPU-x", None, None, None, None, (), lost=True, error="GPU is lost")
    d = snapshot_to_json(snapshot(NvmlSample(True, None, "550.1", (lost,))))
    check_schema(d)
    assert d["devices"][0]["lost"] is True and d["devices"][0]["memory"] == dict.fromkeys(MEMORY_KEYS)


def test_json_unavailable() -> None:
    d = snapshot_to_json(snapshot(unavailable()))
    check_schema(d)
    assert d["nvml"]["available"] is False and "libnvidia-ml" in d["nvml"]["error"]
    assert d["devices"] == [] and d["agents"] == []
    assert d["host"]["memory_total"] > 0


def test_json_agents() -> None:
    nvml = replayed(SYNTHETIC)[0]
    dev = nvml.devices[1]
    s = step()
    agents = (
        AgentView(key="box:101", source="local", hello=hello(101, nvml_uuid=dev.uuid), last_step=s,
                  prediction=prediction()),
        AgentView(key="box:102", source="local", hello=hello(102, device="cpu")),
    )
    d = snapshot_to_json(snapshot(nvml, agents))
    check_schema(d)
    a, b = d["agents"]
    assert a["pid"] == 101 and a["argv"] == ["train.py", "--lr", "3e-4"] and a["gpu"] == dev.index
    assert a["model"] == {"class": "GPT", "parameters": 124_000_000, "parameter_bytes": 496_000_000}
    assert a["step"] == s.step and a["batch_size"] == s.batch_size and a["device_used"] == s.device_used
    assert {k: a["components"][k] for k in COMPONENTS} == s.components
    # cache at the step's peak (as the TUI and the model define it): the eight then sum to the device figure
    assert s.peak_allocated > s.allocated  # the two definitions differ here
    assert a["components"]["cache"] == s.reserved - s.peak_allocated  # type: ignore[operator]
    from batchmon.tui.predict import measured_components  # the TUI's bars: the same eight figures

    assert measured_components(s) == a["components"]
    assert a["components"]["context"] == s.device_used - s.reserved  # type: ignore[operator]
    assert a["prediction"]["max_batch"] == 96 and a["prediction"]["basis"].startswith("3 steps")
    assert b["gpu"] is None and b["step"] is None and b["prediction"] is None
    assert set(b["components"].values()) == {None}


def test_step_components_without_allocator_figures() -> None:
    s = Step(step=1, time=1.0, step_seconds=None, batch_size=4, components=dict.fromkeys(COMPONENTS, 10))
    comps = step_components(s)
    assert comps["cache"] is None and comps["context"] is None and comps["activations"] == 10


# ----------------------------------------------------------------------------------------------- table


def gpu_blocks(text: str) -> dict[int, list[str]]:
    """GPU index -> its line and the process lines under it."""
    blocks: dict[int, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        m = re.match(r"GPU(\d+) ", line)
        if m:
            current = blocks.setdefault(int(m.group(1)), [])
            current.append(line)
        elif current is not None and line.startswith("     "):
            current.append(line)
        else:
            current = None
    return blocks


@pytest.mark.parametrize("path", FIXTURES, ids=[p.stem for p in FIXTURES])
def test_table_from_recordings(path: Path) -> None:
    nvml = replayed(path)[-1]
    snap = snapshot(nvml)
    text = format_table(snap, width=100)
    blocks = gpu_blocks(text)
    assert sorted(blocks) == [d.index for d in nvml.devices]
    for dev in nvml.devices:
        line, *procs = blocks[dev.index]
        assert dev.name in line  # type: ignore[operator]
        assert text_bar(dev.memory.used, dev.memory.total, 20) in line  # type: ignore[union-attr]
        assert fmt_used_total(dev.memory.used, dev.memory.total) in line  # type: ignore[union-attr]
        assert ("util n/a" if dev.utilization is None else f"util {dev.utilization}%") in line
        pid_lines = [p for p in procs if p.strip().startswith("pid ")]
        assert len(pid_lines) == len(dev.processes)
        for p in dev.processes:
            ours = [pl for pl in pid_lines if re.search(rf"pid {p.pid}\b", pl)]
            assert len(ours) == 1 and fmt_bytes(p.used) in ours[0]
    assert f"Host {snap.host.hostname}" in text
    assert text.splitlines()[-1].endswith(NO_AGENTS)
    for line in text.splitlines():
        assert len(line) <= 100 or line.endswith(NO_AGENTS)


def test_table_unavailable() -> None:
    text = format_table(snapshot(unavailable()), width=80)
    lines = text.splitlines()
    assert lines.count("NVML unavailable: libnvidia-ml.so.1 not found (no NVIDIA driver on this machine)") == 1
    assert not gpu_blocks(text)
    assert any(line.startswith("Host ") for line in lines)
    assert lines[-1] == f"  {NO_AGENTS}"


def test_table_prints_names_literally_and_strips_control_characters() -> None:
    nvml = replayed(SYNTHETIC)[0]
    dev = next(d for d in nvml.devices if "[" in (d.name or ""))  # the fixture's markup-looking GPU name
    pid = dev.processes[0].pid
    host = HostSample("box", 64 << 30, 8 << 30, {pid: ProcessInfo(pid, "[red]root[/]", "python [bold]x[/] \x1b[2J\nrm",
                                                                   1.0, 1 << 20)})
    text = format_table(snapshot(nvml, host=host), width=120)
    assert dev.name in text  # type: ignore[operator]
    assert "python [bold]x[/]  [2J rm" in text
    assert "\x1b" not in text and all(line.isprintable() for line in text.splitlines())


def test_table_lost_device_and_process_states() -> None:
    procs = replayed(SYNTHETIC)[0].devices[0].processes
    ok = DeviceSample(0, "NVIDIA H200", "GPU-a", replayed(SYNTHETIC)[0].devices[0].memory, 35, 41, 120.4, procs)
    lost = DeviceSample(1, "NVIDIA H200", "GPU-b", None, None, None, None, (), lost=True, error="GPU is lost")
    host = HostSample("box", 64 << 30, 8 << 30, {procs[0].pid: ProcessInfo(procs[0].pid, None, None, None, None, "gone")})
    text = format_table(snapshot(NvmlSample(True, None, "550.54", (ok, lost)), host=host))
    blocks = gpu_blocks(text)
    assert blocks[1] == ["GPU1 NVIDIA H200  LOST: GPU is lost"]
    assert "util 35%" in blocks[0][0] and "41C" in blocks[0][0] and "120W" in blocks[0][0]
    assert "(gone)" in next(line for line in blocks[0] if f"pid {procs[0].pid}" in line)


def test_table_agents_section() -> None:
    nvml = replayed(SYNTHETIC)[0]
    s = step(n=120, batch=32)
    agents = (
        AgentView(key="box:101", source="local", hello=hello(101), last_step=s, prediction=prediction(),
                  events=(Event(kind="oom", message="CUDA out of memory"),)),
        AgentView(key="box:102", source="local", hello=hello(102, name="[b]exp-7[/b]", device="cpu")),
        AgentView(key="box:103", source="local", hello=hello(103), last_step=s, prediction=prediction(None),
                  connected=False),
    )
    snap = snapshot(nvml, agents, warnings=(Warning("agent box:9", "invalid line dropped", 3),))
    lines = format_table(snap, width=100).splitlines()
    start = lines.index("Agents")
    section = lines[start + 1:]
    first = next(line for line in section if line.startswith("  pid 101"))
    assert "train.py --lr 3e-4" in first and "cuda:0" in first and "step 120" in first and "batch 32" in first
    assert "max batch 96" in first
    comp_text = " ".join(section[section.index(first) + 1: section.index(first) + 4])
    for name in COMPONENTS:
        assert fmt_bytes(s.components[name]) in comp_text
    assert "last event: oom: CUDA out of memory" in " ".join(section)
    second = next(line for line in section if line.startswith("  pid 102"))
    assert "[b]exp-7[/b]" in second and "waiting for the first step" in second and "max batch ?" in second
    third = next(line for line in section if line.startswith("  pid 103"))
    assert "(disconnected)" in third and "max batch ? (no device size)" in third
    assert NO_AGENTS not in "\n".join(lines)
    assert "  agent box:9: invalid line dropped (x3)" in lines
    assert all(len(line) <= 100 for line in lines)


def test_remote_snapshots_follow() -> None:
    remote = Snapshot(time=1.0, host=HostSample("gpu2", 1 << 30, 1 << 29), nvml=unavailable(), source="gpu2")
    text = format_table(snapshot(unavailable(), remote=(remote,)))
    assert "batchmon  gpu2" in text and text.count("NVML unavailable:") == 2
    d = snapshot_to_json(snapshot(unavailable(), remote=(remote,)))
    assert d["remote"][0]["host"]["hostname"] == "gpu2"


def test_batch_source_shown_in_table_and_json() -> None:
    """Issue 12: where the batch size comes from (a sequence-first model's batch is not dim 0) is shown."""
    nvml = replayed(SYNTHETIC)[0]
    seq_first = step(n=9, batch=20, batch_source="input dim 1 (LSTM batch_first=False)", micro_batches=2)
    plain = step(n=9, batch=20)
    agents = (AgentView(key="box:101", source="local", hello=hello(101), last_step=seq_first, prediction=prediction()),
              AgentView(key="box:102", source="local", hello=hello(102), last_step=plain, prediction=prediction()))
    snap = snapshot(nvml, agents)
    lines = format_table(snap, width=160).splitlines()
    first = next(line for line in lines if line.startswith("  pid 101"))
    assert "batch 20 (input dim 1 (LSTM batch_first=False))" in first
    second = next(line for line in lines if line.startswith("  pid 102"))
    assert "batch 20" in second and "batch 20 (" not in second  # no source reported: nothing invented
    doc = snapshot_to_json(snap)
    by_pid = {a["pid"]: a for a in doc["agents"]}
    assert by_pid[101]["batch_source"] == "input dim 1 (LSTM batch_first=False)"
    assert by_pid[101]["micro_batches"] == 2
    assert by_pid[102]["batch_source"] is None and by_pid[102]["micro_batches"] is None
