"""Issue 12 point 2: steps come from the training loop, not only from torch.optim (CPU, real torch).

Each loop runs twice from the same seed, unattached and attached: the losses must be bit-identical, and the
agent must report one step per loop iteration with the right batch size.
"""

from __future__ import annotations

import struct
from typing import Callable

import pytest
import torch
import torch.nn as nn

import batchmon
from batchmon.agent import handle as agent
from agent_helpers import agent_dir  # noqa: F401 - fixture

D, H, O = 8, 16, 3


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, O))


def twice(loop: Callable[[bool], list[float]]) -> tuple[list[float], "agent.AgentHandle"]:
    """Run ``loop`` unattached, then attached (the loop attaches when given True); the losses must match."""
    plain = loop(False)
    handle_losses = loop(True)
    handle = agent.current()
    assert handle is not None
    bits = lambda xs: [struct.pack("<d", x) for x in xs]  # noqa: E731 - bit-identical, NaN included
    assert bits(handle_losses) == bits(plain), "the agent changed the training"
    return handle_losses, handle


def test_manual_sgd_updates_make_one_step_per_iteration(agent_dir):
    def loop(attached: bool) -> list[float]:
        torch.manual_seed(0)
        model = mlp()
        if attached:
            batchmon.attach(model)
        losses = []
        for i in range(6):
            model.zero_grad()
            loss = model(torch.randn(5, D)).square().mean()
            loss.backward()
            for p in model.parameters():
                p.data.add_(p.grad, alpha=-0.1)  # no torch.optim at all
            losses.append(loss.item())
        return losses

    _, handle = twice(loop)
    handle.detach()  # the last iteration's step ends at detach (nothing else marks it)
    steps = handle.steps
    assert [s.step for s in steps] == [1, 2, 3, 4, 5, 6]
    assert all(s.batch_size == 5 and s.micro_batches == 1 for s in steps)
    assert all(s.components["gradients"] == s.components["parameters"] > 0 for s in steps)


def test_gradient_accumulation_is_one_step_with_its_micro_batches(agent_dir):
    def loop(attached: bool) -> list[float]:
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        if attached:
            batchmon.attach(model, opt)
        losses = []
        for i in range(3):
            opt.zero_grad()
            for micro in range(4):
                loss = model(torch.randn(2, D)).sum() / 4
                loss.backward()
                losses.append(loss.item())
            opt.step()
        return losses

    _, handle = twice(loop)
    steps = handle.steps
    assert [s.step for s in steps] == [1, 2, 3]
    assert all(s.batch_size == 2 and s.micro_batches == 4 for s in steps)


def test_manual_updates_with_accumulation_continue_the_step(agent_dir):
    def loop(attached: bool) -> list[float]:
        torch.manual_seed(0)
        model = mlp()
        if attached:
            batchmon.attach(model)
        losses = []
        for i in range(3):
            model.zero_grad()
            for micro in range(2):
                loss = model(torch.randn(3, D)).sum()
                loss.backward()  # accumulates: the grads stay as the backward left them
                losses.append(loss.item())
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
        return losses

    _, handle = twice(loop)
    handle.detach()
    assert [(s.step, s.micro_batches) for s in handle.steps] == [(1, 2), (2, 2), (3, 2)]


def test_lbfgs_closure_is_one_step(agent_dir):
    def loop(attached: bool) -> list[float]:
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.LBFGS(model.parameters(), lr=0.5, max_iter=4)
        if attached:
            batchmon.attach(model, opt)
        x, y = torch.randn(6, D), torch.randn(6, O)
        losses = []
        for i in range(3):
            def closure() -> torch.Tensor:
                opt.zero_grad()
                loss = nn.functional.mse_loss(model(x), y)
                loss.backward()
                return loss

            losses.append(opt.step(closure).item())
        return losses

    _, handle = twice(loop)
    steps = handle.steps
    assert [s.step for s in steps] == [1, 2, 3]
    assert all(s.batch_size == 6 for s in steps)
    assert steps[0].micro_batches >= 2  # the closure ran several times inside one step


