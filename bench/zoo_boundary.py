"""Is a zoo what-if's real largest batch one number? Trial orders at the boundary, each on a fresh runner.

Zoo runs 11-13 (bench/results/predict_zoo_h200_run1{1,2,3}.json) found T5-small checkpointing's real largest
batch at 318, 321 and 351 with the same bench and models, each bisecting from that run's prediction (298, 303,
346). Every trial starts from a clean allocator (bench_runner.Runner.trial), so if trials were independent the
three runs could not disagree: run 12 failed at 330 where run 13 ran 346. This runs given trial orders, each on a
fresh runner (new model and optimizer, one step at the observed small batch first, as predict_zoo does), and
records every trial's outcome and allocator figures: whether the outcome of a batch depends on the trials before
it (and so what a user who starts at the predicted batch gets).

    python3 bench/zoo_boundary.py --arch t5-small --what-if checkpointing --orders 346 325 330 321 351 303,312,330,346 \
        --out bench/results/zoo_boundary_h200.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from predict_accuracy import CudaDevice, Runner  # noqa: E402
from predict_zoo import GIB, _cleanup, _trial, zoo  # noqa: E402


def run_order(entry: Any, what_if: str, order: list[int], dev: Any) -> list[dict[str, Any]]:
    """One fresh runner of the architecture (under the what-if), then the trials in this order."""
    arch = entry.arch
    if what_if == "amp":
        variant = replace(arch, amp=True)
    elif what_if == "checkpointing":
        variant = replace(arch, build=entry.checkpointed)
    else:
        variant = arch
    _cleanup(dev)
    runner = Runner(variant, dev)
    runner.step(arch.observe[1], count=False)  # optimizer state exists, as in predict_zoo's what-if runs
    log: list[dict[str, Any]] = []
    for b in order:
        _trial(runner, b, log)
    del runner
    _cleanup(dev)
    return log


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="t5-small")
    ap.add_argument("--what-if", default="checkpointing", choices=["none", "amp", "checkpointing"])
    ap.add_argument("--orders", nargs="+", required=True, help="trial orders, each comma-separated batch sizes")
    ap.add_argument("--device-memory-gib", type=float, default=24.0)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("zoo_boundary: needs a CUDA device", file=sys.stderr)
        return 2
    dev = CudaDevice()
    physical = dev.total
    cap = int(args.device_memory_gib * GIB)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / physical), dev.device)
    dev.total = cap
    entry = next(e for e in zoo(False) if e.arch.name == args.arch)
    out: dict[str, Any] = {"arch": args.arch, "what_if": args.what_if, "device_memory_gib": args.device_memory_gib,
                           "torch": torch.__version__, "device": torch.cuda.get_device_name(), "orders": []}
    t0 = time.perf_counter()
    for spec in args.orders:
        order = [int(x) for x in spec.split(",")]
        log = run_order(entry, args.what_if, order, dev)
        out["orders"].append({"order": order, "trials": log})
        print(f"{args.arch} {args.what_if} order {order}: "
              + ", ".join(f"{t['batch']} {'ok' if t['ok'] else 'OOM'}" for t in log), flush=True)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
