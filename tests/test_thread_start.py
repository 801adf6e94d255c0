"""A Ctrl-C that lands inside a worker's start() must leave stop() clean (it raised "cannot join thread before
it is started" out of `batchmon export`'s clean-up): hub, replay, remote link, each interrupted for real."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from batchmon.monitor.hub import Hub
from batchmon.monitor.remote import RemoteLink
from batchmon.monitor.replay import ReplaySource

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def interrupted_start(monkeypatch):
    """Thread.start raises KeyboardInterrupt before the thread runs, as a SIGINT landing there does."""
    def start(self):
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start)


def _start_then_stop(worker) -> None:
    with pytest.raises(KeyboardInterrupt):
        worker.start()
    worker.stop()  # must neither raise nor hang


def test_hub_start_interrupted(tmp_path, interrupted_start):
    _start_then_stop(Hub(interval=0.05, socket_dir=tmp_path / "socks"))


def test_replay_start_interrupted(interrupted_start):
    _start_then_stop(ReplaySource(FIXTURES / "tui_h200_no_agents.jsonl", speed=1.0))


def test_remote_link_start_interrupted(interrupted_start):
    _start_then_stop(RemoteLink("gpu1", lambda record: None, argv=["true"]))


def test_list_source_start_interrupted(interrupted_start):
    import tui_fixtures as fx
    from list_source import ListSource

    _start_then_stop(ListSource([fx.no_agents()], interval=0.05))


def test_a_start_interrupted_after_the_thread_began_leaves_no_worker_running(tmp_path, monkeypatch):
    """The interrupt lands after Thread.start returned, before the worker kept the thread: stop() still ends it
    (the thread sees the stop flag) and does not raise."""
    real_start = threading.Thread.start
    started: list[threading.Thread] = []

    def start(self):
        real_start(self)
        started.append(self)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", start)
    hub = Hub(interval=0.05, socket_dir=tmp_path / "socks")
    _start_then_stop(hub)
    monkeypatch.setattr(threading.Thread, "start", real_start)
    (thread,) = started
    thread.join(10)
    assert not thread.is_alive()
