"""Protocol v1: round trips, limits, and that no input makes decode do anything but return or raise ProtocolError."""

from __future__ import annotations

import json
import os
import stat
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchmon import protocol
from batchmon.protocol import (
    COMPONENTS,
    Bye,
    Event,
    Hello,
    LineBuffer,
    ModelInfo,
    ProtocolError,
    SocketDirError,
    Step,
    decode,
    encode,
)
from conftest import make_step as conftest_make_step


def make_hello(**kw: Any) -> Hello:
    base: dict[str, Any] = dict(pid=1234, host="box", argv=("train.py", "--lr", "3e-4"), python="3.11.7", torch="2.13.0",
                device="cuda:0", nvml_uuid="GPU-abc", rank=1, local_rank=1, world_size=2,
                model=ModelInfo("GPT", 124_000_000, 496_000_000), optimizer="AdamW")
    base.update(kw)
    return Hello(**base)


def make_step(**kw: Any) -> Step:
    """conftest.make_step with every allocator figure set (each field can be overridden, None included)."""
    base: dict[str, Any] = dict(time=1_700_000_000.5, step_seconds=0.25,
                                components={name: (i + 1) * 1000 for i, name in enumerate(COMPONENTS)},
                                allocated=10, peak_allocated=20, reserved=30, num_alloc_retries=0, num_ooms=0,
                                device_used=40)
    base.update(kw)
    return conftest_make_step(base.pop("step", 7), base.pop("batch_size", 32), **base)


@pytest.mark.parametrize("message", [
    make_hello(), make_hello(model=None, optimizer=None, nvml_uuid=None, torch=None),
    make_step(), make_step(allocated=None, peak_allocated=None, reserved=None, num_alloc_retries=None,
                           num_ooms=None, device_used=None, batch_size=None, step_seconds=None),
    Event(kind="oom", message="CUDA out of memory", components=make_step().components, batch_size=64,
          requested_bytes=2 << 30),
    Event(kind="warning", message="socket folder unsafe"),
    Bye(),
])
def test_round_trip(message):
    line = encode(message)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    obj = json.loads(line)
    assert obj["v"] == 1 and obj["type"] == message.type
    assert decode(line) == message


def test_unknown_type_and_fields_are_ignored():
    assert decode(b'{"v":1,"type":"future-thing","x":1}') is None
    obj = json.loads(encode(make_step()))
    obj["new_field"] = {"nested": True}
    assert decode(json.dumps(obj)) == make_step()


@pytest.mark.parametrize("line,reason", [
    (b"not json", "not JSON"),
    (b"[1,2]", "not a JSON object"),
    (b'{"type":"step"}', "version"),
    (b'{"v":2,"type":"step"}', "version"),
    (b'{"v":1}', "type"),
    (b'\xff\xfe{"v":1}', "UTF-8"),
])
def test_invalid_lines_raise_protocol_error(line, reason):
    with pytest.raises(ProtocolError, match=reason):
        decode(line)


def test_step_field_validation():
    good = json.loads(encode(make_step()))
    for key, bad in [("step", -1), ("step", "7"), ("time", float("inf")), ("batch_size", True),
                     ("allocated", 1 << 70), ("reserved", -5), ("step_seconds", -1.0)]:
        obj = dict(good, **{key: bad})
        with pytest.raises(ProtocolError, match=key):
            decode(json.dumps(obj))
    comps = dict(good["components"])
    del comps["activations"]
    with pytest.raises(ProtocolError, match="activations"):
        decode(json.dumps(dict(good, components=comps)))


def test_line_limit_on_both_sides():
    huge = make_hello(argv=("x" * 1000,) * 200)  # argv is capped on decode, not on encode
    with pytest.raises(ProtocolError, match="limit"):
        encode(make_event_with_message(2 << 20))
    with pytest.raises(ProtocolError, match="1 MiB"):
        decode(b'{"v":1,"type":"bye","pad":"' + b"a" * (1 << 20) + b'"}')
    assert decode(encode(huge)).argv == huge.argv


def make_event_with_message(n: int) -> Event:
    return Event(kind="warning", message="m" * n)


