"""Remote boxes (`batchmon --host HOST`): `ssh HOST batchmon stream`, its JSON lines fed into the local hub.

One long-lived reader thread per host reads the stream's records (the same records the remote hub ingests,
see hub_state), rewrites each record's ``source`` to the host name and hands it to a sink (``Hub.inject``).
The connection's state travels as ``link`` records, so a dropped connection shows as a warning in the
snapshot ("HOST: connection lost, retrying in 4s") and a recording replays it. A lost connection, ssh missing
or a host that cannot be reached never stops the monitor: the link retries with a growing delay.

Environment:
  BATCHMON_REMOTE_COMMAND  the command run on the remote box (default ``batchmon stream``); ``--interval N``
                           is appended.
  BATCHMON_SSH_OPTIONS     extra ssh arguments, split like a shell would (e.g. ``-F ~/.ssh/gpu_config -p 2222``);
                           they come before batchmon's own ``-o`` options, so they win.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import tempfile
import threading
import time
from typing import IO, Any, Callable

from batchmon import records
from batchmon.monitor.threads import join_started, start_daemon

Record = dict[str, Any]

DEFAULT_COMMAND = "batchmon stream"
COMMAND_ENV = "BATCHMON_REMOTE_COMMAND"
SSH_OPTIONS_ENV = "BATCHMON_SSH_OPTIONS"
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)  # delay before retry n; the last repeats
STABLE_S = 30.0  # a connection that lived this long resets the backoff
MAX_LINE_BYTES = 16 * 1024 * 1024
STOP_TIMEOUT_S = 3.0
QUIET_S = 0.3  # --once: after the first NVML sample, agents' hello and history have arrived once this quiet
# Our own ssh options: never prompt (no terminal to answer), notice a dead peer within ~15 s.
SSH_BASE_OPTIONS = ("-o", "BatchMode=yes", "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
                    "-o", "ServerAliveCountMax=3", "-T")


def remote_command(interval: float) -> str:
    """The command ssh runs on the remote box. Raises ValueError for one starting with '-': ssh reads the
    word after its options as the host and the rest as the command, but a leading '-' makes it an option
    (``-oProxyCommand=...`` ran a local command), so it is refused as a bad --host is."""
    command = os.environ.get(COMMAND_ENV, "").strip() or DEFAULT_COMMAND
    if command.startswith("-"):
        raise ValueError(f"{COMMAND_ENV} must be a command, not an ssh option: {command[:60]!r}")
    return f"{command} --interval {interval:g}"


def ssh_options() -> list[str]:
    """BATCHMON_SSH_OPTIONS split like a shell; a malformed value (unbalanced quote) is used unsplit."""
    raw = os.environ.get(SSH_OPTIONS_ENV, "")
    try:
        return shlex.split(raw)
    except ValueError:
        return [raw] if raw.strip() else []


def ssh_argv(host: str, command: str, options: list[str] | None = None) -> list[str]:
    """The ssh command line for one host. ``--`` is not used: ssh would take it as the host."""
    return ["ssh", *(ssh_options() if options is None else options), *SSH_BASE_OPTIONS, host, command]


def _tail(f: IO[bytes], limit: int = 300) -> str:
    """The last non-empty line ssh (or the remote command) wrote to stderr, to say why a link failed."""
    try:
        f.seek(0)
        data = f.read()[-4096:]
    except OSError:
        return ""
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").splitlines() if ln.strip()]
    text = lines[-1] if lines else ""
    return text if len(text) <= limit else text[: limit - 1] + "…"


class RemoteLink:
    """One remote host: a reader thread that keeps ``ssh HOST <stream command>`` running and feeds the sink."""

    def __init__(self, host: str, sink: Callable[[Record], None], *, interval: float = 1.0,
                 argv: list[str] | None = None, backoff: tuple[float, ...] = BACKOFF_S) -> None:
        if not host or host.startswith("-"):
            raise ValueError(f"bad host name {host!r}")
        self.host = host
        self._sink = sink
        self.argv = argv if argv is not None else ssh_argv(host, remote_command(interval))
        self._backoff = backoff
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None
        self.first_nvml = threading.Event()  # set once the host delivered an NVML sample
        self.failed = threading.Event()  # set once an attempt ended (for --once: stop waiting)
        self.connects = 0  # connections that delivered at least one record
        self.attempts = 0
        self.records = 0
        self.ticks = 0  # the remote hub's ticks seen (a tick follows each NVML and host sample)
        self._last_record = time.monotonic()

    # ------------------------------------------------------------------------------------------ public API

    def start(self) -> "RemoteLink":
        if self._thread is None:
            self._thread = start_daemon(self._run, f"batchmon-remote-{self.host}")
        return self

    def stop(self) -> None:
        """End the ssh process and the thread. Idempotent, bounded."""
        self._stop.set()
        with self._lock:
            proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                proc.terminate()  # the reader thread then sees EOF, waits for it and closes the pipe
            except OSError:
                pass
        join_started(self._thread, STOP_TIMEOUT_S)

    @property
    def ready(self) -> bool:
        """Worth printing for --once: an attempt failed, or the host sent its first NVML sample and then either
        a second tick or nothing for QUIET_S (the agents' hello and history come right after the first tick)."""
        if self.failed.is_set():
            return True
        return self.first_nvml.is_set() and (self.ticks >= 2 or time.monotonic() - self._last_record >= QUIET_S)

    # ------------------------------------------------------------------------------------------ thread

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            started = time.monotonic()
            connected, reason = self._attempt()
            if self._stop.is_set():
                break
            if connected and time.monotonic() - started >= STABLE_S:
                failures = 0
            delay = self._backoff[min(failures, len(self._backoff) - 1)]
            failures += 1
            self._emit(records.link(self.host, "lost", reason, delay))
            self.failed.set()
            self._stop.wait(delay)

    def _attempt(self) -> tuple[bool, str]:
        """One ssh session, read to its end. Returns (delivered any record, why it ended)."""
        self.attempts += 1
        with tempfile.TemporaryFile() as err:
            try:
                with self._lock:
                    if self._stop.is_set():
                        return False, "stopped"
                    self._proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                                  stderr=err, start_new_session=True)
            except FileNotFoundError:
                return False, f"{self.argv[0]} not found (install an OpenSSH client)"
            except OSError as exc:
                return False, f"cannot run {self.argv[0]}: {exc.strerror or exc}"
            connected = False
            bad = 0
            try:
                assert self._proc.stdout is not None
                for line in self._lines(self._proc.stdout):
                    record = self._parse(line)
                    if record is None:
                        bad += 1
                        continue
                    if not connected:
                        connected = True
                        self.connects += 1
                        self._emit(records.link(self.host, "connected"))
                    self._last_record = time.monotonic()
                    if record.get("kind") == "tick":
                        self.ticks += 1
                    if record.get("kind") in ("meta", "tick"):
                        continue
                    self._emit(record)
                    if record.get("kind") == "nvml":
                        self.first_nvml.set()
            finally:
                code = self._end_proc()
            if bad:
                self._emit(records.warning("remote", "invalid lines dropped",
                                           f"{bad} line(s) from ssh were not records", source=self.host))
            why = _tail(err)
            if not why:
                why = "stream ended" if code in (0, None) else f"ssh exited with code {code}"
            return connected, why

    def _lines(self, stream: IO[bytes]):
        """Complete lines from the stream; an oversized line is skipped to its end (counted as bad)."""
        while True:
            line = stream.readline(MAX_LINE_BYTES)
            if not line:
                return
            if not line.endswith(b"\n"):
                if len(line) >= MAX_LINE_BYTES:
                    while True:
                        rest = stream.readline(MAX_LINE_BYTES)
                        if not rest or rest.endswith(b"\n"):
                            break
                    yield b""
                # else: the stream ended mid-line; dropped with the connection
                continue
            yield line

    def _parse(self, line: bytes) -> Record | None:
        if not line.strip():
            return None
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("kind"), str):
            return None
        obj["source"] = self.host  # the remote stream says "local"; here it is this host
        return obj

    def _emit(self, record: Record) -> None:
        self.records += 1
        try:
            self._sink(record)
        except Exception:  # noqa: BLE001 - a closed hub must not kill the thread with a traceback
            self._stop.set()

    def _end_proc(self) -> int | None:
        with self._lock:
            proc = self._proc
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
            except OSError:
                pass
        try:
            code = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            code = None
        if proc.stdout is not None:
            try:
                proc.stdout.close()
            except OSError:
                pass
        return code
