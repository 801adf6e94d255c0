"""Plain renderings of a Snapshot: the `--once --json` object and the `--once` text table.

Pure functions of a Snapshot (no I/O, no textual, no torch), so every front end that prints shows the same
thing. What the TUI shares with it lives in the shared language: sizes and clean text in units, the eight
components of a step in protocol, the imbalance line in jobs.

Over 400 lines: the JSON object and the text table are two renderings of the same fields of the same snapshot
(devices, agents, jobs, ended runs, post-mortems), kept side by side so that a field added to one is seen next to
the other.
"""

from __future__ import annotations

import textwrap
import time
from typing import Any

from batchmon.jobs import Job, group_jobs, imbalance_text
from batchmon.memory_model import Advice, Prediction, advice_for, advice_json, advice_text
from batchmon.probes.nvml import DeviceSample
from batchmon.protocol import ALL_COMPONENTS, Step, step_components
from batchmon.postmortem import OomReport
from batchmon.snapshot import RUNNING, AgentView, RunEnd, Snapshot, StepPhases
from batchmon.units import clean_text, fmt_bytes, fmt_used_total
from batchmon.where_used import DeviceUse, device_use

NO_AGENTS = "no agents attached — add `batchmon.attach(model, optimizer)` or run `batchmon run -- python train.py`"

# ----------------------------------------------------------------------------------------------- formatting


def text_bar(used: int | float | None, total: int | float | None, width: int = 10) -> str:
    """'[#####.....]': the used share of total, clamped to the bar; '[??????????]' when unknown."""
    width = max(1, width)
    if used is None or not total or total <= 0:
        return "[" + "?" * width + "]"
    share = min(max(used / total, 0.0), 1.0)
    filled = int(round(share * width))
    if used > 0 and filled == 0:
        filled = 1  # something is there: never draw it as empty
    return "[" + "#" * filled + "." * (width - filled) + "]"


def _fit(line: str, width: int) -> str:
    return line if len(line) <= width else line[: max(width - 1, 0)] + "…"


def _na(value: Any, fmt: str = "{}") -> str:
    return "n/a" if value is None else fmt.format(value)


# ----------------------------------------------------------------------------------------------- JSON


def _use_json(use: DeviceUse) -> dict[str, Any]:
    return {"processes_total": use.processes_total, "unattributed": use.unattributed,
            "processes": [{"pid": p.pid, "used": p.used, "agent": p.agent, "reserved": p.reserved,
                           "outside_allocator": p.outside} for p in use.processes]}


def _device_json(dev: DeviceSample, snap: Snapshot) -> dict[str, Any]:
    m = dev.memory
    processes = []
    figures = snap.agent_figures(dev)
    use = device_use(dev, figures) if m is not None and not dev.lost else None
    for p in dev.processes:
        info = snap.process(p.pid)
        processes.append({
            "pid": p.pid,
            "used": p.used,
            "agent": p.pid in figures,
            "user": None if info is None else info.user,
            "command": None if info is None else info.command,
            "kind": p.kind,
            "state": None if info is None else info.state,
            "cpu_percent": None if info is None else info.cpu_percent,
            "rss": None if info is None else info.rss,
        })
    return {
        "index": dev.index,
        "name": dev.name,
        "uuid": dev.uuid,
        "memory": {
            "total": None if m is None else m.total,
            "used": None if m is None else m.used,
            "reserved": None if m is None else m.reserved,
            "free": None if m is None else m.free,
        },
        "utilization": dev.utilization,
        "temperature": dev.temperature,
        "power": dev.power,
        "lost": dev.lost,
        "error": dev.error,
        "processes": processes,
        "where_used": None if use is None else _use_json(use),
    }


def prediction_json(pred: Prediction | None, advice: tuple[Advice, ...] = ()) -> dict[str, Any] | None:
    if pred is None:
        return None
    return {
        "max_batch": pred.max_batch,
        "batch_size": pred.batch_size,
        "total": pred.total,
        "headroom": pred.headroom,
        "margin": pred.margin,
        "basis": pred.basis,
        "components": {name: pred.components.get(name) for name in ALL_COMPONENTS},
        "peak_allocated": pred.peak_allocated,
        "device_total": pred.device_total,
        "advice": advice_json(advice),  # the fit advisor (memory_model.advisor), ranked
    }


