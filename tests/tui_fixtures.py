"""Realistic Snapshots for the monitor's tests, built directly from the dataclasses (no hub, no clock).

Numbers follow a GPT-style model on an H200 (143771 MiB): parameters, gradients and Adam state fixed,
activations per sample, allocator cache and CUDA context on top, so the memory model fits a sensible line.
"""

from __future__ import annotations

from batchmon.probes.host import HostSample, ProcessInfo
from batchmon.probes.nvml import DeviceMemory, DeviceSample, GpuProcess, NvmlSample
from batchmon.protocol import Event, Hello, ModelInfo, Step
from batchmon.snapshot import AgentView, Snapshot, Warning

T0 = 1_767_225_600.0  # 2026-01-01 00:00:00 UTC: fixed, so screenshots never change
H200_TOTAL = 143771 * 1024 * 1024
H200_RESERVED = 527 * 1024 * 1024
MiB = 1 << 20
GiB = 1 << 30
HOST = "gpu-box"
DRIVER = "570.124.06"


def step(n: int, batch: int, *, params: int, act_per_sample: int, t: float, adam: bool = True,
         cache: int = 1536 * MiB, context: int = 610 * MiB, cuda: bool = True, retries: int = 0,
         ooms: int = 0) -> Step:
    """One measured step: the agent's six components plus allocator figures consistent with them."""
    comps = {
        "parameters": params,
        "gradients": params,
        "optimizer": 2 * params if adam else 0,
        "activations": act_per_sample * batch,
        "batch": batch * 1024 * 8 * 2,
        "other": 512 * MiB + batch * act_per_sample // 12,
    }
    peak = sum(comps.values())
    if not cuda:
        return Step(step=n, time=t, step_seconds=0.041, batch_size=batch, components=comps)
    return Step(step=n, time=t, step_seconds=0.184 + batch * 0.004, batch_size=batch, components=comps,
                allocated=peak - comps["activations"] - comps["other"], peak_allocated=peak,
                reserved=peak + cache, num_alloc_retries=retries, num_ooms=ooms,
                device_used=peak + cache + context)


