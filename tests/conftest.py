"""Suite-wide set-up.

Signals: a shell that starts the suite in the background (``cmd &`` without job control, ``nohup``) leaves
SIGINT/SIGQUIT/SIGHUP ignored, and children inherit ignored signals through exec. The launcher, recorder and
exporter tests send those signals to real child processes, so the suite restores the defaults first: what they
test is batchmon's handling, not how the suite was started.
"""

from __future__ import annotations

import signal

for _sig, _default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGQUIT, signal.SIG_DFL),
                       (signal.SIGHUP, signal.SIG_DFL)):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, _default)


# ----------------------------------------------------------------------------------------- shared helpers
# Imported by name (`from conftest import wait_until, make_step`): tests/ is on sys.path (rootdir conftest).

import asyncio  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

from batchmon.protocol import COMPONENTS, Step  # noqa: E402

T_STEP0 = 1_700_000_000.0


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition",
               poll: float = 0.01) -> Any:
    """Poll ``predicate()`` until it is truthy and return its value; fail after ``timeout`` seconds. The one way
    tests wait for something another thread or process does (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


async def wait_until_async(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition",
                           poll: float = 0.01) -> Any:
    """wait_until for a test running on an event loop (the loop keeps running while it waits)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)


def make_step(n: int = 7, batch: int | None = 32, *, time: float | None = None, step_seconds: float | None = 0.1,
              components: dict[str, int] | None = None, **fields: Any) -> Step:
    """The one Step builder: step ``n`` at ``batch``, 0.1 s apart from T_STEP0, components that grow with the
    batch (activations and batch data); any other Step field (allocated, peak_allocated, reserved,
    device_used, ...) by keyword, None by default."""
    if components is None:
        components = {name: (i + 1) * 1000 + ((batch or 0) * 10 if name in ("activations", "batch") else 0)
                      for i, name in enumerate(COMPONENTS)}
    return Step(step=n, time=T_STEP0 + n * 0.1 if time is None else time, step_seconds=step_seconds,
                batch_size=batch, components=components, **fields)
