"""Replay a recording made by `batchmon record`: the same HubState, fed from a file, in recorded time.

A snapshot is taken at each recorded tick (the moment the live monitor built one); recordings without tick
lines fall back to "just before the next NVML sample". Bad lines and a truncated last line (the recorder died
mid-write) become counted Warnings; they never stop a replay.

The file is streamed, never loaded: memory stays bounded for a recording of any size (a 543 MB one needed
4.1 GB when it was read whole). A line over MAX_RECORD_LINE bytes is skipped as a bad line without being held.
Only the first lines are read before the replay starts (the interval, whether there are ticks); a file with
no record in them is not a recording (NotARecording: the CLI says so and exits 1). Record times that are not
finite, sane epoch seconds (Infinity, 1e300, 1e400) are replaced by the previous time, and at most MAX_SOURCES
distinct sources are replayed (the rest is counted in one warning), so no recording can freeze or flood a replay.
"""

from __future__ import annotations

import json
import math
import os
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from batchmon.monitor.hub_state import LOCAL, HubState
from batchmon.monitor.threads import join_started, start_daemon
from batchmon.records import warning as warning_record
from batchmon.snapshot import Snapshot

MAX_RECORD_LINE = 64 << 20  # a recorded agent line is at most protocol.MAX_LINE_BYTES (1 MiB) inside a record
HEADER_LINES = 256  # read before the replay starts: the meta line, the first tick, proof it is a recording
MAX_SOURCES = 64  # the local box and up to 63 --host boxes; more is a damaged or hostile recording
MAX_TIME = 1e11  # epoch seconds (year 5138); beyond that, or not finite, a record's time is not believed
MAX_WAIT_S = 1.0  # the replay thread sleeps in slices, so a long gap in recorded time never blocks stop()


class NotARecording(ValueError):
    """The file holds no batchmon record in its first lines (random bytes, an empty file, a device)."""


