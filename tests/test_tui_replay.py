"""The monitor on a replay: it opens at the first agent's hello, ← / → / home / end seek, the position bar moves
and says "end of recording" (real Textual, the real ReplaySource, the DDP H200 recording)."""

from __future__ import annotations

from pathlib import Path

import tui_fixtures as fx
from batchmon.monitor.replay import ReplayPosition, ReplaySource
from batchmon.tui.app import BatchmonApp
from batchmon.tui.replay_bar import fmt_clock, replay_bar_text

DDP = Path(__file__).parent / "fixtures" / "ddp_h200_run.jsonl"


def test_the_bar_text_shows_time_span_and_end():
    playing = replay_bar_text(ReplayPosition(time=116.0, start=100.0, end=136.0, at_end=False), 80)
    assert "▶ replay" in playing.plain and "0:16" in playing.plain and "0:36" in playing.plain
    assert "←/→ 10 s" in playing.plain and len(playing.plain) <= 80
    ended = replay_bar_text(ReplayPosition(time=136.0, start=100.0, end=136.0, at_end=True), 60)
    assert "end of recording" in ended.plain and len(ended.plain) <= 60
    assert fmt_clock(3723) == "1:02:03" and fmt_clock(7) == "0:07"


async def test_seek_keys_move_the_replay_and_the_end_is_said():
    src = ReplaySource(DDP, speed=0.001)  # so slow that only the keys move it
    app = BatchmonApp(src, title="replay")
    async with app.run_test(size=(120, 36)) as pilot:
        await fx.wait_for(pilot, lambda: app.shown is not None and app.shown.agents)  # opened at the hello
        first = src.position()
        assert first.time - first.start > 10  # the recording's first 16 s have no agent: skipped
        await fx.wait_for(pilot, lambda: "▶ replay" in fx.screen_text(app))
        await pilot.press("right")
        await fx.wait_for(pilot, lambda: src.position().time >= first.time + 10)
        await pilot.press("end")
        await fx.wait_for(pilot, lambda: "end of recording" in fx.screen_text(app))
        assert src.position().at_end
        await pilot.press("home")
        await fx.wait_for(pilot, lambda: src.position().time == src.position().start or
                          src.position().time - src.position().start < 1)
        await fx.wait_for(pilot, lambda: "No training process attached" in fx.screen_text(app)
                          or not app.shown.agents)
        await fx.wait_for(pilot, lambda: "end of recording" not in fx.screen_text(app)
                          and " 0:00 " in fx.screen_text(app))
