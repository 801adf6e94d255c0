"""A remote box's agents are marked on its GPU process rows whatever alias `--host` named the box by."""

from __future__ import annotations

import dataclasses

import tui_fixtures as fx
from batchmon.tui.app import BatchmonApp


def test_remote_agents_marked_on_their_process_rows_under_an_alias() -> None:
    local = fx.no_agents()
    box = fx.one_gpu(1)
    assert box.host.hostname != "gpu1"
    aliased = dataclasses.replace(box, agents=tuple(dataclasses.replace(a, source="gpu1") for a in box.agents))
    snap = dataclasses.replace(local, remote=(aliased,))
    views = dict(BatchmonApp(snapshot=snap)._device_views(snap))
    remote_rows = [row for key, view in views.items() if key.startswith(f"{box.host.hostname}:") for row in view.procs]
    agent_pid = box.agents[0].hello.pid
    assert [row.agent for row in remote_rows if row.pid == agent_pid] == [True]
    assert not any(row.agent for row in remote_rows if row.pid != agent_pid)


async def test_a_remote_box_job_gets_its_panel_named_with_the_host() -> None:
    from batchmon.tui.job_panel import JobPanel

    local = fx.one_gpu(1)
    box = fx.one_gpu(1)
    box = dataclasses.replace(box, host=dataclasses.replace(box.host, hostname="gpu1-node"),
                              agents=tuple(dataclasses.replace(a, source="gpu1") for a in box.agents))
    snap = dataclasses.replace(local, remote=(box,))
    app = BatchmonApp(snapshot=snap)
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1 and len(app.query(JobPanel)) == 2)
        views = [p.view for p in app.query(JobPanel)]
        assert [v.host for v in views] == ["", "gpu1-node"]  # local job first, then the box's
        assert views[1].lead.source == "gpu1" and views[1].devices[views[1].lead.key] is not None
        assert "@gpu1-node" in fx.screen_text(app)
