"""Protocol v1 between an in-process agent and monitors: message schema, line codec, socket paths.

Newline-delimited UTF-8 JSON, one object per line, at most 1 MiB a line. Every object carries ``"v": 1`` and
``"type"``. Unknown types and unknown fields are ignored; an invalid line raises ProtocolError, which a reader
counts and drops (never fatal). No pickle, nothing evaluated: a message is data, never code or a path.

This module is imported by both sides, so it must stay free of torch and textual. Over 400 lines because the
schema, its codec and the socket-path rules are one contract between agent and monitor: read in one place.
"""

from __future__ import annotations

import json
import marshal
import math
import os
import stat
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping

VERSION = 1
MAX_LINE_BYTES = 1 << 20
MAX_SIZE = 1 << 62  # bytes; anything larger is not a real memory figure

#: the step components an agent measures, exactly these keys, in this order
COMPONENTS: tuple[str, ...] = ("parameters", "gradients", "optimizer", "activations", "batch", "other")
#: components the monitor derives from allocator and NVML figures
DERIVED_COMPONENTS: tuple[str, ...] = ("cache", "context")
ALL_COMPONENTS: tuple[str, ...] = COMPONENTS + DERIVED_COMPONENTS

MESSAGE_TYPES = ("hello", "step", "event", "bye")
#: the phases of a training step, in order: forward (loss included, up to backward), backward, and the rest of
#: the step (the optimizer's step, zero_grad); a step's ``peak_phase`` is one of them
PHASES: tuple[str, ...] = ("forward", "backward", "optimizer")
#: the segments of a sampled step whose own peaks ``segment_peaks`` carries, in order: the backward split where
#: the gradient of the model's output arrives (``loss_backward``: the loss's backward, part of the backward phase)
SEGMENTS: tuple[str, ...] = ("forward", "loss_backward", "backward", "optimizer")
#: the names of ``Step.saved_split`` (batchmon.agent.saved_split; the first five are always there)
SAVED_SPLIT_FIELDS: tuple[str, ...] = ("batch", "saved", "in_blocks", "block_inputs", "blocks", "amp_saved",
                                       "amp_unknown", "block_max", "output", "block_inputs_fixed")
SAVED_SPLIT_REQUIRED = frozenset(SAVED_SPLIT_FIELDS[:5])
#: the split's one name that is not a byte count: the blocks' saved storages in creation order (a dict; see
#: _block_seq), from which the memory model synthesises the checkpointed step's allocations
SAVED_SPLIT_SEQUENCE = "block_seq"


class ProtocolError(ValueError):
    """A line or field that does not follow protocol v1."""


class SocketDirError(OSError):
    """The socket folder is unsafe or unusable; the message says which and why."""


# ----------------------------------------------------------------------------------------------- field checks


def _int(d: Mapping[str, Any], key: str, *, nullable: bool = False, minimum: int = 0,
         maximum: int = MAX_SIZE) -> int | None:
    value = d.get(key)
    if value is None:
        if nullable:
            return None
        raise ProtocolError(f"{key}: missing")
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{key}: expected an integer, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise ProtocolError(f"{key}: {value} out of range")
    return value


