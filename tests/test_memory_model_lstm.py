"""Issue 13's LSTM miss, reproduced with real torch on CPU: the peak moves from forward to backward as the
batch grows, so two close small batch sizes give too flat a line; the band's high side must cover it.

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
    kept = {}

    def step(b: int) -> None:
        x = torch.randint(0, VOCAB, (b, SEQ))
        y = torch.randint(0, VOCAB, (b, SEQ))
        with live:
            live.reset_peak()
            kept["output"] = model(x)
            loss = crit(kept["output"].reshape(-1, VOCAB), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
        peaks.append(live.peak)

    handle = agent.attach(model, opt, activation_every=1, socket_dir=str(tmp_path_factory.mktemp("sock")))
    try:
        for b in (20, 20, 20, 10):  # three steps at a small batch and a short last batch, as in issue 13
            step(b)
        observed = [dataclasses.replace(s, peak_allocated=p, reserved=p, allocated=p, device_used=p)
                    for s, p in zip(handle.steps, peaks)]
    finally:
        handle.detach()
    real = {}
    for b in (40, 80, 160):
        step(b)
        real[b] = peaks[-1]
    return observed, real


def test_the_central_fit_misses_and_the_band_covers_the_real_peak(lstm_run):
    observed, real = lstm_run
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
    observed, real = lstm_run
    model = fit(observed, optimizer="SGD")
    device = real[160]  # exactly the real peak at 160: the real largest batch is 160
    p = model.predict(device_total=device)
    assert p.max_batch_central > 160  # what the old prediction would have sent a user into: an OOM
    assert p.max_batch <= 160
    assert p.max_batch >= 0.5 * 160  # conservative, not useless
    assert p.basis_fields.conservative and "two close batch sizes (10, 20)" in p.basis
    assert p.basis_fields.extrapolation == pytest.approx(p.max_batch / 20)