def test_gradscaler_skipped_step_still_ends(agent_dir):
    def loop(attached: bool) -> list[float]:
        torch.manual_seed(0)
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
        if attached:
            batchmon.attach(model, opt)
        losses = []
        for i in range(5):
            opt.zero_grad()
            x = torch.randn(4, D)
            if i == 2:
                x[0, 0] = float("inf")  # inf gradients: the scaler skips this optimizer step
            loss = model(x).sum()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            losses.append(loss.item())
        return losses

    losses, handle = twice(loop)
    steps = handle.steps
    assert [s.step for s in steps] == [1, 2, 3, 4, 5]
    assert all(s.batch_size == 4 for s in steps)


class PlainSGD:
    """An optimizer that is not a torch.optim.Optimizer (as some research code writes its own)."""

    def __init__(self, params, lr: float) -> None:
        self.params = list(params)
        self.lr = lr

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for p in self.params:
            p.add_(p.grad, alpha=-self.lr)


def test_optimizer_that_is_not_torch_optim(agent_dir):
    def loop(attached: bool) -> list[float]:
        torch.manual_seed(0)
        model = mlp()
        opt = PlainSGD(model.parameters(), 0.1)
        if attached:
            batchmon.attach(model)
        losses = []
        for i in range(4):
            opt.zero_grad()
            loss = model(torch.randn(7, D)).sum()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        return losses

    _, handle = twice(loop)
    handle.detach()
    assert [(s.step, s.batch_size) for s in handle.steps] == [(i, 7) for i in range(1, 5)]


def test_gan_two_models_two_optimizers_one_step_per_iteration(agent_dir):
    keep: list[object] = []

    def loop(attached: bool) -> list[float]:
        torch.manual_seed(0)
        gen = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, D))
        disc = nn.Sequential(nn.Linear(D, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
        opt_g = torch.optim.Adam(gen.parameters(), lr=1e-3)
        opt_d = torch.optim.Adam(disc.parameters(), lr=1e-3)
        crit = nn.BCEWithLogitsLoss()
        keep[:] = [gen, disc, opt_g, opt_d]
        if attached:
            batchmon.attach()  # as under batchmon run: model and optimizers found
        losses = []
        for i in range(5):
            real = torch.randn(8, D)
            disc.zero_grad()
            err_real = crit(disc(real), torch.ones(8, 1))
            err_real.backward()
            fake = gen(torch.randn(8, 4))
            err_fake = crit(disc(fake.detach()), torch.zeros(8, 1))
            err_fake.backward()
            opt_d.step()
            gen.zero_grad()
            err_g = crit(disc(fake), torch.ones(8, 1))
            err_g.backward()
            opt_g.step()
            losses += [err_real.item(), err_fake.item(), err_g.item()]
        return losses

    _, handle = twice(loop)
    steps = handle.steps
    assert [s.step for s in steps] == [1, 2, 3, 4, 5]
    assert all(s.batch_size == 8 for s in steps)
    gen, disc = keep[0], keep[1]
    assert len(handle.optimizers) == 2 and handle.model is disc  # the first module trained is the root
    gen_and_disc = sum(p.numel() for p in gen.parameters()) + sum(p.numel() for p in disc.parameters())
    assert steps[-1].components["parameters"] == gen_and_disc * 4
    assert steps[-1].components["optimizer"] > 0


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_evaluation_between_steps_makes_no_step(agent_dir, mode):
    guard = torch.no_grad if mode == "no_grad" else torch.inference_mode

    def loop(attached: bool) -> list[float]:
        torch.manual_seed(0)
        model = mlp()
        if attached:
            batchmon.attach(model)  # no optimizer named: the manual rule is the one at work
        losses = []
        for i in range(4):
            model.zero_grad()
            loss = model(torch.randn(5, D)).sum()
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.01 * p.grad
            with guard():
                losses.append(model(torch.randn(50, D)).sum().item())  # evaluation, another batch size
            losses.append(loss.item())
        return losses

    _, handle = twice(loop)
    handle.detach()
    assert [(s.step, s.batch_size) for s in handle.steps] == [(i, 5) for i in range(1, 5)]
