"""What-ifs applied to the fitted component lines, each with the assumptions it rests on."""

from __future__ import annotations

from batchmon.formulas import OPTIMIZER_STATES, optimizer_kind
from batchmon.memory_model.observations import FIXED, Line
from batchmon.memory_model.prediction import WhatIf

DEFAULT_CHECKPOINT_LAYERS = 12


def apply_what_if(observed: dict[str, Line], what_if: WhatIf, *, trainable_bytes: float, state_bytes: float,
                  observed_amp: bool) -> tuple[dict[str, Line], list[str]]:
    lines = dict(observed)
    notes: list[str] = []
    if what_if.optimizer is not None:
        kind = optimizer_kind(what_if.optimizer)
        if kind is None:
            raise ValueError(f"unknown optimizer {what_if.optimizer!r} (expected one of {', '.join(OPTIMIZER_STATES)})")
        lines["optimizer"] = Line(OPTIMIZER_STATES[kind] * state_bytes, 0.0)
        notes.append(f"optimizer {kind}")
    if what_if.amp and not observed_amp:
        other = lines["other"]
        lines["activations"] = lines["activations"].scaled(0.5, 0.5)
        lines["other"] = Line(other.fixed + 0.5 * trainable_bytes, 0.5 * other.per_sample)
        notes.append("amp: 16-bit activations, +16-bit weight copies")
    if what_if.checkpointing:
        n = what_if.checkpoint_layers or DEFAULT_CHECKPOINT_LAYERS
        factor = min(1.0, 2.0 / n)
        lines["activations"] = lines["activations"].scaled(factor, factor)
        assumed = "" if what_if.checkpoint_layers else " assumed"
        notes.append(f"checkpointing: {n} blocks{assumed}, activations x{factor:.2f}")
    if what_if.shards > 1:
        n = what_if.shards
        for name in FIXED:
            lines[name] = lines[name].scaled(1.0 / n, 1.0 / n)
        notes.append(f"sharded over {n} GPUs")
    if what_if.accumulation_steps > 1:
        notes.append(f"{what_if.accumulation_steps} accumulation steps")
    return lines, notes