def _float(d: Mapping[str, Any], key: str, *, nullable: bool = False, minimum: float = 0.0) -> float | None:
    value = d.get(key)
    if value is None:
        if nullable:
            return None
        raise ProtocolError(f"{key}: missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ProtocolError(f"{key}: expected a number, got {type(value).__name__}")
    try:
        value = float(value)
    except OverflowError:
        raise ProtocolError(f"{key}: out of range") from None
    if not math.isfinite(value) or value < minimum or value > 1e12:
        raise ProtocolError(f"{key}: {value} out of range")
    return value


def _str(d: Mapping[str, Any], key: str, *, nullable: bool = False, limit: int = 4096) -> str | None:
    value = d.get(key)
    if value is None:
        if nullable:
            return None
        raise ProtocolError(f"{key}: missing")
    if not isinstance(value, str):
        raise ProtocolError(f"{key}: expected a string, got {type(value).__name__}")
    return value[:limit]


def _components(d: Mapping[str, Any], key: str = "components", *, nullable: bool = False) -> dict[str, int] | None:
    value = d.get(key)
    if value is None and nullable:
        return None
    if not isinstance(value, dict):
        raise ProtocolError(f"{key}: expected an object")
    return {name: _int(value, name) for name in COMPONENTS}  # type: ignore[misc]


# ----------------------------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class ModelInfo:
    cls: str
    parameters: int
    parameter_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"class": self.cls, "parameters": self.parameters, "parameter_bytes": self.parameter_bytes}

    @classmethod
    def from_dict(cls, d: Any) -> "ModelInfo | None":
        if d is None:
            return None
        if not isinstance(d, dict):
            raise ProtocolError("model: expected an object")
        return cls(_str(d, "class", limit=256) or "", _int(d, "parameters"), _int(d, "parameter_bytes"))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Hello:
    pid: int
    host: str
    argv: tuple[str, ...]
    python: str
    torch: str | None
    device: str
    nvml_uuid: str | None
    rank: int
    local_rank: int
    world_size: int
    model: ModelInfo | None
    optimizer: str | None
    name: str | None = None
    time: float | None = None
    job: str | None = None  # added in v1: what the ranks of one distributed job share (torchrun's rendezvous)
    history: int | None = None  # added in v1: how many step/event lines follow this hello as the history burst
    type: str = field(default="hello", init=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["argv"] = list(self.argv)
        d["model"] = self.model.to_dict() if self.model else None
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Hello":
        argv = d.get("argv") or []
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ProtocolError("argv: expected a list of strings")
        return cls(
            pid=_int(d, "pid", maximum=1 << 31),  # type: ignore[arg-type]
            host=_str(d, "host", limit=256) or "",
            argv=tuple(a[:1024] for a in argv[:256]),
            python=_str(d, "python", nullable=True, limit=64) or "",
            torch=_str(d, "torch", nullable=True, limit=64),
            device=_str(d, "device", nullable=True, limit=64) or "cpu",
            nvml_uuid=_str(d, "nvml_uuid", nullable=True, limit=128),
            rank=_int(d, "rank", nullable=True, maximum=1 << 20) or 0,
            local_rank=_int(d, "local_rank", nullable=True, maximum=1 << 20) or 0,
            world_size=_int(d, "world_size", nullable=True, minimum=1, maximum=1 << 20) or 1,
            model=ModelInfo.from_dict(d.get("model")),
            optimizer=_str(d, "optimizer", nullable=True, limit=256),
            name=_str(d, "name", nullable=True, limit=256),
            time=_float(d, "time", nullable=True),
            job=_str(d, "job", nullable=True, limit=256),
            history=_int(d, "history", nullable=True, maximum=1 << 20),
        )


@dataclass(frozen=True)
class Step:
    step: int
    time: float
    step_seconds: float | None
    batch_size: int | None
    components: dict[str, int]
    allocated: int | None = None
    peak_allocated: int | None = None
    reserved: int | None = None
    num_alloc_retries: int | None = None
    num_ooms: int | None = None
    device_used: int | None = None
    batch_source: str | None = None  # added field: where batch_size comes from, e.g. "input dim 1 (LSTM ...)"
    micro_batches: int | None = None  # added field: backward passes in the step (gradient accumulation)
    steps: int = 1  # added field: how many steps this message stands for (a coalesced window; see below)
    peak_phase: str | None = None  # added field: where in the step the peak was reached (PHASES; sampled steps)
    phase_peaks: dict[str, int] | None = None  # added field: allocator peak by the end of each phase (cumulative)
    phase_own_peaks: dict[str, int] | None = None  # added field: each phase's own allocator peak (sampled steps)
    segment_peaks: dict[str, int] | None = None  # added field: each segment's own allocator peak (SEGMENTS)
    # added field: what the saved activations of one sampled forward are made of (SAVED_SPLIT_FIELDS, bytes at
    # ``batch``; batchmon.agent.saved_split), on the sampled steps after it was measured; None otherwise. Not a
    # dataclass field (new_step's positional order and the messages without it stay as they were: written only
    # where set): set by with_saved_split and the decoders, and kept by anything that copies a step's __dict__
    saved_split: ClassVar[dict[str, Any] | None] = None
    # added field, likewise not a dataclass field: the allocator's inactive-split bytes at the end of a sampled
    # CUDA step (torch.cuda.memory_stats()["inactive_split_bytes.all.current"]: free bytes inside segments that
    # still hold live blocks once the step's activations are freed, what a cache flush cannot give back;
    # batchmon.memory_model's fragmentation at the limit), on sampled steps where the agent reads it; else None
    inactive_split: ClassVar[int | None] = None
    type: str = field(default="step", init=False)

    def to_dict(self) -> dict[str, Any]:
        # written out, not dataclasses.asdict (which deep-copies field by field): the agent's socket thread
        # encodes every message it sends
        d = {"step": self.step, "time": self.time, "step_seconds": self.step_seconds,
             "batch_size": self.batch_size, "components": dict(self.components), "allocated": self.allocated,
             "peak_allocated": self.peak_allocated, "reserved": self.reserved,
             "num_alloc_retries": self.num_alloc_retries, "num_ooms": self.num_ooms,
             "device_used": self.device_used, "batch_source": self.batch_source,
             "micro_batches": self.micro_batches, "steps": self.steps, "peak_phase": self.peak_phase,
             "phase_peaks": dict(self.phase_peaks) if self.phase_peaks is not None else None,
             "phase_own_peaks": dict(self.phase_own_peaks) if self.phase_own_peaks is not None else None,
             "segment_peaks": dict(self.segment_peaks) if self.segment_peaks is not None else None,
             "type": "step"}
        split = self.saved_split
        if split is not None:
            d["saved_split"] = dict(split)
        inactive = self.inactive_split
        if inactive is not None:
            d["inactive_split"] = inactive
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], memo: dict[str, Any] | None = None) -> "Step":
        """``memo``: a dict kept per agent between its messages (see _decoded_split)."""
        fast = _step_fast(d, memo)  # the monitor decodes every step message: a valid one takes the short road
        if fast is not None:
            return fast
        made = cls(
            step=_int(d, "step"),  # type: ignore[arg-type]
            time=_float(d, "time"),  # type: ignore[arg-type]
            step_seconds=_float(d, "step_seconds", nullable=True),
            batch_size=_int(d, "batch_size", nullable=True, maximum=1 << 40),
            components=_components(d),  # type: ignore[arg-type]
            allocated=_int(d, "allocated", nullable=True),
            peak_allocated=_int(d, "peak_allocated", nullable=True),
            reserved=_int(d, "reserved", nullable=True),
            num_alloc_retries=_int(d, "num_alloc_retries", nullable=True),
            num_ooms=_int(d, "num_ooms", nullable=True),
            device_used=_int(d, "device_used", nullable=True),
            batch_source=_lenient_str(d.get("batch_source"), 128),
            micro_batches=_lenient_int(d.get("micro_batches")),
            steps=_window_steps(d.get("steps")),
            peak_phase=_phase(d.get("peak_phase")),
            phase_peaks=_phase_peaks(d.get("phase_peaks")),
            phase_own_peaks=_phase_peaks(d.get("phase_own_peaks")),
            segment_peaks=_phase_peaks(d.get("segment_peaks"), SEGMENTS),
        )
        return _with_decoded_added(made, d.get, memo)


