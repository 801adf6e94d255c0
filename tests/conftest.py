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
