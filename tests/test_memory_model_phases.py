"""The per-phase fit (issue 13 point 1): each phase's own peak as its own line, the step's peak the largest.

Synthetic steps from a known truth with a phase crossing: the forward's own peak is the step's at the observed
batches, the backward's starts lower but grows faster and takes the peak from batch 30 on. No torch here (the
real-torch reproduction is tests/test_memory_model_lstm.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from batchmon.memory_model import WhatIf, fit
from batchmon.monitor.step_history import StepHistory, model_steps
from batchmon.protocol import Step, decode, encode

MIB = 1 << 20


@dataclass(frozen=True)
class Crossing:
    """Own peaks (MiB) of a loop that clears the gradients after its forward (as issue 13's LSTM script does):
    the forward holds the last step's gradients, 600 + 20 B; the backward starts without them and grows faster,
    300 + 30 B; the optimizer step 650 + B. The forward decides below batch 30, the backward from 30 on.
    Parameters 100, gradients 300, SGD-momentum state 200 MiB; activations 10, batch 1 MiB a sample.

    ``remnant``: MiB a sample of the step's output that stays alive until the next forward returns (``output =
    model(x)``): the forward then also holds the last step's output, and a short batch after a larger one holds
    the larger one's."""

    context: int = 300 * MIB
    remnant: int = 0

    def own(self, b: int, previous: int | None = None) -> dict[str, int]:
        kept = self.remnant * (b if previous is None else previous)
        return {"forward": (600 + 20 * b + kept) * MIB, "backward": (300 + 30 * b) * MIB,
                "optimizer": (650 + b) * MIB}

    def peak(self, b: int) -> int:
        return max(self.own(b).values())

    def step(self, n: int, b: int, *, own: bool = True, previous: int | None = None) -> Step:
        comps = {"parameters": 100 * MIB, "gradients": 300 * MIB, "optimizer": 200 * MIB,
                 "activations": 10 * b * MIB, "batch": b * MIB}
        phases = self.own(b, previous)
        peak = max(phases.values())
        comps["other"] = peak - sum(comps.values())
        return Step(step=n, time=1000.0 + n, step_seconds=0.1, batch_size=b, components=comps, allocated=peak // 2,
                    peak_allocated=peak, reserved=peak, num_alloc_retries=0, num_ooms=0,
                    device_used=peak + self.context, phase_own_peaks=phases if own else None)

    def observed(self, *, own: bool = True) -> list[Step]:
        """Three steps at 16 and a short last batch of 8 (after a step at 16), as the zoo observes."""
        return [self.step(1, 16, own=own), self.step(2, 16, own=own), self.step(3, 16, own=own),
                self.step(4, 8, own=own, previous=16)]

    def device_for(self, largest: int) -> int:
        """A device on which ``largest`` is exactly the largest batch that fits (peak + context)."""
        return self.peak(largest) + self.context


C = Crossing()


def test_the_per_phase_fit_predicts_the_crossing_exactly():
    model = fit(C.observed(), optimizer="SGD")
    assert model is not None and set(model.phase_lines) == {"forward", "backward", "optimizer"}
    for b in (8, 16, 50, 64, 300, 4000):
        p = model.predict(WhatIf(batch_size=b))
        assert p.peak_allocated == C.peak(b), b
        assert sum(p.components[n] for n in ("parameters", "gradients", "optimizer", "activations", "batch",
                                               "other")) == p.peak_allocated
    assert model.deciding_phase(16) == "forward" and model.deciding_phase(31) == "backward"
    assert not model.phase_bounds  # every fixed byte of each phase is parameters, gradients or state


def test_the_largest_batch_is_exact_and_never_above_the_real_one():
    model = fit(C.observed(), optimizer="SGD")
    for largest in (20, 29, 30, 120, 300, 1500):
        device = C.device_for(largest)
        p = model.predict(device_total=device)
        assert p.max_batch == largest == p.max_batch_central, largest
        assert model.max_batch(device - 1) == largest - 1  # one byte less: one fewer
    p = model.predict(device_total=C.device_for(300))
    assert not p.basis_fields.conservative and p.basis_fields.deciding_phase == "backward"
    assert "peak fitted per phase (forward, backward, optimizer: each phase's own peak at batch 8, 16)" in p.basis
    assert "peak in backward at batch 300" in p.basis


