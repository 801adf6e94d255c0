"""The monitor on the real Hub: a protocol peer on a real unix socket, the hub's IO thread, the app's loop."""

from __future__ import annotations

import socket

from hub_peer import FakeAgent, LivePid, make_hello, make_step
import tui_fixtures as fx
from batchmon.monitor.hub import Hub
from batchmon.protocol import Event
from batchmon.tui.app import BatchmonApp
from batchmon.tui.job_panel import JobPanel


async def test_hub_snapshots_reach_the_screen_and_new_events_are_highlighted(tmp_path):
    sock_dir = tmp_path / "s"
    sock_dir.mkdir(mode=0o700)
    live = LivePid()
    hello = make_hello(live.pid, argv=("train.py", "--name", "[bold]literal[/bold]"))
    agent = FakeAgent(sock_dir, live.pid, hello, [make_step(n, batch=32) for n in range(1, 6)])
    hub = Hub(interval=0.1, socket_dir=sock_dir)
    app = BatchmonApp(hub, interval=0.1)
    try:
        async with app.run_test(size=(160, 48)) as pilot:
            await fx.wait_for(pilot, lambda: app.query(JobPanel) and "step 5" in fx.screen_text(app), timeout=15)
            text = fx.screen_text(app)
            assert "train.py --name [bold]literal[/bold]" in text
            assert f"pid {live.pid}" in text and socket.gethostname() in text
            agent.send_message(make_step(6, batch=32))
            agent.send_message(Event(kind="oom", message="CUDA out of memory. Tried to allocate 8.00 GiB",
                                     step=6, batch_size=64))
            await fx.wait_for(pilot, lambda: "CUDA out of memory" in fx.screen_text(app), timeout=15)
            assert "OOM" in fx.screen_text(app) and "step 6" in fx.screen_text(app)
            await pilot.press("right_square_bracket")  # the interval key reaches the hub
            assert hub.interval == app.interval == 0.25
        assert not hub.running  # quitting the app stopped the hub
    finally:
        hub.stop()
        agent.close()
        live.kill()
