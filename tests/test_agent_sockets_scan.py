"""agent_sockets.scan: the agent sockets of a folder by pid, leaving out the pids the hub is connected to."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from batchmon.monitor.agent_sockets import scan


def test_scan_leaves_out_known_pids(tmp_path: Path) -> None:
    folder = tmp_path / "bm"
    folder.mkdir(mode=0o700)
    listeners = []
    for name in ("101.sock", "102.sock", "103-1.sock", "x.sock"):
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(folder / name))
        listeners.append(s)
    (folder / "104.sock").write_text("not a socket")
    try:
        assert [(f.pid, f.path.name) for f in scan(folder)] == [(101, "101.sock"), (102, "102.sock"),
                                                               (103, "103-1.sock")]
        assert [f.pid for f in scan(folder, {101, 103})] == [102]
        assert scan(folder, {101, 102, 103}) == []
        assert scan(folder / "missing") == []
    finally:
        for s in listeners:
            s.close()
    assert os.path.exists(folder / "101.sock")
