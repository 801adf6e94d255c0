"""The step decoder's short road (protocol._step_fast) gives exactly what the checked road gives, and leaves
every doubtful message to the checked road (which names the problem)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from batchmon import protocol
from batchmon.protocol import ProtocolError, Step

FIXTURES = Path(__file__).parent / "fixtures"


def _checked(d: dict) -> Step:
    """The checked road alone: the short road switched off for one call."""
    saved = protocol._step_fast
    protocol._step_fast = lambda _d, _memo=None: None  # type: ignore[assignment]
    try:
        return Step.from_dict(d)
    finally:
        protocol._step_fast = saved  # type: ignore[assignment]


def _recorded_steps() -> list[dict]:
    out = []
    for path in sorted(FIXTURES.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            rec = json.loads(line)
            data = rec.get("data")
            if rec.get("kind") == "agent" and isinstance(data, dict) and data.get("type") == "step":
                out.append(data)
    return out


def test_short_road_equals_checked_road_on_every_recorded_step() -> None:
    steps = _recorded_steps()
    assert len(steps) > 1000  # the H200 recordings
    fast = 0
    for d in steps:
        got = protocol._step_fast(d)
        if got is not None:
            fast += 1
            assert got == _checked(d)
            assert got.to_dict() == _checked(d).to_dict()
    assert fast == len(steps)  # every real agent message takes the short road


BASE = {"step": 7, "time": 1795880396.5, "step_seconds": 0.25, "batch_size": 32,
        "components": {name: 1024 * (i + 1) for i, name in enumerate(protocol.COMPONENTS)},
        "allocated": 10, "peak_allocated": 20, "reserved": 30, "num_alloc_retries": 0, "num_ooms": 0,
        "device_used": None, "batch_source": "input dim 0", "micro_batches": 2, "steps": 5, "type": "step", "v": 1}


@pytest.mark.parametrize("key,value", [
    ("step", True), ("step", -1), ("step", 1.0), ("time", float("nan")), ("time", math.inf), ("time", -1.0),
    ("time", 12), ("step_seconds", "0.1"), ("batch_size", False), ("batch_size", 1 << 41),
    ("components", {"parameters": 1}), ("components", None), ("allocated", 1 << 63), ("reserved", 2.5),
    ("num_ooms", True)])
def test_doubtful_fields_go_the_checked_road(key: str, value: object) -> None:
    d = dict(BASE, **{key: value})
    assert protocol._step_fast(d) is None
    try:
        expected = _checked(d)
    except ProtocolError as exc:
        with pytest.raises(ProtocolError, match=str(exc).split(":")[0]):
            Step.from_dict(d)
    else:  # valid after all (an int time): the same value either way
        assert Step.from_dict(d) == expected


def test_added_fields_read_leniently_on_both_roads() -> None:
    for extra in ({"steps": 0}, {"steps": "3"}, {"micro_batches": -1}, {"batch_source": 5}, {}):
        d = dict(BASE, **extra)
        assert protocol._step_fast(d) == _checked(d)
    assert protocol._step_fast(BASE).steps == 5
