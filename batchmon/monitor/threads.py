"""Start and join the monitor's worker threads so that a Ctrl-C landing anywhere in between is harmless.

The shape `self._thread = Thread(...); self._thread.start()` with `stop()` joining whatever is assigned fails
when a KeyboardInterrupt lands after the assignment and before the thread started: `join()` then raises
"cannot join thread before it is started" out of the clean-up. Every worker (hub, replay, remote links) starts
and joins through these two functions instead.
"""

from __future__ import annotations

import threading
from typing import Callable


def start_daemon(target: Callable[[], object], name: str) -> threading.Thread:
    """A started daemon thread. Assign the result only after this returns: an interrupted start leaves the
    caller's attribute None, and the thread, if it did start, sees the caller's stop flag and ends."""
    thread = threading.Thread(target=target, name=name, daemon=True)
    thread.start()
    return thread


def join_started(thread: threading.Thread | None, timeout: float | None = None) -> None:
    """Wait for `thread` where there is something to wait for: not None, not us, and started."""
    if thread is None or thread is threading.current_thread() or thread.ident is None:
        return
    try:
        thread.join(timeout)
    except RuntimeError:  # between ident and its start event; it sees the stop flag on its own
        pass
