"""Lines kept by what they show (tui/kept.py): the GPU panel and a job's full panel, built second after second from
the real 16-job H200 recording, read exactly as a fresh build of the same view (text and styles, line for line),
and the lines that read the same as the second before are the same objects (the panel's diff finds them by
identity)."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from batchmon.monitor.replay import load_snapshots
from batchmon.tui import gpu_panel, job_panel, views
from batchmon.tui.kept import Kept
from batchmon.tui.predict import Predictor
from batchmon.tui.state import WhatIfState

GROWTH = Path(__file__).parent / "fixtures" / "fast16_h200_50s_growth.jsonl.gz"


def test_kept_makes_once_per_key_and_forgets_the_oldest_past_its_limit():
    kept: Kept[list[int]] = Kept(2)
    made: list[str] = []

    def make(name: str) -> list[int]:
        made.append(name)
        return [len(made)]

    a = kept.get("a", lambda: make("a"))
    assert kept.get("a", lambda: make("a")) is a and made == ["a"]
    kept.get("b", lambda: make("b"))
    kept.get("a", lambda: make("a"))  # used: now the newest
    kept.get("c", lambda: make("c"))  # past the limit: "b", the oldest, goes
    assert len(kept) == 2 and kept.get("a", lambda: make("a")) is a
    kept.get("b", lambda: make("b"))
    assert made == ["a", "b", "c", "b"]


def _shown(lines) -> list[tuple]:
    return [(t.plain, str(t.style), [(s.start, s.end, str(s.style)) for s in t.spans]) for t in lines]


def _fresh(build):
    """``build()`` with every kept line forgotten (what the panel drew before lines were kept); what was kept is
    kept again afterwards."""
    stores = [gpu_panel._KEPT._made, job_panel._KEPT._made, gpu_panel._BLOCKS._made, job_panel._BLOCKS._made]
    saved = [store.copy() for store in stores]
    for store in stores:
        store.clear()
    try:
        return build()
    finally:
        for store, was in zip(stores, saved):
            store.clear()
            store.update(was)


@pytest.fixture(scope="module")
def fast16(tmp_path_factory) -> list:
    plain = tmp_path_factory.mktemp("fast16") / "fast16.jsonl"
    with gzip.open(GROWTH, "rb") as src, open(plain, "wb") as dst:
        shutil.copyfileobj(src, dst)
    snaps = [s for s in load_snapshots(plain) if len(s.running) == 16]
    assert len(snaps) >= 40
    return snaps


@pytest.mark.parametrize("width", [93, 63])
def test_kept_lines_read_as_a_fresh_build_and_are_shared_while_they_read_the_same(fast16, width):
    predictor = Predictor()
    history: list[int] = []
    before: dict[str, list] = {}
    shared = compared = 0
    for k, snap in enumerate(fast16):
        if k % 5 == 0:  # the GPU history takes a sample every 5 s (app_memory.HISTORY_SECONDS)
            history.append(snap.nvml.devices[0].memory.used)
        (_, gpu), = views.device_views(snap, {})
        gpu.history, gpu.history_rows = list(history), 6
        key, ranks = views.ordered_jobs(snap)[k % 3]
        job = views.job_view(snap, key, ranks, WhatIfState(), predictor)
        builds = {
            "gpu": lambda: gpu_panel.gpu_lines(gpu, width, "full"),
            "job": lambda: job_panel.job_lines(job, width, "full", focused=True, chart_rows=10),
            "medium": lambda: job_panel.job_lines(job, width, "medium", focused=True, chart_rows=8),
        }
        for name, build in builds.items():
            lines = build()
            assert _shown(lines) == _shown(_fresh(build)), (name, k)
            if name == "gpu" and name in before and len(before[name]) == len(lines):
                for old, new in zip(before[name], lines):
                    if _shown([old]) == _shown([new]):
                        compared += 1
                        shared += old is new
            before[name] = lines
    # the GPU panel's ~43 lines: all but the title and a history row read the same, second after second, and
    # nearly all of those are the same objects (not all: a part made again for a change that does not show, as the
    # watts 207.3 -> 207.1, or the used memory under the process table, has new lines that read the same)
    assert compared > 30 * len(fast16) and shared > 0.95 * compared