def _ended_json(end: RunEnd | None) -> dict[str, Any] | None:
    if end is None:
        return None
    return {"time": end.time, "how": end.how, "text": end.text, "steps": end.steps, "peak": end.peak,
            "exit_code": end.exit_code, "signal": end.signal}


def _agent_json(agent: AgentView, snap: Snapshot) -> dict[str, Any]:
    h, s = agent.hello, agent.last_step
    dev = snap.device_of(agent)
    last_event = agent.events[-1] if agent.events else None
    return {
        "key": agent.key,
        "source": agent.source,
        "state": agent.state,
        "ended": _ended_json(agent.ended),
        "oom": None if agent.oom is None else agent.oom.to_dict(),
        "connected": agent.connected,
        "detached": agent.detached,
        # the hello fields
        "pid": h.pid,
        "host": h.host,
        "argv": list(h.argv),
        "name": h.name,
        "python": h.python,
        "torch": h.torch,
        "device": h.device,
        "nvml_uuid": h.nvml_uuid,
        "rank": h.rank,
        "local_rank": h.local_rank,
        "world_size": h.world_size,
        "job": h.job,
        "model": None if h.model is None else h.model.to_dict(),
        "optimizer": h.optimizer,
        "started": h.time,
        "gpu": None if dev is None else dev.index,
        # the last step's fields
        "step": None if s is None else s.step,
        "time": None if s is None else s.time,
        "step_seconds": None if s is None else s.step_seconds,
        "batch_size": None if s is None else s.batch_size,
        "batch_source": None if s is None else s.batch_source,
        "micro_batches": None if s is None else s.micro_batches,
        "components": step_components(s),
        "allocated": None if s is None else s.allocated,
        "peak_allocated": None if s is None else s.peak_allocated,
        "reserved": None if s is None else s.reserved,
        "num_alloc_retries": None if s is None else s.num_alloc_retries,
        "num_ooms": None if s is None else s.num_ooms,
        "device_used": None if s is None else s.device_used,
        "last_event": None if last_event is None else {"kind": last_event.kind, "message": last_event.message,
                                                        "time": last_event.time},
        "invalid_lines": agent.invalid_lines,
        # where in the step the peak was reached, from the latest sampled step (null: none sampled, older agent)
        **_phases_json(agent.phases),
        "prediction": prediction_json(agent.prediction, _advice(agent)),
    }


def _phases_json(phases: StepPhases | None) -> dict[str, Any]:
    if phases is None:
        return {"peak_phase": None, "phase_peaks": None, "phase_step": None, "phase_batch_size": None}
    return phases.to_dict()


def _advice(agent: AgentView) -> tuple[Advice, ...]:
    pred = agent.prediction
    return advice_for(agent.model, pred.device_total if pred else None, gpus=agent.hello.world_size)


def _job_json(job: Job) -> dict[str, Any]:
    found = job.imbalance()
    return {"key": job.key, "world_size": job.world_size, "ranks": [a.key for a in job.ranks],
            "imbalance": None if found is None else found.to_dict()}


def snapshot_to_json(snap: Snapshot) -> dict[str, Any]:
    """The `batchmon --once --json` object (README documents it). Every key is always present; null where a
    driver or an agent does not say; sizes are integers in bytes."""
    return {
        "time": snap.time,
        "source": snap.source,
        "nvml": {"available": snap.nvml.available, "error": snap.nvml.error, "driver": snap.nvml.driver},
        "host": {"hostname": snap.host.hostname, "memory_total": snap.host.memory_total,
                 "memory_used": snap.host.memory_used},
        "devices": [_device_json(d, snap) for d in snap.nvml.devices],
        "agents": [_agent_json(a, snap) for a in snap.agents],
        "jobs": [_job_json(job) for job in group_jobs(snap.agents)],
        "warnings": [{"source": w.source, "message": w.message, "count": w.count} for w in snap.warnings],
        "remote": [snapshot_to_json(r) for r in snap.remote],
    }