def test_line_buffer_splits_and_drops_oversized_without_storing():
    buf = LineBuffer(limit=10)
    assert buf.feed(b"abc\nde") == [b"abc"]
    assert buf.feed(b"f\n") == [b"def"]
    assert buf.feed(b"0123456789ABCDEF") == []  # over the limit: dropped, not buffered
    assert buf.pending == 0 and buf.oversized == 1
    assert buf.feed(b"GHI\nok\n") == [b"ok"]  # the rest of the long line is skipped
    assert buf.oversized == 1
    assert buf.feed(b"x" * 11 + b"\n") == []
    assert buf.oversized == 2


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2048))
def test_decode_never_raises_anything_but_protocol_error_on_bytes(data):
    try:
        decode(data)
    except ProtocolError:
        pass


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["hello", "step", "event", "bye"]), st.dictionaries(
    st.sampled_from(["pid", "host", "argv", "step", "time", "components", "batch_size", "kind", "message",
                     "model", "world_size", "allocated", "requested_bytes", "rank"]), json_values, max_size=8))
def test_decode_of_typed_garbage_is_a_message_or_protocol_error(kind, fields):
    obj = dict(fields, v=1, type=kind)
    try:
        result = decode(json.dumps(obj))
    except ProtocolError:
        return
    assert result is not None and result.type == kind


def test_socket_dir_resolution(tmp_path):
    assert protocol.socket_dir({"BATCHMON_DIR": str(tmp_path)}) == tmp_path
    assert protocol.socket_dir({"XDG_RUNTIME_DIR": "/run/user/5"}) == protocol.Path("/run/user/5/batchmon")
    assert str(protocol.socket_dir({})) == f"/tmp/batchmon-{os.getuid()}"


def test_ensure_socket_dir_creates_private_folder(tmp_path):
    path = protocol.ensure_socket_dir(tmp_path / "socks")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700


def test_ensure_socket_dir_refuses_symlink_and_open_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(SocketDirError, match="symlink"):
        protocol.ensure_socket_dir(link)
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    with pytest.raises(SocketDirError, match="0700"):
        protocol.ensure_socket_dir(open_dir)


def test_pid_of_socket():
    assert protocol.pid_of_socket(protocol.Path("/x/123.sock")) == 123
    assert protocol.pid_of_socket(protocol.Path("/x/abc.sock")) is None
    assert protocol.pid_of_socket(protocol.Path("/x/123.txt")) is None
    for name in ("123.sock", "abc.sock", "123.txt", "123-4.sock", "123-x.sock", ".sock", "123.x.sock", "1-.sock"):
        assert protocol.pid_of_socket(name) == protocol.pid_of_socket(protocol.Path("/x") / name)  # a name alone
    assert protocol.pid_of_socket("123-4.sock") == 123 and protocol.pid_of_socket("123.x.sock") is None


def test_integer_too_large_for_a_float_is_a_protocol_error():
    obj = json.loads(encode(make_step()))
    obj["time"] = 10 ** 400
    with pytest.raises(ProtocolError, match="time"):
        decode(json.dumps(obj))


def test_cache_and_context_one_definition_two_readings():
    """step_components (front ends) and the memory model's observations derive cache and context from one
    function; the model's strict reading differs only where a figure is missing or stale."""
    from batchmon.memory_model.observations import Observation
    from batchmon.protocol import cache_and_context

    assert cache_and_context(900, 700, 1000, 1500) == (100, 500)
    assert cache_and_context(None, 700, 1000, 1500) == (300, 500)  # no peak: reserved - allocated
    assert cache_and_context(None, 700, 1000, 1500, strict=True) == (None, 500)
    assert cache_and_context(900, 700, 1000, 800) == (100, 0)  # NVML read before the pool grew
    assert cache_and_context(900, 700, 1000, 800, strict=True) == (100, None)
    assert cache_and_context(900, 700, None, 1500) == (None, None)
    obs = Observation(step=1, batch_size=8, components={}, peak_allocated=900, reserved=1000, device_used=800)
    assert (obs.cache, obs.context) == cache_and_context(900, None, 1000, 800, strict=True)


