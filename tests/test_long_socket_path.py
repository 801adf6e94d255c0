"""An agent socket whose path is too long for a socket address (a deep TMPDIR: pytest's, a CI runner's): the agent
binds a shorter staging name and links it into place, so the path exists; the monitor must still reach it (it
reaches it through the folder's descriptor). Seen as a demo test failing only when pids had six digits."""

from __future__ import annotations

import os

import pytest

from batchmon.monitor.agent_sockets import UNIX_PATH_MAX
from conftest import wait_until

torch = pytest.importorskip("torch")


def test_the_monitor_reaches_an_agent_at_a_path_too_long_for_an_address(tmp_path) -> None:
    import batchmon
    from batchmon.monitor.hub import Hub

    name = f"{os.getpid()}.sock"
    pad = UNIX_PATH_MAX - len(str(tmp_path)) - 2 - len(name)  # the socket's whole path: exactly UNIX_PATH_MAX
    assert pad > 0
    deep = tmp_path / ("d" * pad)
    deep.mkdir(mode=0o700)
    model = torch.nn.Linear(8, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, socket_dir=deep)
    hub = None
    try:
        for _ in range(3):
            opt.zero_grad()
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
        sockets = list(deep.glob("*.sock"))
        assert sockets and len(os.fsencode(str(sockets[0]))) >= UNIX_PATH_MAX
        hub = Hub(interval=0.05, socket_dir=deep).start()
        agent = wait_until(lambda: next((a for a in hub.snapshot().agents if a.last_step is not None), None),
                           what="the hub sees the agent's steps")
        assert agent.hello.pid == os.getpid() and agent.last_step.step == 3
    finally:
        if hub is not None:
            hub.stop()
        handle.detach()
