"""Handlers of `batchmon` (live monitor or --once) and `batchmon replay`.

--once never imports Textual; the interactive monitor imports batchmon.tui lazily, only here.
"""

from __future__ import annotations

import json
import shutil
import time
from typing import Any

from batchmon.errors import CliError
from batchmon.snapshot import Snapshot

ONCE_MAX_WAIT_S = 0.5  # how long --once waits for agents' hello and history, at most
ONCE_REMOTE_WAIT_S = 10.0  # how long --once --host waits for each host's first NVML sample, at most


def print_snapshot(snap: Snapshot, as_json: bool) -> None:
    from batchmon.monitor.render import format_table, snapshot_to_json

    if as_json:
        print(json.dumps(snapshot_to_json(snap), indent=2))
    else:
        width = shutil.get_terminal_size(fallback=(100, 24)).columns
        print(format_table(snap, width=max(60, width)).rstrip("\n"))


def _run_monitor(source: Any, *, interval: float, mouse: bool, title: str | None = None) -> int:
    try:
        from batchmon.tui.app import run_monitor
    except ImportError as exc:
        raise CliError(f"the interactive monitor is not available ({exc}); try `batchmon --once`") from None
    try:
        return int(run_monitor(source, interval=interval, mouse=mouse, title=title) or 0)
    finally:
        source.stop()


def _hosts(args: Any) -> list[str]:
    hosts = list(getattr(args, "host", None) or [])
    for h in hosts:
        if not h.strip() or h.startswith("-") or any(c.isspace() for c in h):
            raise CliError(f"--host: bad host name {h!r}", code=2)
    return hosts


def main(args: Any) -> int:
    from batchmon.monitor.hub import Hub

    hosts = _hosts(args)
    if args.once:
        hub = Hub(interval=args.interval, hosts=hosts)
        if hosts:
            # Remote hosts first: their ssh sessions start while we wait, bounded, for a first sample each.
            hub.start_remotes()
            deadline = time.monotonic() + ONCE_REMOTE_WAIT_S
            while not hub.remotes_ready() and time.monotonic() < deadline:
                time.sleep(0.02)  # polling a condition with a deadline
        snap = hub.sample_once(max_wait=ONCE_MAX_WAIT_S)
        print_snapshot(snap, args.json)
        return 0
    return _run_monitor(Hub(interval=args.interval, hosts=hosts), interval=args.interval, mouse=not args.no_mouse)


def main_replay(args: Any) -> int:
    from batchmon.monitor.replay import ReplaySource, final_snapshot

    try:
        if args.once:
            print_snapshot(final_snapshot(args.file), args.json)
            return 0
        source = ReplaySource(args.file, speed=args.speed)
    except OSError as exc:
        raise CliError(f"cannot read recording {args.file}: {exc.strerror or exc}") from None
    return _run_monitor(source, interval=source.interval, mouse=not args.no_mouse, title=f"replay {args.file}")
