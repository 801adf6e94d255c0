"""Where the monitor's memory goes beside fast agents: the hub, in this process, traced by tracemalloc.

    python3 bench/monitor_rss.py --agents 16 --rate 100 --prefill 1000 --out monitor_rss.json
    python3 bench/monitor_rss.py --cpu-smoke --out /tmp/monitor_rss_smoke.json

Why: issue 14 point 3 holds the monitor's RSS beside 16 fast agents to nvitop's + 20 MiB, and most of what the
monitor adds beside agents is their kept history (HISTORY_LIMIT steps each) and what the hub fits on it. RSS
on a shared box moves by a MiB between runs; tracemalloc's bytes are deterministic for the same input. The
peers are bench/load.py's (``--serve``, ``--gpu``: the figures of a steady CUDA job, coalesced as the real agent
does) in their own processes, each sending ``--prefill`` steps of history on connect; the hub runs here with NVML
answered from the H200 recording (tests/nvml_recording.py), the peers listed as the GPU's processes, so the
memory model is fitted as on the H200. The Textual app is not here (bench/ab_monitor.py and bench/vs_nvitop.py
take the whole monitor's RSS in a terminal).

Writes: the RSS before and after, tracemalloc's bytes by file and by line (the largest), the steps kept, bytes
per kept step (the hub's traced growth over the steps kept). Exit 0 when every peer's history arrived.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # nvml_recording: test and bench tooling, not in the package


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def replay_probe(path: Path, pids: list[int]):
    """An NvmlProbe answering from an H200 recording, listing ``pids`` as the GPU's processes (~850 MiB each)."""
    from batchmon.probes.nvml import NvmlProbe
    from nvml_recording import ReplayBackend, load_recording

    data = load_recording(path)
    for s in data["samples"]:
        for call in s["calls"]:
            if call.get("fn") == "nvmlDeviceGetComputeRunningProcesses":
                call["value"] = [{"pid": pid, "usedGpuMemory": (850 + pid % 3 * 2) * 2**20,
                                  "gpuInstanceId": 4294967295, "computeInstanceId": 4294967295} for pid in pids]
    return NvmlProbe(backend=ReplayBackend(data, loop=True))


def pymalloc_stats() -> dict[str, int]:
    """Python's small-object allocator now (sys._debugmallocstats): its arenas' bytes against the bytes of the
    blocks in use; a gap is memory the allocator holds for objects that are gone (a burst's transients)."""
    import io
    import re

    r, w = os.pipe()
    saved = os.dup(2)
    try:
        os.dup2(w, 2)
        os.close(w)
        sys._debugmallocstats()
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    with io.open(r, "rb") as f:
        text = f.read().decode("utf-8", "replace")
    out = {}
    for key, label in (("arenas", "arenas allocated current"), ("arenas_highwater", "arenas highwater mark"),
                       ("in_use_bytes", "bytes in allocated blocks"), ("free_in_pools_bytes", "bytes in available blocks"),
                       ("empty_pools_bytes", "unused pools")):
        m = re.search(r"# *" + label + r"[^=]*=\s*([\d,]+)", text)
        if m:
            out[key] = int(m.group(1).replace(",", ""))
    return out


def recorded_uuid(path: Path) -> str:
    data = json.loads(path.read_text())
    for part in [data.get("init", [])] + [s["calls"] for s in data.get("samples", [])]:
        for call in part:
            if call.get("fn") == "nvmlDeviceGetUUID" and isinstance(call.get("value"), str):
                return call["value"]
    return "GPU-unknown"