def new_step(step: int, time: float, step_seconds: float | None, batch_size: int | None,
             components: dict[str, int], allocated: int | None, peak_allocated: int | None, reserved: int | None,
             num_alloc_retries: int | None, num_ooms: int | None, device_used: int | None,
             batch_source: str | None, micro_batches: int | None, steps: int = 1, peak_phase: str | None = None,
             phase_peaks: dict[str, int] | None = None, phase_own_peaks: dict[str, int] | None = None,
             segment_peaks: dict[str, int] | None = None) -> Step:
    """A Step equal to ``Step(...)`` with the same fields, made in a fraction of the time: a frozen dataclass's
    ``__init__`` sets each field through ``object.__setattr__``, which the agent would pay on every training step.
    """
    s = object.__new__(Step)
    s.__dict__.update(step=step, time=time, step_seconds=step_seconds, batch_size=batch_size,
                      components=components, allocated=allocated, peak_allocated=peak_allocated,
                      reserved=reserved, num_alloc_retries=num_alloc_retries, num_ooms=num_ooms,
                      device_used=device_used, batch_source=batch_source, micro_batches=micro_batches, steps=steps,
                      peak_phase=peak_phase, phase_peaks=phase_peaks, phase_own_peaks=phase_own_peaks,
                      segment_peaks=segment_peaks)
    return s


