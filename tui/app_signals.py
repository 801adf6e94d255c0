"""How signals end the monitor, as the part of the App it is (BatchmonApp derives from SignalsApp): SIGTERM,
SIGHUP and SIGINT from outside end the app the way `q` does, and a handler installed outside the app (the demo's)
can ask it to quit at any point of its start-up.

Split from app.py to keep that module under 600 lines.
"""

from __future__ import annotations

import asyncio
import signal

from textual.app import App

QUIT_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)


class SignalsApp(App):
    _signals: list[int]  # signals whose handlers on_mount installed
    _loop: asyncio.AbstractEventLoop | None = None  # the app's loop, once its handlers are installed
    _pending_signal: int | None = None  # a signal quit_from_signal got before the app was mounted

    def _catch_signals(self) -> None:
        """SIGTERM, SIGHUP (the terminal closed) and SIGINT from outside end the app the way `q` does: Textual
        restores the terminal (alternate screen and mouse reporting off, cursor shown) and on_unmount stops
        the source, which ends what it started (ssh sessions of --host). Exit status 128 + the signal's number."""
        loop = self._loop = asyncio.get_running_loop()
        self._signals = []
        for sig in QUIT_SIGNALS:
            try:
                loop.add_signal_handler(sig, self._signalled, sig)
            except (NotImplementedError, RuntimeError, ValueError):  # not the main thread, or no such signal
                continue
            self._signals.append(sig)
        if self._pending_signal is not None:
            self._signalled(self._pending_signal)

    def _signalled(self, sig: int) -> None:
        self.exit(return_code=128 + int(sig))

    def quit_from_signal(self, sig: int) -> None:
        """For a signal handler installed outside the app (the demo's, while Textual starts): end the app as its
        own handlers do, wherever start-up was interrupted. Raising from the handler instead could land inside
        Textual's start-up and leave it hanging; before the loop runs, on_mount ends the app at once."""
        self._pending_signal = sig
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._signalled, sig)

    def _release_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in getattr(self, "_signals", ()):
            loop.remove_signal_handler(sig)
        self._signals = []
