"""Ended runs stay (issue 16 point 1): the last 20, newest first, with how they ended, steps and peak, until
cleared; --once --json keeps them in ``agents`` with ``state``. Real HubState, real replay of the H200 recordings,
a real Hub with its IO thread, the real CLI and a real Textual app."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tui_fixtures as fx
from batchmon import protocol, records
from batchmon.monitor.hub import Hub
from batchmon.monitor.hub_state import HubState
from batchmon.monitor.render import format_table
from batchmon.monitor.replay import final_snapshot, read_recording
from batchmon.protocol import Bye, Event
from batchmon.snapshot import ENDED_LIMIT
from hub_peer import make_hello, make_step, wait_for

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parent.parent


def msg(pid: int, message, t: float = 1.0) -> dict:
    return records.agent(f"vm:{pid}", {"data": json.loads(protocol.encode(message))}, t=t)


def test_the_h200_oom_recording_ends_with_the_run_shown_as_oom_not_no_agent():
    snap = final_snapshot(FIXTURES / "agent_h200_oom.jsonl")
    (gpt,) = snap.agents
    assert gpt.state == "oom"
    assert gpt.ended.how == "oom" and gpt.ended.steps == 0 and "out of memory in forward at step 1" in gpt.ended.text
    assert gpt.ended.peak == 148_941_015_040  # the live tensors at the failing moment: no step finished
    assert snap.running == ()
    text = format_table(snap, 120)
    assert "Ended runs (newest first)" in text and "[OOM " in text and "pid 571" in text


def test_the_two_jobs_recording_keeps_both_runs_newest_first_with_steps_and_peak():
    snap = final_snapshot(FIXTURES / "tui_h200_two_jobs.jsonl")
    gpt, cnn = snap.agents  # the GPT ended last
    assert [a.hello.pid for a in snap.agents] == [516, 517] and gpt.ended.time > cnn.ended.time
    assert {a.state for a in snap.agents} == {"ended"}
    assert (gpt.ended.how, gpt.ended.steps, cnn.ended.steps) == ("exited", 60, 300)
    peaks = {a.hello.pid: max(s.peak_allocated for s in a.history) for a in snap.agents}
    assert gpt.ended.peak == peaks[516] and cnn.ended.peak == peaks[517]
    assert gpt.ended.exit_code is None and "exit code not reported" in gpt.ended.text


def test_once_json_of_a_replay_keeps_ended_runs_in_agents_with_their_state():
    out = subprocess.run([sys.executable, "-m", "batchmon", "replay", str(FIXTURES / "agent_h200_oom.jsonl"),
                          "--once", "--json"], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)), cwd=ROOT)
    assert out.returncode == 0, out.stderr
    (agent,) = json.loads(out.stdout)["agents"]
    assert agent["state"] == "oom" and agent["ended"]["how"] == "oom" and agent["ended"]["steps"] == 0
    oom = agent["oom"]
    assert {"time", "step", "batch_size", "requested_bytes", "components", "reserved", "advice"} <= set(oom)
    assert (oom["step"], oom["batch_size"], oom["requested_bytes"]) == (1, 2048, 6442450944)


def test_states_running_ended_oom_and_a_survived_oom_is_not_the_end():
    s = HubState()
    s.ingest(msg(1, make_hello(1)))
    s.ingest(msg(1, make_step(1)))
    s.ingest(msg(2, make_hello(2)))
    s.ingest(msg(2, make_step(1)))
    s.ingest(msg(2, Event(kind="oom", message="out of memory in backward at step 2", step=2, batch_size=16,
                          components=dict(make_step(1).components), requested_bytes=1 << 20, time=2.0)))
    s.ingest(msg(2, make_step(2)))  # the script caught it and went on
    snap = s.snapshot(3.0)
    assert [a.state for a in snap.agents] == ["running", "running"] and snap.agents[1].oom is not None
    s.ingest(msg(2, Bye(reason="exit", time=4.0)))
    s.ingest(msg(1, Bye(reason="exit", time=5.0)))
    one, two = s.snapshot(6.0).agents  # newest first
    assert (one.hello.pid, one.state, two.hello.pid, two.state) == (1, "ended", 2, "ended")
    assert two.ended.how == "exited" and two.oom.batch_size == 16  # the post-mortem stays with the run


def test_at_most_the_last_20_ended_runs_are_kept_newest_first_until_cleared():
    s = HubState()
    for pid in range(1, 26):
        s.ingest(msg(pid, make_hello(pid)))
        s.ingest(msg(pid, make_step(1)))
        s.ingest(msg(pid, Bye(reason="exit", time=100.0 + pid)))
    pids = [a.hello.pid for a in s.snapshot(200.0).agents]
    assert pids == list(range(25, 5, -1)) and len(pids) == ENDED_LIMIT
    s.ingest(records.clear_ended(t=201.0))
    assert s.snapshot(202.0).agents == ()


def test_an_agent_gone_without_bye_says_whether_its_process_ended():
    s = HubState()
    for pid in (1, 2, 3):
        s.ingest(msg(pid, make_hello(pid)))
    s.ingest(records.agent_gone("vm:1", why="process ended", t=10.0))
    s.ingest(records.agent_gone("vm:2", why="silent", t=11.0))
    s.ingest(records.agent_gone("vm:3", t=12.0))  # a recording from before agent_gone said why
    hows = {a.hello.pid: a.ended.how for a in s.snapshot(13.0).agents}
    assert hows == {1: "killed", 2: "lost", 3: "gone"}


def test_a_new_run_of_the_same_pid_after_it_ended_is_a_second_job():
    s = HubState()
    s.ingest(msg(7, make_hello(7)))
    s.ingest(msg(7, Bye(reason="detached", time=2.0)))
    s.ingest(msg(7, make_hello(7)))  # attached again in the same process
    s.ingest(msg(7, make_step(1)))
    snap = s.snapshot(3.0)
    assert [a.state for a in snap.agents] == ["running", "ended"]
    assert len({a.job for a in snap.agents}) == 2 and s.agent_keys() == ["vm:7"]


def test_a_live_hub_ends_a_run_at_bye_and_clear_ended_goes_through_its_io_thread(tmp_path):
    sockdir = protocol.ensure_socket_dir(tmp_path / "sock")
    hub = Hub(interval=0.05, socket_dir=sockdir).start()
    try:
        for rec in (msg(9, make_hello(9)), msg(9, make_step(1)), msg(9, make_step(2)), msg(9, Bye(reason="exit"))):
            hub.inject(rec)
        ended = wait_for(lambda: hub.snapshot().agents and hub.snapshot().agents[0].ended, what="ended run")
        assert ended.how == "exited" and ended.steps == 2
        hub.clear_ended()
        wait_for(lambda: hub.snapshot().agents == (), what="cleared")
        assert hub.error is None
    finally:
        hub.stop()


async def test_tui_shows_the_oom_run_as_its_post_mortem_and_x_clears_it(tmp_path):
    from batchmon.tui.app import BatchmonApp
    from batchmon.tui.job_panel import JobPanel
    from batchmon.tui.notices import NoAgentsPanel

    sockdir = protocol.ensure_socket_dir(tmp_path / "sock")
    hub = Hub(interval=0.05, socket_dir=sockdir)
    for record, _, _ in read_recording(FIXTURES / "agent_h200_oom.jsonl").records():
        if record is not None and record.get("kind") != "meta":
            hub.inject(record)
    app = BatchmonApp(hub, interval=0.05)
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: any(p.view.lead.state == "oom" for p in app.query(JobPanel))
                          and "what would have fit batch 2048" in fx.screen_text(app), timeout=60)
        text = fx.screen_text(app)
        assert " OOM " in text and "asked for 6.0 GiB" in text and "No training process attached" not in text
        await pilot.press("x")
        await fx.wait_for(pilot, lambda: not list(app.query(JobPanel)) and list(app.query(NoAgentsPanel)), timeout=60)
        hub.stop()  # no snapshot in flight while the app closes (its on_unmount stops the hub too: idempotent)
        await pilot.pause()


def test_once_sees_a_process_lingering_after_its_oom_as_oom(tmp_path):
    """What an agent sends a first monitor while it lingers after dying of an OOM (hello, its steps, the oom
    event, bye) over a real socket: `batchmon --once`'s sample_once lists the run as oom, without waiting out
    its max_wait for more."""
    import time

    from hub_peer import FakeAgent, LivePid

    sockdir = protocol.ensure_socket_dir(tmp_path / "sock")
    live = LivePid()
    fail = Event(kind="oom", message="out of memory in backward at step 3", step=3, batch_size=64,
                 components=dict(make_step(2).components), requested_bytes=1 << 30, time=10.0)
    greeting = b"".join(protocol.encode(m) for m in (make_hello(live.pid), make_step(1), make_step(2), fail,
                                                      Bye(reason="exit", time=11.0)))
    agent = FakeAgent(sockdir, live.pid, greeting=greeting)
    try:
        started = time.monotonic()
        snap = Hub(socket_dir=sockdir).sample_once(max_wait=20.0, quiet=0.5)
        (run,) = snap.agents
        assert run.state == "oom" and run.ended.steps == 2 and run.oom.batch_size == 64
        assert time.monotonic() - started < 10.0  # the bye ends its burst: no wait for max_wait
    finally:
        agent.close()
        live.kill()


def test_a_torchrun_job_that_ended_is_one_panel_with_each_ranks_end():
    from batchmon.tui.job_panel import job_lines
    from batchmon.tui.predict import Predictor
    from batchmon.tui.state import WhatIfState
    from batchmon.tui.views import job_view, ordered_jobs

    snap = final_snapshot(FIXTURES / "ddp_h200_run.jsonl")
    jobs = ordered_jobs(snap)
    (key, ranks), = [(k, r) for k, r in jobs if len(r) == 2]
    assert all(a.state == "ended" for a in ranks) and key.endswith("|ended")
    lines = [t.plain for t in job_lines(job_view(snap, key, ranks, WhatIfState(), Predictor()), 120, "full")]
    assert lines[0].lstrip().startswith("ENDED") and "2/2 ranks" in lines[0]
    for a in ranks:
        assert any(f"rank {a.hello.rank}" in ln and f"{a.ended.steps} steps" in ln for ln in lines)


EXITING = """
import os, signal, sys, torch
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
for _ in range(3):
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    opt.zero_grad()
sys.stdin.readline()  # the test lets it end once the monitor has seen its steps
if sys.argv[1] == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
sys.exit(int(sys.argv[1]))
"""


def test_batchmon_run_tells_the_monitor_its_childs_exit_code_and_signal(tmp_path):
    """`batchmon run` (real launcher, real agent auto-attached, real hub): the child's exit status, which no
    agent can report, reaches the run's summary through the launcher's exit note."""
    import subprocess

    import pytest

    pytest.importorskip("torch")
    from agent_helpers import batchmon_cmd

    sockdir = protocol.ensure_socket_dir(tmp_path / "sock")
    script = tmp_path / "exiting.py"
    script.write_text(EXITING)
    hub = Hub(interval=0.05, socket_dir=sockdir).start()
    hub.GONE_GRACE_S = 0.5
    cases = (("3", 3), ("kill", 128 + 9))
    procs = {}
    try:
        for arg, _ in cases:  # both runs side by side: each launch is a fresh interpreter importing torch
            procs[arg] = subprocess.Popen(batchmon_cmd("run", "--", sys.executable, str(script), arg), cwd=ROOT,
                                          env={**os.environ, "BATCHMON_DIR": str(sockdir)}, stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for arg, rc in cases:
            proc = procs[arg]

            def running(arg=arg):
                return any(a.state == "running" and a.hello.argv[-1] == arg and a.last_step is not None
                           and a.last_step.step == 3 for a in hub.snapshot().agents)

            wait_for(running, timeout=90, what=f"the steps of the run that ends with {arg}")
            _, err = proc.communicate("\n", timeout=60)
            assert proc.returncode == rc, err  # the launcher's own exit is unchanged

            def ended(arg=arg):
                return next((a.ended for a in hub.snapshot().agents if a.ended is not None and a.hello.argv[-1] == arg
                             and (a.ended.exit_code is not None or a.ended.signal is not None)), None)

            end = wait_for(ended, timeout=60, what=f"the end of the run that ends with {arg}")
            if arg == "3":
                assert (end.how, end.exit_code, end.signal, end.text) == ("exited", 3, None, "exited with code 3")
            else:
                assert (end.how, end.exit_code, end.signal) == ("killed", None, 9) and "SIGKILL" in end.text
            assert end.steps == 3
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        hub.stop()


def test_agent_exit_records_complete_the_summary_before_or_after_the_end():
    s = HubState()
    for pid in (1, 2):
        s.ingest(msg(pid, make_hello(pid)))
        s.ingest(msg(pid, make_step(1)))
    s.ingest(msg(1, Bye(reason="exit", time=5.0)))
    s.ingest(records.agent_exit("vm:1", 2, t=5.1))  # after its bye: the ended run gets it
    s.ingest(records.agent_exit("vm:2", -15, t=6.0))  # before its end is seen: kept for it
    s.ingest(records.agent_gone("vm:2", why="process ended", t=6.1))
    s.ingest(records.agent_exit("vm:3", "x"))  # malformed: counted, not fatal
    ends = {a.hello.pid: a.ended for a in s.snapshot(7.0).agents}
    assert (ends[1].exit_code, ends[1].text) == (2, "exited with code 2")
    assert (ends[2].how, ends[2].signal, ends[2].text) == ("killed", 15, "killed by SIGTERM (signal 15)")
    assert any("bad agent_exit record" in w.message for w in s.snapshot(7.0).warnings)
