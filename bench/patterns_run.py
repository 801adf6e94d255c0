"""Issue 12 point 5 on a device: the pattern corpus (tests/patterns/) plain and under ``batchmon run``, as a table.

    python3 bench/patterns_run.py --device cuda --out bench/results/patterns_h200.json
    python3 bench/patterns_run.py --device cpu --only gan,hf_dict --out /tmp/p.json     # a CPU smoke run

For every pattern: steps seen (the agent's steps against the script's own), batch right (the agent's batch
size of every step equals the script's), loss unchanged (bit-identical losses), components sum to the peak (on
CUDA: the six components of every step add up to its peak allocated; null on CPU). Writes the JSON table and
prints it as a Markdown table for README. Exit 0 when every row is ok, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "patterns"))

import corpus  # noqa: E402


def markdown(rows: list[dict]) -> str:
    def mark(value: object) -> str:
        return "n/a" if value is None else ("yes" if value else "**no**")

    lines = ["| pattern | steps seen | batch right | loss unchanged | components sum to the peak | batch source |",
             "|---|---:|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['pattern']} | {r['steps_seen']}/{r['steps_expected']} | {mark(r['batch_right'])} | "
                     f"{mark(r['loss_unchanged'])} | {mark(r['components_sum_to_peak'])} | {r['batch_source'] or ''} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--out", required=True, help="JSON table to write")
    parser.add_argument("--only", help="comma-separated pattern names (default: all)")
    parser.add_argument("--skip-slow", action="store_true", help="leave out the torch.compile patterns")
    parser.add_argument("--serial", action="store_true", help="plain and attached runs one after the other")
    args = parser.parse_args()
    wanted = set(args.only.split(",")) if args.only else None
    patterns = [p for p in corpus.PATTERNS if (wanted is None or p.name in wanted) and not (args.skip_slow and p.slow)]
    if wanted is not None and len(patterns) != len(wanted):
        known = ", ".join(p.name for p in corpus.PATTERNS)
        print(f"patterns_run: unknown pattern in --only (known: {known})", file=sys.stderr)
        return 2
    rows = []
    work = Path(tempfile.mkdtemp(prefix="bmpat"))
    for pattern in patterns:
        start = time.monotonic()
        row = corpus.run_pattern(pattern, args.device, work / pattern.name,
                                 parallel=not args.serial and args.device == "cpu")
        data = row.to_dict()
        data["seconds"] = round(time.monotonic() - start, 1)
        rows.append(data)
        print(f"{pattern.name}: {'ok' if row.ok else 'FAILED'} ({data['seconds']} s) {'; '.join(row.problems)}",
              flush=True)
    result = {"device": args.device, "rows": rows, "all_ok": all(r["ok"] for r in rows),
              "time": time.time(), "python": sys.version.split()[0]}
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(markdown(rows))
    return 0 if result["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