# ----------------------------------------------------------------------------------------------- table

_LABELS = {"parameters": "params", "gradients": "grads", "optimizer": "optim", "activations": "activ",
           "batch": "batch", "other": "other", "cache": "cache", "context": "context"}


def _wrap(items: list[str], indent: str, width: int) -> list[str]:
    lines: list[str] = []
    line = indent
    for item in items:
        if line.strip() and len(line) + 2 + len(item) > width:
            lines.append(line)
            line = indent
        line += ("  " if line.strip() else "") + item
    if line.strip():
        lines.append(line)
    return lines


def _use_lines(use: DeviceUse, width: int) -> list[str]:
    """Where the device's used bytes go: processes, unattributed; per attached process its allocator pool."""
    items = [f"used {fmt_bytes(use.used)} = processes {fmt_bytes(use.processes_total)}"]
    if use.unattributed is not None:
        items.append(f"+ unattributed {fmt_bytes(use.unattributed)} (driver, processes not visible here)")
    lines = _wrap(items, "     ", width)
    for p in use.processes:
        if p.agent:
            outside = "n/a (pool grew after NVML's sample)" if p.outside is None else fmt_bytes(p.outside)
            lines.append(f"       pid {p.pid}: allocator reserved {fmt_bytes(p.reserved)} + {p.outside_label} "
                         f"{outside}")
    return lines


def _device_lines(dev: DeviceSample, snap: Snapshot, width: int, bar: int) -> list[str]:
    head = f"GPU{dev.index} {clean_text(dev.name or 'unknown GPU')}"
    if dev.lost:
        return [f"{head}  LOST: {clean_text(dev.error or 'GPU is lost')}"]
    m = dev.memory
    if m is None:
        mem = "memory n/a"
    else:
        mem = f"{text_bar(m.used, m.total, bar)} {fmt_used_total(m.used, m.total)}"
    util = "util n/a" if dev.utilization is None else f"util {dev.utilization}%"
    temp = "temp n/a" if dev.temperature is None else f"{dev.temperature}C"
    power = "power n/a" if dev.power is None else f"{dev.power:.0f}W"
    lines = [f"{head}  {mem}  {util}  {temp}  {power}"]
    if dev.error:
        lines.append(f"     ! {clean_text(dev.error)}")
    procs = sorted(dev.processes, key=lambda p: (p.used is None, -(p.used or 0), p.pid))
    for p in procs:
        info = snap.process(p.pid)
        if info is None:
            user, command = "?", ""
        elif info.state == "gone":
            user, command = "?", "(gone)"
        elif info.state == "denied" and info.command is None:
            user, command = clean_text(info.user or "?"), "(no access)"
        else:
            user, command = clean_text(info.user or "?"), clean_text(info.command or "")
        lines.append(f"     pid {p.pid:<7} {user[:12]:<12} {fmt_bytes(p.used):>10}  {command}".rstrip())
    if not procs:
        lines.append("     no processes")
        return lines
    figures = snap.agent_figures(dev)
    if m is not None:
        lines += _use_lines(device_use(dev, figures), width)
    ended = {a.hello.pid for a in snap.agents if a.state != RUNNING and snap.device_of(a) is dev}
    others = [p.pid for p in procs if p.pid not in figures and p.pid not in ended]
    if others:
        lines.append(f"     without an agent: pid {', '.join(str(pid) for pid in others)}")
    exiting = [p.pid for p in procs if p.pid in ended and p.pid not in figures]
    if exiting:
        lines.append(f"     run ended, process still exiting: pid {', '.join(str(pid) for pid in exiting)}")
    return lines


def _batch_source(step: Step) -> str:
    """Where the agent found the batch size (' (input dim 1 (LSTM batch_first=False))'), '' where unknown."""
    return f" ({clean_text(step.batch_source)})" if step.batch_source else ""