_OPTIONAL_SIZES = ("allocated", "peak_allocated", "reserved", "num_alloc_retries", "num_ooms", "device_used")


def _step_fast(d: Mapping[str, Any], memo: dict[str, Any] | None = None) -> Step | None:
    """``Step.from_dict`` for a message whose every field is plainly valid, else None (the checked road then
    names what is wrong). The same Step the checked road makes, in about half the time: one exact type test
    per field instead of a checking call per field (the hub decodes every agent's every step message)."""
    get = d.get
    step, when, secs, batch, comps = get("step"), get("time"), get("step_seconds"), get("batch_size"), get("components")
    if type(step) is not int or not 0 <= step <= MAX_SIZE or type(comps) is not dict:
        return None
    if type(when) is not float or not 0.0 <= when <= 1e12:  # NaN fails the comparison
        return None
    if secs is not None and (type(secs) is not float or not 0.0 <= secs <= 1e12):
        return None
    if batch is not None and (type(batch) is not int or not 0 <= batch <= 1 << 40):
        return None
    components = {}
    for name in COMPONENTS:
        value = comps.get(name)
        if type(value) is not int or not 0 <= value <= MAX_SIZE:
            return None
        components[name] = value
    sizes = []
    for key in _OPTIONAL_SIZES:
        value = get(key)
        if value is not None and (type(value) is not int or not 0 <= value <= MAX_SIZE):
            return None
        sizes.append(value)
    allocated, peak, reserved, retries, ooms, used = sizes
    made = new_step(step, when, secs, batch, components, allocated, peak, reserved, retries, ooms, used,
                    _lenient_str(get("batch_source"), 128), _lenient_int(get("micro_batches")),
                    _window_steps(get("steps")), _phase(get("peak_phase")), _phase_peaks(get("phase_peaks")),
                    _phase_peaks(get("phase_own_peaks")), _phase_peaks(get("segment_peaks"), SEGMENTS))
    return _with_decoded_added(made, get, memo)


#: Step's added fields that are not dataclass fields (not __init__ arguments, written only where set; a copy of a
#: step's __dict__ keeps them)
ADDED_FIELDS = ("saved_split", "inactive_split")


def with_added(step: Step, **added: Any) -> Step:
    """A copy of ``step`` carrying the given ADDED_FIELDS values."""
    unknown = added.keys() - set(ADDED_FIELDS)
    if unknown:
        raise TypeError(f"not an added Step field: {', '.join(sorted(unknown))}")
    made = object.__new__(Step)
    made.__dict__.update(step.__dict__)
    made.__dict__.update(added)
    return made


def with_saved_split(step: Step, split: dict[str, Any] | None) -> Step:
    """A copy of ``step`` carrying ``split`` in its added ``saved_split`` field (not an __init__ argument)."""
    return with_added(step, saved_split=split)


