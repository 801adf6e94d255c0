#!/usr/bin/env python3
"""What one NVML sample costs beside N GPU processes, call by call (issue 14 point 3: the hub thread's NVML part).

Beside the H200's 16 fast jobs NvmlProbe.sample took ~1.9 ms, nvmlDeviceGetComputeRunningProcesses ~0.8 ms of it.
pynvml's process-list functions call the driver twice when the list is not empty (once for the count, once to fill
a buffer) and turn every entry into a Python object field by field. This times, with N torch processes holding
memory on cuda:0: the probe's whole sample, each field's pynvml call, and the process lists' raw driver calls -
the count-only call, and one call into a buffer already large enough (what batchmon.probes.nvml_lists does).

    OUT=out python3 bench/nvml_process_calls.py --children 16 [--samples 300] [--busy]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import sys
import time
from typing import Any, Callable

import subprocess

from nvml_common import CHILD_CODE, import_batchmon, pynvml_version


#: --busy: each child trains as the fast16 jobs do (small matmuls in a loop, ~100 steps/s) until its stdin closes
BUSY_CODE = r"""
import sys, threading, time, torch
n = int(sys.argv[1])
x = torch.empty(n, dtype=torch.uint8, device="cuda:0")
w = torch.randn(512, 512, device="cuda:0")
done = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), done.set()), daemon=True).start()
print("ready", 0, 0, flush=True)
while not done.is_set():
    a = torch.randn(256, 512, device="cuda:0")
    for _ in range(8):
        a = (a @ w).relu()
    a.sum().item()
    time.sleep(0.004)
"""


def start_children(n: int, nbytes: int, timeout: float = 240.0, busy: bool = False) -> list[subprocess.Popen]:
    """N torch processes holding ``nbytes`` of cuda:0 each, started together (one at a time took minutes)."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_CODE if busy else CHILD_CODE, str(nbytes)],
                              stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) for _ in range(n)]
    deadline = time.monotonic() + timeout
    for proc in procs:
        assert proc.stdout is not None
        while time.monotonic() < deadline and proc.poll() is None:
            if proc.stdout.readline().startswith("ready"):
                break
    return procs


def best_and_median(fn: Callable[[], Any], n: int) -> dict[str, float]:
    for _ in range(min(20, n)):
        fn()
    values = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        fn()
        values.append((clock() - t0) / 1000.0)
    values.sort()
    return {"min_us": round(values[0], 2), "median_us": round(values[len(values) // 2], 2),
            "p90_us": round(values[int(len(values) * 0.9)], 2), "n": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--children", type=int, default=16)
    p.add_argument("--mib", type=int, default=512, help="MiB each child holds")
    p.add_argument("--samples", type=int, default=300)
    p.add_argument("--busy", action="store_true", help="the children run small matmuls at ~100 steps/s")
    args = p.parse_args(argv)
    import_batchmon()
    try:
        import pynvml
    except ImportError:
        print("no pynvml")
        return 0
    children = start_children(args.children, args.mib << 20, busy=args.busy)
    try:
        from batchmon.probes.nvml import NvmlProbe

        probe = NvmlProbe()
        sample = probe.sample()
        procs = len(sample.devices[0].processes) if sample.devices else 0
        pynvml.nvmlInit()
        h = pynvml.nvmlDeviceGetHandleByIndex(0)
        out: dict[str, Any] = {"host": platform.node(), "python": platform.python_version(),
                               "pynvml": pynvml_version(), "children": args.children, "busy": args.busy, "processes_seen": procs}
        calls: dict[str, Callable[[], Any]] = {
            "probe.sample": probe.sample,
            "compute_processes (pynvml)": lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(h),
            "graphics_processes (pynvml)": lambda: pynvml.nvmlDeviceGetGraphicsRunningProcesses(h),
            "memory_info_v2": lambda: pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2),
            "utilization": lambda: pynvml.nvmlDeviceGetUtilizationRates(h),
            "temperature": lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "power": lambda: pynvml.nvmlDeviceGetPowerUsage(h),
        }
        fn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetComputeRunningProcesses_v3")
        gfn = pynvml._nvmlGetFunctionPointer("nvmlDeviceGetGraphicsRunningProcesses_v3")
        struct = pynvml.c_nvmlProcessInfo_v3_t if hasattr(pynvml, "c_nvmlProcessInfo_v3_t") else \
            pynvml.c_nvmlProcessInfo_t
        buf = (struct * 64)()

        def count_only(f: Any = fn) -> int:
            c = ctypes.c_uint(0)
            f(h, ctypes.byref(c), None)
            return c.value

        def one_call(f: Any = fn) -> list[tuple[int, int]]:
            c = ctypes.c_uint(64)
            ret = f(h, ctypes.byref(c), buf)
            assert ret == 0, ret
            return [(buf[i].pid, buf[i].usedGpuMemory) for i in range(c.value)]

        calls["compute raw: count only"] = count_only
        calls["compute raw: one call, 64-entry buffer"] = one_call
        calls["graphics raw: count only"] = lambda: count_only(gfn)
        try:
            from batchmon.probes import nvml_lists  # the probe's one-call lists, where this tree has them

            lister = nvml_lists.ProcessLists(pynvml)
            calls["nvml_lists compute"] = lambda: lister.get(h, "compute")
            calls["nvml_lists graphics"] = lambda: lister.get(h, "graphics")
        except ImportError:
            pass
        out["raw_compute_entries"] = len(one_call())
        out["calls"] = {name: best_and_median(f, args.samples) for name, f in calls.items()}
        for name, r in out["calls"].items():
            print(f"{name:42s} min {r['min_us']:9.1f} us  median {r['median_us']:9.1f} us  p90 {r['p90_us']:9.1f}")
        path = os.path.join(os.environ.get("OUT", "."), f"nvml_process_calls{'_busy' if args.busy else ''}.json")
        with open(path, "w") as f:
            json.dump(out, f, indent=1)
        print(json.dumps({k: v for k, v in out.items() if k != "calls"}))
    finally:
        for c in children:
            if c.stdin is not None:
                c.stdin.close()
        for c in children:
            c.wait(timeout=30)
    return 0


if __name__ == "__main__":
    sys.exit(main())
