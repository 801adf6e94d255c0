"""`batchmon record` and `batchmon stream`: every hub input as JSON lines, flushed per line.

The first line is ``{"kind": "meta", "version": 1, ...}``; every further line is one hub record (batchmon.records).
Flushing each line means a crash loses at most the line being written. Ctrl-C (or SIGTERM/SIGHUP, as when an
ssh session ends) stops cleanly with exit code 0.
"""

from __future__ import annotations

import errno
import os
import stat
import signal
import sys
import time
from typing import IO, Any

from batchmon import __version__
from batchmon.errors import CliError
from batchmon.monitor.hub import Hub
from batchmon import records
from batchmon.records import record_line

FORMAT_VERSION = records.FORMAT_VERSION


def meta_record(interval: float, command: str) -> dict[str, Any]:
    """The recording's first line (records.meta) for this batchmon."""
    return records.meta(interval, command, version=__version__)


class LineWriter:
    """Writes records to a text stream, one flushed line each (the hub's recorder callback)."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.lines = 0

    def __call__(self, record: dict[str, Any]) -> None:
        self.stream.write(record_line(record))
        self.stream.flush()
        self.lines += 1


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop()


def run_recording(stream: IO[str], *, interval: float, duration: float | None, command: str) -> int:
    """Run a hub that writes every record to ``stream`` until duration, Ctrl-C, a signal or a closed reader."""
    writer = LineWriter(stream)
    writer(meta_record(interval, command))
    hub = Hub(interval=interval, recorder=writer)
    previous = {}
    for sig in (signal.SIGTERM, signal.SIGHUP):
        try:
            previous[sig] = signal.signal(sig, _raise_stop)
        except (ValueError, OSError):  # not the main thread, or not supported
            pass
    deadline = None if duration is None else time.monotonic() + duration
    try:
        hub.start()
        while hub.running:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            hub.wait(0.2 if left is None else min(0.2, left))
    except (KeyboardInterrupt, _Stop):
        pass
    finally:
        hub.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if isinstance(hub.error, BrokenPipeError):
        return 0  # the reader went away (ssh closed, `| head`): a normal end for a stream
    if hub.error is not None:
        raise CliError(f"recording stopped: {hub.error}")
    return 0


def main_record(args: Any) -> int:
    if args.host:
        raise CliError("record --host is not supported; run `batchmon record` on that host", code=2)
    if args.output == "-":
        return main_stream(args)
    try:
        stream = _open_output(args.output)
    except OSError as exc:
        raise CliError(f"cannot write {args.output}: {exc.strerror or exc}") from None
    try:
        return run_recording(stream, interval=args.interval, duration=args.duration, command="record")
    finally:
        try:
            stream.close()
        except OSError:
            pass


def _open_output(path: str) -> IO[str]:
    """Open the recording for writing. A FIFO is opened only when a reader is on it (ENXIO otherwise), so
    `record -o FIFO` with nobody reading is an error, not a hang in open()."""
    if not path:
        raise FileNotFoundError(2, "empty file name")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_CLOEXEC", 0)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        st = None
    if st is not None and stat.S_ISFIFO(st.st_mode):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise OSError(errno.ENXIO, "a FIFO with no process reading it") from None
            raise
        os.set_blocking(fd, True)
    else:
        fd = os.open(path, flags, 0o644)
    return open(fd, "w", encoding="utf-8")  # noqa: SIM115 - the caller closes it


def main_stream(args: Any) -> int:
    if getattr(args, "host", None):
        raise CliError("stream --host is not supported; run `batchmon stream` on that host", code=2)
    if sys.stdout is None or not hasattr(sys.stdout, "buffer"):  # started with stdout closed (`>&-`)
        raise CliError("cannot write the stream: stdout is closed")
    try:
        return run_recording(sys.stdout, interval=args.interval, duration=args.duration, command="stream")
    except BrokenPipeError:
        _silence_stdout()
        return 0
    finally:
        try:
            sys.stdout.flush()
        except (BrokenPipeError, OSError):
            _silence_stdout()


def _silence_stdout() -> None:
    """After the reader closed the pipe, point stdout at /dev/null so interpreter exit does not complain."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except OSError:
        pass