def _with_decoded_added(made: Step, get: Callable[[str], Any], memo: dict[str, Any] | None = None) -> Step:
    """``made`` with the added fields of its message, each checked as its decoder says (a bad value is None)."""
    split, inactive = get("saved_split"), get("inactive_split")
    if split is None and inactive is None:
        return made
    return with_added(made, saved_split=None if split is None else _decoded_split(split, memo),
                      inactive_split=inactive if type(inactive) is int and 0 <= inactive <= MAX_SIZE else None)


def _phase(value: Any) -> str | None:
    """The added ``peak_phase`` field: one of PHASES, else None (missing, an older agent, an odd value)."""
    return value if value in PHASES else None


def _phase_peaks(value: Any, names: tuple[str, ...] = PHASES) -> dict[str, int] | None:
    """The added ``phase_peaks``, ``phase_own_peaks`` (names: PHASES) and ``segment_peaks`` (SEGMENTS) fields:
    {name: bytes} for known names, else None."""
    if type(value) is not dict or not value:
        return None
    out = {}
    for name, size in value.items():
        if name not in names or type(size) is not int or not 0 <= size <= MAX_SIZE:
            return None
        out[name] = size
    return out


def _decoded_split(value: Any, memo: dict[str, Any] | None) -> dict[str, Any] | None:
    """_saved_split(value); with ``memo`` (one agent's), the previous answer when its message carried the very same
    split. A sampled step carries it every time, unchanged for the run (a fast job: ~8 messages a second, the
    block sequence of every block), and its check was half of such a message's decoding (~18 us). The same is
    told by marshal's bytes, which say every value's type (1, 1.0 and True differ there, not under ==), ~2.6 us;
    the answer is shared by the steps, as step_history.compact_step shares equal values (nothing changes a step's
    dicts)."""
    if memo is None:
        return _saved_split(value)
    try:
        key = marshal.dumps(value)
    except ValueError:  # (a JSON value always marshals)
        return _saved_split(value)
    last = memo.get("saved_split")
    if last is not None and last[0] == key:
        return last[1]  # type: ignore[no-any-return]
    out = _saved_split(value)
    memo["saved_split"] = (key, out)
    return out


def _saved_split(value: Any) -> dict[str, Any] | None:
    """The added ``saved_split`` field: {name: bytes} with the required SAVED_SPLIT_FIELDS, else None (an old, odd
    or hostile agent's value never fails the line). Names this monitor does not know are skipped, not fatal: a
    newer agent adds names within protocol v1, and the known ones still serve."""
    if type(value) is not dict or not SAVED_SPLIT_REQUIRED <= value.keys() or len(value) > 4 * len(SAVED_SPLIT_FIELDS):
        return None
    out: dict[str, Any] = {}
    for name, size in value.items():
        if name == SAVED_SPLIT_SEQUENCE:
            seq = _block_seq(size)
            if seq is not None:
                out[name] = seq
            continue
        if name not in SAVED_SPLIT_FIELDS:
            continue
        if type(size) is not int or not 0 <= size <= MAX_SIZE:
            return None
        out[name] = size
    return out if out["batch"] >= 1 else None


def _sizes(value: Any, limit: int, signed: bool = False) -> list[int] | None:
    if type(value) is not list or len(value) > limit:
        return None
    low = -MAX_SIZE if signed else 0
    return value if all(type(v) is int and low <= v <= MAX_SIZE for v in value) else None


