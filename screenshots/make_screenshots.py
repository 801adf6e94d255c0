"""Render the monitor's screenshots (SVG, and PNG where a converter exists) from a `batchmon record` file.

    python screenshots/make_screenshots.py RECORDING.jsonl [--out screenshots] [--name h200] [--size 160x48]
                                           [--press plus --press a] [--index -1]
    python screenshots/make_screenshots.py --set        # every screenshot the README shows, from tests/fixtures

The app runs headless (Textual's run_test) on one Snapshot of the recording (the last by default), its GPU
memory history sampled from the snapshots before it, so the picture is what `batchmon replay RECORDING` shows at
that moment. The header clock is shown in UTC so a screenshot does not depend on the machine's time zone.

PNG: cairosvg when it is importable, else rsvg-convert (Debian: apt-get install -y librsvg2-bin), else
ImageMagick's convert. Before converting, non-breaking spaces in Rich's SVG are turned into spaces with
xml:space="preserve", because rsvg and cairo drop them and the text then collapses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


def parse_size(text: str) -> tuple[int, int]:
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT, got {text!r}")
    return int(m.group(1)), int(m.group(2))


FIXTURES = Path(__file__).resolve().parents[1] / "tests" / "fixtures"

#: the README's screenshots: (file stem, recording under tests/fixtures, moment (None: the busiest), size, keys)
SET: tuple[tuple[str, str, int | None, tuple[int, int], tuple[str, ...]], ...] = (
    ("h200_two_jobs", "tui_h200_two_jobs.jsonl", None, (160, 48), ()),
    ("h200_oom_post_mortem", "agent_h200_oom.jsonl", -1, (160, 48), ()),
    ("h200_advisor", "tui_h200_two_jobs.jsonl", None, (160, 48), ("b", "2", "5", "6")),
    ("h200_timeline_long_run", "tui_h200_long_run.jsonl", None, (160, 48), ()),
    ("h200_ddp", "ddp_h200_run.jsonl", None, (160, 48), ()),
    ("h200_16_agents", "tui_h200_16_agents.jsonl", None, (160, 48), ()),
    ("h200_16_agents", "tui_h200_16_agents.jsonl", None, (80, 24), ()),
    ("h200_two_jobs", "tui_h200_two_jobs.jsonl", None, (80, 24), ()),
    ("h200_what_if", "tui_h200_one_job.jsonl", None, (160, 48), ("plus", "plus", "a", "c")),
    ("h200_no_agents", "tui_h200_no_agents.jsonl", None, (100, 30), ()),
)


def busiest(snapshots) -> int:
    """The last moment with the most training processes live (as tests/tui_fixtures.busiest picks it)."""
    live = [sum(1 for a in snap.agents if a.connected and a.last_step and getattr(a, "state", "running") == "running")
            for snap in snapshots]
    return max(range(len(snapshots)), key=lambda i: (live[i], i))


async def render_svg(snapshot, size: tuple[int, int], press: list[str], path: Path, title: str | None,
                     earlier=()) -> None:
    from batchmon.tui.app import BatchmonApp

    app = BatchmonApp(snapshot=snapshot, title=title, interval=snapshot.interval)
    app.add_history(earlier)
    async with app.run_test(size=size) as pilot:
        await pilot.pause()
        for key in press:
            await pilot.press(key)
        await pilot.pause()
        app.save_screenshot(filename=path.name, path=str(path.parent))


def printable_svg(svg: str) -> str:
    """Rich's SVG with plain spaces kept (rsvg/cairo collapse the &#160; it uses)."""
    svg = svg.replace("&#160;", " ")
    return svg.replace("<svg ", '<svg xml:space="preserve" ', 1)


class ConvertFailed(Exception):
    """The converter exists but did not make a PNG: one line for the user, no traceback."""


def _run_converter(argv: list[str]) -> None:
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        first = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[0]
        raise ConvertFailed(f"{argv[0]} failed: {first}")


