"""`--host` boxes in the UI: a remote box's agents are marked on its GPU process rows whatever alias named the
box; its panels carry the name the user typed; a box with no GPU gets a host panel; the header counts every
box's agents (issue 17 item 12)."""

from __future__ import annotations

import dataclasses

import tui_fixtures as fx
from batchmon.snapshot import Snapshot
from batchmon.tui import views
from batchmon.tui.app import BatchmonApp
from batchmon.tui.header import header_text


def remote(box: Snapshot, name: str = "gpu1") -> Snapshot:
    """``box`` as the hub shows a --host box: its snapshot's source and its agents' source are the typed name."""
    return dataclasses.replace(box, source=name,
                               agents=tuple(dataclasses.replace(a, source=name) for a in box.agents))


def test_remote_agents_marked_on_their_process_rows_under_an_alias() -> None:
    local = fx.no_agents()
    box = remote(fx.one_gpu(1))
    assert box.host.hostname != "gpu1"
    snap = dataclasses.replace(local, remote=(box,))
    shown = views.device_views(snap, {})
    assert len(shown) == 2 and [v.host for _, v in shown] == ["", "gpu1"]
    remote_rows = shown[1][1].procs
    agent_pid = box.agents[0].hello.pid
    assert [row.agent for row in remote_rows if row.pid == agent_pid] == [True]
    assert not any(row.agent for row in remote_rows if row.pid != agent_pid)
    assert not any(row.agent for row in shown[0][1].procs)  # the local GPU runs no agent


async def test_a_remote_box_job_gets_its_panel_named_as_typed_and_the_header_counts_both() -> None:
    from batchmon.tui.job_panel import JobPanel

    local = fx.one_gpu(1)
    box = fx.one_gpu(1)
    box = remote(dataclasses.replace(box, host=dataclasses.replace(box.host, hostname="gpu1-node")))
    snap = dataclasses.replace(local, remote=(box,))
    assert views.agent_count(snap) == 2
    assert "2 agents" in header_text(snap, interval=1.0, paused=False, title=None, width=200).plain
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 2)
        shown = [p.view for p in app.query(JobPanel)]
        assert [v.host for v in shown] == ["", "gpu1"]  # local job first, then the box's, as the user named it
        assert shown[1].lead.source == "gpu1" and shown[1].devices[shown[1].lead.key] is not None
        assert "@gpu1" in fx.screen_text(app) and "2 agents" in fx.screen_text(app)


async def test_a_remote_box_without_a_gpu_gets_a_host_panel() -> None:
    from batchmon.tui.notices import NoGpuPanel

    snap = dataclasses.replace(fx.one_gpu(1), remote=(remote(fx.no_gpu(), "cpu-box"),))
    hosts = views.host_views(snap, any_gpu=True)
    assert [(k, v.host) for k, v in hosts] == [("host:cpu-box", "cpu-box")]
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(NoGpuPanel)) == 1)
        text = fx.screen_text(app)
        assert "No GPU visible @cpu-box" in text and "NVML Shared Library Not Found" in text
