"""The per-phase fit (issue 13 point 1): each phase's own peak as its own line, the step's peak the largest.

Synthetic steps from a known truth with a phase crossing: the forward's own peak is the step's at the observed
batches, the backward's starts lower but grows faster and takes the peak beyond batch 50. No torch here (the
real-torch reproduction is tests/test_memory_model_lstm.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from batchmon.memory_model import WhatIf, fit
from batchmon.monitor.step_history import model_steps
from batchmon.protocol import Step, decode, encode

MIB = 1 << 20


@dataclass(frozen=True)
class Crossing:
    """Own peaks: forward 1000 + 20 B, backward 500 + 30 B, optimizer 700 + 11 B (MiB): the backward decides
    from batch 50 on. Parameters 100, gradients 100, Adam state 200 MiB; activations 10, batch 1 MiB a sample."""

    context: int = 300 * MIB

    def own(self, b: int) -> dict[str, int]:
        return {"forward": (1000 + 20 * b) * MIB, "backward": (500 + 30 * b) * MIB, "optimizer": (700 + 11 * b) * MIB}

    def peak(self, b: int) -> int:
        return max(self.own(b).values())

    def step(self, n: int, b: int, *, own: bool = True) -> Step:
        comps = {"parameters": 100 * MIB, "gradients": 100 * MIB, "optimizer": 200 * MIB,
                 "activations": 10 * b * MIB, "batch": b * MIB}
        peak = self.peak(b)
        comps["other"] = peak - sum(comps.values())
        return Step(step=n, time=1000.0 + n, step_seconds=0.1, batch_size=b, components=comps, allocated=peak // 2,
                    peak_allocated=peak, reserved=peak, num_alloc_retries=0, num_ooms=0,
                    device_used=peak + self.context, phase_own_peaks=self.own(b) if own else None)

    def observed(self, *, own: bool = True) -> list[Step]:
        """Three steps at 16 and a short last batch of 8, as the zoo observes."""
        return [self.step(n, b, own=own) for n, b in ((1, 16), (2, 16), (3, 16), (4, 8))]

    def device_for(self, largest: int) -> int:
        """A device on which ``largest`` is exactly the largest batch that fits (peak + context)."""
        return self.peak(largest) + self.context


C = Crossing()


def test_the_per_phase_fit_predicts_the_crossing_exactly():
    model = fit(C.observed(), optimizer="AdamW")
    assert model is not None and set(model.phase_lines) == {"forward", "backward", "optimizer"}
    for b in (8, 16, 50, 64, 300, 4000):
        p = model.predict(WhatIf(batch_size=b))
        assert p.peak_allocated == C.peak(b), b
        assert sum(p.components[n] for n in ("parameters", "gradients", "optimizer", "activations", "batch",
                                               "other")) == p.peak_allocated
    assert model.deciding_phase(16) == "forward" and model.deciding_phase(51) == "backward"


def test_the_largest_batch_is_exact_and_never_above_the_real_one():
    model = fit(C.observed(), optimizer="AdamW")
    for largest in (40, 50, 120, 300, 1500):
        device = C.device_for(largest)
        p = model.predict(device_total=device)
        assert p.max_batch == largest == p.max_batch_central, largest
        assert model.max_batch(device - 1) == largest - 1  # one byte less: one fewer
    p = model.predict(device_total=C.device_for(300))
    assert not p.basis_fields.conservative and p.basis_fields.deciding_phase == "backward"
    assert "peak fitted per phase (forward, backward, optimizer: each phase's own peak at batch 8, 16)" in p.basis
    assert "peak in backward at batch 300" in p.basis


def test_without_own_peaks_the_line_through_the_step_peaks_is_low_and_the_band_keeps_it_safe():
    """The same run from an older agent (the step's peak only): the fitted line follows the forward, 23% low at
    batch 200; the fixed part no component explains makes the largest batch conservative, below the real one."""
    model = fit(C.observed(own=False), optimizer="AdamW")
    assert not model.phase_lines and model.suspect
    central = model.predict(WhatIf(batch_size=200)).peak_allocated
    assert central < 0.8 * C.peak(200)
    p = model.predict(device_total=C.device_for(300))
    assert p.max_batch_central > 300  # the line alone would send a user into an out-of-memory error
    assert p.max_batch <= 300 and p.basis_fields.conservative
    assert p.basis_fields.deciding_phase is None and "peak fitted per phase" not in p.basis


def test_own_peaks_at_one_batch_size_fit_the_step_as_one_line():
    steps = [C.step(n, 16) for n in (1, 2, 3)] + [C.step(4, 8, own=False)]
    model = fit(steps, optimizer="AdamW")
    assert not model.phase_lines and model.predict().basis_fields.deciding_phase is None


def test_what_ifs_shift_every_phase_by_what_they_change():
    """A what-if changes the components, not the phases' lift over the step's line: 2 accumulation steps at an
    effective batch of 600 are the micro-batch 300's peak; an optimizer without state drops 200 MiB."""
    model = fit(C.observed(), optimizer="AdamW")
    acc = model.predict(WhatIf(batch_size=600, accumulation_steps=2))
    assert acc.peak_allocated == C.peak(300) and acc.micro_batch == 300
    assert model.max_batch(C.device_for(300), WhatIf(accumulation_steps=2)) == 600
    sgd = model.predict(WhatIf(batch_size=300, optimizer="sgd"))
    assert sgd.peak_allocated == C.peak(300) - 200 * MIB


def test_own_peaks_reach_the_fit_through_the_wire_and_the_hubs_summary():
    """The agent's own peaks survive encoding and the monitor's bounded summary of a long history (which keeps
    the first step, the highest peak per batch size and the recent steps): the hub fits per phase."""
    history = []
    for n in range(1, 400):
        b = 8 if n % 100 == 0 else 16  # an epoch's short last batch every 100 steps
        sampled = n % 3 == 0 or b == 8  # the agent follows phases on sampled steps only
        history.append(decode(encode(C.step(n, b, own=sampled))))
    summary = model_steps(tuple(history))
    assert len(summary) < len(history) and any(s.phase_own_peaks for s in summary if s.batch_size == 8)
    model = fit(summary, optimizer="AdamW")
    assert model is not None and set(model.phase_lines) == {"forward", "backward", "optimizer"}
    assert model.predict(WhatIf(batch_size=300)).peak_allocated == C.peak(300)
    # a first step at a batch size peaks lower (lazy state, warm-up): the largest own peak per batch size is kept
    low = replace(C.step(500, 16), phase_own_peaks={k: v // 2 for k, v in C.own(16).items()})
    assert fit([*summary, low], optimizer="AdamW").predict(WhatIf(batch_size=300)).peak_allocated == C.peak(300)