def test_written_out_to_dict_has_every_field_and_new_step_equals_the_constructor():
    """Step/Event.to_dict are written out (not dataclasses.asdict, which the agent's socket thread paid per
    line): they must list every field, so a field added later cannot be left out of the wire silently."""
    import dataclasses

    from batchmon.protocol import Event, new_step

    step = conftest_make_step(5, 16, allocated=1, peak_allocated=2, reserved=3, num_alloc_retries=0, num_ooms=0,
                              device_used=4, batch_source="input dim 0", micro_batches=2, steps=7,
                              peak_phase="backward", phase_peaks={"forward": 1, "backward": 2},
                              phase_own_peaks={"forward": 1, "backward": 2, "optimizer": 1},
                              segment_peaks={"forward": 1, "loss_backward": 2, "backward": 1, "optimizer": 1})
    assert step.to_dict() == dataclasses.asdict(step)
    event = Event(kind="oom", message="m", components=dict(step.components), time=1.0, step=3, batch_size=2,
                  requested_bytes=9)
    assert event.to_dict() == dataclasses.asdict(event)
    fields = [getattr(step, f.name) for f in dataclasses.fields(Step) if f.init]
    made = new_step(*fields)
    assert made == step and made.type == "step" and encode(made) == encode(step)
    assert [f.name for f in dataclasses.fields(Step) if f.init][-3:] == ["phase_peaks", "phase_own_peaks", "segment_peaks"]  # new_step's order


def test_peak_phase_fields_are_lenient():
    """The added peak_phase/phase_peaks fields: kept when valid, None for an older agent or an odd value, and an
    odd value never fails the line (the checked road included)."""
    base = {"step": 1, "time": 1.0, "step_seconds": 0.1, "batch_size": 4,
            "components": {name: 1 for name in ("parameters", "gradients", "optimizer", "activations", "batch", "other")}}
    good = Step.from_dict({**base, "peak_phase": "optimizer", "phase_peaks": {"forward": 5, "backward": 7, "optimizer": 9}})
    assert good.peak_phase == "optimizer" and good.phase_peaks == {"forward": 5, "backward": 7, "optimizer": 9}
    assert Step.from_dict(base).peak_phase is None and Step.from_dict(base).phase_peaks is None
    for odd_phase, odd_peaks in (("loss", {"loss": 1}), (3, {"forward": -1}), (None, {"forward": True}), ("", [1])):
        for d in ({**base, "peak_phase": odd_phase, "phase_peaks": odd_peaks},
                  {**base, "step_seconds": "x", "peak_phase": odd_phase, "phase_peaks": odd_peaks}):
            try:
                step = Step.from_dict(d)
            except ProtocolError:
                assert d["step_seconds"] == "x"  # the checked road refuses the bad step_seconds, not the phase
                continue
            assert step.peak_phase is None and step.phase_peaks is None


def test_own_phase_peaks_round_trip_and_are_lenient():
    """The added phase_own_peaks field (each phase's own allocator peak, sampled steps): encoded, decoded the same
    on both roads, None for an older agent or an odd value, and an odd value never fails the line."""
    base = {"step": 1, "time": 1.0, "step_seconds": 0.1, "batch_size": 4,
            "components": {name: 1 for name in ("parameters", "gradients", "optimizer", "activations", "batch", "other")}}
    own = {"forward": 9, "backward": 7, "optimizer": 5}  # own peaks need not grow phase by phase
    step = Step.from_dict({**base, "phase_peaks": {"forward": 9, "backward": 9, "optimizer": 9}, "phase_own_peaks": own})
    assert step.phase_own_peaks == own and step.phase_peaks == {"forward": 9, "backward": 9, "optimizer": 9}
    assert decode(encode(step)) == step and step.to_dict()["phase_own_peaks"] == own
    assert Step.from_dict({**base, "step_seconds": None, "time": 1, "phase_own_peaks": own}).phase_own_peaks == own
    assert Step.from_dict(base).phase_own_peaks is None
    for odd in ({"loss": 1}, {"forward": -1}, {"forward": True}, [1], {}, "x", {"forward": 1 << 63}):
        for d in ({**base, "phase_own_peaks": odd}, {**base, "time": 1, "phase_own_peaks": odd}):
            step = Step.from_dict(d)
            assert step.phase_own_peaks is None and step.step == 1


