"""Re-evaluate a predict_accuracy results JSON offline with the current memory model (no GPU, no torch), and
derive the fragmentation share the margin rests on.

For every architecture in the JSON: refit batchmon.memory_model on the recorded observed steps, predict the
largest batch, and compare it with the real OOM boundary the run measured. Two boundaries are shown: the
run's reported ``real_max_batch`` (with --quick a bisection to 0.5%) and the exact one from all recorded
trials (the largest batch that ran below the smallest batch that ran out of memory).

``--derive`` also prints, per architecture, the share s of phi x peak (phi: the allocator's cache / peak at the
observed batch) that the room left at the first failing batch called for: (device - context - the model's own
central peak there - the measured extras) / (phi x that peak). Any s above it keeps that batch out of the
prediction. memory_model.FRAG_SURVIVAL is the largest over every recorded boundary, rounded up to 2 digits.

``--project-zoo FILE`` does the same for a bench/predict_zoo.py results file recorded before the zoo kept its
observed steps (bench/results/predict_zoo_h200.json of 2026-11-30 15:22): the model's central peak line is
recovered from the recorded predicted peaks (two points), phi as the interval the recorded largest batch
allows under the rule it was predicted with (cache + 0.16 x phi x growth), and the largest batch the current
rule would give at both ends of that interval. A projection, not a refit: ``predict_zoo.py --reevaluate`` on a
file with observed steps is the check.

Usage: python3 bench/recalibrate_margin.py [results.json ...] [--derive] [--project-zoo ZOO.json]
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

from batchmon.memory_model import FRAG_SURVIVAL, fit  # noqa: E402
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
    peak = model.peak_at(fail)
    extras = model.reserved_growth + (model.cache if model.alloc_retries > 0 else 0)
    room = device_total - model.context - peak - extras  # what the first failing batch left for fragmentation
    share = room / (model.frag_ratio * peak) if model.frag_ratio * peak > 0 else 0.0
    return {"arch": result["arch"], "predicted": pred, "old_predicted": result["predicted_max_batch"],
            "real": real, "exact": exact, "ratio": pred / real if real else None,
            "ratio_exact": pred / exact if exact else None, "context": model.context, "cache": model.cache,
            "frag_ratio": model.frag_ratio, "retries": model.alloc_retries,
            "margin": model.fragmentation(model.peak_at(pred or 1)) + model.reserved_growth,
            "needed_share": share, "basis": model.basis}


#: the rule bench/results/predict_zoo_h200.json (2026-11-30 15:22) was predicted with: cache kept in full plus
#: this share of phi x the pool's growth beyond the observed batch
OLD_SURVIVAL = 0.16


def project_zoo(doc: dict) -> list[dict]:
    """Per architecture of an old zoo file: the central peak line from its recorded predicted peaks, phi's
    interval from its recorded largest batch under the old rule, the share each end needed at the first failing
    batch, and the largest batch the current rule gives at each end (see the module docstring)."""
    cap = doc["emulated_device_memory"]
    rows = []
    for r in doc["results"]:
        (b1, p1), (b2, p2) = [(p["batch"], p["predicted_peak"]) for p in r["points"][:2]]
        slope = (p2 - p1) / (b2 - b1)
        fixed = p1 - slope * b1
        ref = max(r["observed"])
        ref_peak = fixed + slope * ref
        pred, real = r["predicted_max_batch"], exact_boundary(r["trials"]) or r["real_max_batch"]

        def phi_at(b: int) -> float:  # the old rule's total equals the cap at b: solve for the cache
            room = cap - (fixed + slope * b)
            return room / (1 + OLD_SURVIVAL * ((fixed + slope * b) - ref_peak) / ref_peak) / ref_peak

        phis = (phi_at(pred + 1), phi_at(pred))  # the recorded prediction lies in this interval
        fail_peak = fixed + slope * (real + 1)
        needed = max((cap - fail_peak) / (ph * fail_peak) for ph in phis)
        now = [max(0, int((cap / (1 + FRAG_SURVIVAL * ph) - fixed) // slope)) for ph in phis]
        rows.append({"arch": r["arch"], "phi": phis, "needed_share": needed, "real": real, "recorded": pred,
                     "projected": now, "conservative": r.get("conservative", False)})
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="*", type=Path, default=[DEFAULT])
    ap.add_argument("--derive", action="store_true", help="print the fragmentation share each boundary needed")
    ap.add_argument("--project-zoo", type=Path, metavar="ZOO", help="project an old predict_zoo results file")
    args = ap.parse_args(argv)
    if args.project_zoo:
        try:
            rows = project_zoo(json.loads(args.project_zoo.read_text()))
        except (OSError, ValueError, KeyError) as exc:
            print(f"recalibrate_margin: cannot project {args.project_zoo}: {exc}", file=sys.stderr)
            return 2
        print(f"projection of {args.project_zoo.name} under FRAG_SURVIVAL={FRAG_SURVIVAL} (the central peak line "
              f"recovered from the recorded points; phi an interval)")
        print("| arch | phi | share needed at the first failing batch | recorded | projected now | real | "
              "projected/real |")
        print("|---|---|---:|---:|---:|---:|---:|")
        above = False
        for row in rows:
            lo, hi = row["phi"]
            ratios = "-".join(f"{b / row['real']:.3f}" for b in sorted(set(row["projected"])))
            above = above or (max(row["projected"]) > row["real"] and not row["conservative"])
            if row["conservative"]:  # the recorded answer came from the band's high side: phi is not recoverable
                print(f"| {row['arch']} | - | - | {row['recorded']} | not projected (the band's high side decided) "
                      f"| {row['real']} | - |")
                continue
            print(f"| {row['arch']} | {lo:.3f}-{hi:.3f} | {row['needed_share']:.3f} | {row['recorded']} | "
                  f"{'-'.join(str(b) for b in sorted(set(row['projected'])))} | {row['real']} | {ratios} |")
        top = max(r["needed_share"] for r in rows if not r["conservative"])
        print(f"\nlargest share needed {top:.4f}; rounded up to 2 digits: {math.ceil(top * 100) / 100:.2f}")
        return 1 if above else 0
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
        print("\nshare of phi x peak the first failing batch left room for (FRAG_SURVIVAL must exceed each):")
        for arch, share in shares:
            print(f"  {arch}: {share:.4f}")
        top = max(s for _, s in shares)
        print(f"largest {top:.4f}; rounded up to 2 digits: {math.ceil(top * 100) / 100:.2f}")
    print(f"\n{'all within 5% and not above' if not bad else f'{bad} outside (above, or >5% below)'}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
