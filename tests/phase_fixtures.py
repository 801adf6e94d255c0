"""A GPT run on an H200 fed through the real HubState, with the peak's phase on its sampled steps (issue 16
point 4): every fourth step carries ``peak_phase`` / ``phase_peaks`` as the agent sends them, the others none.

Shared by the phase tests and the SVG snapshot of the job panel with a phase."""

from __future__ import annotations

import dataclasses
import json

import tui_fixtures as fx
from batchmon import protocol, records
from batchmon.monitor.hub_state import HubState
from batchmon.protocol import PHASES, Step
from batchmon.snapshot import Snapshot

KEY = f"{fx.HOST}:4242"
GiB = fx.GiB


def agent_record(message, t: float) -> dict:
    """A hub record of one agent message, through the real protocol encoding (what the socket carries)."""
    return records.agent(KEY, {"data": json.loads(protocol.encode(message))}, t=t)


def sampled(step: Step, forward: int, backward: int) -> Step:
    """``step`` as a sampled one: the peak by the end of forward and of backward; the step's peak at its end."""
    peaks = dict(zip(PHASES, (forward, backward, step.peak_allocated or backward)))
    phase = next(name for name in PHASES if peaks[name] == max(peaks.values()))
    return dataclasses.replace(step, peak_phase=phase, phase_peaks=peaks)


def run_with_phases(steps: int = 40, *, sample_every: int | None = 4, last_sampled: bool = False) -> Snapshot:
    """The tui_fixtures GPT run on one H200 (its NVML and host samples, hello, steps), through HubState; the
    sampled steps peak in backward (activations kept for it, then gradients on top). ``last_sampled``: the last
    step is a sampled one (else the latest phase is a few steps old, as it usually is); ``sample_every=None``: no
    step sampled (an agent or a recording from before the measurement)."""
    base = fx.one_gpu(1, steps=steps)
    (agent,) = base.agents
    state = HubState()
    t = base.time
    state.ingest({"t": t - 60, "kind": "nvml", "source": "local", "sample": base.nvml})
    state.ingest({"t": t - 60, "kind": "host", "source": "local", "sample": base.host})
    state.ingest(agent_record(agent.hello, t - 60))
    history = list(agent.history)
    for i, step in enumerate(history):
        if sample_every is not None and (i % sample_every == 0 or (last_sampled and i == len(history) - 1)):
            peak = step.peak_allocated or 0
            comps = step.components
            forward = peak - comps["gradients"] - comps["optimizer"] // 2
            step = sampled(step, forward, peak)
        state.ingest(agent_record(step, step.time))
    return state.snapshot(t)
