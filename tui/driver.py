"""Textual's Linux driver without its 10-a-second input poll: the monitor's idle cost is mostly wake-ups.

Textual's LinuxDriver reads the terminal in a thread that wakes every 0.1 s even when no key is pressed (to time
out a lone Escape). For a monitor that refreshes once a second that thread was about a third of its idle CPU
(bench/monitor_cpu.py, bench/results/monitor_cpu_devbox_*.json). This driver's input thread waits for input
(at most IDLE_MAX_S), except while the key parser waits on a timeout (then exactly until it), and a pipe wakes
it when input is disabled (quit, suspend). Everything else is Textual's own driver.

Textual internals are used (the parser's ``_timeout_time``, the thread target's shape): ``available()`` says
whether they look as expected, and the app falls back to Textual's driver otherwise.

Also here, as the other half of what reaches the terminal: ``CroppedChopsUpdate``, partial screen updates that
start where a line changed (the app uses it through tui/app_cost.py). Textual writes each changed span of a
line from the left edge of the widget it is in (``ChopsUpdate.render_segments`` crops only the span's end): a
clock's seconds repainted the whole header line, a GPU's watts its panel's line from the border on, so the
monitor wrote ~12x nvitop's bytes beside one job.
"""

from __future__ import annotations

import os
import queue
import selectors
from codecs import getincrementaldecoder

from rich.cells import cell_len
from rich.console import Console
from rich.color import ColorSystem
from rich.control import Control
try:  # an internal of Textual's: without it partial updates are written as Textual writes them
    from textual._compositor import ChopsUpdate
except ImportError:  # pragma: no cover - another Textual
    ChopsUpdate = None  # type: ignore[assignment, misc]
from textual._loop import loop_last
from textual._time import get_time
from textual._xterm_parser import XTermParser
from textual.drivers.linux_driver import LinuxDriver
from textual.strip import Strip

POLL_S = 0.1  # Textual's own poll, used when the parser does not expose its timeout
IDLE_MAX_S = 2.0  # the longest wait without input: bounds a quit that races the thread's start-up

OUTPUT_POLL_S = 0.5  # how often a wait on the output thread checks that it still lives


def available() -> bool:
    """The Textual internals this driver relies on are there."""
    return (hasattr(LinuxDriver, "run_input_thread") and hasattr(LinuxDriver, "disable_input")
            and hasattr(LinuxDriver, "process_message") and "_timeout_time" in vars(XTermParser(False)))


