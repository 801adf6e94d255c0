"""The monitor's Linux driver: Textual's own, less its 10 Hz input poll (batchmon/tui/driver.py).

Its input thread runs for real on a real pseudo-terminal; only the hand-off of parsed events to an app is
replaced by a list (the app is not what is tested here). The monitor in a real terminal (keys, q) is covered by
test_tui_tmux.py.
"""

from __future__ import annotations

import asyncio
import os
import pty
import signal
import sys
import threading
import time
import tty

import pytest

from conftest import wait_until_async

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux driver")


def wakeups(thread: threading.Thread) -> int:
    """Times the thread was scheduled to run (its wake-ups), from /proc."""
    with open(f"/proc/self/task/{thread.native_id}/schedstat") as fh:
        return int(fh.read().split()[2])


async def parked(thread: threading.Thread, timeout: float = 5.0) -> int:
    """The thread's wake-up count once it sits in its wait: two readings 0.1 s apart agree."""
    deadline = time.monotonic() + timeout
    last = wakeups(thread)
    while True:
        await asyncio.sleep(0.1)
        now = wakeups(thread)
        if now == last:
            return now
        if time.monotonic() > deadline:
            raise AssertionError(f"the input thread never settled ({now} wake-ups and counting)")
        last = now


async def test_input_thread_reads_keys_times_out_a_lone_escape_sleeps_when_idle_and_stops_at_once():
    from textual import events

    from batchmon.tui.driver import IDLE_MAX_S, QuietLinuxDriver, available

    assert available()  # the Textual internals it relies on are there (else the app uses Textual's driver)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTSTP, signal.SIGCONT, signal.SIGWINCH)}
    master, slave = pty.openpty()
    tty.setraw(slave)  # as the driver's start_application_mode leaves the terminal: bytes, not lines
    got: list = []

    class Recording(QuietLinuxDriver):
        def process_message(self, message) -> None:  # the app's side of the hand-off
            got.append(message)

    driver = Recording(None, mouse=False)  # type: ignore[arg-type]
    driver.fileno = slave
    thread = threading.Thread(target=driver.run_input_thread, daemon=True)
    driver._key_thread = thread  # as start_application_mode does: disable_input joins it
    thread.start()
    try:
        keys = lambda: [m.key for m in got if isinstance(m, events.Key)]  # noqa: E731
        os.write(master, b"a")
        await wait_until_async(lambda: "a" in keys(), what="the key a")
        sent = time.monotonic()
        os.write(master, b"\x1b")  # a lone Escape: only the parser's timeout turns it into a key
        await wait_until_async(lambda: "escape" in keys(), what="the lone escape")
        assert time.monotonic() - sent < 1.0  # waited for the parser's timeout, not for IDLE_MAX_S
        before = await parked(thread)  # the Escape's own handling (GIL hand-offs) is over before the window opens
        await asyncio.sleep(2.0)  # the measuring window: nothing typed
        idle = wakeups(thread) - before
        assert idle <= 2.0 / IDLE_MAX_S + 2, f"{idle} wake-ups in 2 s idle (Textual's own driver: about 20)"
        t = time.monotonic()
        driver.disable_input()
        assert not thread.is_alive() and time.monotonic() - t < 0.5  # woken by the pipe, not the timeout
    finally:
        driver.exit_event.set()
        thread.join(IDLE_MAX_S + 1)
        for fd in (master, slave):
            os.close(fd)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_the_monitor_uses_it_on_linux_unless_a_driver_is_forced():
    from textual import constants
    from textual.drivers.linux_driver import LinuxDriver

    from batchmon.tui.app import BatchmonApp
    from batchmon.tui.driver import QuietLinuxDriver

    cls = BatchmonApp().get_driver_class()
    if constants.DRIVER is None:
        assert cls is QuietLinuxDriver and issubclass(cls, LinuxDriver)
    else:  # TEXTUAL_DRIVER set: Textual's choice stands
        assert cls is not QuietLinuxDriver


async def test_input_thread_ends_when_the_terminal_is_closed():
    """A closed terminal (window closed, tmux session killed) leaves the tty readable at EOF forever: the input
    thread spun at 100% CPU and, not being a daemon, kept a demo whose app had already ended alive (seen after a
    killed tmux session under load). It must end on its own, without exit_event."""
    from batchmon.tui.driver import QuietLinuxDriver

    saved = {s: signal.getsignal(s) for s in (signal.SIGTSTP, signal.SIGCONT, signal.SIGWINCH)}
    master, slave = pty.openpty()
    tty.setraw(slave)
    driver = QuietLinuxDriver(None, mouse=False)  # type: ignore[arg-type]
    driver.fileno = slave
    thread = threading.Thread(target=driver.run_input_thread, daemon=True)
    thread.start()
    try:
        os.close(master)  # the terminal goes away: reads give EIO / EOF from now on
        master = -1
        await wait_until_async(lambda: not thread.is_alive(), what="the input thread to end", timeout=5.0)
        assert not driver.exit_event.is_set()
    finally:
        driver.exit_event.set()
        thread.join(2.0)
        for fd in (master, slave):
            if fd >= 0:
                os.close(fd)
        for sig, handler in saved.items():
            signal.signal(sig, handler)


