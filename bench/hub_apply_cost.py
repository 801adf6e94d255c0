"""The hub state's cost per applied message and per snapshot, on recorded or generated agent messages (issue 14.3).

Beside 16 real fast agents on the H200 the monitor's hub thread took ~26 ms a second, against ~11 ms beside
bench/load.py's fake peers on the dev box. This replays messages through the same pure HubState the live hub
uses (ingest per record, a snapshot at each tick, as batchmon.monitor.replay does) and reports, per record kind
and agent message type: how many, microseconds each, Python function calls each (cProfile, deterministic); per
snapshot the same, and how many memory-model refits (memory_model.fit calls) the snapshots made.

Sources (one of):
  --recording FILE     a `batchmon record` recording (e.g. one made on the H200 beside the fast16 jobs:
                       `python3 -m batchmon record --interval 1 --out fast16.jsonl` for 30 s)
  --synthetic fake     bench/load.py --gpu --coalesce peers' messages (steady figures, every window alike)
  --synthetic real     messages shaped like examples/train_mlp.py's real agent on CUDA at ~101 steps/s: the agent's
                       own StepCoalescer (0.2 s windows) over steps sampled at most every 0.25 s (peak_phase,
                       phase_peaks, phase_own_peaks, segment_peaks, saved_split on sampled steps only), so windows
                       with and without a sampled step alternate as the real ones do. A model of the real stream,
                       not a recording: say so when quoting it.

  python3 bench/hub_apply_cost.py --synthetic real --agents 16 --seconds 30 --out bench/results/hub_apply_real.json
  python3 bench/hub_apply_cost.py --recording tests/fixtures/tui_h200_16_agents.jsonl --out /tmp/x.json
  --cpu-smoke: a tiny run (2 agents, 3 s) for tests.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import platform
import pstats
import random
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batchmon import memory_model, protocol  # noqa: E402
from batchmon.agent.coalesce import StepCoalescer  # noqa: E402
from batchmon.monitor.hub_state import HubState  # noqa: E402
from batchmon.monitor.replay import read_recording  # noqa: E402
from batchmon.protocol import COMPONENTS, Hello, ModelInfo, new_step, with_saved_split  # noqa: E402

MIB = 2**20
ARGV = ("examples/train_mlp.py", "--device", "cuda", "--steps", "0", "--sleep", "0.004", "--batch-size", "256",
        "--hidden", "512", "--layers", "8")


# ---------------------------------------------------------------------------------------------- generated streams


def _hello(pid: int, t: float) -> dict[str, Any]:
    msg = Hello(pid=pid, host="bench", argv=ARGV, python="3", torch="2", device="cuda:0", nvml_uuid="GPU-bench",
                rank=0, local_rank=0, world_size=1, model=ModelInfo("MLP", 2_000_000, 8_000_000), optimizer="Adam",
                time=t)
    return json.loads(protocol.encode(msg))


def _fake_step(i: int, n: int, t: float, rate: float, jitter: random.Random):
    """bench/load.py --gpu's peer step: the same figures step after step, phases every 16th step."""
    comps = {name: 4_000_000 * (k + 1) for k, name in enumerate(COMPONENTS)}
    peak = sum(comps.values())
    sampled = n % 16 == 0
    return new_step(n, t, jitter.uniform(0.97, 1.03) / rate, 256, comps, peak - comps["activations"], peak,
                    (peak // MIB + 8) * MIB, 0, 0, (peak // MIB + 8) * MIB + 500 * MIB, "input dim 0", 1, 1,
                    "optimizer" if sampled else None,
                    {"forward": peak - 10 * MIB, "backward": peak - 6 * MIB, "optimizer": peak} if sampled else None)


class _RealAgent:
    """Steps as the real agent makes them for an MLP on CUDA (batchmon.agent.step_meter): a sampled step (first 3,
    then every 10th at most every 0.25 s) resets the allocator's peak and carries the phase figures; the others
    carry the last sampled components, with ``other`` from the allocator's peak (read at most every 0.05 s), which
    since the previous read may include a few MiB more or less (``noisy``: "real-noisy"; "real" keeps every memory
    figure the same step after step, so the only thing that differs between windows is whether a sampled step
    was in it: the least the real stream does)."""

    def __init__(self, index: int, noisy: bool = False) -> None:
        self.noisy = noisy  # allocator and NVML figures that move by a few MiB (else: the same every step)
        self.r = random.Random(index)
        self.hidden = (256, 512, 768, 1024)[index % 4]
        self.last_sample = -1.0
        self.last_read = -1.0
        self.other = 60 * MIB
        self.split: dict[str, int] | None = None
        self.device_used = 900 * MIB + index * 2 * MIB
        self.nvml_read = -1.0

    def step(self, n: int, t: float, rate: float):
        base = {"parameters": 8 * self.hidden * self.hidden * 4, "gradients": 8 * self.hidden * self.hidden * 4,
                "optimizer": 16 * self.hidden * self.hidden * 4, "activations": 256 * self.hidden * 4 * 24,
                "batch": 256 * 784 * 4}
        sampled = n <= 3 or (n % 10 == 0 and t - self.last_sample >= 0.25)
        if self.noisy and (sampled or t - self.last_read >= 0.05):
            self.last_read = t
            self.other = 60 * MIB + (self.r.choice((0, 0, 1, 2)) * 2 * MIB if not sampled else 0)
        if self.noisy and t - self.nvml_read >= 1.0:  # NVML's per-process figure: read once a second
            self.nvml_read = t
            self.device_used = 900 * MIB + self.r.choice((0, 0, 2)) * MIB
        comps = dict(base, other=self.other)
        peak = sum(comps.values())
        allocated = peak - comps["activations"] - self.other // 2
        s = new_step(n, t, self.r.uniform(0.97, 1.03) / rate, 256, comps, allocated, peak,
                     (peak // (20 * MIB) + 2) * 20 * MIB, 0, 0, self.device_used, "input dim 0", 1, 1,
                     "backward" if sampled else None,
                     {"forward": peak - 8 * MIB, "backward": peak, "optimizer": peak} if sampled else None,
                     {"forward": peak - 8 * MIB, "backward": peak, "optimizer": allocated + 4 * MIB}
                     if sampled else None,
                     {"forward": peak - 8 * MIB, "loss_backward": peak - 7 * MIB, "backward": peak,
                      "optimizer": allocated + 4 * MIB} if sampled else None)
        if sampled:
            self.last_sample = t
            if n >= 10 and self.split is None:
                a = comps["activations"]
                self.split = {"batch": comps["batch"], "saved": a, "in_blocks": a - 2 * MIB,
                              "block_inputs": a // 3, "blocks": 8}
            if self.split is not None:
                s = with_saved_split(s, self.split)
        return s


def _nvml_dict(agents: int, t: float) -> dict[str, Any]:
    """An H200 with the agents' processes on it, as the NVML probe's sample dict."""
    from batchmon.probes.nvml import DeviceMemory, DeviceSample, GpuProcess, NvmlSample, sample_to_dict

    total = 150_754_820_096
    used = agents * 900 * MIB + 600 * MIB
    dev = DeviceSample(index=0, name="NVIDIA H200", uuid="GPU-bench", memory=DeviceMemory(total, used, 0, total - used),
                       utilization=40, temperature=40, power=200.0,
                       processes=tuple(GpuProcess(1000 + a, 900 * MIB) for a in range(agents)))
    return sample_to_dict(NvmlSample(True, None, "580", (dev,), time=t))


def generated(kind: str, agents: int, seconds: float, rate: float, interval: float) -> Iterator[dict[str, Any]]:
    """Hub records in time order: each agent's hello, its windows (the agent's own StepCoalescer), a tick every
    ``interval`` with an NVML sample of one H200 holding the agents' processes just before it (no host records:
    those are timed from a recording)."""
    t0 = 1_800_000_000.0
    heap: list[tuple[float, int, dict[str, Any]]] = []
    for a in range(agents):
        key = f"bench:{1000 + a}"
        heap.append((t0 + a * 1e-4, 0, {"t": t0, "kind": "agent", "source": "local", "key": key,
                                       "data": _hello(1000 + a, t0)}))
        coal = StepCoalescer()
        jitter = random.Random(a)
        real = _RealAgent(a, noisy=kind == "real-noisy")
        t, n = t0 + 0.01 * a, 0
        while t < t0 + seconds:
            n += 1
            t += jitter.uniform(0.97, 1.03) / rate
            step = real.step(n, t, rate) if kind != "fake" else _fake_step(a, n, t, rate, jitter)
            for i, m in enumerate(coal.add(step, t) + (coal.flush(t) if coal.due(t) else [])):
                heap.append((t + 0.002, n * 4 + i, {"t": t + 0.002, "kind": "agent", "source": "local", "key": key,
                                                     "data": json.loads(protocol.encode(m))}))
    k = 1
    while t0 + k * interval < t0 + seconds:
        tk = t0 + k * interval
        # NVML's sample just before each tick (the hub samples, then snapshots): the device's total is what the
        # prediction's largest-batch search runs against (without one, a refit skips that search)
        heap.append((tk - 0.01, -2, {"t": tk - 0.01, "kind": "nvml", "source": "local",
                                     "data": _nvml_dict(agents, tk - 0.01)}))
        heap.append((tk, -1, {"t": tk, "kind": "tick", "source": "local"}))
        k += 1
    heap.sort(key=lambda e: (e[0], e[1]))
    for _, _, rec in heap:
        yield rec


def recorded(path: str) -> Iterator[dict[str, Any]]:
    for rec, _why, _n in read_recording(path).records():
        if rec is not None:
            yield rec


# ---------------------------------------------------------------------------------------------- measuring


def _label(rec: dict[str, Any]) -> str:
    kind = rec.get("kind")
    if kind == "agent":
        data = rec.get("data")
        t = data.get("type") if isinstance(data, dict) else None
        if t == "step" and isinstance(data, dict):
            sampled = data.get("peak_phase") is not None
            return f"agent:step({'sampled' if sampled else 'plain'}{',window' if (data.get('steps') or 1) > 1 else ''})"
        return f"agent:{t}"
    return str(kind)


class _FitCounter:
    def __init__(self) -> None:
        self.calls = 0
        self.seconds = 0.0
        self.calls_before = 0  # before the counted part (after the warm-up)
        self.seconds_before = 0.0
        self.orig = memory_model.fit

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        t = time.perf_counter()
        try:
            return self.orig(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - t


def _shown(prediction: Any) -> Any:
    """What a prediction says apart from its basis (the step range and step times it read)."""
    if prediction is None:
        return None
    return (prediction.batch_size, tuple(prediction.components.items()), prediction.total, prediction.peak_allocated,
            prediction.max_batch, prediction.headroom, prediction.margin, prediction.band, prediction.max_batch_central,
            prediction.micro_batch)


def _new_fits_same_answer(state: HubState, last: dict[str, Any]) -> int:
    """After a snapshot: how many agents show a new fit (a fit time not seen before for the agent: hub_state
    answers figures that come back from their earlier fit, showing its time again) that answers as the
    prediction shown before it."""
    same = 0
    for src in state._sources.values():  # noqa: SLF001 - a bench looking inside
        for agent in list(src.agents.values()):
            seen, shown = last.get(agent.key, (set(), None))
            t_fit = agent.prediction_time
            if t_fit is not None and t_fit not in seen:
                same += bool(seen) and shown == _shown(agent.prediction)
                seen.add(t_fit)
            last[agent.key] = (seen, _shown(agent.prediction))
    return same


def measure(records: list[dict[str, Any]], interval: float, profile: bool, warmup: float = 0.0) -> dict[str, Any]:
    """One pass: each record ingested, a snapshot at each tick (the tick's time). Only what happens ``warmup``
    recorded seconds after the first record is counted (the first steps' refits, the history filling)."""
    state = HubState()
    last_pred: dict[str, Any] = {}
    same_refits = 0
    fits = _FitCounter()
    memory_model.fit = fits  # hub_state calls memory_model.fit through the module: counted here
    prof = cProfile.Profile() if profile else None
    per: dict[str, list[float]] = defaultdict(lambda: [0, 0.0, 0])  # label -> [count, seconds, calls]
    snap = [0, 0.0, 0]
    fits_in_snapshots = 0
    clock = time.perf_counter
    first_t = last_t = start = None
    try:
        for rec in records:
            t = rec.get("t")
            if isinstance(t, (int, float)):
                start = t if start is None else start
                if t - start < warmup:
                    state.ingest(rec)
                    if rec.get("kind") == "tick":
                        state.snapshot(float(t), interval)
                        _new_fits_same_answer(state, last_pred)  # the fit times seen before the counted part
                    continue
                if first_t is None:
                    first_t, fits.calls_before, fits.seconds_before = t, fits.calls, fits.seconds
                last_t = t
            label = _label(rec)
            if prof is not None:
                before = _calls(prof)
                prof.enable()
                state.ingest(rec)
                prof.disable()
                per[label][2] += _calls(prof) - before
            else:
                s = clock()
                state.ingest(rec)
                per[label][1] += clock() - s
            per[label][0] += 1
            if rec.get("kind") == "tick":
                f0 = fits.calls
                if prof is not None:
                    before = _calls(prof)
                    prof.enable()
                    state.snapshot(float(t), interval)
                    prof.disable()
                    snap[2] += _calls(prof) - before
                else:
                    s = clock()
                    state.snapshot(float(t), interval)
                    snap[1] += clock() - s
                snap[0] += 1
                fits_in_snapshots += fits.calls - f0
                same_refits += _new_fits_same_answer(state, last_pred)
    finally:
        memory_model.fit = fits.orig
    span = (last_t - first_t) if first_t is not None and last_t is not None else None
    out: dict[str, Any] = {"recorded_seconds": round(span, 3) if span else None, "kinds": {}}
    for label, (n, sec, calls) in sorted(per.items()):
        out["kinds"][label] = {"count": n, "calls_per_record": round(calls / n, 1) if profile else None,
                               "us_per_record": None if profile else round(sec / n * 1e6, 2)}
    out["snapshots"] = {"count": snap[0], "calls_per_snapshot": round(snap[2] / snap[0], 1) if profile and snap[0]
                        else None, "ms_per_snapshot": None if profile or not snap[0] else round(snap[1] / snap[0] * 1e3, 3),
                        "fits": fits_in_snapshots, "refits_same_prediction": same_refits, "fit_ms_each": round(fits.seconds / fits.calls * 1e3, 3)
                        if fits.calls and not profile else None, "fits_during_warmup": fits.calls_before}
    if not profile and span:
        ingest = sum(v[1] for v in per.values())
        out["ms_per_recorded_second"] = {"ingest": round(ingest / span * 1e3, 3),
                                         "snapshots": round(snap[1] / span * 1e3, 3),
                                         "of_which_fits": round((fits.seconds - fits.seconds_before) / span * 1e3, 3)}
    if prof is not None:
        stats = pstats.Stats(prof)
        table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]  # set by Stats, not in typeshed
        rows = sorted(table.items(), key=lambda kv: -kv[1][3])[:25]  # by cumulative time
        out["top_cumulative"] = [{"function": f"{Path(fn).name}:{line}:{name}", "calls": nc, "tottime_s": round(tt, 4),
                                  "cumtime_s": round(ct, 4)} for (fn, line, name), (cc, nc, tt, ct, _) in rows]
        out["total_calls"] = stats.total_calls  # type: ignore[attr-defined]  # likewise
    return out


def _calls(prof: cProfile.Profile) -> int:
    """Function calls the profiler has counted so far (its stats are built from a snapshot of them)."""
    return sum(entry.callcount for entry in prof.getstats())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="HubState cost per applied message and per snapshot")
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--recording", help="a batchmon recording (.jsonl)")
    src.add_argument("--synthetic", choices=("fake", "real", "real-noisy"), help="generated agent messages (see the docstring)")
    ap.add_argument("--agents", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=101.0, help="steps per second per generated agent")
    ap.add_argument("--interval", type=float, default=1.0, help="snapshot interval for generated streams")
    ap.add_argument("--warmup", type=float, default=20.0, help="recorded seconds not counted (history filling)")
    ap.add_argument("--repeat", type=int, default=3, help="timed passes (the best is kept)")
    ap.add_argument("--no-profile", action="store_true", help="skip the cProfile pass (call counts)")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny run: 2 agents, 3 s, 1 pass")
    ap.add_argument("--out", help="write the JSON result here")
    args = ap.parse_args(argv)
    if args.cpu_smoke:
        args.agents, args.seconds, args.repeat, args.warmup = 2, 3.0, 1, 1.0
        args.synthetic = args.synthetic or (None if args.recording else "real")
    if not args.recording and not args.synthetic:
        print("hub_apply_cost: give --recording FILE or --synthetic fake|real", file=sys.stderr)
        return 2
    if args.agents < 1 or args.seconds <= 0 or args.rate <= 0 or args.interval <= 0 or args.repeat < 1:
        print("hub_apply_cost: --agents, --seconds, --rate, --interval and --repeat must be positive", file=sys.stderr)
        return 2
    try:
        if args.recording:
            records = list(recorded(args.recording))
            interval = float(read_recording(args.recording).interval or 1.0)
        else:
            records = list(generated(args.synthetic, args.agents, args.seconds, args.rate, args.interval))
            interval = args.interval
    except OSError as exc:
        print(f"hub_apply_cost: {exc}", file=sys.stderr)
        return 1
    timed = [measure(records, interval, False, args.warmup) for _ in range(args.repeat)]
    best = min(timed, key=lambda r: sum(r.get("ms_per_recorded_second", {}).get(k, 0) for k in ("ingest", "snapshots")))
    result: dict[str, Any] = {
        "source": args.recording or f"synthetic:{args.synthetic}",
        "agents": None if args.recording else args.agents, "rate": None if args.recording else args.rate,
        "interval": interval, "warmup_s": args.warmup, "records": len(records), "host": platform.node(), "python": platform.python_version(),
        "time": time.time(), "timed_best": best,
        "timed_all_ms_per_s": [r.get("ms_per_recorded_second") for r in timed],
        "profiled": None if args.no_profile else measure(records, interval, True, args.warmup),
    }
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text + "\n")
    b = best
    print(f"{result['source']}: {len(records)} records over {b['recorded_seconds']} s; "
          f"hub ms per recorded second: {b.get('ms_per_recorded_second')}; snapshots {b['snapshots']}")
    for label, row in b["kinds"].items():
        calls = result["profiled"]["kinds"][label]["calls_per_record"] if result["profiled"] else None
        print(f"  {label:34s} n={row['count']:6d}  {row['us_per_record']:8.1f} us  {calls} calls")
    if result["profiled"]:
        print(f"  snapshot: {result['profiled']['snapshots']['calls_per_snapshot']} calls each")
    return 0


if __name__ == "__main__":
    sys.exit(main())