def _block_seq(value: Any) -> dict[str, Any] | None:
    """The split's optional ``block_seq`` (batchmon.agent.saved_split.BlockSplitMeter.sequence): {"kinds":
    [[input, [saved...], [params...]], ...], "order": [[kind, gap, fixed], ...], "before": b, "after": b}; else
    None
    (the rest of the split stands). An older monitor skips the name, as any name it does not know."""
    if type(value) is not dict:
        return None
    kinds, order = value.get("kinds"), value.get("order")
    if type(kinds) is not list or not 0 < len(kinds) <= 64 or type(order) is not list or not 0 < len(order) <= 4096:
        return None
    out_kinds = []
    for kind in kinds:
        if type(kind) is not list or len(kind) != 3 or type(kind[0]) is not int or not 0 <= kind[0] <= MAX_SIZE:
            return None
        saved, params = _sizes(kind[1], 1024, signed=True), _sizes(kind[2], 1024)
        if saved is None or params is None:
            return None
        out_kinds.append([kind[0], list(saved), list(params)])
    out_order = []
    for entry in order:
        pair = _sizes(entry, 3)
        if pair is None or len(pair) < 2 or pair[0] >= len(out_kinds):
            return None
        out_order.append(list(pair))
    before, after = value.get("before", 0), value.get("after", 0)
    if any(type(v) is not int or not 0 <= v <= MAX_SIZE for v in (before, after)):
        return None
    return {"kinds": out_kinds, "order": out_order, "before": before, "after": after}


def _window_steps(value: Any) -> int:
    """The added ``steps`` field: a count >= 1; missing (an older agent) or odd values read as 1 step."""
    return value if isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= 1 << 40 else 1


def _lenient_str(value: Any, limit: int) -> str | None:
    """An added optional field: a string, else None (an old or odd agent's value never fails the line)."""
    return value[:limit] if isinstance(value, str) else None


def _lenient_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SIZE else None


@dataclass(frozen=True)
class Event:
    kind: str
    message: str
    components: dict[str, int] | None = None
    time: float | None = None
    step: int | None = None
    batch_size: int | None = None
    requested_bytes: int | None = None
    # added fields (an oom event on CUDA): the caching allocator at the error - live tensors, its pool, and its
    # cumulative cache-flush-and-retry count; older agents send none (the post-mortem then estimates or says n/a)
    allocated: int | None = None
    reserved: int | None = None
    num_alloc_retries: int | None = None
    type: str = field(default="event", init=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "message": self.message,
                "components": dict(self.components) if self.components is not None else None,
                "time": self.time, "step": self.step, "batch_size": self.batch_size,
                "requested_bytes": self.requested_bytes, "allocated": self.allocated, "reserved": self.reserved,
                "num_alloc_retries": self.num_alloc_retries, "type": "event"}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Event":
        return cls(
            kind=_str(d, "kind", limit=64) or "warning",
            message=_str(d, "message", nullable=True, limit=4096) or "",
            components=_components(d, nullable=True),
            time=_float(d, "time", nullable=True),
            step=_int(d, "step", nullable=True),
            batch_size=_int(d, "batch_size", nullable=True, maximum=1 << 40),
            requested_bytes=_int(d, "requested_bytes", nullable=True),
            allocated=_lenient_int(d.get("allocated")),
            reserved=_lenient_int(d.get("reserved")),
            num_alloc_retries=_lenient_int(d.get("num_alloc_retries")),
        )


@dataclass(frozen=True)
class Bye:
    reason: str = "detached"
    time: float | None = None
    type: str = field(default="bye", init=False)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Bye":
        return cls(reason=_str(d, "reason", nullable=True, limit=256) or "detached",
                   time=_float(d, "time", nullable=True))


Message = Hello | Step | Event | Bye
#: the other message types' decoders (a step, with the agent's memo, is decode_object's own first test)
_PARSERS: dict[str, Callable[[Mapping[str, Any]], Message]] = {
    "hello": Hello.from_dict, "event": Event.from_dict, "bye": Bye.from_dict}