def _lines(path: Path) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without newline, complete) for each line, streamed; an oversized line comes back as
    b"" with complete=False and its number, its bytes skipped unread into memory."""
    with open(path, "rb", buffering=1 << 20) as f:
        number = 0
        while True:
            line = f.readline(MAX_RECORD_LINE + 1)
            if not line:
                return
            number += 1
            if line.endswith(b"\n"):
                yield number, line[:-1], True
            elif len(line) > MAX_RECORD_LINE:
                while line and not line.endswith(b"\n"):  # skip the rest of the oversized line
                    line = f.readline(1 << 20)
                yield number, b"", False
            else:
                yield number, line, False  # the last line, without a newline


def _parse(line: bytes, complete: bool) -> tuple[dict[str, Any] | None, str | None]:
    """(record, None) or (None, why it is a bad line); (None, None) for a blank line."""
    if not complete and not line:
        return None, f"longer than {MAX_RECORD_LINE} bytes"
    if not line.strip():
        return None, None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None, "not JSON" if complete else "truncated last line"
    if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
        return None, "not a record"
    return obj, None


def _is_local_tick(record: dict[str, Any]) -> bool:
    return record.get("kind") == "tick" and record.get("source", LOCAL) == LOCAL


@dataclass
class Recording:
    """A recording file, read lazily: ``records()`` streams it from the start each time it is called."""

    path: Path
    interval: float
    has_ticks: bool
    records_in_header: int  # valid records among the first HEADER_LINES lines

    def records(self) -> Iterator[tuple[dict[str, Any] | None, str | None, int]]:
        """(record, None, line number) for each record, (None, why, line number) for each bad line."""
        for number, line, complete in _lines(self.path):
            record, why = _parse(line, complete)
            if record is not None or why is not None:
                yield record, why, number


def read_recording(path: str | Path, *, strict: bool = False) -> Recording:
    """Open a recording: reads its first lines only (and, with no tick among them, scans for one).

    Raises OSError when it cannot be read; with ``strict``, NotARecording when it is not a regular file or
    holds no record in its first lines. Without, any content replays (as warnings)."""
    path = Path(path)
    if strict:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(21, "Is a directory")
        if not stat.S_ISREG(st.st_mode):
            raise NotARecording(f"{path} is not a regular file")
        if st.st_size == 0:
            raise NotARecording(f"{path} is empty")
    interval: float | None = None
    has_ticks = False
    valid = 0
    for number, line, complete in _lines(path):
        if number > HEADER_LINES:
            break
        record, _ = _parse(line, complete)
        if record is None:
            continue
        valid += 1
        if interval is None and record.get("kind") == "meta":
            value = record.get("interval")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e6:
                interval = float(value)
        has_ticks = has_ticks or _is_local_tick(record)
        if has_ticks and interval is not None:
            break
    if strict and valid == 0:
        raise NotARecording(f"{path} is not a batchmon recording (no record in its first {HEADER_LINES} lines)")
    if not has_ticks:
        has_ticks = _scan_for_tick(path)
    return Recording(path, interval if interval is not None else 1.0, has_ticks, valid)


def _scan_for_tick(path: Path) -> bool:
    """Whether any line is a local tick; parses only the lines that mention one (grep speed)."""
    for _, line, complete in _lines(path):
        if b'"tick"' in line:
            record, _ = _parse(line, complete)
            if record is not None and _is_local_tick(record):
                return True
    return False


def _time(record: dict[str, Any], default: float) -> float:
    t = record.get("t")
    if isinstance(t, bool) or not isinstance(t, (int, float)):
        return default
    try:
        value = float(t)
    except OverflowError:  # an integer >= 2**1024
        return default
    return value if math.isfinite(value) and 0 <= value <= MAX_TIME else default


def iter_snapshots(rec: Recording, state: HubState | None = None) -> Iterator[Snapshot]:
    """Feed a recording through a HubState; yield the snapshot at each tick (deterministic), streaming."""
    state = state or HubState()
    now = 0.0
    fed_since_snapshot = False
    yielded = 0
    sources: set[str] = {LOCAL}
    for record, why, number in rec.records():
        if record is None:
            state.ingest(warning_record("recording", "bad lines skipped", f"line {number}: {why}", t=now))
            continue
        before, now = now, _time(record, now)
        if "t" in record and record["t"] != now:
            record["t"] = now  # the state and the screen never see an unbelievable time
        source = record.get("source", LOCAL)
        if source not in sources:
            if not isinstance(source, str) or len(sources) >= MAX_SOURCES:
                state.ingest(warning_record("recording", f"more than {MAX_SOURCES} sources; the rest skipped",
                                            f"line {number}", t=now))
                continue
            sources.add(source)
        kind = record.get("kind")
        is_local = source == LOCAL
        if rec.has_ticks:
            state.ingest(record)
            fed_since_snapshot = True
            if kind == "tick" and is_local:
                fed_since_snapshot = False
                yielded += 1
                yield state.snapshot(now, rec.interval, kind="replay")
        else:
            if kind == "nvml" and is_local and fed_since_snapshot:
                yielded += 1
                yield state.snapshot(before, rec.interval, kind="replay")
            state.ingest(record)
            fed_since_snapshot = fed_since_snapshot or kind != "meta"
    if fed_since_snapshot or not yielded:
        yield state.snapshot(now, rec.interval, kind="replay")


def load_snapshots(path: str | Path) -> list[Snapshot]:
    """Every snapshot of a recording, one per recorded tick (for tests and screenshots)."""
    return list(iter_snapshots(read_recording(path)))


def final_snapshot(path: str | Path, *, strict: bool = False) -> Snapshot:
    """The state at the end of a recording (streamed: only the latest snapshot is held)."""
    last = None
    for last in iter_snapshots(read_recording(path, strict=strict)):
        pass
    assert last is not None  # iter_snapshots always yields at least one
    return last


class ReplaySource:
    """Drives a front end from a recording, paced by recorded time / speed. Same shape as Hub."""

    def __init__(self, path: str | Path, *, speed: float = 1.0,
                 on_snapshot: Callable[[Snapshot], None] | None = None) -> None:
        if not speed > 0:
            raise ValueError("speed must be positive")
        self.path = Path(path)
        self.speed = float(speed)
        self.on_snapshot = on_snapshot  # public, as on Hub
        # OSError or NotARecording here: the caller says so in one line
        self._recording = read_recording(self.path, strict=True)
        self._interval = self._recording.interval
        self._snapshots = iter_snapshots(self._recording)
        self._latest = next(self._snapshots)
        self._pending: Snapshot | None = next(self._snapshots, None)
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.finished = threading.Event()
        self.error: BaseException | None = None
        if self._pending is None:
            self.finished.set()

    def start(self) -> "ReplaySource":
        if self._thread is None:
            self._thread = start_daemon(self._run, "batchmon-replay")
        return self

    def stop(self) -> None:
        self._stopping.set()
        join_started(self._thread)

    def snapshot(self) -> Snapshot:
        return self._latest

    def set_interval(self, seconds: float) -> None:
        """Accepted for the Hub shape; a replay is paced by recorded time (see ``speed``), not by this."""
        if not seconds > 0:
            raise ValueError("interval must be positive")
        self._interval = float(seconds)

    @property
    def interval(self) -> float:
        return self._interval

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _publish(self, snap: Snapshot) -> None:
        self._latest = snap
        if self.on_snapshot is not None:
            self.on_snapshot(snap)

    def _run(self) -> None:
        try:
            self._publish(self._latest)
            wall0, rec0 = time.monotonic(), self._latest.time
            while self._pending is not None and not self._stopping.is_set():
                snap = self._pending
                due = wall0 + min(max(0.0, snap.time - rec0) / self.speed, 1e9)
                while not self._stopping.is_set() and time.monotonic() < due:
                    self._stopping.wait(min(MAX_WAIT_S, max(0.0, due - time.monotonic())))
                if self._stopping.is_set():
                    break
                self._publish(snap)
                self._pending = next(self._snapshots, None)
        except BaseException as exc:  # noqa: BLE001 - kept for the owner; the last snapshot stays shown
            self.error = exc
        finally:
            if self._pending is None:
                self.finished.set()
