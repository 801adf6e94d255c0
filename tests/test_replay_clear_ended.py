"""`x` (clear the ended runs) in a replay (issue 16 point 1 with point 6): it clears the runs that had ended by
the replay position shown, from that position on; a run that ends later still shows its end; seeking back
before it shows the ended runs again (the recording as it was then) and playing or seeking past it clears them
again. The real ReplayCursor / ReplaySource on a recording written with the real record constructors and
protocol encoding, and the real Textual app on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tui_fixtures as fx
from batchmon import protocol, records
from batchmon.monitor.hub_state import HubState
from batchmon.monitor.replay import ReplayCursor, ReplaySource, read_recording
from batchmon.protocol import Bye
from batchmon.tui.app import BatchmonApp
from conftest import wait_until
from hub_peer import make_hello, make_step

T0 = 1_767_225_600.0
ENDS = {1: 5.0, 2: 15.5, 3: None, 4: 23.5}  # seconds from T0: runs 1, 2 and 4 say bye then; 3 runs on
LAST = 25  # a tick a second, at 0.9 s past each second, to 25.9


def agent_line(pid: int, message, t: float) -> dict:
    return records.agent(f"vm:{pid}", {"data": json.loads(protocol.encode(message))}, t=t)


def write_recording(path: Path) -> Path:
    """Four runs under one monitor (ENDS), a step each a second, a tick at 0.9 s past each second."""
    lines = [records.meta(1.0, "record", version="test", t=T0)]
    for pid in ENDS:
        lines.append(agent_line(pid, make_hello(pid), T0 + 0.1 * pid))
    for second in range(LAST + 1):
        t = T0 + second
        for pid, ends in ENDS.items():
            if ends is None or second < ends:
                lines.append(agent_line(pid, make_step(second + 1, t0=T0 + 0.5 - 0.1), t + 0.5))
            if ends is not None and second < ends <= second + 1:
                lines.append(agent_line(pid, Bye(reason="exit", time=T0 + ends), T0 + ends))
        lines.append(records.tick(t=t + 0.9))
    path.write_text("".join(records.record_line(r) for r in lines))
    return path


def ended_pids(snap) -> list[int]:
    return sorted(a.hello.pid for a in snap.agents if a.state != "running")


def running_pids(snap) -> list[int]:
    return sorted(a.hello.pid for a in snap.agents if a.state == "running")


def test_x_clears_the_runs_ended_by_the_position_shown_and_a_later_end_still_shows(tmp_path):
    cursor = ReplayCursor(read_recording(write_recording(tmp_path / "rec.jsonl")))
    snap = cursor.seek(T0 + 14.9)  # the tick at 14.9: run 1 ended, run 2 still running (it ends at 15.5)
    assert (ended_pids(snap), running_pids(snap)) == ([1], [2, 3, 4])
    # the cursor has already read on to the next moment (run 2's bye at 15.5): the clear still leaves its end
    cleared = cursor.clear_ended()
    assert cleared.time == snap.time and ended_pids(cleared) == [] and running_pids(cleared) == [2, 3, 4]
    after = cursor.step()
    assert after is not None and ended_pids(after) == [2] and running_pids(after) == [3, 4]


def test_seeking_back_before_the_clear_shows_the_ended_runs_again_and_past_it_clears_them(tmp_path):
    cursor = ReplayCursor(read_recording(write_recording(tmp_path / "rec.jsonl")))
    cursor.seek(T0 + 17.9)
    assert ended_pids(cursor.current) == [1, 2]
    assert ended_pids(cursor.clear_ended()) == []
    assert cursor.clears == [T0 + 17.9]
    back = cursor.seek(T0 + 7.9)  # before x: run 1 had ended, run 2 not yet; the recording as it was then
    assert (ended_pids(back), running_pids(back)) == ([1], [2, 3, 4])
    assert ended_pids(cursor.seek(T0 + 16.9)) == [1, 2]  # still before the clear
    assert ended_pids(cursor.seek(T0 + 17.9)) == []  # the moment x was pressed: cleared, as it was shown
    played = [cursor.step() for _ in range(3)]
    assert all(s is not None and ended_pids(s) == [] for s in played)
    end = cursor.seek_end()  # run 4 ended after the clear: its end shows
    assert cursor.at_end and ended_pids(end) == [4] and running_pids(end) == [3]


def test_x_at_the_end_sticks_through_a_seek_home_and_back_to_the_end(tmp_path):
    cursor = ReplayCursor(read_recording(write_recording(tmp_path / "rec.jsonl")))
    end = cursor.seek_end()
    assert cursor.at_end and ended_pids(end) == [1, 2, 4]
    assert ended_pids(cursor.clear_ended()) == []
    start = cursor.seek_start()
    assert ended_pids(start) == [] and running_pids(start) == [1, 2, 3, 4]
    assert ended_pids(cursor.seek(T0 + 6.9)) == [1]
    final = cursor.seek_end()
    assert cursor.at_end and ended_pids(final) == [] and running_pids(final) == [3]


def test_a_second_x_before_the_first_clears_from_there_too(tmp_path):
    cursor = ReplayCursor(read_recording(write_recording(tmp_path / "rec.jsonl")))
    cursor.seek(T0 + 20.9)
    cursor.clear_ended()
    cursor.seek(T0 + 6.9)
    assert ended_pids(cursor.current) == [1]
    assert ended_pids(cursor.clear_ended()) == []
    assert ended_pids(cursor.seek(T0 + 16.9)) == [2]  # run 2 ended after the second clear, before the first
    assert ended_pids(cursor.seek(T0 + 21.9)) == []
    assert cursor.clears == [T0 + 6.9, T0 + 20.9]


def test_the_source_clears_on_request_after_the_seeks_asked_before_it(tmp_path):
    published = []
    src = ReplaySource(write_recording(tmp_path / "rec.jsonl"), speed=0.001, on_snapshot=published.append)
    src.start()
    try:
        wait_until(lambda: published, what="the first snapshot")
        src.seek_by(11.0)  # from the first hello's moment (0.9 s) to the tick at 11.9: run 1 ended
        src.clear_ended()
        wait_until(lambda: src.position().seeks == 1 and not ended_pids(src.snapshot())
                   and abs(src.snapshot().time - (T0 + 11.9)) < 1e-6, what="cleared at 11.9")
        assert running_pids(src.snapshot()) == [2, 3, 4] and src.error is None
    finally:
        src.stop()


async def test_x_in_the_replayed_monitor_clears_and_a_seek_back_shows_them_again(tmp_path):
    src = ReplaySource(write_recording(tmp_path / "rec.jsonl"), speed=0.001)  # only the keys move it
    app = BatchmonApp(src, title="replay")
    async with app.run_test(size=(120, 60)) as pilot:  # tall: the ended runs are listed under the live ones
        await fx.wait_for(pilot, lambda: app.shown is not None and app.shown.agents)
        await pilot.press("right", "right")  # 20 s on: runs 1 and 2 have ended
        await fx.wait_for(pilot, lambda: ended_pids(app.shown) == [1, 2] and "ENDED" in fx.screen_text(app))
        at = app.shown.time
        await pilot.press("x")
        await fx.wait_for(pilot, lambda: ended_pids(app.shown) == [] and "ENDED" not in fx.screen_text(app))
        assert app.shown.time == at and running_pids(app.shown) == [3, 4]
        await pilot.press("left")  # back before x: the run that had ended by then is there again
        await fx.wait_for(pilot, lambda: app.shown.time < at and ended_pids(app.shown) == [1]
                          and "ENDED" in fx.screen_text(app))
        await pilot.press("end")  # past x: runs 1 and 2 stay cleared, run 4's later end shows
        await fx.wait_for(pilot, lambda: src.position().at_end and ended_pids(app.shown) == [4]
                          and "end of recording" in fx.screen_text(app))
        assert "ENDED" in fx.screen_text(app)


@pytest.mark.parametrize("before", [None, "soon", True, float("nan"), [1]])
def test_a_clear_record_without_a_usable_before_clears_every_ended_run(before):
    state = HubState()
    for pid, end in ((1, 5.0), (2, 50.0)):
        state.ingest(agent_line(pid, make_hello(pid), 1.0))
        state.ingest(agent_line(pid, Bye(reason="exit", time=end), end))
    record = records.clear_ended(t=10.0) | ({} if before is None else {"before": before})
    state.ingest(record)
    assert state.snapshot(60.0).agents == () and not state.snapshot(60.0).warnings


def test_a_clear_record_with_before_keeps_the_runs_that_ended_after_it():
    state = HubState()
    for pid, end in ((1, 5.0), (2, 50.0)):
        state.ingest(agent_line(pid, make_hello(pid), 1.0))
        state.ingest(agent_line(pid, Bye(reason="exit", time=end), end))
    state.ingest(records.clear_ended(t=60.0) | {"before": 10.0})
    assert [a.hello.pid for a in state.snapshot(60.0).agents] == [2]