def step_components(step: Step | None) -> dict[str, int | None]:
    """The eight components of a step (ALL_COMPONENTS): the six measured ones from the step, cache and context
    derived, None where a figure is missing. One definition for --once/--json, the exporter and the UI.

    cache = reserved - peak allocated: the allocator's free blocks at the step's peak, the moment the six
    components describe (they sum to the peak). The end-of-step reserved - allocated also counts the blocks
    the activations held and freed after backward, already counted as activations, so the eight summed to
    more than the device used. The TUI's bars, the memory model and the prediction use the same definition.
    Without a peak (an agent that doesn't report one): reserved - allocated. context = device used - reserved."""
    out: dict[str, int | None] = {name: None for name in ALL_COMPONENTS}
    if step is None:
        return out
    for name in COMPONENTS:
        out[name] = step.components.get(name)
    out["cache"], out["context"] = cache_and_context(step.peak_allocated, step.allocated, step.reserved,
                                                     step.device_used)
    return out


def cache_and_context(peak_allocated: int | None, allocated: int | None, reserved: int | None,
                      device_used: int | None, *, strict: bool = False) -> tuple[int | None, int | None]:
    """The two derived components, defined once (step_components and the memory model's observations):
    cache = reserved - peak allocated, context = device used - reserved, never negative.

    strict is the memory model's reading: no cache without a peak (the end-of-step allocated also counts the
    activations' freed blocks), and no context from an NVML reading older than the step's pool (device used <
    reserved: None, not 0, so the fit does not take a stale 0 for a measured one)."""
    base = peak_allocated if peak_allocated is not None or strict else allocated
    cache = None if reserved is None or base is None else max(reserved - base, 0)
    if reserved is None or device_used is None or (strict and device_used < reserved):
        return cache, None
    return cache, max(device_used - reserved, 0)


# ----------------------------------------------------------------------------------------------- codec


def encode(message: Message) -> bytes:
    """One protocol line, newline included. Raises ProtocolError when it would exceed the line limit."""
    d = message.to_dict()
    d["v"] = VERSION
    line = json.dumps(d, separators=(",", ":"), allow_nan=False).encode("utf-8") + b"\n"
    if len(line) > MAX_LINE_BYTES:
        raise ProtocolError(f"message of {len(line)} bytes exceeds the {MAX_LINE_BYTES}-byte line limit")
    return line


def decode(line: bytes | str) -> Message | None:
    """Parse one line. Returns None for a valid object of an unknown type (ignored by design).

    Raises ProtocolError for anything else that is not a valid v1 message.
    """
    if isinstance(line, bytes):
        if len(line) > MAX_LINE_BYTES:
            raise ProtocolError("line exceeds 1 MiB")
        try:
            line = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ProtocolError("line is not UTF-8") from exc
    elif len(line) > MAX_LINE_BYTES:
        raise ProtocolError("line exceeds 1 MiB")
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise ProtocolError("line is not JSON") from exc
    return decode_object(obj)


def decode_object(obj: Any, memo: dict[str, Any] | None = None) -> Message | None:
    """``decode`` for a line already parsed as JSON (a recording's ``data``): None for a valid object of an
    unknown type, ProtocolError for anything else that is not a valid v1 message. ``memo``: a dict the caller
    keeps per agent, so a step's parts that repeat its previous message's are checked once (Step.from_dict)."""
    if not isinstance(obj, dict):
        raise ProtocolError("line is not a JSON object")
    if obj.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {obj.get('v')!r}")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("type: missing")
    if kind == "step":
        return Step.from_dict(obj, memo)
    parser = _PARSERS.get(kind)
    if parser is None:
        return None
    return parser(obj)


# ----------------------------------------------------------------------------------------------- monitor -> agent

REFRESH = "refresh"  # v1 addition, the one line a monitor writes: ``{"v": 1, "type": "refresh", "interval": S}``,
# how often it refreshes (seconds; its --interval), sent on connecting and again whenever it changes. An agent uses
# it to pick its step window (batchmon.agent.pace); older agents read and discard what a monitor writes, and an agent
# that never gets it (an older monitor) keeps its short window. Never more than this: a monitor cannot make an agent
# do anything but send fewer step messages.
REFRESH_LINE_BYTES = 256  # a longer line from a monitor is dropped unread


