"""Handlers of `batchmon` (live monitor or --once) and `batchmon replay`.

--once never imports Textual; the interactive monitor imports batchmon.tui lazily, only here.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from typing import Any

from batchmon.errors import CliError
from batchmon.snapshot import Snapshot

ONCE_MAX_WAIT_S = 0.5  # how long --once waits for agents' hello and history, at most
ONCE_REMOTE_WAIT_S = 10.0  # how long --once --host waits for each host's first NVML sample, at most


def print_snapshot(snap: Snapshot, as_json: bool) -> None:
    """Print and flush here, so an output that fails is one line: a full disk (`> /dev/full`) is a CliError, a
    reader that went away (`| head -2`) a quiet end; neither is blamed on the input, neither a traceback at exit."""
    from batchmon.monitor.render import format_table, snapshot_to_json

    if as_json:
        text = json.dumps(snapshot_to_json(snap), indent=2)
    else:
        width = shutil.get_terminal_size(fallback=(100, 24)).columns
        text = format_table(snap, width=max(60, width)).rstrip("\n")
    if sys.stdout is None:  # started with stdout closed (`>&-`)
        raise CliError("cannot write the snapshot: stdout is closed")
    try:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        _silence_stdout()
    except OSError as exc:
        _silence_stdout()
        raise CliError(f"cannot write the snapshot to stdout: {exc.strerror or exc}") from None
    except ValueError:  # stdout closed (`>&-`)
        raise CliError("cannot write the snapshot: stdout is closed") from None


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's flush at exit neither fails nor prints a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


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
    if hosts:
        from batchmon.monitor.remote import remote_command

        try:
            remote_command(getattr(args, "interval", 1.0))
        except ValueError as exc:
            raise CliError(str(exc), code=2) from None
    return hosts


def _warn_silent_hosts(hub: Any, waited: float) -> None:
    """--once: a host that neither answered nor failed within the wait (ssh still connecting, a box that
    drops packets) is a warning in the output, not a silent absence; the exit code stays 0, as for a host
    that refused (the local box was printed; `warnings` says what is missing)."""
    from batchmon import records

    for link in hub.links:
        if not link.ready:
            hub.inject(records.link(link.host, "lost", f"no answer within {waited:g} s"))


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
            _warn_silent_hosts(hub, ONCE_REMOTE_WAIT_S)
        snap = hub.sample_once(max_wait=ONCE_MAX_WAIT_S)
        print_snapshot(snap, args.json)
        return 0
    return _run_monitor(Hub(interval=args.interval, hosts=hosts), interval=args.interval, mouse=not args.no_mouse)


def main_replay(args: Any) -> int:
    from batchmon.monitor.replay import NotARecording, ReplaySource, final_snapshot

    try:
        if args.once:
            snap = final_snapshot(args.file, strict=True)
        else:
            source = ReplaySource(args.file, speed=args.speed, from_start=getattr(args, "from_start", False))
    except NotARecording as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot read recording {args.file}: {exc.strerror or exc}") from None
    if args.once:
        print_snapshot(snap, args.json)  # outside the try: a closed pipe is not the recording's fault
        return 0
    return _run_monitor(source, interval=source.interval, mouse=not args.no_mouse, title=f"replay {args.file}")
