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
    python3 bench/zoo_boundary.py --plan t5-small:checkpointing:bisect=303-321 gpt2-fp32:checkpointing:70/71 \
        --out F.json     # the largest batch a fresh job starts at; single fresh trials
    python3 bench/zoo_boundary.py --process-per-probe --plan t5-small:checkpointing:bisect=303-351 --out F.json
                         # each probe the first trial of a new process
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from predict_accuracy import Runner  # noqa: E402
from predict_zoo import _cleanup, _trial, emulated_device, zoo  # noqa: E402


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


def probe_in_new_process(arch: str, what_if: str, batch: int, memory_gib: float, cpu_smoke: bool) -> dict[str, Any]:
    """One trial as the first thing a new Python process does on the GPU (nothing earlier in the process can
    have shaped the allocator or the libraries' workspaces): this script again, one single-trial plan."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        cmd = [sys.executable, __file__, "--plan", f"{arch}:{what_if}:{batch}", "--device-memory-gib", str(memory_gib),
               "--out", str(out)] + (["--cpu-smoke"] if cpu_smoke else [])
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        trial: dict[str, Any] = json.loads(out.read_text())["plans"][0]["orders"][0]["trials"][0]
    trial["new_process"] = True
    return trial


def fresh_bisect(entry: Any, what_if: str, lo: int, hi: int, dev: Any,
                 probe: Callable[[int], dict[str, Any]] | None = None) -> dict[str, Any]:
    """The largest batch that runs as a fresh runner's first trial, between ``lo`` (must run) and ``hi`` (must
    fail): each probe on its own fresh runner, as a user who starts a job at that batch (``probe``: how one
    batch is tried; default a fresh runner in this process)."""
    if probe is None:
        def probe(b: int) -> dict[str, Any]:
            return run_order(entry, what_if, [b], dev)[0]
    probes: list[dict[str, Any]] = []
    ends = []
    for b in (lo, hi):
        t = probe(b)
        probes.append(t)
        ends.append(t["ok"])
    if ends != [True, False]:
        return {"lo": lo, "hi": hi, "largest_fresh": None, "probes": probes,
                "note": f"the ends did not bracket: {lo} {'ran' if ends[0] else 'failed'}, "
                        f"{hi} {'ran' if ends[1] else 'failed'}"}
    while hi - lo > 1:
        mid = (lo + hi) // 2
        t = probe(mid)
        probes.append(t)
        lo, hi = (mid, hi) if t["ok"] else (lo, mid)
    return {"lo": lo, "hi": hi, "largest_fresh": lo, "probes": probes}


def _outcomes(trials: list[dict[str, Any]]) -> str:
    return ", ".join(f"{t['batch']} {'ok' if t['ok'] else 'OOM'}" for t in trials)


def _plan(spec: str) -> tuple[str, str, str]:
    """ARCH:WHAT_IF:ORDERS where ORDERS is 'b,b,...[/b,b,...]' (trial orders, each on a fresh runner) or
    'bisect=LO-HI' (fresh_bisect)."""
    arch, what_if, orders = spec.split(":")
    return arch, what_if, orders


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="t5-small")
    ap.add_argument("--what-if", default="checkpointing", choices=["none", "amp", "checkpointing"])
    ap.add_argument("--orders", nargs="+", default=[], help="trial orders, each comma-separated batch sizes")
    ap.add_argument("--plan", nargs="+", default=[],
                    help="ARCH:WHAT_IF:ORDERS, ORDERS 'b,b/b,b' (orders, each on a fresh runner) or 'bisect=LO-HI' "
                         "(the largest batch that runs as a fresh runner's first trial); instead of --arch/--orders")
    ap.add_argument("--process-per-probe", action="store_true",
                    help="bisect plans try each batch as the first trial of a new process (not a fresh runner in "
                         "this one): what a job started at that batch gets")
    ap.add_argument("--device-memory-gib", type=float, default=24.0)
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU, a fake device: tests the script")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    made = emulated_device("zoo_boundary", args.cpu_smoke, args.device_memory_gib)
    if made is None:
        return 2
    dev, emulation = made
    entries = {e.arch.name: e for e in zoo(args.cpu_smoke)}
    plans = [_plan(p) for p in args.plan] or [(args.arch, args.what_if, "/".join(args.orders))]
    out: dict[str, Any] = {"device_memory_gib": args.device_memory_gib, "emulation": emulation, "torch": torch.__version__,
                           "device": "cpu-smoke" if args.cpu_smoke else torch.cuda.get_device_name(), "plans": []}
    t0 = time.perf_counter()
    for arch, what_if, orders in plans:
        entry = entries[arch]
        item: dict[str, Any] = {"arch": arch, "what_if": what_if}
        if orders.startswith("bisect="):
            lo, hi = (int(x) for x in orders.split("=", 1)[1].split("-"))
            new_process = None
            if args.process_per_probe:
                def new_process(b: int, a: str = arch, w: str = what_if) -> dict[str, Any]:
                    return probe_in_new_process(a, w, b, args.device_memory_gib, args.cpu_smoke)
            item["fresh_bisect"] = found = fresh_bisect(entry, what_if, lo, hi, dev, new_process)
            found["process_per_probe"] = args.process_per_probe
            print(f"{arch} {what_if}: largest batch as a fresh runner's first trial in [{lo}, {hi}]: "
                  f"{found['largest_fresh']} ({_outcomes(found['probes'])})"
                  f"{' - ' + found['note'] if found.get('note') else ''}", flush=True)
        else:
            item["orders"] = []
            for spec in orders.split("/"):
                order = [int(x) for x in spec.split(",")]
                log = run_order(entry, what_if, order, dev)
                item["orders"].append({"order": order, "trials": log})
                print(f"{arch} {what_if} order {order}: {_outcomes(log)}", flush=True)
        out["plans"].append(item)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} ({out['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