def refresh_line(interval: float) -> bytes:
    """The line a monitor writes to an agent: its refresh interval in seconds."""
    return json.dumps({"v": VERSION, "type": REFRESH, "interval": float(interval)},
                      separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode_refresh(line: bytes) -> float | None:
    """A monitor's refresh interval from one line it wrote; None for anything else (never raises)."""
    if len(line) > REFRESH_LINE_BYTES:
        return None
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or obj.get("v") != VERSION or obj.get("type") != REFRESH:
        return None
    value = obj.get("interval")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return None
    return float(value)


class LineBuffer:
    """Splits a byte stream into lines, dropping (and counting) lines longer than the limit without storing them."""

    def __init__(self, limit: int = MAX_LINE_BYTES) -> None:
        self.limit = limit
        self._buf = bytearray()
        self._skipping = False
        self.oversized = 0

    def feed(self, data: bytes) -> list[bytes]:
        lines: list[bytes] = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                break
            chunk = data[start:nl]
            if self._skipping:
                self._skipping = False
            elif len(self._buf) + len(chunk) > self.limit:
                self.oversized += 1
            else:
                self._buf += chunk
                lines.append(bytes(self._buf))
            self._buf.clear()
            start = nl + 1
        rest = data[start:]
        if not self._skipping:
            if len(self._buf) + len(rest) > self.limit:
                self._buf.clear()
                self._skipping = True
                self.oversized += 1
            else:
                self._buf += rest
        return lines

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held now (a partial line at the end of a stream)."""
        return len(self._buf)


# ----------------------------------------------------------------------------------------------- socket paths


def socket_dir(env: Mapping[str, str] | None = None) -> Path:
    """``$BATCHMON_DIR``, else ``$XDG_RUNTIME_DIR/batchmon``, else ``/tmp/batchmon-<uid>``."""
    env = os.environ if env is None else env
    if env.get("BATCHMON_DIR"):
        return Path(env["BATCHMON_DIR"])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "batchmon"
    return Path(f"/tmp/batchmon-{os.getuid()}")


def check_socket_dir(path: Path) -> None:
    """Raise SocketDirError unless path is a real folder owned by us with no access for others."""
    try:
        st = os.lstat(path)
    except FileNotFoundError as exc:
        raise SocketDirError(f"socket folder {path} does not exist") from exc
    if stat.S_ISLNK(st.st_mode):
        raise SocketDirError(f"socket folder {path} is a symlink; refusing to use it")
    if not stat.S_ISDIR(st.st_mode):
        raise SocketDirError(f"socket folder {path} is not a folder")
    if st.st_uid != os.getuid():
        raise SocketDirError(f"socket folder {path} is owned by uid {st.st_uid}, not by you (uid {os.getuid()})")
    if st.st_mode & 0o077:
        raise SocketDirError(f"socket folder {path} is open to other users (mode {stat.S_IMODE(st.st_mode):o}); "
                             "expected 0700")


def ensure_socket_dir(path: Path | None = None) -> Path:
    """Create the socket folder 0700 if missing, then check it is safe. Returns the path."""
    path = socket_dir() if path is None else path
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise SocketDirError(f"cannot create socket folder {path}: {exc.strerror}") from exc
    check_socket_dir(path)
    return path


def socket_path(pid: int, directory: Path | None = None) -> Path:
    return (socket_dir() if directory is None else directory) / f"{pid}.sock"


def pid_of_socket(path: Path | str) -> int | None:
    """The pid a socket file (a path, or a file name: the hub's scan, no Path made) is named after, or None for a
    file that is not an agent socket."""
    name = path if isinstance(path, str) else path.name
    if not name.endswith(".sock"):
        return None
    pid, _, n = name[:-5].partition("-")  # <pid>-<n>.sock: another process with our pid had <pid>.sock
    if not pid.isdigit() or (n and not n.isdigit()):
        return None
    return int(pid)