def _agent_lines(agent: AgentView, snap: Snapshot, width: int) -> list[str]:
    h, s = agent.hello, agent.last_step
    rest = [clean_text(h.device)]
    if h.world_size > 1:
        rest.append(f"rank {h.rank}/{h.world_size}")
    if s is None:
        rest.append("waiting for the first step")
    else:
        rest += [f"step {s.step}", f"batch {_na(s.batch_size)}" + _batch_source(s)]
    pred = agent.prediction
    if pred is None:
        rest.append("max batch ?")
    elif pred.max_batch is None:
        rest.append("max batch ? (no device size)")
    else:
        rest.append(f"max batch {pred.max_batch}")
    if not agent.connected:
        rest.append("(disconnected)")
    elif agent.detached:
        rest.append("(detached)")
    head = f"  pid {h.pid}"
    # the command line gets what room the figures leave (at least a little)
    name = clean_text(h.name or " ".join(h.argv) or "python")
    room = max(width - len(head) - sum(len(r) + 2 for r in rest) - 2, 8)
    lines = [_fit("  ".join([head, _fit(name, room), *rest]), width)]
    items: list[str] = []
    if s is not None:
        comps = step_components(s)
        items = [f"{_LABELS[n]} {fmt_bytes(v)}" for n, v in comps.items() if v is not None]
        if s.peak_allocated is not None:
            items.append(f"peak {fmt_bytes(s.peak_allocated)}")
    if pred is not None and pred.headroom is not None:
        items.append(f"headroom {fmt_bytes(pred.headroom)} at batch {pred.batch_size}")
    lines += _wrap(items, "      ", width)
    if agent.phases is not None:
        lines.append(_fit(f"      {_phase_text(agent.phases, s)}", width))
    advice = advice_text(_advice(agent))
    if advice:
        lines.append(_fit(f"      fit advice: {advice}", width))
    if agent.events and agent.events[-1].kind in ("oom", "alloc_retry", "warning"):
        ev = agent.events[-1]
        lines.append(_fit(f"      last event: {clean_text(ev.kind)}: {clean_text(ev.message)}", width))
    return lines


def _phase_text(phases: StepPhases, last: Step | None) -> str:
    """The peak's phase, and which step it was measured on when that is not the step shown (sampled steps only)."""
    text = phases.text()
    if last is None or last.step != phases.step:
        text += f", sampled at step {phases.step}"
        if last is not None and phases.batch_size != last.batch_size:
            text += f" (batch {_na(phases.batch_size)})"
    return text


def _ended_lines(agent: AgentView, width: int) -> list[str]:
    """An ended run: its final summary, and after an OOM the post-mortem."""
    h, end = agent.hello, agent.ended
    assert end is not None
    when = time.strftime("%H:%M:%S", time.localtime(end.time)) if end.time else "?"
    name = clean_text(h.name or " ".join(h.argv) or "python")
    label = "OOM" if agent.state == "oom" else "ended"
    lines = [_fit(f"  pid {h.pid}  {name}  [{label} {when}]", width)]
    peak = "n/a" if end.peak is None else fmt_bytes(end.peak)
    lines.append(_fit(f"      {clean_text(end.text)}; {end.steps} step{'s' if end.steps != 1 else ''}, peak {peak}",
                      width))
    if agent.phases is not None:  # its last sampled step: where a finished step of this run peaked
        ph = agent.phases
        batch = f" (batch {ph.batch_size})" if ph.batch_size is not None else ""
        lines.append(_fit(f"      last sampled step {ph.step}{batch}: {ph.text()}", width))
    if agent.oom is not None and agent.state == "oom":
        lines += _oom_lines(agent.oom, width)
    return lines


