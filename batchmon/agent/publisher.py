"""Where the agent's measurements go: the recent history (``handle.steps``/``events``), the socket that serves
it to monitors (batchmon.agent.transport, opened lazily), and the one-line stderr warnings.

Quiet steps are not Steps here but runs of the last one (batchmon.agent.step_runs): the history and the socket
thread expand or fold them.

Opening the socket can fail (an unusable folder): the training goes on unmonitored, with one warning.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from batchmon import protocol
from batchmon.agent.coalesce import HISTORY_EVENTS, HISTORY_STEPS, WINDOW_SECONDS
from batchmon.agent.step_runs import QuietRun, StepHistory
from batchmon.protocol import Bye, Event, Hello, Step

if TYPE_CHECKING:
    from batchmon.agent.transport import Transport

NVML_SECONDS = 1.0  # how often the transport thread calls ``tick`` (NVML's per-process figure)


def snapshot(items: deque[Any]) -> list[Any]:
    """A copy of a deque another thread may append to."""
    for _ in range(100):
        try:
            return list(items)
        except RuntimeError:  # mutated during iteration
            continue
    return []


class Publisher:
    """History, socket and warnings of one agent."""

    def __init__(self, pid: int, socket_dir: Path | None, hello: Callable[[], Hello],
                 on_error: Callable[[BaseException], None], tick: Callable[[], None]) -> None:
        self.pid = pid
        self.socket_dir = socket_dir
        self._hello = hello
        self._on_error = on_error
        self._tick = tick
        # told how often the allocator's figures are worth reading (Transport's on_pace; the agent sets it)
        self.pace: Callable[[float], None] | None = None
        self.transport: Transport | None = None
        self.socket_error: str | None = None  # why there is no socket (training continues unmonitored)
        self.steps = StepHistory(HISTORY_STEPS)  # Steps and quiet runs (batchmon.agent.step_runs)
        self.events: deque[Event] = deque(maxlen=HISTORY_EVENTS)
        self._warned: set[str] = set()

    def ensure(self) -> None:
        """Open the socket if it is not open (and was never found unusable)."""
        if self.transport is not None or self.socket_error is not None:
            return
        from batchmon.agent.transport import Transport  # sockets and selectors only once a model is seen

        try:
            directory = protocol.ensure_socket_dir(self.socket_dir)
            transport = Transport(protocol.socket_path(self.pid, directory), on_error=self._on_error,
                                  tick=self._tick, tick_seconds=NVML_SECONDS, window_seconds=WINDOW_SECONDS,
                                  on_pace=self.pace)
            transport.start()
        except (protocol.SocketDirError, OSError) as exc:
            self.socket_error = str(exc) or type(exc).__name__
            self.warn_once("socket", f"not monitoring this process: {self.socket_error}")
            self.events.append(Event(kind="warning", message=f"no agent socket: {self.socket_error}",
                                     time=time.time()))
            return
        self.transport = transport
        for event in snapshot(self.events):
            transport.put(event)
        self.hello()

    def hello(self) -> None:
        if self.transport is not None:
            self.transport.set_hello(self._hello())

    def step(self, step: Step) -> None:
        self.steps.append(step)
        if self.transport is not None:
            self.transport.put(step)

    def run(self, run: QuietRun | None) -> None:
        """Quiet steps begin (StepMeter.new_run): they join ``run`` one by one, and the socket thread reads them
        from it (handed over once, here)."""
        if run is not None:
            self.steps.append(run)
            if self.transport is not None:
                self.transport.put(run)

    def event(self, event: Event) -> None:
        self.events.append(event)
        if self.transport is not None:
            self.transport.put(event)

    def close(self, bye: Bye, linger: float) -> None:
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.close(bye, linger=linger)

    def forget(self) -> None:
        """In a forked child: the socket is the parent's. Keep its file, drop our side."""
        transport, self.transport = self.transport, None
        if transport is not None:
            transport.forget()

    def warn_once(self, key: str, message: str) -> None:
        if key in self._warned:
            return
        self._warned.add(key)
        try:
            sys.stderr.write(f"batchmon: {message}\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            pass