def test_without_own_peaks_the_line_through_the_step_peaks_is_low_and_the_band_keeps_it_safe():
    """The same run from an older agent (the step's peak only): the fitted line follows the forward, 30% low at
    batch 200; the fixed part no component explains makes the largest batch conservative, below the real one."""
    model = fit(C.observed(own=False), optimizer="SGD")
    assert not model.phase_lines and model.suspect
    central = model.predict(WhatIf(batch_size=200)).peak_allocated
    assert central < 0.75 * C.peak(200)
    p = model.predict(device_total=C.device_for(300))
    assert p.max_batch_central > 300  # the line alone would send a user into an out-of-memory error
    assert p.max_batch <= 300 and p.basis_fields.conservative
    assert p.basis_fields.deciding_phase is None and "peak fitted per phase" not in p.basis


def test_own_peaks_at_one_batch_size_fit_the_step_as_one_line():
    steps = [C.step(n, 16) for n in (1, 2, 3)] + [C.step(4, 8, own=False)]
    model = fit(steps, optimizer="SGD")
    assert not model.phase_lines and model.predict().basis_fields.deciding_phase is None


def test_what_ifs_shift_every_phase_by_what_they_change():
    """A what-if changes the components, not the phases' lift over the step's line: 2 accumulation steps at an
    effective batch of 600 are the micro-batch 300's peak; plain SGD (no state) drops the 200 MiB of state."""
    model = fit(C.observed(), optimizer="SGD")
    acc = model.predict(WhatIf(batch_size=600, accumulation_steps=2))
    assert acc.peak_allocated == C.peak(300) and acc.micro_batch == 300
    assert model.max_batch(C.device_for(300), WhatIf(accumulation_steps=2)) == 600
    model = fit(C.observed(), optimizer="SGD")
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
    kept = StepHistory(2000)  # the hub's history: compacted steps, its summary kept up to date on every append
    for step in history:
        kept.append(step)
    assert kept.window().model_steps() == summary
    model = fit(summary, optimizer="SGD")
    assert model is not None and set(model.phase_lines) == {"forward", "backward", "optimizer"}
    assert model.predict(WhatIf(batch_size=300)).peak_allocated == C.peak(300)
    # a first step at a batch size peaks lower (lazy state, warm-up): the largest own peak per batch size is kept
    low = replace(C.step(500, 16), phase_own_peaks={k: v // 2 for k, v in C.own(16).items()})
    assert fit([*summary, low], optimizer="SGD").predict(WhatIf(batch_size=300)).peak_allocated == C.peak(300)


def test_a_short_batch_holding_a_larger_steps_output_opens_the_band_and_stays_safe():
    """``output = model(x)`` keeps the last output until the new forward returns: the short batch's forward holds
    the batch-16 output, its line comes out flat (20 MiB a sample where the forward grows 25) with 80 MiB of
    fixed bytes no component explains. The forward's line through that floor and its own peak at 16 is the
    truth here; the central fit (the backward's line) would promise one batch more than fits."""
    remnant = Crossing(remnant=5)  # the forward, steady: 600 + 25 B; the backward 300 + 30 B: it decides from 60
    model = fit(remnant.observed(), optimizer="SGD")
    assert model is not None and set(model.phase_bounds) == {"forward"}
    device = remnant.device_for(50)  # the forward decides at 50
    p = model.predict(device_total=device)
    assert p.max_batch_central == 51  # the backward's line: an out-of-memory error at 51
    assert p.max_batch == 50 and p.basis_fields.conservative
    assert "the forward's own peak holds 80 MiB that are not parameters, gradients or optimizer state" in p.basis
    assert fit(Crossing(remnant=5).observed()[:3] + [remnant.step(4, 8, previous=8)], optimizer="SGD").phase_bounds == {}


@dataclass(frozen=True)
class AutocastCrossing(Crossing):
    """The same run under autocast: the forward also holds the 16-bit weight copies (half the trainable bytes,
    150 MiB) from its first matmul on."""

    def own(self, b: int, previous: int | None = None) -> dict[str, int]:
        out = super().own(b, previous)
        return {**out, "forward": out["forward"] + 150 * MIB}


def test_autocasts_weight_copies_are_explained_fixed_bytes_when_the_run_says_amp():
    run = AutocastCrossing()
    assert not fit(run.observed(), optimizer="SGD", amp=True).phase_bounds
    unknown = fit(run.observed(), optimizer="SGD")  # a monitor that does not know: the safe side
    assert set(unknown.phase_bounds) == {"forward"} and unknown.phase_bounds["forward"][0] == 150 * MIB
