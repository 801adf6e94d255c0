"""Re-evaluate a predict_accuracy results JSON offline with the current memory model (no GPU, no torch).

For every architecture in the JSON: refit batchmon.memory_model on the recorded observed steps, predict the
largest batch, and compare it with the real OOM boundary the run measured. Two boundaries are shown: the
run's reported ``real_max_batch`` (with --quick a bisection to 0.5%) and the exact one from all recorded
trials (the largest batch that ran below the smallest batch that ran out of memory).

``--derive`` also prints, per architecture, the share of the proportional fragmentation estimate
(phi x pool growth) the margin needed at the first failing batch: the bytes the model's own total (predicted
peak + measured cache + context) left unused there, divided by phi x (predicted peak there - observed peak).
memory_model.FRAG_SURVIVAL is the largest of these, doubled (one run of four models).

Usage: python3 bench/recalibrate_margin.py [results.json ...] [--derive]
(default: bench/results/predict_accuracy_h200_run1.json). Exit 1 when a prediction is above its boundary or
more than 5% below it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from batchmon.memory_model import FRAG_SURVIVAL, WhatIf, fit  # noqa: E402
from batchmon.protocol import Step  # noqa: E402

DEFAULT = Path(__file__).resolve().parent / "results" / "predict_accuracy_h200_run1.json"
OPTIMIZERS = {"mlp": "Adam", "cnn": "SGD", "gpt": "AdamW", "gpt-amp-tied": "AdamW"}


def exact_boundary(trials: list[dict]) -> int | None:
    """Largest batch that ran, below the smallest that ran out of memory (None without an OOM trial)."""
    ooms = [t["batch"] for t in trials if not t["ok"]]
    if not ooms:
        return None
    first_fail = min(ooms)
    ok = [t["batch"] for t in trials if t["ok"] and t["batch"] < first_fail]
    return max(ok) if ok else 0


def evaluate(result: dict, device_total: int) -> dict:
    steps = [Step.from_dict(s) for s in result["observed"]]
    optimizer = OPTIMIZERS.get(result["arch"])
    model = fit(steps, optimizer=optimizer, amp="amp" in result["arch"])
    assert model is not None
    pred = model.max_batch(device_total) or 0
    real = result["real_max_batch"]
    exact = exact_boundary(result["trials"]) or real
    fail = exact + 1
    at_fail = model.predict(WhatIf(batch_size=fail), device_total=device_total, margin=0)
    growth = max(0.0, at_fail.peak_allocated - model.peak_line.at(model.reference_batch))
    needed = device_total - at_fail.total + 1  # margin that makes the first failing batch not fit
    fixed_terms = model.reserved_growth + (model.cache if model.alloc_retries > 0 else 0)
    share = max(0.0, needed - fixed_terms) / (model.frag_ratio * growth) if model.frag_ratio * growth > 0 else 0.0
    return {"arch": result["arch"], "predicted": pred, "old_predicted": result["predicted_max_batch"],
            "real": real, "exact": exact, "ratio": pred / real if real else None,
            "ratio_exact": pred / exact if exact else None, "context": model.context, "cache": model.cache,
            "frag_ratio": model.frag_ratio, "retries": model.alloc_retries,
            "margin": model.predict(WhatIf(batch_size=pred or 1), device_total=device_total).margin,
            "needed_share": share, "basis": model.basis}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", type=Path, default=[DEFAULT])
    ap.add_argument("--derive", action="store_true", help="print the fragmentation share each boundary needed")
    args = ap.parse_args(argv)
    bad = 0
    shares = []
    for path in args.files:
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            print(f"recalibrate_margin: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        print(f"{path.name}: {doc.get('device')} ({doc['device_total'] / 2**30:.2f} GiB), FRAG_SURVIVAL={FRAG_SURVIVAL}")
        print("| arch | predicted (was) | real (reported) | pred/real | real (exact) | pred/exact | context MiB "
              "| cache MiB | phi | retries (increase) | margin MiB |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for result in doc["results"]:
            e = evaluate(result, doc["device_total"])
            shares.append((e["arch"], e["needed_share"]))
            print(f"| {e['arch']} | {e['predicted']} ({e['old_predicted']}) | {e['real']} | {e['ratio']:.3f} "
                  f"| {e['exact']} | {e['ratio_exact']:.3f} | {e['context'] / 2**20:.0f} | {e['cache'] / 2**20:.0f} "
                  f"| {e['frag_ratio']:.3f} | {e['retries']} | {e['margin'] / 2**20:.0f} |")
            for ratio in (e["ratio"], e["ratio_exact"]):
                if ratio is None or ratio > 1.0 or ratio < 0.95:
                    bad += 1
    if args.derive:
        print("\nshare of phi x growth the margin needed at the first failing batch:")
        for arch, share in shares:
            print(f"  {arch}: {share:.4f}")
        top = max(s for _, s in shares)
        print(f"largest {top:.4f}; doubled, rounded up to 2 digits: {math.ceil(top * 200) / 100:.2f}")
    print(f"\n{'all within 5% and not above' if not bad else f'{bad} outside (above, or >5% below)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