def measure(args: argparse.Namespace) -> dict:
    from batchmon import protocol
    from batchmon.monitor.hub import Hub

    base = Path(tempfile.mkdtemp(prefix="bm_rss"))
    sockdir = protocol.ensure_socket_dir(base / "s")
    peers = subprocess.Popen(
        [sys.executable, str(HERE / "load.py"), "--serve", str(sockdir), "--agents", str(args.agents), "--rate",
         str(args.rate), "--coalesce", "--gpu", recorded_uuid(args.nvml), "--prefill", str(args.prefill),
         "--duration", str(args.settle + 120)], stdout=subprocess.PIPE, text=True)
    try:
        line = peers.stdout.readline() if peers.stdout else ""
        if not line.startswith("ready"):
            raise SystemExit(f"monitor_rss: the peers did not start: {line.strip()!r}")
        pids = [int(p) for p in line.split(":", 1)[1].split()]
        probe = replay_probe(args.nvml, pids)
        # what a monitor imports and opens once, before its baseline: the growth is what the agents cost
        Hub(interval=1.0, socket_dir=base, nvml_probe=replay_probe(args.nvml, pids)).sample_once()
        import batchmon.memory_model  # noqa: F401
        gc.collect()
        if not args.rss_only:
            tracemalloc.start(args.frames)
        rss0, traced0 = rss_mib(), tracemalloc.get_traced_memory()[0]
        before = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
        hub = Hub(interval=1.0, socket_dir=sockdir, nvml_probe=probe).start()
        try:
            deadline = time.monotonic() + 60
            received = False
            while time.monotonic() < deadline:
                snap = hub.snapshot()
                kept = sum(len(a.history) for a in snap.agents)
                if len(snap.agents) >= args.agents and kept >= args.agents * args.prefill:
                    received = True
                    break
                time.sleep(0.1)
            time.sleep(args.settle)  # live steps and a few refits, as a monitor that has run a while
            snap = hub.snapshot()
            kept = sum(len(a.history) for a in snap.agents)
            del snap
            gc.collect()
            after = tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None
            traced = tracemalloc.get_traced_memory()[0] - traced0
            rss1 = rss_mib()
            trimmed = None
            pymalloc = pymalloc_stats()
            if args.rss_only:
                try:  # what glibc's heap holds free (freed line buffers of the history bursts): given back
                    import ctypes
                    ctypes.CDLL("libc.so.6").malloc_trim(0)
                    trimmed = round(rss_mib(), 2)
                except OSError:
                    pass
        finally:
            hub.stop()
        tracemalloc.stop()
    finally:
        peers.terminate()
        try:
            peers.wait(30)
        except subprocess.TimeoutExpired:
            peers.kill()
            peers.wait()
    by_file = after.compare_to(before, "filename") if after and before else []
    by_line = after.compare_to(before, "lineno") if after and before else []
    short = lambda p: str(p).replace(str(ROOT) + "/", "").replace(sys.prefix + "/", "")  # noqa: E731
    return {
        "agents": args.agents, "rate": args.rate, "prefill": args.prefill, "settle_s": args.settle,
        "all_histories_received": received, "steps_kept": kept, "rss_before_mib": round(rss0, 2),
        "rss_after_mib": round(rss1, 2), "rss_after_malloc_trim_mib": trimmed,
        "pymalloc": pymalloc, "tracemalloc": not args.rss_only,
        "traced_growth_bytes": traced,
        "traced_bytes_per_kept_step": round(traced / kept, 1) if kept and not args.rss_only else None,
        "rss_bytes_per_kept_step": round((rss1 - rss0) * 2**20 / kept, 1) if kept else None,
        "by_file": [{"file": short(d.traceback[0].filename), "bytes": d.size_diff, "blocks": d.count_diff}
                    for d in by_file[:args.top] if d.size_diff > 0],
        "by_line": [{"at": f"{short(d.traceback[0].filename)}:{d.traceback[0].lineno}", "bytes": d.size_diff,
                     "blocks": d.count_diff} for d in by_line[:args.top] if d.size_diff > 0],
        "load": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--agents", type=int, default=16)
    p.add_argument("--rate", type=float, default=100.0, help="steps per second per peer (default 100)")
    p.add_argument("--prefill", type=int, default=1000, help="history steps each peer sends on connect")
    p.add_argument("--settle", type=float, default=5.0, help="seconds of live steps after the histories arrived")
    p.add_argument("--nvml", type=Path, default=ROOT / "tests" / "fixtures" / "nvml_h200_recording.json")
    p.add_argument("--frames", type=int, default=1, help="tracemalloc frames kept per allocation")
    p.add_argument("--rss-only", action="store_true",
                   help="no tracemalloc (its own traces cost ~RSS): the RSS alone, and after malloc_trim")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--cpu-smoke", action="store_true", help="4 agents, 100 steps of history, 1 s: checks it runs")
    p.add_argument("--out", type=Path, default=None, help="write the result as JSON here")
    args = p.parse_args(argv)
    if args.cpu_smoke:
        args.agents, args.prefill, args.settle = 4, 100, 1.0
    if args.agents < 1 or args.prefill < 0 or args.rate <= 0 or args.settle < 0:
        print("monitor_rss: --agents, --rate must be positive, --prefill and --settle not negative", file=sys.stderr)
        return 2
    if not args.nvml.is_file():
        print(f"monitor_rss: no such NVML recording: {args.nvml}", file=sys.stderr)
        return 2
    result = measure(args)
    print(f"monitor_rss: {result['agents']} agents, {result['steps_kept']} steps kept; RSS "
          f"{result['rss_before_mib']} -> {result['rss_after_mib']} MiB; traced +{result['traced_growth_bytes'] / 2**20:.2f} "
          f"MiB, {result['traced_bytes_per_kept_step']} B a kept step; after malloc_trim "
          f"{result['rss_after_malloc_trim_mib']} MiB")
    for row in result["by_file"][:10]:
        print(f"  {row['bytes'] / 2**20:7.3f} MiB  {row['blocks']:7d} blocks  {row['file']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result["all_histories_received"] else 1


if __name__ == "__main__":
    sys.exit(main())
