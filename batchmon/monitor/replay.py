"""Replay a recording made by `batchmon record`: the same HubState, fed from a file, in recorded time.

A snapshot is taken at each recorded tick (the moment the live monitor built one); recordings without tick
lines fall back to "just before the next NVML sample". Bad lines and a truncated last line (the recorder died
mid-write) become counted Warnings; they never stop a replay.

The file is streamed, never loaded: memory stays bounded for a recording of any size (a 543 MB one needed
4.1 GB when it was read whole). A line over MAX_RECORD_LINE bytes is skipped as a bad line without being held.
Only the first lines are read before the replay starts (the interval, whether there are ticks); a file with
no record in them is not a recording (NotARecording: the CLI says so and exits 1). The last record's time
is read from the file's tail (the position bar's end). Record times that are not finite, sane epoch seconds
(Infinity, 1e300, 1e400) are replaced by the previous time, and at most MAX_SOURCES distinct sources are
replayed (the rest is counted in one warning), so no recording can freeze or flood a replay.

Seeking is pure state too: a ReplayCursor (SnapshotFeed underneath) steps from snapshot to snapshot, skips
moments without building their snapshots, and seeks back by streaming a fresh HubState from the start. The
ReplaySource paces it on its own thread and carries out seeks asked from the UI's.

Clearing the ended runs (the monitor's `x`) in a replay acts at the replay position shown when it is pressed,
as if the recording had a ``clear_ended`` record there: the runs that had ended by then go; a run that ends
later still shows its end. The clear belongs to that position, not to the screen: seeking back before it shows
those ended runs again (the recording as it was then), and playing or seeking past it clears them again.

Over 400 lines: reading a recording (streamed, bounded, hostile input survived), feeding it moment by moment,
the seekable cursor and the paced source are one pipeline whose parts share the record rules above.
"""

from __future__ import annotations

import json
import math
import os
import stat
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

from batchmon.monitor.hub_state import LOCAL, HubState
from batchmon.monitor.threads import join_started, start_daemon
from batchmon.records import clear_ended as clear_ended_record
from batchmon.records import warning as warning_record
from batchmon.snapshot import RUNNING, Snapshot

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
    start_time: float | None = None  # recorded time of the first record with one
    end_time: float | None = None  # of the last one (read from the file's tail; None when not found there)

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
    start: float | None = None
    for number, line, complete in _lines(path):
        if number > HEADER_LINES:
            break
        record, _ = _parse(line, complete)
        if record is None:
            continue
        valid += 1
        if start is None and "t" in record:
            start = _time(record, math.nan)
            start = None if math.isnan(start) else start
        if interval is None and record.get("kind") == "meta":
            value = record.get("interval")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e6:
                interval = float(value)
        has_ticks = has_ticks or _is_local_tick(record)
        if has_ticks and interval is not None and start is not None:
            break
    if strict and valid == 0:
        raise NotARecording(f"{path} is not a batchmon recording (no record in its first {HEADER_LINES} lines)")
    if not has_ticks:
        has_ticks = _scan_for_tick(path)
    return Recording(path, interval if interval is not None else 1.0, has_ticks, valid, start, _end_time(path))


TAIL_BYTES = 1 << 20  # how much of the file's end is read for its last record's time


