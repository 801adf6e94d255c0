"""How a run ended, and its OOM post-mortem, from what the hub holds of it (HubState keeps the state; these
are the rules): the summary of an ended run (snapshot.RunEnd) and the report of an out-of-memory error
(batchmon.postmortem), fitted on the run's steps when it has any.
"""

from __future__ import annotations

import signal as signals
from dataclasses import replace
from typing import Any

from batchmon import memory_model
from batchmon.monitor.step_history import StepHistory
from batchmon.postmortem import OomReport, oom_report
from batchmon.probes.nvml import NvmlSample
from batchmon.protocol import Bye, Event, Hello, Step
from batchmon.snapshot import RunEnd, device_for

ADVICE_EVERY_S = 2.0  # a loop that catches OOMs (a batch finder): the advice for one batch size at most this often

#: RunEnd.text for an end without a bye, by the agent_gone record's ``why`` (None: an older recording)
GONE_TEXT = {
    "process ended": ("killed", "ended without a goodbye: killed by a signal, crashed or os._exit (its exit "
                                "status is not visible to the monitor)"),
    "silent": ("lost", "no goodbye, and silent past the grace time while its process lives on"),
    None: ("gone", "ended without a goodbye"),
}


def _short(text: Any, limit: int) -> str:
    s = str(text).replace("\n", " ")
    return s if len(s) <= limit else s[: limit - 1] + "…"


def bye_text(bye: Bye) -> tuple[str, str]:
    """RunEnd.how and .text for a run that said bye."""
    if bye.reason == "exit":
        return "exited", "exited (exit code not reported)"
    if bye.reason == "detached":
        return "detached", "detached: the process went on without the agent"
    return "exited", f"ended: {_short(bye.reason, 80)}"


def _lenient_code(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and -1024 < value < 1024 else None


def run_end(last: Step | None, failing: Event | None, oom: OomReport | None, peak: int | None, how: str, text: str,
            t: float, bye: Bye | None) -> RunEnd:
    """The final summary. An OOM with no step after it is how the run ended, whatever followed (the bye at exit);
    a bye that carries ``exit_code`` / ``signal`` (protocol v1's does not) says them."""
    if failing is not None and (last is None or last.step < (failing.step or 0)):
        how, text = "oom", _short(failing.message or "out of memory", 300)
        if oom is not None:
            peak = oom.allocated if peak is None else max(peak, oom.allocated)
    code, sig = _lenient_code(getattr(bye, "exit_code", None)), _lenient_code(getattr(bye, "signal", None))
    if code is not None and how == "exited":
        text = f"exited with code {code}"
    if sig is not None:
        text += f" (signal {sig})"
    return RunEnd(time=t, how=how, text=text, steps=last.step if last is not None else 0, peak=peak,
                  exit_code=code, signal=sig)


def same_oom_again(previous: OomReport | None, event: Event) -> OomReport | None:
    """The previous report with the new event's moment, when a loop that catches OOMs (a batch finder) fails
    again at the same batch within ADVICE_EVERY_S: the advice is not fitted again for each."""
    if (previous is None or previous.batch_size != event.batch_size or previous.time is None or event.time is None
            or not 0 <= event.time - previous.time < ADVICE_EVERY_S):
        return None
    return replace(previous, time=event.time, step=event.step, requested_bytes=event.requested_bytes,
                   message=event.message)


def report(event: Event, hello: Hello | None, history: StepHistory, model: Any, nvml: NvmlSample | None,
           device_used: int | None, device_free: int | None) -> OomReport:
    """The post-mortem of ``event``: advised from the model fitted to the run's steps (the hub's, else fitted
    now), or from the failing step alone when none finished."""
    dev = device_for(hello, nvml.devices) if hello is not None and nvml is not None else None
    total = dev.memory.total if dev is not None and dev.memory is not None else None
    optimizer = hello.optimizer if hello is not None else None
    if model is None and history.last is not None:
        model = memory_model.fit(history.window().model_steps(), optimizer=optimizer)
    return oom_report(event, last_step=history.last, model=model, optimizer=optimizer, device_total=total,
                      device_used=device_used, device_free=device_free)


def process_figures(hello: Hello, sample: NvmlSample) -> tuple[int, int | None] | None:
    """NVML's figure for the process and the device's free bytes in ``sample``; None when it is not listed."""
    dev = device_for(hello, sample.devices)
    if dev is None:
        return None
    used = next((p.used for p in dev.processes if p.pid == hello.pid), None)
    if used is None:
        return None
    return used, dev.memory.free if dev.memory is not None else None


def with_returncode(end: RunEnd, returncode: int) -> RunEnd:
    """The summary once the launcher's exit status is known (Popen's returncode: -N for signal N)."""
    code, sig = (returncode, None) if returncode >= 0 else (None, -returncode)
    if sig is not None:
        try:
            name = signals.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        what = f"killed by {name} (signal {sig})"
    else:
        what = f"exit code {code}"
    if end.how == "exited":
        text = f"exited with code {code}" if sig is None else what
    elif end.how in ("killed", "gone", "lost"):
        text = what if sig is not None else f"ended without a goodbye, {what}"
    else:  # oom, detached: how it ended stays; the status follows
        text = f"{end.text}; {what}"
    return replace(end, text=_short(text, 300), exit_code=code, signal=sig)