class QuietLinuxDriver(LinuxDriver):
    """LinuxDriver whose input thread sleeps until there is input (or a pending key sequence times out)."""

    _wake_w: int | None = None

    def write(self, data: str) -> None:
        """Queue output for Textual's output thread, but only while that thread lives: on a closed terminal (tmux
        kill-session, a dropped ssh) its write fails and the thread dies, and LinuxDriver's unbounded ``put`` on
        the full queue then hung the process on its way out (seen with ``batchmon demo``, whose training run
        outlived it). A slow terminal still gets everything: the wait goes on while the thread is alive."""
        writer = self._writer_thread
        pending = getattr(writer, "_queue", None)  # Textual's WriterThread's queue (an internal: else its own write)
        if writer is None or pending is None:
            super().write(data)
            return
        while writer.is_alive():
            try:
                pending.put(data, timeout=OUTPUT_POLL_S)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Stop the output thread the same way: the stop mark is queued and waited for only while it lives."""
        writer = self._writer_thread
        if writer is None or getattr(writer, "_queue", None) is None:
            super().close()
            return
        self.write(None)  # type: ignore[arg-type]  # the thread's stop mark
        while writer.is_alive():
            writer.join(timeout=OUTPUT_POLL_S)

    def disable_input(self) -> None:
        # LinuxDriver.disable_input sets exit_event and joins the input thread; the thread waits up to IDLE_MAX_S,
        # so it needs a wake-up to see the flag at once. The byte is never read: until the flag is up, each wait returns
        # at once (a few microseconds of spinning at most), then the thread ends.
        wake = self._wake_w
        if wake is not None:
            try:
                os.write(wake, b"x")
            except OSError:
                pass
        super().disable_input()

    def run_input_thread(self) -> None:
        """Textual's run_input_thread, with a wait that ends on input, on the parser's timeout, or on the pipe."""
        wake_r, wake_w = os.pipe()
        self._wake_w = wake_w
        selector = selectors.DefaultSelector()
        selector.register(self.fileno, selectors.EVENT_READ, "tty")
        selector.register(wake_r, selectors.EVENT_READ, "wake")
        fileno = self.fileno
        parser = XTermParser(self._debug)
        feed, tick = parser.feed, parser.tick
        decode = getincrementaldecoder("utf-8")().decode

        hung_up = False

        def process(events: list, final: bool = False) -> None:
            nonlocal hung_up
            tty_events = [(key, mask) for key, mask in events if key.data == "tty"]
            for last, (_key, mask) in loop_last(tty_events):
                if mask & selectors.EVENT_READ:
                    try:
                        raw = os.read(fileno, 1024 * 4)
                    except OSError:  # EIO: the terminal was closed
                        raw = b""
                    if not raw:
                        # End of input: the terminal is gone (closed window, killed tmux session). Reading on
                        # would spin (the tty stays readable) and, this thread not being a daemon, keep the
                        # process alive after the app ended; SIGHUP tells the app.
                        hung_up = True
                        break
                    data = decode(raw, final=final and last)
                    if not data:
                        break
                    for event in feed(data):
                        self.process_message(event)
            for event in tick():
                self.process_message(event)

        def timeout() -> float | None:
            due = getattr(parser, "_timeout_time", POLL_S)
            if due is None:
                return IDLE_MAX_S  # nothing pending: wait for input (or the wake pipe)
            if due is POLL_S:
                return POLL_S
            return max(0.0, due - get_time())

        try:
            while not self.exit_event.is_set() and not hung_up:
                process(selector.select(timeout()))
            selector.unregister(self.fileno)
            process(selector.select(0.1), final=True)
        finally:
            self._wake_w = None
            selector.close()
            for fd in (wake_r, wake_w):
                try:
                    os.close(fd)
                except OSError:
                    pass


class CroppedChopsUpdate(ChopsUpdate if ChopsUpdate is not None else object):  # type: ignore[misc]
    """Textual's partial update, each changed span written from its own column (from the start of the segment it
    starts in when that segment holds a wide character: a line is never cut inside one) rather than from the
    widget's left edge, and without Textual's newline after each line (each span starts with a cursor move).

    Colours are set only when they change: Textual writes every segment as its colours, its text and a reset,
    so a step counter's three new digits cost ~35 bytes, most of them ``ESC[38;5;245;48;5;16m`` and ``ESC[0m``.
    Here the colours in force are carried from one segment to the next, across cursor moves (which leave them as
    they are), and set again (reset and new colours in one sequence) only where a segment's differ; the frame
    ends with a reset, so nothing outside it sees them. Beside 16 jobs the spans that change each second (the
    step counters, the clock) are mostly in the same dim colours: about 13 bytes each instead of ~35."""

    def render_segments(self, console: Console) -> str:
        out: list[str] = []
        append = out.append
        move_to = Control.move_to
        chops, chop_ends = self.chops, self.chop_ends
        color_system = console._color_system or ColorSystem.TRUECOLOR
        current = ""  # the SGR parameters in force ("": none since the last reset)

        def write(strip: Strip) -> None:
            nonlocal current
            for text, style, _ in strip:
                if not text:
                    continue
                if style is None or style._link:
                    if current:
                        append("\x1b[0m")
                        current = ""
                    append(text if style is None else Strip.render_style(style, text, color_system))
                    continue
                ansi = style._ansi
                if ansi is None:
                    ansi = Strip.render_ansi(style, color_system)
                if ansi != current:
                    append(f"\x1b[0;{ansi}m" if current and ansi else "\x1b[0m" if current else f"\x1b[{ansi}m")
                    current = ansi
                append(text)

        for y, x1, x2 in self.spans:
            for end, (x, strip) in zip(chop_ends[y], chops[y].items()):
                if strip is None or x > x2 or end <= x1:
                    continue
                if x2 > x >= x1 and end <= x2:  # the whole chop lies in the span
                    append(move_to(x, y).segment.text)
                    write(strip)
                    continue
                start = x
                if x < x1:  # skip the segments that end before the span; start in the one it starts in
                    for segment in strip:
                        text = segment.text
                        width = cell_len(text)
                        if start + width > x1:
                            if width == len(text):  # one cell per character: start at the span's own column
                                start = x1
                            break
                        start += width
                append(move_to(start, y).segment.text)
                write(strip.crop(start - x, min(end, x2) - x))
        if current:
            append("\x1b[0m")
        # (Textual also writes a newline after each line's spans: every span starts with its own cursor move)
        return "".join(out)


def cropped(update: object) -> object:
    """A ChopsUpdate as a CroppedChopsUpdate (what the terminal gets for the same screen); anything else as is."""
    parts = ("chops", "spans", "chop_ends")
    if ChopsUpdate is not None and type(update) is ChopsUpdate and all(hasattr(update, a) for a in parts):
        return CroppedChopsUpdate(update.chops, update.spans, update.chop_ends)
    return update