# ----------------------------------------------------------------------------------- cropped partial updates

def terminal_cells(data: str) -> dict[tuple[int, int], tuple[str, str]]:
    """What a terminal draws from ``data``: (x, y) -> (character, the colours in force); cursor moves, SGR."""
    import re

    cells: dict[tuple[int, int], tuple[str, str]] = {}
    x = y = 0
    sgr = ""
    for m in re.finditer(r"\x1b\[(\d+);(\d+)H|\x1b\[([0-9;]*)m|(\n)|(.)", data, re.S):
        if m.group(1):
            y, x = int(m.group(1)) - 1, int(m.group(2)) - 1
        elif m.group(3) is not None:
            codes = m.group(3)
            if codes in ("", "0"):
                sgr = ""
            elif codes.startswith("0;"):  # a reset and new colours in one sequence
                sgr = ";" + codes[2:]
            else:
                sgr = sgr + ";" + codes
        elif m.group(4):
            x, y = 0, y + 1
        else:
            cells[(x, y)] = (m.group(5), sgr)
            x += 1
    return cells


def test_a_cropped_update_draws_every_changed_cell_as_textual_would_and_little_else():
    from hypothesis import given, settings
    from hypothesis import strategies as st
    from rich.console import Console
    from rich.segment import Segment
    from rich.style import Style
    from textual._compositor import ChopsUpdate
    from textual.strip import Strip

    from batchmon.tui.driver import CroppedChopsUpdate, cropped

    console = Console(color_system="256", force_terminal=True, width=200)
    styles = [Style(), Style(bold=True), Style(color="red"), Style(color="blue", bgcolor="black")]
    segs = st.lists(st.tuples(st.text(alphabet="ab 09█▂│", min_size=1, max_size=7), st.sampled_from(styles)),
                    min_size=1, max_size=6)

    @settings(max_examples=200, deadline=None)
    @given(st.lists(segs, min_size=1, max_size=3), st.data())
    def check(widgets, data):
        # one line cut into widgets side by side (the chops), and changed spans over it
        chops, ends, x = {}, [], 0
        for parts in widgets:
            strip = Strip([Segment(text, style) for text, style in parts])
            chops[x] = strip
            x += strip.cell_length
            ends.append(x)
        x1 = data.draw(st.integers(0, x - 1))
        x2 = data.draw(st.integers(x1 + 1, x))
        spans = [(0, x1, x2)]
        textual = terminal_cells(ChopsUpdate([chops], spans, [ends]).render_segments(console))
        ours = terminal_cells(cropped(ChopsUpdate([chops], spans, [ends])).render_segments(console))
        assert set(ours) <= set(textual)
        assert all(ours[c] == textual[c] for c in ours)  # the same characters in the same colours
        assert {(i, 0) for i in range(x1, x2)} <= set(ours)  # every cell of the span
        assert min(i for i, _ in ours) == x1  # nothing before the span (one cell per character here)

    check()
    # the colours are set once for consecutive segments that share them (across cursor moves), and the frame
    # ends reset: three step counters in the same colours
    dim = Style(color="grey50", bgcolor="black")
    row = Strip([Segment("step ", styles[1]), Segment("1234", dim)])
    frame = ChopsUpdate([{0: row}] * 3, [(y, 5, 9) for y in range(3)], [[9]] * 3)
    data = cropped(frame).render_segments(console)
    textual = ChopsUpdate([{0: row}] * 3, [(y, 5, 9) for y in range(3)], [[9]] * 3).render_segments(console)
    assert terminal_cells(data) == {c: v for c, v in terminal_cells(textual).items() if c[0] >= 5}
    assert data.count("\x1b[0m") == 1 and data.endswith("\x1b[0m") and data.count("m1234") == 1
    assert len(data) < len(textual) / 2
    # a wide character: the span is written from the start of the segment it starts in, never from inside one
    strip = Strip([Segment("ab", styles[1]), Segment("c显d", styles[2])])
    two_rows = ChopsUpdate([{0: strip}, {0: strip}], [(0, 4, 5), (1, 3, 4)], [[5], [5]])
    data = cropped(two_rows).render_segments(console)
    ours = terminal_cells(data)
    assert min(x for x, y in ours if y == 0) == 2 and min(x for x, y in ours if y == 1) == 2
    assert "\n" not in data  # each span starts with its own cursor move: no newline between lines
    assert type(cropped(ChopsUpdate([{}], [(0, 0, 1)], [[]]))) is CroppedChopsUpdate
    assert cropped("a full update") == "a full update"


def test_the_monitor_writes_its_partial_updates_cropped():
    from batchmon.tui.app import BatchmonApp
    from batchmon.tui.app_cost import CostApp

    assert issubclass(BatchmonApp, CostApp)
    assert "_display" in vars(CostApp)
    from textual.app import App

    assert hasattr(App, "_display")  # the internal it wraps is still there in this Textual