def _oom_lines(r: OomReport, width: int) -> list[str]:
    asked = "?" if r.requested_bytes is None else fmt_bytes(r.requested_bytes)
    head = f"      post-mortem: step {_na(r.step)}, batch {_na(r.batch_size)}, asked for {asked}"
    if r.device_total is not None:
        head += f" on a device of {fmt_bytes(r.device_total)}"
    lines = [_fit(head, width)]
    items = [f"{_LABELS[n]} {fmt_bytes(v)}" for n, v in r.components.items() if v is not None]
    items.append(f"live {fmt_bytes(r.allocated)}")
    lines += _wrap(items, "        ", width)
    pool = ["reserved n/a (not reported by the agent)" if r.reserved is None else
            f"reserved ~{fmt_bytes(r.reserved)} (NVML less the context)" if r.reserved_estimated else
            f"reserved {fmt_bytes(r.reserved)}"]
    if r.fragmentation is not None:
        pool.append(f"fragmentation {fmt_bytes(r.fragmentation)}")
    if r.device_used is not None:
        pool.append(f"NVML process {fmt_bytes(r.device_used)} (beyond live tensors {fmt_bytes(r.beyond_allocated)})")
    if r.device_free is not None:
        pool.append(f"device free {fmt_bytes(r.device_free)}")
    pool.append(f"alloc retries {_na(r.num_alloc_retries)}")
    lines += _wrap(pool, "        ", width)
    if r.advice:
        lines.append(f"      what would have fit batch {_na(r.batch_size)}, cheapest first:")
        lines += textwrap.wrap(f"({r.advice_basis})", width, initial_indent="        ", subsequent_indent="         ")
        for a in r.advice:
            fits = "fits" if a.fits_target else "short"
            lines.append(_fit(f"        {a.what_if:<40} max batch {_na(a.max_batch):>7}  "
                              f"step time x{a.step_time_factor:.2f}  {fits}", width))
    elif r.advice_basis:
        lines.append(_fit(f"      {r.advice_basis}", width))
    return lines


def _job_lines(job: Job) -> list[str]:
    lead = job.lead.hello
    name = clean_text(lead.name or " ".join(lead.argv) or "python")
    found = job.imbalance()
    lines = [f"  job of {len(job.ranks)}/{job.world_size} ranks  {name}"]
    lines.append(f"    {imbalance_text(found)}" if found else "    imbalance: waiting for two ranks' steps")
    return lines


def format_table(snap: Snapshot, width: int = 100) -> str:
    """The `batchmon --once` text: one line per GPU with a bar and its processes under it, host memory, agents."""
    width = max(width, 40)
    bar = 20 if width >= 100 else 10
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap.time)) if snap.time else ""
    header = f"batchmon  {clean_text(snap.host.hostname)}  {stamp}"
    if snap.nvml.available and snap.nvml.driver:
        header += f"  driver {clean_text(snap.nvml.driver)}"
    if snap.source != "live":
        header += f"  ({clean_text(snap.source)})"
    lines = [header]
    if not snap.nvml.available:
        lines.append(f"NVML unavailable: {clean_text(snap.nvml.error or 'unknown reason')}")
    elif not snap.nvml.devices:
        lines.append("no NVIDIA GPUs found")
    for dev in snap.nvml.devices:
        lines += _device_lines(dev, snap, width, bar)
    host = snap.host
    lines.append(f"Host {clean_text(host.hostname)}  memory {text_bar(host.memory_used, host.memory_total, bar)} "
                 f"{fmt_used_total(host.memory_used, host.memory_total)}")
    lines.append("Agents")
    running = [a for a in snap.agents if a.state == RUNNING]
    if not snap.agents:
        lines.append(f"  {NO_AGENTS}")
    elif not running:
        lines.append("  none running (ended runs below)")
    for job in group_jobs(running):
        if len(job.ranks) > 1 or job.world_size > 1:
            lines += _job_lines(job)
        for agent in job.ranks:
            lines += _agent_lines(agent, snap, width)
    ended = [a for a in snap.agents if a.state != RUNNING]
    if ended:
        lines.append("Ended runs (newest first)")
        for agent in ended:
            lines += _ended_lines(agent, width)
    if snap.warnings:
        lines.append("Warnings")
        for w in snap.warnings:
            count = f" (x{w.count})" if w.count > 1 else ""
            lines.append(f"  {clean_text(w.source)}: {clean_text(w.message)}{count}")
    text = "\n".join(line if line.endswith(NO_AGENTS) else _fit(line, width) for line in lines)
    for remote in snap.remote:
        text += "\n\n" + format_table(remote, width)
    return text