def test_segment_peaks_round_trip_and_are_lenient():
    """The added segment_peaks field (each segment's own allocator peak, the backward split at the output's
    gradient: issue 13): encoded, decoded the same on both roads, None for an older agent or an odd value (a name
    outside SEGMENTS included), and an odd value never fails the line; an older monitor's decoder ignores it."""
    from batchmon.protocol import SEGMENTS

    base = {"step": 1, "time": 1.0, "step_seconds": 0.1, "batch_size": 4,
            "components": {name: 1 for name in ("parameters", "gradients", "optimizer", "activations", "batch", "other")}}
    segments = {"forward": 9, "loss_backward": 11, "backward": 7, "optimizer": 5}
    assert tuple(segments) == SEGMENTS
    step = Step.from_dict({**base, "phase_own_peaks": {"forward": 9, "backward": 11, "optimizer": 5},
                           "segment_peaks": segments})
    assert step.segment_peaks == segments and step.phase_own_peaks == {"forward": 9, "backward": 11, "optimizer": 5}
    assert decode(encode(step)) == step and step.to_dict()["segment_peaks"] == segments
    assert Step.from_dict({**base, "time": 1, "segment_peaks": segments}).segment_peaks == segments  # checked road
    assert Step.from_dict(base).segment_peaks is None
    for odd in ({"loss": 1}, {"loss_backward": -1}, {"forward": True}, [1], {}, "x", {"backward": 1 << 63}):
        for d in ({**base, "segment_peaks": odd}, {**base, "time": 1, "segment_peaks": odd}):
            got = Step.from_dict(d)
            assert got.segment_peaks is None and got.step == 1
    # phase_own_peaks never takes a segment name: "loss_backward" there is an odd value
    assert Step.from_dict({**base, "phase_own_peaks": {"loss_backward": 1}}).phase_own_peaks is None


def test_saved_split_skips_names_it_does_not_know_and_keeps_the_rest():
    """A newer agent may add names to the added saved_split field within protocol v1: this decoder keeps the known
    names (both roads) instead of dropping the whole split, and still drops a split missing a required name, with
    an odd size, or with a hostile number of names."""
    from batchmon.protocol import SAVED_SPLIT_FIELDS, SAVED_SPLIT_REQUIRED

    base = {"step": 1, "time": 1.0, "step_seconds": 0.1, "batch_size": 4,
            "components": {name: 1 for name in ("parameters", "gradients", "optimizer", "activations", "batch", "other")}}
    split = {name: 10 for name in SAVED_SPLIT_REQUIRED}
    newer = {**split, "a_name_from_the_future": 7}
    for d in ({**base, "saved_split": newer}, {**base, "time": 1, "saved_split": newer}):
        assert Step.from_dict(d).saved_split == split
    missing = dict(split)
    missing.pop(SAVED_SPLIT_FIELDS[1])
    hostile = {**split, **{f"x{i}": 1 for i in range(10 * len(SAVED_SPLIT_FIELDS))}}
    for odd in (missing, {**split, "a_name_from_the_future": 7, SAVED_SPLIT_FIELDS[1]: -1}, hostile):
        assert Step.from_dict({**base, "saved_split": odd}).saved_split is None


def test_inactive_split_round_trips_beside_saved_split_and_is_lenient():
    """The added inactive_split field (a sampled CUDA step's allocator inactive-split peak: the memory model's
    fragmentation at the limit): written only where set, decoded the same on both roads, kept beside saved_split,
    None for an older agent or an odd value, and an odd value never fails the line."""
    from batchmon.protocol import SAVED_SPLIT_REQUIRED, new_step, with_added

    base = {"step": 1, "time": 1.0, "step_seconds": 0.1, "batch_size": 4,
            "components": {name: 1 for name in ("parameters", "gradients", "optimizer", "activations", "batch", "other")}}
    split = {name: 10 for name in SAVED_SPLIT_REQUIRED}
    for d in ({**base, "inactive_split": 12345}, {**base, "time": 1, "inactive_split": 12345}):
        step = Step.from_dict(d)
        assert step.inactive_split == 12345 and step.saved_split is None
        assert decode(encode(step)).inactive_split == 12345 and step.to_dict()["inactive_split"] == 12345
    both = Step.from_dict({**base, "inactive_split": 7, "saved_split": split})
    assert (both.inactive_split, both.saved_split) == (7, split)
    again = decode(encode(both))
    assert (again.inactive_split, again.saved_split) == (7, split)
    plain = Step.from_dict(base)
    assert plain.inactive_split is None and "inactive_split" not in plain.to_dict()
    for odd in (-1, True, 1.5, "7", [7], 1 << 63):
        for d in ({**base, "inactive_split": odd}, {**base, "time": 1, "inactive_split": odd}):
            got = Step.from_dict(d)
            assert got.inactive_split is None and got.step == 1
    made = new_step(1, 1.0, None, 4, dict(base["components"]), None, None, None, None, None, None, None, None)
    assert with_added(made, inactive_split=9).inactive_split == 9 and made.inactive_split is None
    with pytest.raises(TypeError):
        with_added(made, not_a_field=1)