def _end_time(path: Path) -> float | None:
    """The recorded time of the file's last record that has one, from its last TAIL_BYTES (the position bar's
    end); None when none is there."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, os.SEEK_END)
            f.seek(max(0, size - TAIL_BYTES))
            tail = f.read(TAIL_BYTES)
    except OSError:
        return None
    for line in reversed(tail.split(b"\n")):
        record, _ = _parse(line, True)
        if record is not None and "t" in record:
            t = _time(record, math.nan)
            if not math.isnan(t):
                return t
    return None


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


class SnapshotFeed:
    """A recording fed through a HubState one snapshot moment at a time, streaming.

    ``advance()`` ingests the records up to the next moment a snapshot is taken (a recorded tick; without ticks,
    just before the next NVML sample) and returns its time, without building the snapshot: a seek skips moments
    at the cost of ingesting their records only. ``snapshot()`` builds the one of the moment ``advance`` reached.
    """

    def __init__(self, rec: Recording, state: HubState | None = None, clears: tuple[float, ...] = ()) -> None:
        self.rec = rec
        self.state = state or HubState()
        self._clears = sorted(clears)  # the user's clears of the ended runs still ahead (recorded times)
        self._records = rec.records()
        self.now = 0.0  # time of the last record read
        self.moment: float | None = None  # the moment advance() reached (None before the first, after the last)
        self.hellos = 0  # agent hello messages ingested so far
        self._fed = False  # records ingested since the last moment
        self._moments = 0
        self._held: dict[str, Any] | None = None  # no-tick recordings: the NVML record after the moment
        self._sources: set[str] = {LOCAL}
        self._done = False

    def advance(self) -> float | None:
        """Ingest up to the next snapshot moment; its recorded time, or None when the recording is over."""
        if self._held is not None:
            self._ingest(self._held)
            self._held = None
            self._fed = True
        if self._done:
            self.moment = None
            return None
        rec = self.rec
        for record, why, number in self._records:
            if record is None:
                self.state.ingest(warning_record("recording", "bad lines skipped", f"line {number}: {why}", t=self.now))
                continue
            before, self.now = self.now, _time(record, self.now)
            if "t" in record and record["t"] != self.now:
                record["t"] = self.now  # the state and the screen never see an unbelievable time
            while self._clears and self.now > self._clears[0]:  # the recording has passed a clear: apply it
                self.clear_ended(self._clears.pop(0))
            source = record.get("source", LOCAL)
            if source not in self._sources:
                if not isinstance(source, str) or len(self._sources) >= MAX_SOURCES:
                    self.state.ingest(warning_record("recording", f"more than {MAX_SOURCES} sources; the rest skipped",
                                                     f"line {number}", t=self.now))
                    continue
                self._sources.add(source)
            kind = record.get("kind")
            is_local = source == LOCAL
            if rec.has_ticks:
                self._ingest(record)
                self._fed = True
                if kind == "tick" and is_local:
                    return self._reached(self.now)
            else:
                if kind == "nvml" and is_local and self._fed:
                    self._held = record
                    return self._reached(before)
                self._ingest(record)
                self._fed = self._fed or kind != "meta"
        self._done = True
        if self._fed or not self._moments:
            return self._reached(self.now)
        self.moment = None
        return None

    def clear_ended(self, at: float) -> None:
        """Forget the runs that had ended by recorded time ``at`` (the monitor's `x` at that position)."""
        self.state.ingest({**clear_ended_record(t=at), "before": at})

    def _reached(self, t: float) -> float:
        while self._clears and self._clears[0] <= t:  # a clear made at this very moment applies to its snapshot
            self.clear_ended(self._clears.pop(0))
        self._fed = False
        self._moments += 1
        self.moment = t
        return t

    def _ingest(self, record: dict[str, Any]) -> None:
        if record.get("kind") == "agent":
            data = record.get("data")
            if isinstance(data, dict) and data.get("type") == "hello":
                self.hellos += 1
        self.state.ingest(record)

    def snapshot(self, t: float | None = None) -> Snapshot:
        """The state now, as the snapshot of time ``t`` (default: the moment reached, else the last record's)."""
        when = t if t is not None else self.moment if self.moment is not None else self.now
        return self.state.snapshot(when, self.rec.interval, kind="replay")


def iter_snapshots(rec: Recording, state: HubState | None = None) -> Iterator[Snapshot]:
    """Feed a recording through a HubState; yield the snapshot at each tick (deterministic), streaming."""
    feed = SnapshotFeed(rec, state)
    while (t := feed.advance()) is not None:
        yield feed.snapshot(t)


@dataclass(frozen=True)
class ReplayPosition:
    """Where a replay is: the recorded time shown, the recording's first and last record times (end None while
    unknown), whether the last snapshot is shown, and how many seeks were made (a front end drops what it
    accumulated over time, e.g. a GPU's memory history, when that changes)."""

    time: float
    start: float | None
    end: float | None
    at_end: bool
    seeks: int = 0

    @property
    def fraction(self) -> float | None:
        if self.start is None or self.end is None or self.end <= self.start:
            return None
        return max(0.0, min(1.0, (self.time - self.start) / (self.end - self.start)))


class ReplayCursor:
    """The replay's pure state: which snapshot is shown, what comes next, seeking. No threads, no clocks.

    Forward (the next moment, a seek ahead) streams on; a seek back starts a fresh HubState from the file's
    start and streams to the target (O(target), memory bounded as ever). Unless ``from_start``, the replay starts
    at the first moment after the first agent's hello (a recording often begins long before a training process
    attaches); a recording without a hello starts at its beginning."""

    def __init__(self, rec: Recording, *, from_start: bool = False) -> None:
        self.rec = rec
        self.seeks = 0
        self.start, self.end = rec.start_time, rec.end_time
        self.clears: list[float] = []  # recorded times at which the user cleared the ended runs (`x`)
        self._restart()
        if not from_start:
            self.to_first_hello()

    def _restart(self) -> None:
        self._feed = SnapshotFeed(self.rec, clears=tuple(self.clears))
        first = self._feed.advance()
        self.current = self._feed.snapshot(first)
        self._next = self._feed.advance()

    def to_first_hello(self) -> None:
        """From the recording's first snapshot: move to the first one that shows an agent's hello."""
        if self.current.agents:  # an agent is there from the first moment
            return
        while self._next is not None and not self._feed.hellos:
            self._next = self._feed.advance()
        if self._next is None:  # no hello at all: the whole recording, from its start
            self._restart()
            return
        self.current = self._feed.snapshot(self._next)
        self._next = self._feed.advance()

    @property
    def at_end(self) -> bool:
        return self._next is None

    @property
    def next_time(self) -> float | None:
        """Recorded time of the next snapshot (None at the end)."""
        return self._next

    def step(self) -> Snapshot | None:
        """Move to the next snapshot and return it; None at the end (nothing changes)."""
        if self._next is None:
            return None
        self.current = self._feed.snapshot(self._next)
        self._next = self._feed.advance()
        self._note_time(self.current.time)
        return self.current

    def seek(self, t: float) -> Snapshot:
        """Show the first snapshot at or after recorded time ``t`` (the last one when ``t`` is past the end,
        the first when before the start)."""
        self.seeks += 1
        if t < self.current.time:
            self._restart()
            if t < self.current.time or self._next is None:
                return self.current
        while self._next is not None and self._next < t:
            self._next = self._feed.advance()
        if self._next is None:  # past the end: everything ingested, the final snapshot
            self.current = self._feed.snapshot()
        else:
            self.current = self._feed.snapshot(self._next)
            self._next = self._feed.advance()
        self._note_time(self.current.time)
        return self.current

    def seek_by(self, seconds: float) -> Snapshot:
        return self.seek(self.current.time + seconds)

    def clear_ended(self) -> Snapshot:
        """The monitor's `x`: forget the runs that had ended by the position shown, from that position on (see
        the module's docstring). The snapshot shown stays that of its moment, without them."""
        at = self.current.time
        if at not in self.clears:
            self.clears.append(at)
            self.clears.sort()
        # the feed has already read on to the next moment: only the runs ended by ``at`` go, in the state and
        # in the snapshot shown (rebuilding it from the state would show the next moment's records early)
        self._feed.clear_ended(at)
        self.current = without_ended(self.current, at)
        return self.current

    def seek_start(self) -> Snapshot:
        return self.seek(-math.inf)

    def seek_end(self) -> Snapshot:
        return self.seek(math.inf)

    def _note_time(self, t: float) -> None:
        if self.end is None or t > self.end:
            self.end = t

    def position(self) -> ReplayPosition:
        return ReplayPosition(self.current.time, self.start, self.end, self.at_end, self.seeks)


def without_ended(snap: Snapshot, at: float) -> Snapshot:
    """``snap`` without the runs that had ended by recorded time ``at``, on every box."""
    def kept(box: Snapshot) -> Snapshot:
        agents = tuple(a for a in box.agents if a.state == RUNNING or a.ended is None or a.ended.time > at)
        return box if len(agents) == len(box.agents) else replace(box, agents=agents)
    return replace(kept(snap), remote=tuple(kept(box) for box in snap.remote))


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
    """Drives a front end from a recording, paced by recorded time / speed, seekable. Same shape as Hub.

    The cursor (pure) lives on the replay thread; ``seek_by``/``seek_start``/``seek_end`` (any thread) post a
    request that thread carries out, and ``position()`` says where the snapshot last published is. At the end
    of the recording the last snapshot is published once more, with ``position().at_end`` true, so a front end
    can say so; a seek from there plays on."""

    def __init__(self, path: str | Path, *, speed: float = 1.0, from_start: bool = False,
                 on_snapshot: Callable[[Snapshot], None] | None = None) -> None:
        if not speed > 0:
            raise ValueError("speed must be positive")
        self.path = Path(path)
        self.speed = float(speed)
        self.from_start = from_start
        self.on_snapshot = on_snapshot  # public, as on Hub
        # OSError or NotARecording here: the caller says so in one line
        self._recording = read_recording(self.path, strict=True)
        self._interval = self._recording.interval
        # the first snapshot at once (the first lines only); the jump to the first hello happens on the thread
        self._cursor = ReplayCursor(self._recording, from_start=True)
        self._latest = self._cursor.current
        self._position = self._cursor.position()
        self._lock = threading.Lock()
        self._requests: list[tuple[str, float]] = []  # seeks and clears asked from the UI's thread, in order
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.finished = threading.Event()
        self.error: BaseException | None = None
        if self._cursor.at_end and from_start:
            self.finished.set()

    def start(self) -> "ReplaySource":
        if self._thread is None:
            self._thread = start_daemon(self._run, "batchmon-replay")
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        join_started(self._thread)

    def snapshot(self) -> Snapshot:
        return self._latest

    def position(self) -> ReplayPosition:
        """Where the last published snapshot is in the recording."""
        return self._position

    def seek_by(self, seconds: float) -> None:
        self._post("by", float(seconds))

    def seek_start(self) -> None:
        self._post("to", -math.inf)

    def seek_end(self) -> None:
        self._post("to", math.inf)

    def clear_ended(self) -> None:
        """The monitor's `x`: forget the ended runs from the replay position shown (ReplayCursor.clear_ended);
        thread-safe, carried out on the replay thread after the seeks asked before it."""
        self._post("clear", 0.0)

    def _post(self, kind: str, value: float) -> None:
        with self._lock:
            if kind == "by" and self._requests and self._requests[-1][0] == "by":
                value += self._requests.pop()[1]  # keys pressed faster than the thread seeks add up
            elif kind == "to" and self._requests and self._requests[-1][0] in ("by", "to"):
                self._requests.pop()  # a jump replaces the seek before it
            elif kind == "clear" and self._requests and self._requests[-1][0] == "clear":
                return  # `x` held down: one clear
            self._requests.append((kind, value))
        self._wake.set()

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
        self._position = self._cursor.position()
        if self.on_snapshot is not None:
            self.on_snapshot(snap)

    def _take_request(self) -> tuple[str, float] | None:
        with self._lock:
            request = self._requests.pop(0) if self._requests else None
            if not self._requests:
                self._wake.clear()
        return request

    def _run(self) -> None:
        cursor = self._cursor
        try:
            if not self.from_start:
                cursor.to_first_hello()  # streams to it: on this thread, not before the first frame
            self._publish(cursor.current)
            wall0, rec0 = time.monotonic(), cursor.current.time
            ended = False
            while not self._stopping.is_set():
                request = self._take_request()
                if self._stopping.is_set():  # stop() sets it before waking us: a cleared wake-up is not lost
                    break
                if request is not None and request[0] == "clear":  # no move: the pace goes on
                    self._publish(cursor.clear_ended())
                    continue
                if request is not None:
                    kind, value = request
                    snap = cursor.seek_by(value) if kind == "by" else cursor.seek(value)
                    self.finished.clear()
                    ended = False
                    self._publish(snap)
                    wall0, rec0 = time.monotonic(), snap.time
                    continue
                if cursor.at_end:
                    if not ended:  # once: the same snapshot, now said to be the end
                        ended = True
                        self._publish(cursor.current)
                        self.finished.set()
                    self._wake.wait(MAX_WAIT_S)
                    continue
                due = wall0 + min(max(0.0, (cursor.next_time or rec0) - rec0) / self.speed, 1e9)
                left = due - time.monotonic()
                if left > 0:
                    self._wake.wait(min(MAX_WAIT_S, left))
                    continue
                stepped = cursor.step()
                if stepped is not None:
                    self._publish(stepped)
        except BaseException as exc:  # noqa: BLE001 - kept for the owner; the last snapshot stays shown
            self.error = exc
            self.finished.set()