def history(steps: int, batch: int, *, params: int, act: int, t_end: float, last_batch: int | None = None,
            **kw) -> tuple[Step, ...]:
    out = []
    for i in range(steps):
        b = last_batch if (last_batch and i == steps // 2) else batch  # an epoch's short last batch
        out.append(step(i + 1, b, params=params, act_per_sample=act, t=t_end - (steps - 1 - i) * 0.3, **kw))
    return tuple(out)


def hello(pid: int, argv: list[str], *, device: str = "cuda:0", uuid: str | None = None, rank: int = 0,
          world: int = 1, params: int = 355_000_000, cls: str = "GPT", optimizer: str | None = "AdamW",
          host: str = HOST, name: str | None = None) -> Hello:
    return Hello(pid=pid, host=host, argv=tuple(argv), python="3.11.7", torch="2.13.0", device=device,
                 nvml_uuid=uuid, rank=rank, local_rank=rank % 8, world_size=world,
                 model=ModelInfo(cls, params, params * 4), optimizer=optimizer, name=name, time=T0 - 120)


def agent(h: Hello, steps: tuple[Step, ...], events: tuple[Event, ...] = ()) -> AgentView:
    return AgentView(key=f"{h.host}:{h.pid}", source="local", hello=h, last_step=steps[-1] if steps else None,
                     history=steps, events=events)


def device(index: int, used: int, procs: tuple[GpuProcess, ...], *, util: int = 97, name: str = "NVIDIA H200",
           total: int = H200_TOTAL) -> DeviceSample:
    return DeviceSample(index=index, name=name, uuid=f"GPU-{index:08x}-0000-0000-0000-h200fixture",
                        memory=DeviceMemory(total=total, used=used, reserved=H200_RESERVED,
                                            free=total - used - H200_RESERVED),
                        utilization=util, temperature=41 + index, power=312.5 + 10 * index, processes=procs)


def proc(pid: int, command: str, user: str = "alice", rss: int = 3 * GiB) -> ProcessInfo:
    return ProcessInfo(pid=pid, user=user, command=command, cpu_percent=101.0, rss=rss)


def _host(processes: dict[int, ProcessInfo], t: float) -> HostSample:
    return HostSample(hostname=HOST, memory_total=2015 * GiB, memory_used=187 * GiB, processes=processes, time=t)


def one_gpu(n_agents: int = 1, *, t: float = T0, steps: int = 40, markup_names: bool = False) -> Snapshot:
    """One H200; one GPT run at batch 16 (a last batch of 8), optionally a second run that hit an OOM."""
    params = 355_000_000 * 4
    act = 1_900 * MiB
    argv = ["python", "train.py", "--model", "gpt-medium", "--batch-size", "16"]
    if markup_names:
        argv = ["python", "[bold red]x[/]", "--name", "[link=file:///etc]y[/link]"]
    uuid = "GPU-00000000-0000-0000-0000-h200fixture"
    h1 = hello(4242, argv, uuid=uuid)
    s1 = history(steps, 16, params=params, act=act, t_end=t, last_batch=8)
    agents = [agent(h1, s1)]
    gpu_procs = [GpuProcess(4242, s1[-1].device_used)]
    procs = {4242: proc(4242, " ".join(argv))}
    if n_agents >= 2:
        h2 = hello(5151, ["python", "finetune.py", "--batch-size", "24"], uuid=uuid, params=124_000_000,
                   cls="BertModel", optimizer="Adam")
        s2 = history(12, 24, params=124_000_000 * 4, act=900 * MiB, t_end=t, retries=3, ooms=1)
        ev = (Event(kind="alloc_retry", message="allocator flushed its cache to satisfy a request", time=t - 5,
                    step=9, batch_size=24),
              Event(kind="oom", message="CUDA out of memory. Tried to allocate 2.00 GiB", time=t - 2, step=11,
                    batch_size=48, requested_bytes=2 * GiB))
        agents.append(agent(h2, s2, ev))
        gpu_procs.append(GpuProcess(5151, s2[-1].device_used))
        procs[5151] = proc(5151, "python finetune.py --batch-size 24", user="bob")
    gpu_procs.append(GpuProcess(777, 1200 * MiB))
    procs[777] = proc(777, "[link=file:///etc]y[/link] jupyter-kernel" if markup_names else "python -m jupyter kernel",
                      user="carol")
    used = sum(p.used or 0 for p in gpu_procs)
    nvml = NvmlSample(available=True, error=None, driver=DRIVER,
                      devices=(device(0, used, tuple(gpu_procs)),), time=t)
    return Snapshot(time=t, host=_host(procs, t), nvml=nvml, agents=tuple(agents), interval=1.0)


def many(n_gpus: int = 8, n_agents: int = 16, *, t: float = T0) -> Snapshot:
    """8 H200s: a torchrun job with one rank per GPU (8 agents) and 8 single-GPU runs, one per GPU."""
    params = 1_300_000_000 * 4
    ddp_ranks = min(n_gpus, n_agents // 2)
    agents, procs = [], {}
    per_gpu: dict[int, list[GpuProcess]] = {i: [] for i in range(n_gpus)}
    argv = ["/usr/bin/python3", "pretrain.py", "--model", "llama-1b", "--micro-batch", "8"]  # each rank's argv
    for r in range(ddp_ranks):
        pid = 10_000 + r
        h = hello(pid, argv, uuid=f"GPU-{r:08x}-0000-0000-0000-h200fixture", rank=r, world=ddp_ranks,
                  params=1_300_000_000, cls="LlamaForCausalLM", device=f"cuda:{r}")
        s = history(20, 8, params=params, act=2600 * MiB + r * 3 * MiB, t_end=t)
        agents.append(agent(h, s))
        per_gpu[r].append(GpuProcess(pid, s[-1].device_used))
        procs[pid] = proc(pid, " ".join(argv), user="alice")
    for j in range(n_agents - ddp_ranks):
        g = j % n_gpus
        pid = 20_000 + j
        a = ["python", "sweep.py", "--trial", str(j), "--batch-size", str(32 * (1 + j % 3))]
        h = hello(pid, a, uuid=f"GPU-{g:08x}-0000-0000-0000-h200fixture", params=85_000_000, cls="ViT-B",
                  optimizer="SGD", device=f"cuda:{g}")
        s = history(10, 32 * (1 + j % 3), params=85_000_000 * 4, act=48 * MiB, t_end=t, adam=False)
        ev = (Event(kind="oom", message="CUDA out of memory. Tried to allocate 1.50 GiB", time=t - 1, step=10,
                    batch_size=512),) if j == 3 else ()
        agents.append(agent(h, s, ev))
        per_gpu[g].append(GpuProcess(pid, s[-1].device_used))
        procs[pid] = proc(pid, " ".join(a), user="bob")
    devs = tuple(device(i, sum(p.used or 0 for p in per_gpu[i]), tuple(per_gpu[i]), util=60 + 5 * i)
                 for i in range(n_gpus))
    nvml = NvmlSample(available=True, error=None, driver=DRIVER, devices=devs, time=t)
    warnings = (Warning("agent gpu-box:20005", "3 invalid lines dropped", 3),)
    return Snapshot(time=t, host=_host(procs, t), nvml=nvml, agents=tuple(agents), warnings=warnings, interval=1.0)


def no_gpu(*, t: float = T0) -> Snapshot:
    """No NVML (this machine, CI): the reason, host memory, and a CPU training run."""
    h = hello(3131, ["python", "examples/train_mlp.py", "--steps", "200", "--device", "auto"], device="cpu",
              params=2_200_000, cls="MLP", optimizer="Adam")
    s = history(30, 64, params=2_200_000 * 4, act=96 * 1024, t_end=t, cuda=False)
    nvml = NvmlSample(available=False, error="NVML Shared Library Not Found", driver=None, devices=(), time=t)
    procs = {3131: proc(3131, "python examples/train_mlp.py --steps 200 --device auto", rss=900 * MiB)}
    return Snapshot(time=t, host=_host(procs, t), nvml=nvml, agents=(agent(h, s),), interval=1.0)


def no_agents(*, t: float = T0) -> Snapshot:
    """One H200 with a process that has no agent: the monitor says how to attach one."""
    procs = {777: proc(777, "python serve.py", user="carol")}
    dev = device(0, 20 * GiB, (GpuProcess(777, 20 * GiB - 600 * MiB),), util=12)
    nvml = NvmlSample(available=True, error=None, driver=DRIVER, devices=(dev,), time=t)
    return Snapshot(time=t, host=_host(procs, t), nvml=nvml, agents=(), interval=1.0)


def series(n: int = 30, *, n_agents: int = 1) -> list[Snapshot]:
    """n one-GPU snapshots one second apart, the run advancing a step each time (for sparklines and replay)."""
    return [one_gpu(n_agents, t=T0 - (n - 1 - i), steps=10 + i) for i in range(n)]


def screen_text(app) -> str:
    """What the terminal shows now, as plain lines (the active screen's composited strips)."""
    return "\n".join(strip.text for strip in app.screen._compositor.render_strips())


async def wait_for(pilot, predicate, timeout: float = 20.0) -> None:
    """Poll ``predicate()`` on the app's loop until true or fail after ``timeout`` seconds (no fixed sleeps; the
    deadline is generous for a loaded 2-core CI box, and costs nothing when the condition comes true early)."""
    import time as _time

    deadline = _time.monotonic() + timeout
    while not predicate():
        if _time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await pilot.pause(0.02)


FIXTURES = __import__("pathlib").Path(__file__).parent / "fixtures"


def recorded_or(name: str, fallback):
    """The busiest Snapshot of tests/fixtures/<name> (a `batchmon record` file) when it is there, else fallback().

    The snapshot screens are meant to come from real H200 recordings; until one is committed under that name
    the synthetic fixture stands in (and the SVGs are regenerated with --snapshot-update when it lands)."""
    path = FIXTURES / name
    if path.exists():
        from batchmon.monitor.replay import load_snapshots

        snaps = load_snapshots(path)
        return snaps[busiest(snaps)]
    return fallback()


def busiest(snaps) -> int:
    """The last moment with the most training processes live: what a user watching the run saw."""
    live = [sum(1 for a in snap.agents if a.connected and a.last_step and getattr(a, "state", "running") == "running")
            for snap in snaps]
    return max(range(len(snaps)), key=lambda i: (live[i], i))


def recorded_app(name: str, index: int | None = None, **kw):
    """The monitor on one moment of tests/fixtures/<name> (the busiest unless ``index``), its GPU memory history
    sampled from the moments before, as the monitor watching the run would have it."""
    from batchmon.monitor.replay import load_snapshots
    from batchmon.tui.app import BatchmonApp

    snaps = load_snapshots(FIXTURES / name)
    i = busiest(snaps) if index is None else index % len(snaps)
    app = BatchmonApp(snapshot=snaps[i], **kw)
    app.add_history(snaps[:i])
    return app


#: what a hostile agent, recording or remote box may send: an OSC that sets the window title, a clear screen,
#: a cursor move, a bell, a C1 control (CSI as one byte)
TITLE_ESCAPE = "\x1b]2;PWNED\x1b\\"
CLEAR_SCREEN = "\x1b[2J"
HOSTILE = f"x{TITLE_ESCAPE}y{CLEAR_SCREEN}z\x1b[10;10H\x07\x9b31m"


def hostile(*, t: float = T0) -> Snapshot:
    """Every string that comes from outside carries terminal escapes: argv and name, model class, optimizer,
    device, event text, GPU name, host name, process user and command, warnings."""
    params = 355_000_000 * 4
    uuid = "GPU-00000000-0000-0000-0000-h200fixture"
    h = hello(4242, ["python", f"train{HOSTILE}.py", HOSTILE], uuid=uuid, cls=f"GPT{HOSTILE}",
              optimizer=f"Adam{HOSTILE}", device=f"cuda:0{HOSTILE}", host=f"box{HOSTILE}")
    s = history(20, 16, params=params, act=1_900 * MiB, t_end=t)
    ev = (Event(kind=f"oom{HOSTILE}", message=f"CUDA out of memory{HOSTILE}", time=t - 1, step=19, batch_size=16),)
    view = AgentView(key=f"box:{h.pid}", source="local", hello=h, last_step=s[-1], history=s, events=ev)
    procs = {4242: ProcessInfo(pid=4242, user=f"eve{HOSTILE}", command=f"python train.py {HOSTILE}",
                               cpu_percent=99.0, rss=GiB)}
    dev = device(0, s[-1].device_used or 0, (GpuProcess(4242, s[-1].device_used),), name=f"NVIDIA H200{HOSTILE}")
    nvml = NvmlSample(available=True, error=None, driver=f"570{HOSTILE}", devices=(dev,), time=t)
    host = HostSample(hostname=f"gpu-box{HOSTILE}", memory_total=2015 * GiB, memory_used=187 * GiB,
                      processes=procs, time=t)
    warnings = (Warning(f"agent box{HOSTILE}", f"invalid lines dropped: {HOSTILE}", 2),)
    return Snapshot(time=t, host=host, nvml=nvml, agents=(view,), warnings=warnings, interval=1.0)
