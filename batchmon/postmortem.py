"""The OOM post-mortem: what filled the device when a training process ran out of memory, and what would have fit.

PyTorch's own message names only the allocation that failed. The agent's ``oom`` event adds the components at
that moment (parameters, gradients, optimizer, activations so far, batch, other) and the bytes asked for; the
monitor adds what it saw around it (NVML's figure for the process at its first sample after the error, the
allocator figures of the last finished step), and the fit advisor (batchmon.memory_model.advisor) says which
change would have made the failing batch fit and the largest batch with it.

Built once per OOM by the hub (HubState), read by every front end: pure, no torch, no textual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from batchmon.memory_model import MemoryModel, Observation, fit
from batchmon.memory_model.advisor import Advice, advise
from batchmon.protocol import ALL_COMPONENTS, COMPONENTS, Event, Step, step_components

ADVICE_SHOWN = 8  # advice rows kept in a report (the advisor ranks them, cheapest way to the batch first)


@dataclass(frozen=True)
class OomReport:
    """One out-of-memory error, taken apart."""

    time: float | None
    step: int | None  # the step that failed (the agent counts it as the next one)
    batch_size: int | None
    requested_bytes: int | None  # the allocation that failed
    message: str  # the agent's one line ("out of memory in forward at step 1: CUDA out of memory")
    components: dict[str, int | None]  # every name of protocol.ALL_COMPONENTS at the failing moment
    allocated: int  # the six measured components' sum: live tensors when it failed
    reserved: int | None  # the caching allocator's pool then (None: not reported)
    reserved_basis: str  # where ``reserved`` comes from, or why it is missing
    num_alloc_retries: int | None  # cache flushes and retries so far (cumulative for the process)
    fragmentation: int | None  # reserved - allocated: free blocks in the pool the request could not use
    device_used: int | None  # NVML's figure for the process at its first sample after the error
    beyond_allocated: int | None  # device_used - allocated: allocator cache + CUDA context and libraries
    device_total: int | None
    device_free: int | None  # NVML's free bytes on the device at that sample
    advice: tuple[Advice, ...] = ()
    advice_basis: str = ""  # what the advice rests on (the fitted steps, or the failing step alone)

    @property
    def reserved_estimated(self) -> bool:
        """``reserved`` is NVML's figure less the context measured earlier, not the allocator's own."""
        return self.reserved is not None and self.reserved_basis.startswith("estimated")

    @property
    def needed(self) -> int | None:
        """At least what the failing step wanted: live tensors + the allocation that failed."""
        return None if self.requested_bytes is None else self.allocated + self.requested_bytes

    def to_dict(self) -> dict[str, Any]:
        """`--once --json`'s ``agents[].oom``."""
        return {
            "time": self.time, "step": self.step, "batch_size": self.batch_size,
            "requested_bytes": self.requested_bytes, "message": self.message,
            "components": dict(self.components), "allocated": self.allocated, "reserved": self.reserved,
            "reserved_basis": self.reserved_basis, "num_alloc_retries": self.num_alloc_retries,
            "fragmentation": self.fragmentation, "device_used": self.device_used,
            "beyond_allocated": self.beyond_allocated, "device_total": self.device_total,
            "device_free": self.device_free, "advice_basis": self.advice_basis,
            "advice": [advice_dict(a) for a in self.advice],
        }


def advice_dict(a: Advice) -> dict[str, Any]:
    return {"what_if": a.what_if, "max_batch": a.max_batch, "step_time_factor": a.step_time_factor,
            "factor_basis": a.factor_basis, "fits_target": a.fits_target}


