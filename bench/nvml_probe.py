#!/usr/bin/env python3
"""Cost of one full NvmlProbe.sample() of one device (target: <= 50 us), with single NVML calls for reference.

    OUT=out python3 bench/nvml_probe.py [--samples 2000] [--device 0] [--child-gib 0]

--child-gib N starts a torch process holding N GiB on cuda:0 first, so the process lists are not empty (an empty
list is one NVML call, a non-empty one two). Writes $OUT/nvml_probe.json and prints it. Without NVML it says
so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from typing import Any, Callable

from nvml_common import GiB, Child, import_batchmon, out_dir, percentile, pynvml_version, write_json

TARGET_US = 50.0


def timings(fn: Callable[[], Any], n: int, warmup: int) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    clock = time.perf_counter_ns
    values = []
    for _ in range(n):
        t0 = clock()
        fn()
        values.append((clock() - t0) / 1000.0)
    return {"median_us": round(statistics.median(values), 2), "p90_us": round(percentile(values, 0.9), 2),
            "p99_us": round(percentile(values, 0.99), 2), "min_us": round(min(values), 2),
            "mean_us": round(statistics.fmean(values), 2), "n": n}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--device", type=int, default=0)
    parser.add_argument("--child-gib", type=float, default=0.0)
    args = parser.parse_args(argv)
    out = out_dir()
    import_batchmon()
    from batchmon.probes.nvml import NvmlProbe

    probe = NvmlProbe(indices=[args.device])
    first = probe.sample()
    if not first.available:
        result = {"available": False, "error": first.error}
        write_json(out / "nvml_probe.json", result)
        print(f"NVML unavailable: {first.error}; nothing to measure on this machine.")
        return 0
    if not first.devices:
        print(f"no GPU with index {args.device}")
        write_json(out / "nvml_probe.json", {"available": True, "error": f"no GPU with index {args.device}"})
        return 1

    import pynvml

    child = Child(int(args.child_gib * GiB)) if args.child_gib > 0 else None
    try:
        if child is not None and child.error:
            print(child.error)
            return 1
        dev = probe.sample().devices[0]
        sample_cost = timings(probe.sample, args.samples, args.warmup)

        h = pynvml.nvmlDeviceGetHandleByIndex(args.device)
        calls: dict[str, Callable[[], Any]] = {
            "memory_info_v2": lambda: pynvml.nvmlDeviceGetMemoryInfo(h, version=pynvml.nvmlMemory_v2),
            "memory_info_v1": lambda: pynvml.nvmlDeviceGetMemoryInfo(h),
            "utilization": lambda: pynvml.nvmlDeviceGetUtilizationRates(h),
            "temperature": lambda: pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            "power": lambda: pynvml.nvmlDeviceGetPowerUsage(h),
            "compute_processes": lambda: pynvml.nvmlDeviceGetComputeRunningProcesses(h),
            "graphics_processes": lambda: pynvml.nvmlDeviceGetGraphicsRunningProcesses(h),
        }
        single: dict[str, Any] = {}
        for name, fn in calls.items():
            try:
                single[name] = timings(fn, args.samples, args.warmup // 4)
            except Exception as exc:  # NotSupported on this device: say so, measure the rest
                single[name] = {"error": f"{type(exc).__name__}: {exc}"}
        result = {
            "available": True,
            "device": {"index": dev.index, "name": dev.name, "driver": first.driver,
                       "processes": len(dev.processes), "memory_v2": dev.memory is not None and dev.memory.reserved is not None},
            "host": platform.node(),
            "python": platform.python_version(),
            "pynvml": pynvml_version(),
            "child_gib": args.child_gib,
            "sample": sample_cost,
            "single_calls": single,
            "target_us": TARGET_US,
            "meets_target": sample_cost["median_us"] <= TARGET_US,
        }
    finally:
        if child is not None:
            child.stop()
    write_json(out / "nvml_probe.json", result)
    print(json.dumps(result, indent=2))
    print(f"one full sample of GPU{dev.index}: median {sample_cost['median_us']} us, p90 {sample_cost['p90_us']} us "
          f"(target <= {TARGET_US:.0f} us: {'met' if result['meets_target'] else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
