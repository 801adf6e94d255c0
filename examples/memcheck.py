"""``--check`` for the examples: the agent's components next to torch.cuda.memory_allocated() deltas.

Measured in the same run as the agent's figures:

- parameters: allocated bytes added by ``model.to(device)`` (the model is built on the CPU first);
- optimizer: added by the first ``optimizer.step()`` (it creates the states; its temporaries are freed);
- gradients: freed by ``optimizer.zero_grad(set_to_none=True)`` right after the checked step;
- activations: added by the checked step's forward (and loss), minus nothing: what is still allocated after
  the forward is what the graph saved, plus the scalar loss (512 bytes);
- batch: added by moving the checked step's batch to the device.

Parameters, gradients, optimizer and batch must agree exactly, activations within 2%. Exactness needs the
allocator to split every block it hands out, so the check turns on ``expandable_segments`` (set before torch
is imported; ``--allocator default`` keeps the stock allocator, where a block is not split when the rest
would be 1 MiB or less and may count up to that much extra).

``measured_step``/``run_steps`` are the examples' training loop with those deltas taken in place, so every
example measures the same way.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

EXACT = ("parameters", "gradients", "optimizer", "batch")
ACTIVATION_TOLERANCE = 0.02


def prepare_allocator(argv: list[str]) -> None:
    """Call before importing torch (the allocator reads its settings once): expandable segments for --check."""
    check = "--check" in argv
    default = "--allocator=default" in argv or any(a == "--allocator" and b == "default" for a, b in zip(argv, argv[1:]))
    if check and not default and "PYTORCH_CUDA_ALLOC_CONF" not in os.environ:
        os.environ["PYTORCH_CUDA_ALLOC_CONF"] = "expandable_segments:True"


def add_arguments(parser: Any) -> None:
    parser.add_argument("--check", action="store_true",
                        help="compare the agent's components with torch.cuda.memory_allocated() deltas (CUDA)")
    parser.add_argument("--check-out", metavar="FILE", help="write the --check comparison as JSON to FILE")
    parser.add_argument("--allocator", choices=("expandable", "default"), default="expandable",
                        help="allocator for --check (default: expandable segments, so blocks are exact)")


class Meter:
    """torch.cuda.memory_allocated() on one device; None everywhere off CUDA."""

    def __init__(self, device: Any) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.cuda = device.type == "cuda"
        self.measured: dict[str, int | None] = {name: None for name in (*EXACT, "activations")}

    def allocated(self) -> int | None:
        return int(self.torch.cuda.memory_allocated(self.device)) if self.cuda else None

    def record(self, name: str, before: int | None, after: int | None) -> None:
        if before is not None and after is not None:
            self.measured[name] = after - before


def measured_step(meter: Meter, optimizer: Any, make_batch: Callable[[], tuple[Any, Any]],
                  loss_of: Callable[[Any, Any], Any], *, amp: bool, first: bool, last: bool) -> float:
    """One step (batch to the device, forward and loss, backward, optimizer step); returns the loss value.

    Records the optimizer delta on the ``first`` step and batch, activations and gradients on the ``last``
    (the checked one). ``make_batch()`` returns (inputs, targets) on the device; ``loss_of(inputs, targets)``
    runs under bf16 autocast when ``amp``. The batch and loss are freed on return, before the next step.
    """
    torch = meter.torch
    before = meter.allocated()
    x, y = make_batch()
    if last:
        meter.record("batch", before, meter.allocated())
    optimizer.zero_grad(set_to_none=True)
    before = meter.allocated()
    with torch.autocast(meter.device.type, dtype=torch.bfloat16, enabled=amp):
        loss = loss_of(x, y)
    if last:
        meter.record("activations", before, meter.allocated())
    loss.backward()
    before = meter.allocated()
    optimizer.step()
    if first:
        meter.record("optimizer", before, meter.allocated())
    if last:
        before = meter.allocated()
        optimizer.zero_grad(set_to_none=True)
        meter.record("gradients", meter.allocated(), before)
    return loss.item()


def run_steps(meter: Meter, optimizer: Any, steps: int, make_batch: Callable[[], tuple[Any, Any]],
              loss_of: Callable[[Any, Any], Any], *, amp: bool) -> None:
    """``steps`` measured steps; a progress line after the first, every tenth and the last."""
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        last = step == steps
        value = measured_step(meter, optimizer, make_batch, loss_of, amp=amp, first=step == 1, last=last)
        if step == 1 or last or step % 10 == 0:
            print(f"step {step:4d}  loss {value:.4f}  {time.perf_counter() - t0:.1f}s", flush=True)


def compare(example: str, meter: Meter, step: Any, extra: dict[str, Any]) -> dict[str, Any]:
    """The comparison object (written with --check-out and printed)."""
    result: dict[str, Any] = {"example": example, "device": str(meter.device), **extra,
                              "allocator": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "components": {}}
    if step is None:
        result.update(ok=False, note="the agent reported no step (not attached?)")
        return result
    result["step"] = step.step
    result["batch_size"] = step.batch_size
    ok: bool | None = True
    for name in (*EXACT, "activations"):
        agent = int(step.components[name])
        measured = meter.measured[name]
        row: dict[str, Any] = {"agent": agent, "measured": measured}
        if measured is None:
            row.update(rule="needs CUDA", ok=None)
            ok = None
        else:
            diff = agent - measured
            row["diff"] = diff
            if name == "activations":
                rel = abs(diff) / measured if measured else (0.0 if diff == 0 else 1.0)
                row.update(rel_diff=round(rel, 6), rule=f"within {ACTIVATION_TOLERANCE:.0%}",
                           ok=rel <= ACTIVATION_TOLERANCE)
            else:
                row.update(rule="exact", ok=diff == 0)
            if ok is not None:
                ok = ok and bool(row["ok"])
        result["components"][name] = row
    result["ok"] = ok
    if not meter.cuda:
        result["note"] = "CPU run: torch.cuda.memory_allocated() is not available, nothing to compare against"
    result["agent_step"] = step.to_dict()
    return result


def report(result: dict[str, Any], out: str | None) -> int:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        path = Path(out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    verdict = {True: "OK", False: "FAILED", None: "not comparable here"}[result.get("ok")]
    print(f"check: {verdict}", file=sys.stderr)
    return 1 if result.get("ok") is False else 0
