"""The hub record: what `record`, `stream` and `replay` carry, and what ``HubState.ingest`` takes. One dict::

    {"t": unix time, "kind": "nvml" | "host" | "agent" | "agent_eof" | "agent_gone" | "warning" | "tick" | "meta"
                     | "link" | "clear_ended" | "agent_exit",
     "source": "local" or a remote host, "key": "<host>:<pid>" (agent kinds), "data": ...}

``data`` is the probe sample dict (nvml, host; a live hub with no recorder may pass the sample object itself as
``"sample"`` instead), the raw protocol message object (agent; null with an ``"error"`` when the line was not a
JSON object), ``{"source", "message"[, "detail"]}`` (warning, counted per source and message) or
``{"state": "connected" | "lost", "message", "retry_in"}`` (link: a remote box's ssh session came up or went
down), ``{"why": "process ended" | "silent"}`` (agent_gone; absent in older recordings), ``{"returncode": N}``
(agent_exit). Records are plain JSON-able dicts, so a recording is one per line (``record_line``).

Every producer (the hub, remote boxes, replay) builds them with the constructors here, so a record's shape is
written once.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any, Mapping

LOCAL = "local"
FORMAT_VERSION = 1  # of a recording: its first line, ``meta``, says it

Record = dict[str, Any]


def _now(t: float | None) -> float:
    return time.time() if t is None else t


def meta(interval: float, command: str, *, version: str, t: float | None = None) -> Record:
    """A recording's first line: its format, who wrote it (batchmon ``version``, host) and how (interval, command)."""
    return {"t": _now(t), "kind": "meta", "version": FORMAT_VERSION, "batchmon": version,
            "host": socket.gethostname(), "interval": interval, "command": command, "source": LOCAL}


def tick(t: float | None = None, source: str = LOCAL) -> Record:
    """A refresh boundary: replay shows one snapshot per local tick."""
    return {"t": _now(t), "kind": "tick", "source": source}


def warning(origin: str, message: str, detail: str | None = None, *, source: str = LOCAL,
            t: float | None = None) -> Record:
    """A problem the monitor survived, counted per (origin, message); ``detail`` is the latest occurrence's."""
    data: dict[str, Any] = {"source": origin, "message": message}
    if detail is not None:
        data["detail"] = detail
    return {"t": _now(t), "kind": "warning", "source": source, "data": data}


def sample(kind: str, *, data: Any = None, sample: Any = None, source: str = LOCAL, t: float | None = None) -> Record:
    """A probe sample ("nvml" or "host"): its dict form as ``data``, or (a live hub that records nothing) the
    sample object itself as ``sample``, which HubState takes as is."""
    record: Record = {"t": _now(t), "kind": kind, "source": source}
    if sample is not None:
        record["sample"] = sample
    else:
        record["data"] = data
    return record


def agent(key: str, body: Mapping[str, Any], *, source: str = LOCAL, t: float | None = None) -> Record:
    """One line from an agent: ``body`` is ``{"data": the JSON object}`` or ``{"data": None, "error": why}``."""
    record: Record = {"t": _now(t), "kind": "agent", "source": source, "key": key}
    record.update(body)
    return record


def agent_eof(key: str, *, source: str = LOCAL, t: float | None = None) -> Record:
    """The agent's connection closed (it may come back: the pid is alive)."""
    return {"t": _now(t), "kind": "agent_eof", "source": source, "key": key}


def agent_gone(key: str, *, why: str | None = None, source: str = LOCAL, t: float | None = None) -> Record:
    """The agent is gone for good: ``why`` "process ended" (its pid is gone) or "silent" (it stayed disconnected
    past the grace time, its process alive). Recordings older than ``why`` have no ``data``."""
    record: Record = {"t": _now(t), "kind": "agent_gone", "source": source, "key": key}
    if why is not None:
        record["data"] = {"why": why}
    return record


def agent_exit(key: str, returncode: int, *, source: str = LOCAL, t: float | None = None) -> Record:
    """A process's exit status as its launcher (`batchmon run`) saw it: ``returncode`` as Popen gives it (-N for
    signal N)."""
    return {"t": _now(t), "kind": "agent_exit", "source": source, "key": key, "data": {"returncode": returncode}}


def clear_ended(t: float | None = None) -> Record:
    """The user cleared the ended runs (the monitor's `x`): every box's ended runs go."""
    return {"t": _now(t), "kind": "clear_ended", "source": LOCAL}


def link(host: str, state: str, message: str | None = None, retry_in: float | None = None,
         *, t: float | None = None) -> Record:
    """A remote box's connection: ``state`` "connected" or "lost" (then why, and the seconds to the retry)."""
    return {"t": _now(t), "kind": "link", "source": host,
            "data": {"state": state, "message": message, "retry_in": retry_in}}


def record_line(record: Mapping[str, Any]) -> str:
    """One record as a compact JSON line (newline included), as `batchmon record` writes it."""
    return json.dumps(record, separators=(",", ":"), default=str) + "\n"