def _reported(event: Event, name: str) -> int | None:
    """An allocator figure the oom event may carry (a later agent); protocol v1's event has none of them."""
    value = getattr(event, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def oom_report(event: Event, *, last_step: Step | None, model: MemoryModel | None, optimizer: str | None,
               device_total: int | None, device_used: int | None = None,
               device_free: int | None = None) -> OomReport:
    """The post-mortem of ``event`` (an ``oom`` Event). ``model``: the model fitted to the run's finished steps,
    when there are any; without one the failing step alone is fitted (see _failing_step_model)."""
    six = dict(event.components) if event.components else dict(last_step.components) if last_step else {}
    comps: dict[str, int | None] = {name: int(six.get(name) or 0) for name in COMPONENTS}
    allocated = sum(int(v or 0) for v in comps.values())
    reserved = _reported(event, "reserved")
    context = step_components(last_step)["context"] if last_step is not None else None
    if reserved is not None:
        basis = "reported with the error"
    elif device_used is not None and context is not None and device_used - context >= allocated:
        # the CUDA context and libraries outside the allocator stay put within a run: what NVML saw the process
        # hold after the error, less the context measured at its last step, is the pool the error met
        reserved = device_used - context
        basis = (f"estimated: NVML's figure for the process after the error less its context at step "
                 f"{last_step.step} ({context} bytes)")  # type: ignore[union-attr]
    elif device_used is not None:
        basis = "not reported by the agent; NVML's figure for the process holds it with the CUDA context"
    else:
        basis = "not reported by the agent"
    retries = _reported(event, "num_alloc_retries")
    if retries is None and last_step is not None:
        retries = last_step.num_alloc_retries
    comps["cache"] = None if reserved is None else max(reserved - allocated, 0)
    comps["context"] = None if reserved is None or device_used is None else max(device_used - reserved, 0)
    advice: tuple[Advice, ...] = ()
    why = ""
    if event.batch_size is None or not device_total:
        why = "no advice: " + ("the failing batch size is unknown" if event.batch_size is None
                               else "the device size is unknown")
    else:
        used_model, why = (model, f"the model fitted to the run's steps ({model.basis})") if model is not None \
            else _failing_step_model(event, comps, allocated, optimizer, device_used)
        if used_model is not None:
            try:
                advice = advise(used_model, capacity=device_total, target_batch=event.batch_size)[:ADVICE_SHOWN]
            except Exception as exc:  # noqa: BLE001 - a model or advisor bug costs the advice, not the report
                why = f"no advice: {type(exc).__name__}: {exc}"
    return OomReport(
        time=event.time, step=event.step, batch_size=event.batch_size, requested_bytes=event.requested_bytes,
        message=event.message, components={name: comps.get(name) for name in ALL_COMPONENTS}, allocated=allocated,
        reserved=reserved, reserved_basis=basis, num_alloc_retries=retries,
        fragmentation=comps["cache"], device_used=device_used,
        beyond_allocated=None if device_used is None else max(device_used - allocated, 0),
        device_total=device_total, device_free=device_free, advice=advice, advice_basis=why)


def _failing_step_model(event: Event, comps: dict[str, int | None], allocated: int, optimizer: str | None,
                        device_used: int | None) -> tuple[MemoryModel | None, str]:
    """A run that failed before finishing a step (the GPT at batch 2048 on the H200 failed in its first forward)
    has only the failing moment: fitted as one observation at the failing batch whose peak is live tensors + the
    allocation that failed. The step would have needed more (the rest of the forward, the backward), so the
    largest batches are upper bounds. Gradients not yet allocated are taken as the parameters' size (every
    parameter trainable), optimizer state as the memory model's lazy-state rule says."""
    six = {name: int(comps.get(name) or 0) for name in COMPONENTS}
    notes = ["fitted to the failing step alone (it did not finish: the largest batches are upper bounds)"]
    if six["gradients"] == 0 and six["parameters"] > 0:
        six["gradients"] = six["parameters"]
        notes.append("gradients not yet allocated: taken as the parameters' size")
    peak = sum(six.values()) + int(event.requested_bytes or 0)
    obs = Observation(step=event.step or 1, batch_size=event.batch_size or 1, components=six, peak_allocated=peak,
                      device_used=device_used)
    model = fit([obs], optimizer=optimizer)
    return model, "; ".join(notes)
