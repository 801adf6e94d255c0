"""The memory model fed with real CPU torch measurements: a small MLP trained at two batch sizes."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from batchmon.memory_model import WhatIf, fit  # noqa: E402
from batchmon.protocol import Step  # noqa: E402


def _bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def _train_step(model, opt, batch: int, n: int) -> Step:
    """One real training step; components measured here, independently of batchmon's agent."""
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(batch, 32, generator=gen)
    y = torch.randint(0, 10, (batch,), generator=gen)
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    excluded |= {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    saved: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in excluded and s.nbytes() > 0:
            saved[s.data_ptr()] = s.nbytes()
        return t

    opt.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = _bytes(p.grad for p in model.parameters() if p.grad is not None)
    opt.step()
    state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    comps = {"parameters": _bytes(model.parameters()), "gradients": grads, "optimizer": _bytes(state),
             "activations": sum(saved.values()), "batch": _bytes([x, y]), "other": 0}
    return Step(step=n, time=float(n), step_seconds=None, batch_size=batch, components=comps)


def test_real_mlp_activations_predicted_exactly_at_a_third_batch_size():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = [_train_step(model, opt, 8, 1), _train_step(model, opt, 8, 2), _train_step(model, opt, 24, 3)]
    assert steps[0].components["optimizer"] > 0  # Adam state exists after its first step
    truth = _train_step(model, opt, 40, 4)
    assert truth.components["activations"] > steps[2].components["activations"]

    predicted = fit(steps, optimizer=type(opt).__name__).predict(WhatIf(batch_size=40))
    for name in ("parameters", "gradients", "optimizer", "activations", "batch"):
        assert predicted.components[name] == truth.components[name], name

    # the seed's activation formula for this net: B * (hidden layers) * H * 4 for the ReLU outputs, plus
    # what the loss saves: the log-softmax (B x 10) floats; check the fitted per-sample slope against it
    model_fit = fit(steps)
    per_sample = model_fit.lines["activations"].per_sample
    assert per_sample == pytest.approx(2 * 64 * 4 + 10 * 4)
