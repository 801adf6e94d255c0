"""Segment by segment, what the model predicts at the real largest batch against what the zoo run measured there
(``phase_peaks_at_real``, plain and under each what-if): which segment's change missed, and by how much - the
first thing to read when a prediction is below real.

    python3 bench/zoo_segments.py bench/results/predict_zoo_h200_run8.json [ARCH ...] [--splits SPLITS.json]

``--splits``: the what-ifs derived from the given splits (bench/zoo_split_cpu.py's projection of a newer agent's
walk) instead of the recorded ones, as ``bench/predict_zoo.py --reevaluate --splits`` does.

The measured ``backward`` is the whole backward's peak (the loss's and the model's); ``model_backward`` (recorded
since zoo run 9) the model's backward's own peak after the output's gradient arrives, which the model's
``backward`` segment predicts. Where only the whole backward is recorded and it equals the loss's backward, the
model's backward is known only to be at most that (shown as '<=')."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # batchmon from the checkout

from zoo_offline import _split_of  # noqa: E402

from batchmon.memory_model import WhatIf, fit  # noqa: E402
from batchmon.protocol import Step  # noqa: E402

MIB = 2**20


def _measured(peaks: dict[str, Any], segment: str) -> tuple[float | None, str]:
    """The measured peak comparable with the model's ``segment`` and how it is known ('=' or '<=')."""
    if segment != "backward":
        value = peaks.get(segment)
        return (float(value), "=") if isinstance(value, (int, float)) else (None, "")
    if isinstance(peaks.get("model_backward"), (int, float)):
        return float(peaks["model_backward"]), "="
    whole, loss = peaks.get("backward"), peaks.get("loss_backward")
    if not isinstance(whole, (int, float)):
        return None, ""
    return float(whole), ("<=" if isinstance(loss, (int, float)) and whole <= loss else "=")


def compare(doc: dict[str, Any], archs: list[str] | None = None,
            splits: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """One row per (architecture, what-if, segment): the model's segment line, its value at the real largest
    batch, the measured peak there, and the ratio (model / measured)."""
    rows: list[dict[str, Any]] = []
    for r in doc.get("results", []):
        if (archs and r["arch"] not in archs) or "observed_steps" not in r:
            continue
        steps = [Step.from_dict(d) for d in r["observed_steps"]]
        split, _ = _split_of(r, splits)
        model = fit(steps, optimizer=r.get("optimizer"), amp=bool(r.get("amp")), saved_split=split)
        if model is None:
            continue
        cases = [("plain", WhatIf(), r.get("phase_peaks_at_real"))]
        cases += [(w["what_if"], WhatIf(**w["spec"]), w.get("phase_peaks_at_real"))
                  for w in r.get("what_ifs", []) if "spec" in w]
        for name, spec, peaks in cases:
            if not isinstance(peaks, dict) or not isinstance(peaks.get("batch"), int):
                continue
            batch = peaks["batch"]
            for segment, value in model.segment_peaks(spec, batch).items():
                measured, how = _measured(peaks, segment)
                rows.append({"arch": r["arch"], "what_if": name, "batch": batch, "segment": segment,
                             "predicted": value, "measured": measured, "known": how,
                             "ratio": value / measured if measured else None})
    return rows


def text(rows: list[dict[str, Any]]) -> str:
    lines = ["| arch | what-if | batch | segment | predicted MiB | measured MiB | predicted / measured |",
             "|---|---|---:|---|---:|---:|---:|"]
    for row in rows:
        measured = "" if row["measured"] is None else f"{'<=' if row['known'] == '<=' else ''}{row['measured'] / MIB:.0f}"
        ratio = "" if row["ratio"] is None else f"{'>=' if row['known'] == '<=' else ''}{row['ratio']:.3f}"
        lines.append(f"| {row['arch']} | {row['what_if']} | {row['batch']} | {row['segment']} | "
                     f"{row['predicted'] / MIB:.0f} | {measured} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    splits_path = None
    if "--splits" in args:
        at = args.index("--splits")
        if at + 1 >= len(args):
            print("zoo_segments: --splits needs a file", file=sys.stderr)
            return 2
        splits_path = args[at + 1]
        del args[at:at + 2]
    if not args:
        print("usage: zoo_segments.py RESULTS.json [ARCH ...] [--splits SPLITS.json]", file=sys.stderr)
        return 2
    try:
        doc = json.loads(Path(args[0]).read_text())
        splits = json.loads(Path(splits_path).read_text()).get("splits") if splits_path else None
    except (OSError, ValueError) as exc:
        print(f"zoo_segments: cannot read {args[0]} or {splits_path}: {exc}", file=sys.stderr)
        return 2
    print(text(compare(doc, args[1:] or None, splits)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
