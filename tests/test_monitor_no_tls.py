"""The monitor's process imports asyncio (Textual's loop) without ssl: OpenSSL is never loaded (~4 MiB resident).

Run in a fresh interpreter: the test process has asyncio (and maybe ssl) imported already."""

from __future__ import annotations

import subprocess
import sys

CHECK = r"""
import socket, sys
import batchmon.tui.app  # what the live monitor imports first: textual, asyncio, the app
import asyncio
assert "ssl" not in sys.modules, "ssl imported"
with open("/proc/self/maps") as f:
    maps = f.read()
assert "libssl" not in maps and "libcrypto" not in maps, "OpenSSL mapped"
assert asyncio.base_events.ssl is None

async def echo():  # the loop still does what Textual needs of it: tasks, readers on sockets
    a, b = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=a)
    b.sendall(b"ping\n")
    line = await reader.readline()
    writer.close()
    b.close()
    return line

assert asyncio.run(echo()) == b"ping\n"
import ssl  # anything that needs TLS later still gets it
assert ssl.create_default_context() is not None
print("ok")
"""


def test_the_monitor_loads_no_tls():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_asyncio_already_imported_with_ssl_is_left_alone():
    """Imported after asyncio with ssl (a test process, a host program): nothing is removed or replaced."""
    code = ("import asyncio, ssl, sys\nimport batchmon.tui\n"
            "assert sys.modules['ssl'] is ssl and asyncio.base_events.ssl is ssl\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
