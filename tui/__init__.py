"""batchmon.tui: the Textual monitor. Only this package imports textual; it renders Snapshots and nothing else.

Entry point: ``batchmon.tui.app.run_monitor(source, interval=..., mouse=...)``.
"""

import sys


def _asyncio_without_tls() -> None:
    """Import asyncio (Textual's loop) without the ssl module, when neither is imported yet.

    asyncio imports ssl only to offer TLS transports (``try: import ssl except ImportError: ssl = None``, in
    base_events, selector_events and sslproto); the monitor never opens one (agents are unix sockets, remote
    boxes are ssh subprocesses). Loading ssl maps OpenSSL's libcrypto and runs its initialisation: +4.2 MiB
    resident on Python 3.11, +4.4 on 3.12, a fifth of the monitor's RSS above nvitop's beside 16 jobs (issue 14
    point 3; nvitop has no asyncio). Only asyncio's own import sees ssl missing: anything that imports ssl later
    gets the real module."""
    if "asyncio" in sys.modules or "ssl" in sys.modules:
        return
    sys.modules["ssl"] = None  # type: ignore[assignment]  # None in sys.modules: `import ssl` raises ImportError
    try:
        import asyncio  # noqa: F401
    finally:
        if "ssl" in sys.modules and sys.modules["ssl"] is None:
            del sys.modules["ssl"]


_asyncio_without_tls()
