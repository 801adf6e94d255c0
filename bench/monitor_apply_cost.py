"""The monitor's main-thread work per refresh, replayed in-process: deterministic, for A/B of UI changes.

    python3 bench/monitor_apply_cost.py                            # this checkout, 3 passes
    python3 bench/monitor_apply_cost.py --tree old=HEAD~2 --tree new=. --repeat 3
    python3 bench/monitor_apply_cost.py --recording tests/fixtures/fast16_h200_50s_growth.jsonl.gz

Why: the live A/B (bench/ab_monitor.py) moves by ±6% per round on the 2-core dev box; a UI change worth a few
per cent of the main thread needs a steadier figure. This runs the real app headless (Textual's run_test, 160x48)
on a 16-job H200 recording (default tests/fixtures/tui_h200_16_agents.jsonl: 132 snapshots of 16 jobs stepping;
``--recording`` another, e.g. fast16_h200_50s_growth.jsonl.gz: the fast16 stage's jobs, one snapshot a second),
hands it one snapshot after another as the hub would, waits for each to be drawn, and times by the main thread's
CPU clock: the whole loop (the test pilot's waits included: most of it), the app's ``_apply`` (views, panels,
their line diffs) and in it the header, the GPU panels and the job panels, and the compositor's partial update
(rows rendered). No terminal output (headless), no hub, no sockets: the UI's own work only.

Each ``--tree NAME=REV`` is laid out as bench/ab_monitor.py lays it out and run in its own process, the trees
alternating, ``--repeat`` times. Writes $OUT/NAME.json (default monitor_apply_cost) and prints a summary.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r'''
import asyncio, json, sys, time
sys.path.insert(0, sys.argv[1])  # the tree's tests/: its fixtures
import tui_fixtures as fx
from batchmon.monitor.replay import load_snapshots
from batchmon.tui.app import BatchmonApp
from batchmon.tui.job_panel import JobPanel

tt = time.thread_time
snaps = [s for s in load_snapshots(sys.argv[2]) if len(s.running) == 16]
parts = {"apply": 0.0, "compositor": 0.0}


def timed(name, fn):
    async def run(*a, **k):
        t = tt()
        try:
            return await fn(*a, **k)
        finally:
            parts[name] += tt() - t
    return run


def timed_sync(name, fn):
    def run(*a, **k):
        t = tt()
        try:
            return fn(*a, **k)
        finally:
            parts[name] += tt() - t
    return run


async def main():
    app = BatchmonApp(snapshot=snaps[0])
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 16)
        await pilot.pause()
        for snap in snaps[1:6]:  # warm-up: caches, the collector
            app.deliver(snap)
            await fx.wait_for(pilot, lambda: app.shown is snap)
            await pilot.pause()
        app._apply = timed("apply", app._apply)
        for name, part in (("_apply_jobs", "jobs"), ("_apply_devices", "devices")):
            if hasattr(app, name):  # (an older tree may lack one: its part is left out)
                parts[part] = 0.0
                setattr(app, name, timed(part, getattr(app, name)))
        header = app.query_one("#header")
        parts["header"] = 0.0
        header.update_text = timed_sync("header", header.update_text)
        comp = app.screen._compositor
        comp.render_partial_update = timed_sync("compositor", comp.render_partial_update)
        t0 = tt()
        n = 0
        for snap in snaps[6:]:
            app.deliver(snap)
            await fx.wait_for(pilot, lambda: app.shown is snap)
            await pilot.pause()
            n += 1
        total = tt() - t0
    print(json.dumps({"refreshes": n, "main_ms_per_refresh": total * 1e3 / n,
                      **{k + "_ms_per_refresh": v * 1e3 / n for k, v in parts.items()}}))


asyncio.run(main())
'''


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from ab_monitor import lay_out

    p = argparse.ArgumentParser(description="the UI's work per refresh on the 16-job recording, in-process")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=REV", help="default: new=.")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--name", default="monitor_apply_cost")
    p.add_argument("--recording", type=Path, default=ROOT / "tests" / "fixtures" / "tui_h200_16_agents.jsonl",
                   help="a recording of 16 running jobs (.jsonl or .jsonl.gz)")
    args = p.parse_args(argv)
    pairs = [t.partition("=") for t in (args.tree or ["new=."])]
    base = Path(tempfile.mkdtemp(prefix="bm_apply"))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in pairs}
    recording = args.recording.resolve()
    if recording.suffix == ".gz":  # the replay reads plain JSON lines
        plain = base / recording.stem
        with gzip.open(recording, "rb") as src, open(plain, "wb") as dst:
            shutil.copyfileobj(src, dst)
        recording = plain
    try:
        trees = {name: lay_out(rev, base / name) for name, _, rev in pairs}
        child = base / "child.py"
        child.write_text(CHILD)
        for r in range(args.repeat):
            order = pairs if r % 2 == 0 else list(reversed(pairs))
            for name, _, _ in order:
                env = dict(os.environ, PYTHONPATH=str(trees[name]), PYTHONDONTWRITEBYTECODE="1")
                out = subprocess.run([sys.executable, str(child), str(trees[name] / "tests"), str(recording)], env=env,
                                     capture_output=True, text=True, timeout=600)
                if out.returncode != 0:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
                row = runs[name][-1]
                print(f"  pass {r + 1} {name:6s} main {row['main_ms_per_refresh']:.3f} ms/refresh, "
                      + ", ".join(f"{k[:-len('_ms_per_refresh')]} {v:.3f}" for k, v in row.items()
                                  if k.endswith("_ms_per_refresh") and not k.startswith("main")))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    revs = {}
    for name, _, rev in pairs:
        base_rev = rev.partition("+")[0]
        revs[name] = rev if base_rev == "." else subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", base_rev], capture_output=True, text=True).stdout.strip()
    shown = args.recording.resolve()
    result = {"what": __doc__.split("\n")[0],
              "recording": str(shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown), "size": [160, 48],
              "trees": revs, "runs": runs, "host": platform.node(), "cpu_count": os.cpu_count(),
              "load": os.getloadavg(), "python": platform.python_version(), "time": time.time()}
    out_dir = Path(os.environ.get("OUT", "out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{args.name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    for name in runs:
        keys = [k for k in runs[name][0] if k.endswith("_ms_per_refresh")]
        print(f"{name}: best " + ", ".join(f"{k[:-len('_ms_per_refresh')]} {min(r[k] for r in runs[name]):.3f}"
                                           for k in keys) + " ms/refresh")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
