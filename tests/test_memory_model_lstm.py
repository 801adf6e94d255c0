"""Issue 13's LSTM miss, reproduced with real torch on CPU: the peak moves from forward to backward as the
batch grows, so a line through the step's peaks at two close small batch sizes is too flat. With each phase's
own peak (what the agent reads on sampled CUDA steps) every phase is fitted as its own line and the crossing is
predicted; with the step's peak alone (an older agent) the band's high side must cover it.

The agent reports the components; the allocator peak (CPU has none) comes from tests/live_bytes.py. The
training loop is the usual one: ``output = model(x)`` keeps the previous step's logits alive until the new
forward returns, and ``zero_grad()`` runs after the forward, so the previous gradients are alive in it too.
"""

from __future__ import annotations

import dataclasses

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from batchmon.agent import handle as agent  # noqa: E402
from batchmon.agent.peak_phase import PhaseTracker  # noqa: E402
from batchmon.memory_model import WhatIf, fit  # noqa: E402
from live_bytes import LiveBytes  # noqa: E402

VOCAB, HIDDEN, SEQ = 6000, 128, 35


class LSTMLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.rnn = nn.LSTM(HIDDEN, HIDDEN, 2, batch_first=True)
        self.out = nn.Linear(HIDDEN, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y, _ = self.rnn(self.emb(x))
        return self.out(y)


@pytest.fixture(scope="module")
def lstm_run(tmp_path_factory):
    torch.manual_seed(0)
    model = LSTMLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    live = LiveBytes()
    live.add_existing(model.parameters())
    peaks: list[int] = []
    own: list[dict[str, int]] = []
    kept = {}

    def read_and_reset() -> int:
        peak = live.peak
        live.reset_peak()
        return peak

    # the agent's phase boundaries (backward's start and end, the step's end), read as it reads CUDA's peak
    tracker = PhaseTracker(read_and_reset)

    def step(b: int) -> None:
        x = torch.randint(0, VOCAB, (b, SEQ))
        y = torch.randint(0, VOCAB, (b, SEQ))
        with live:
            live.reset_peak()
            tracker.start()
            kept["output"] = model(x)
            loss = crit(kept["output"].reshape(-1, VOCAB), y.reshape(-1))
            opt.zero_grad()
            tracker.mark("forward")
            loss.backward()
            tracker.mark("backward")
            opt.step()
        reading = tracker.finish(read_and_reset())
        assert reading.own is not None and reading.peak is not None
        peaks.append(reading.peak)
        own.append(reading.own)

    handle = agent.attach(model, opt, activation_every=1, socket_dir=str(tmp_path_factory.mktemp("sock")))
    try:
        for b in (20, 20, 20, 10):  # three steps at a small batch and a short last batch, as in issue 13
            step(b)
        # what the agent reports on CUDA: the step's peak and each phase's own peak
        observed = [dataclasses.replace(s, peak_allocated=p, reserved=p, allocated=p, device_used=p,
                                        phase_own_peaks=o)
                    for s, p, o in zip(handle.steps, peaks, own, strict=True)]
    finally:
        handle.detach()
    real, real_own = {}, {}
    for b in (40, 80, 160):
        step(b)
        real[b], real_own[b] = peaks[-1], own[-1]
    return observed, real, real_own


def _step_peaks_only(observed):
    """The same steps without own peaks: what an older agent sent (one running peak per step)."""
    return [dataclasses.replace(s, phase_own_peaks=None) for s in observed]


def test_the_phase_crossing_is_real(lstm_run):
    """The root cause, measured: at the short last batch (10) the forward's own peak is the step's (it holds the
    previous step's batch-20 logits until the new forward returns) and the backward's lies below it; at 20 and
    beyond the backward's, which grows faster per sample, is the step's peak. The line through the step's peaks
    at 10 and 20 mixes the two phases: too flat."""
    observed, real, real_own = lstm_run
    short = observed[-1]
    assert short.batch_size == 10
    assert short.phase_own_peaks["forward"] == short.peak_allocated > short.phase_own_peaks["backward"]
    for s in observed[:3]:
        assert s.phase_own_peaks["backward"] == s.peak_allocated > s.phase_own_peaks["forward"], s.phase_own_peaks
    for b in real:
        assert real_own[b]["backward"] == real[b] > real_own[b]["forward"]


def test_the_per_phase_fit_predicts_the_crossing(lstm_run):
    """Issue 13 point 1's fix: each phase's own peak fitted as its own line, the step's peak the largest: the
    real peaks at 2x, 4x and 8x the largest observed batch within 1%, the backward named as deciding, and the
    largest batch at or below the real one and within 5% of it, without the band."""
    observed, real, _ = lstm_run
    model = fit(observed, optimizer="SGD")
    assert set(model.phase_lines) == {"forward", "backward", "optimizer"}
    assert not model.suspect and "peak fitted per phase" in model.basis
    for b, peak in real.items():
        p = model.predict(WhatIf(batch_size=b))
        assert abs(p.peak_allocated - peak) <= 0.01 * peak, (b, p.peak_allocated, peak)
    assert model.deciding_phase(10) == "forward" and model.deciding_phase(160) == "backward"
    device = real[160] + model.cache + model.context  # the real largest batch is 160
    p = model.predict(device_total=device)
    assert 0.95 * 160 <= p.max_batch <= 160 and p.max_batch == p.max_batch_central
    assert p.basis_fields.deciding_phase == "backward" and f"peak in backward at batch {p.max_batch}" in p.basis


def test_the_central_fit_misses_and_the_band_covers_the_real_peak(lstm_run):
    observed, real, _ = lstm_run
    observed = _step_peaks_only(observed)
    assert [s.batch_size for s in observed] == [20, 20, 20, 10]
    model = fit(observed, optimizer="SGD")
    central_160 = model.predict(WhatIf(batch_size=160)).peak_allocated
    # the root cause: the line through batch 10 and 20 is too flat (the forward peaks there, with the last
    # step's logits still alive; at 160 the loss's backward does, with several logits-sized tensors)
    assert central_160 < 0.85 * real[160]
    assert model.unexplained_fixed > 0
    for b, peak in real.items():
        p = model.predict(WhatIf(batch_size=b))
        assert p.band.low == p.total and p.band.high >= peak + model.cache + model.context, b


def test_largest_batch_is_conservative_and_says_why(lstm_run):
    observed, real, _ = lstm_run
    model = fit(_step_peaks_only(observed), optimizer="SGD")
    device = real[160]  # exactly the real peak at 160: the real largest batch is 160
    p = model.predict(device_total=device)
    assert p.max_batch_central > 160  # what the old prediction would have sent a user into: an OOM
    assert p.max_batch <= 160
    assert p.max_batch >= 0.5 * 160  # conservative, not useless
    assert p.basis_fields.conservative and "two close batch sizes (10, 20)" in p.basis
    assert p.basis_fields.extrapolation == pytest.approx(p.max_batch / 20)
