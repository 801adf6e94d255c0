"""Replay a recording made by `batchmon record`: the same HubState, fed from a file, in recorded time.

A snapshot is taken at each recorded tick (the moment the live monitor built one); recordings without tick
lines fall back to "just before the next NVML sample". Bad lines and a truncated last line (the recorder died
mid-write) become counted Warnings; they never stop a replay.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from batchmon.monitor.hub_state import LOCAL, HubState
from batchmon.monitor.threads import join_started, start_daemon
from batchmon.records import warning as warning_record
from batchmon.snapshot import Snapshot


@dataclass
class Recording:
    records: list[dict[str, Any]]
    bad_lines: list[tuple[int, str]]  # (line number, why)
    interval: float
    has_ticks: bool


def read_recording(path: str | Path) -> Recording:
    """Parse a recording. Raises OSError when the file cannot be read; tolerates any bad content."""
    with open(path, "rb") as f:
        raw = f.read()
    records: list[dict[str, Any]] = []
    bad: list[tuple[int, str]] = []
    lines = raw.split(b"\n")
    ends_with_newline = raw.endswith(b"\n")
    if ends_with_newline:
        lines.pop()
    for number, line in enumerate(lines, 1):
        last = number == len(lines)
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            why = "truncated last line" if last and not ends_with_newline else "not JSON"
            bad.append((number, why))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
            bad.append((number, "not a record"))
            continue
        records.append(obj)
    interval = 1.0
    for rec in records:
        if rec.get("kind") == "meta":
            value = rec.get("interval")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e6:
                interval = float(value)
            break
    has_ticks = any(r.get("kind") == "tick" and r.get("source", LOCAL) == LOCAL for r in records)
    return Recording(records, bad, interval, has_ticks)


def _time(record: dict[str, Any], default: float) -> float:
    t = record.get("t")
    return float(t) if isinstance(t, (int, float)) and not isinstance(t, bool) and t == t else default


def iter_snapshots(rec: Recording, state: HubState | None = None) -> Iterator[Snapshot]:
    """Feed a recording through a HubState; yield the snapshot at each tick (deterministic)."""
    state = state or HubState()
    for number, why in rec.bad_lines:
        state.ingest(warning_record("recording", "bad lines skipped", f"line {number}: {why}"))
    now = 0.0
    fed_since_snapshot = False
    yielded = 0
    for record in rec.records:
        before, now = now, _time(record, now)
        kind = record.get("kind")
        is_local = record.get("source", LOCAL) == LOCAL
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


def final_snapshot(path: str | Path) -> Snapshot:
    """The state at the end of a recording."""
    last = None
    for last in iter_snapshots(read_recording(path)):
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
        self._recording = read_recording(self.path)  # OSError here: the caller says so in one line
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
                due = wall0 + max(0.0, snap.time - rec0) / self.speed
                if self._stopping.wait(max(0.0, due - time.monotonic())):
                    break
                self._publish(snap)
                self._pending = next(self._snapshots, None)
        except BaseException as exc:  # noqa: BLE001 - kept for the owner; the last snapshot stays shown
            self.error = exc
        finally:
            if self._pending is None:
                self.finished.set()