def to_png(svg_path: Path, png_path: Path) -> str | None:
    """Convert with the first converter available; returns its name, or None when there is none.
    Raises ConvertFailed when it fails (the stand-in `convert` some boxes ship only passes PNGs through)."""
    fixed = svg_path.with_suffix(".print.svg")
    fixed.write_text(printable_svg(svg_path.read_text(encoding="utf-8")), encoding="utf-8")
    try:
        try:
            import cairosvg  # type: ignore[import-not-found]

            cairosvg.svg2png(url=str(fixed), write_to=str(png_path))
            return "cairosvg"
        except ImportError:
            pass
        if shutil.which("rsvg-convert"):
            _run_converter(["rsvg-convert", str(fixed), "-o", str(png_path)])
            return "rsvg-convert"
        if shutil.which("convert"):
            _run_converter(["convert", str(fixed), str(png_path)])
            return "convert"
        return None
    finally:
        fixed.unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("recording", type=Path, nargs="?", help="a file written by `batchmon record`")
    p.add_argument("--set", action="store_true", help="render the README's screenshots from tests/fixtures")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    p.add_argument("--name", help="file name stem (default: the recording's stem)")
    p.add_argument("--size", type=parse_size, action="append", help="WIDTHxHEIGHT, repeatable (default 160x48)")
    p.add_argument("--press", action="append", default=[], help="keys to press first (Textual names), repeatable")
    p.add_argument("--index", type=int, default=-1, help="which snapshot of the recording (default: the last)")
    p.add_argument("--no-png", action="store_true", help="SVG only")
    args = p.parse_args(argv)

    os.environ["TZ"] = "UTC"
    time.tzset()
    if args.set:
        return render_set(args.out, png=not args.no_png)
    if args.recording is None:
        p.error("a recording, or --set")
    try:
        from batchmon.monitor.replay import load_snapshots

        snapshots = load_snapshots(args.recording)
    except OSError as exc:
        print(f"make_screenshots: cannot read {args.recording}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except ValueError as exc:
        print(f"make_screenshots: {args.recording} is not a batchmon recording: {exc}", file=sys.stderr)
        return 1
    if not snapshots:
        print(f"make_screenshots: {args.recording} holds no snapshot", file=sys.stderr)
        return 1
    try:
        snapshot = snapshots[args.index]
    except IndexError:
        print(f"make_screenshots: --index {args.index} out of range (0..{len(snapshots) - 1})", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.name or args.recording.name.split(".")[0]
    for width, height in args.size or [(160, 48)]:
        svg = args.out / f"{stem}_{width}x{height}.svg"
        index = args.index % len(snapshots)
        asyncio.run(render_svg(snapshot, (width, height), args.press, svg, title=f"replay {args.recording.name}",
                               earlier=snapshots[:index]))
        print(with_png(svg, png=not args.no_png))
    return 0


def with_png(svg: Path, *, png: bool) -> str:
    """Convert ``svg`` to PNG beside it (unless not asked); the line to print about both."""
    line = f"{svg}"
    if png:
        out = svg.with_suffix(".png")
        try:
            tool = to_png(svg, out)
        except ConvertFailed as exc:
            out.unlink(missing_ok=True)
            print(f"make_screenshots: no PNG for {svg.name}: {exc}", file=sys.stderr)
        else:
            line += f"  {out} ({tool})" if tool else "  (no PNG: install cairosvg, librsvg2-bin or ImageMagick)"
    return line


def render_set(out: Path, *, png: bool) -> int:
    """Every screenshot of SET, each from its recording's moment with the GPU history before it."""
    from batchmon.monitor.replay import load_snapshots

    out.mkdir(parents=True, exist_ok=True)
    loaded: dict[str, list] = {}
    for stem, name, index, size, press in SET:
        snaps = loaded.get(name)
        if snaps is None:
            snaps = loaded[name] = load_snapshots(FIXTURES / name)
        i = busiest(snaps) if index is None else index % len(snaps)
        svg = out / f"{stem}_{size[0]}x{size[1]}.svg"
        asyncio.run(render_svg(snaps[i], size, list(press), svg, title=f"replay {name}", earlier=snaps[:i]))
        print(with_png(svg, png=png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
