"""Exact component bytes on CPU, against references worked out independently in each test.

The agent is attached to real models and real optimizers; every expected figure comes from shapes and
dtypes (or, for the GPT example, from walking the autograd graph), never from batchmon's own functions.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import batchmon
from agent_helpers import agent_dir  # noqa: F401 - fixture

F32 = 4
BF16 = 2
I64 = 8

B, D, H, L, O = 4, 8, 16, 3, 2


def mlp(d: int = D, h: int = H, layers: int = L, o: int = O) -> nn.Sequential:
    mods: list[nn.Module] = [nn.Linear(d, h), nn.ReLU()]
    for _ in range(layers - 1):
        mods += [nn.Linear(h, h), nn.ReLU()]
    mods.append(nn.Linear(h, o))
    return nn.Sequential(*mods)


def mlp_param_count(d: int = D, h: int = H, layers: int = L, o: int = O) -> int:
    return (d * h + h) + (layers - 1) * (h * h + h) + (h * o + o)


def train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int = 2, *, batch: int = B,
          amp: bool = False, criterion: nn.Module | None = None, every: int = 1):
    handle = batchmon.attach(model, optimizer, activation_every=every)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(batch, D, generator=gen)
        y = torch.randint(0, O, (batch,), generator=gen)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = criterion(out, y) if criterion is not None else out.float().sum()
        loss.backward()
        optimizer.step()
    return handle


def test_relu_mlp_activations_are_the_seed_formula(agent_dir):
    # Linear saves its input (layer 1: the batch, excluded; later layers: the previous ReLU output, already
    # saved) and its weight (a parameter, excluded); each ReLU saves its output; sum() saves nothing.
    model = mlp()
    handle = train(model, torch.optim.SGD(model.parameters(), lr=0.1))
    comps = handle.last_step.components
    assert comps["activations"] == B * L * H * F32
    assert comps["parameters"] == mlp_param_count() * F32
    assert comps["gradients"] == mlp_param_count() * F32
    assert comps["optimizer"] == 0  # plain SGD keeps no state
    assert comps["batch"] == B * D * F32  # the input; sum() has no targets
    assert comps["other"] == 0  # CPU: no allocator peak to take it from


@pytest.mark.parametrize("batch, hidden, layers", [(2, 8, 1), (16, 32, 4), (7, 24, 2)])
def test_activation_formula_scales_with_batch_width_depth(agent_dir, batch, hidden, layers):
    model = mlp(h=hidden, layers=layers)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=1)
    opt.zero_grad()
    model(torch.randn(batch, D)).sum().backward()
    opt.step()
    assert handle.last_step.components["activations"] == batch * layers * hidden * F32
    assert handle.last_step.batch_size == batch


def test_criterion_module_adds_targets_to_batch_and_its_saved_tensors(agent_dir):
    # CrossEntropyLoss = log_softmax (saves its B x O output) + nll_loss (saves the target - batch - and a
    # float32 total_weight scalar).
    model = mlp()
    handle = train(model, torch.optim.SGD(model.parameters(), lr=0.1), criterion=nn.CrossEntropyLoss())
    comps = handle.last_step.components
    assert comps["batch"] == B * D * F32 + B * I64
    assert comps["activations"] == B * L * H * F32 + B * O * F32 + F32


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd-momentum"])
def test_optimizer_states_after_a_step(agent_dir, name):
    model = mlp()
    n = mlp_param_count()
    tensors = len(list(model.parameters()))
    if name == "adam":
        opt = torch.optim.Adam(model.parameters())
        expected = 2 * n * F32 + tensors * F32  # exp_avg, exp_avg_sq; a float32 `step` scalar per parameter
    elif name == "adamw":
        opt = torch.optim.AdamW(model.parameters())
        expected = 2 * n * F32 + tensors * F32
    else:
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        expected = n * F32  # momentum_buffer
    handle = train(model, opt, steps=1)
    assert handle.last_step.components["optimizer"] == expected
    train(model, opt, steps=2)  # states do not grow
    assert handle.last_step.components["optimizer"] == expected


class TiedLM(nn.Module):
    """Embedding and output head share one weight; BatchNorm adds buffers."""

    def __init__(self, vocab: int = 50, width: int = 12) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.norm = nn.BatchNorm1d(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.emb(idx)))


def test_tied_weights_counted_once_buffers_included(agent_dir):
    vocab, width = 50, 12
    model = TiedLM(vocab, width)
    opt = torch.optim.Adam(model.parameters())
    handle = batchmon.attach(model, opt, activation_every=1)
    idx = torch.randint(0, vocab, (6,))
    opt.zero_grad()
    model(idx).sum().backward()
    opt.step()
    comps = handle.last_step.components
    params = vocab * width + 2 * width  # tied weight once; BatchNorm weight and bias
    buffers = 2 * width * F32 + I64  # running_mean, running_var, num_batches_tracked
    assert comps["parameters"] == params * F32 + buffers
    assert comps["gradients"] == params * F32
    assert comps["optimizer"] == 2 * params * F32 + 3 * F32  # three parameter tensors, one `step` each
    assert comps["batch"] == 6 * I64
    assert handle.steps[-1].batch_size == 6


def test_autocast_bf16_counts_low_precision_copies_as_activations(agent_dir):
    # Under CPU bf16 autocast each Linear runs on bf16 copies: layer 1 saves the bf16 copy of the input (not
    # the batch storage: an activation); layers 2..L+1 save their bf16 input (the previous ReLU output) and
    # a bf16 copy of their weight; ReLUs save bf16 outputs.
    model = mlp()
    handle = train(model, torch.optim.SGD(model.parameters(), lr=0.1), amp=True)
    expected = B * D * BF16 + L * B * H * BF16 + (L - 1) * H * H * BF16 + O * H * BF16
    assert handle.last_step.components["activations"] == expected
    assert handle.last_step.components["parameters"] == mlp_param_count() * F32  # master weights stay fp32


class Checkpointed(nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode
        self.inp = nn.Linear(D, H)
        self.block = nn.Sequential(nn.ReLU(), nn.Linear(H, H), nn.ReLU(), nn.Linear(H, H), nn.ReLU())
        self.out = nn.Linear(H, O)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if self.mode == "none":
            h = self.block(h)
        else:
            h = checkpoint(self.block, h, use_reentrant=self.mode == "reentrant")
        return self.out(h)


@pytest.mark.parametrize("mode, saved", [
    ("none", 3),  # the three ReLU outputs inside the block
    ("non-reentrant", 2),  # the checkpoint's input, and its output (saved by the last Linear)
    ("reentrant", 2),
])
def test_activation_checkpointing(agent_dir, mode, saved):
    model = Checkpointed(mode)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=1)
    for _ in range(2):  # recomputation in backward must not leak into the next step's count
        opt.zero_grad()
        model(torch.randn(B, D)).sum().backward()
        opt.step()
    assert [s.components["activations"] for s in handle.steps] == [saved * B * H * F32] * 2


def _graph_saved_tensors(root: torch.Tensor) -> list[torch.Tensor]:
    """Every tensor the autograd graph behind root saved, read through the nodes' _saved_* attributes."""
    seen, out, stack = set(), [], [root.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        for name in dir(node):
            if name.startswith("_saved_"):
                value = getattr(node, name)
                values = value if isinstance(value, (list, tuple)) else [value]
                out.extend(v for v in values if isinstance(v, torch.Tensor))
        stack.extend(fn for fn, _ in node.next_functions)
    return out


def test_gpt_example_activations_match_the_autograd_graph(agent_dir):
    import importlib.util
    import sys

    from agent_helpers import EXAMPLES

    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("train_gpt_for_test", EXAMPLES / "train_gpt.py")
    gpt = importlib.util.module_from_spec(spec)
    sys.modules["train_gpt_for_test"] = gpt
    spec.loader.exec_module(gpt)

    cfg = gpt.TINY
    model = gpt.GPT(cfg)
    opt = gpt.make_optimizer(model)
    handle = batchmon.attach(model, opt, activation_every=1)
    x, y = gpt.make_batch(cfg, 3, 32, torch.device("cpu"))
    opt.zero_grad()
    loss = model(x, y)
    excluded = {p.untyped_storage().data_ptr() for p in model.parameters()}
    excluded |= {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
    storages = {}
    for t in _graph_saved_tensors(loss):
        s = t.untyped_storage()
        if s.data_ptr() not in excluded and s.nbytes():
            storages[s.data_ptr()] = s.nbytes()
    loss.backward()
    opt.step()
    comps = handle.last_step.components
    assert comps["activations"] == sum(storages.values())
    assert comps["batch"] == 2 * 3 * 32 * I64
    n = sum(p.numel() for p in model.parameters())  # nn.Module lists the tied weight once
    assert comps["parameters"] == n * F32
    assert comps["optimizer"] == 2 * n * F32 + len(list(model.parameters())) * F32


def test_the_scripts_own_saved_tensor_hooks_still_pack_every_tensor_on_sampled_steps(agent_dir):
    """A pair of saved-tensor hooks the script puts around its forward (an offloading hook, ``save_on_cpu``) is
    displaced by the agent's counter for a sampled step unless the counter hands each tensor on: every tensor is
    still packed and unpacked by the script's pair, and the training is the same as without the agent."""

    def run(attach: bool) -> tuple[int, int, list[float]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = batchmon.attach(model, opt, activation_every=1) if attach else None
        packed, unpacked, losses = [0], [0], []

        def pack(t: torch.Tensor) -> tuple[str, torch.Tensor]:
            packed[0] += 1
            return ("boxed", t.clone())

        def unpack(box: tuple[str, torch.Tensor]) -> torch.Tensor:
            unpacked[0] += 1
            assert box[0] == "boxed"
            return box[1]

        try:
            for _ in range(4):  # every step sampled: the counter's hooks are in force for each forward
                opt.zero_grad()
                with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
                    loss = model(torch.randn(B, D)).pow(2).mean()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            if handle is not None:
                assert [s.components["activations"] for s in handle.steps][-1] > 0  # and it still counted
        finally:
            if handle is not None:
                handle.detach()
        return packed[0], unpacked[0], losses

    plain, attached = run(False), run(True)
    assert plain[0] > 0 and attached == plain


def test_save_on_cpu_trains_the_same_under_the_agent(agent_dir):
    def run(attach: bool) -> list[float]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        handle = batchmon.attach(model, opt, activation_every=1) if attach else None
        losses = []
        try:
            for _ in range(3):
                opt.zero_grad()
                with torch.autograd.graph.save_on_cpu():
                    loss = model(torch.randn(B, D)).pow(2).mean()
                loss.backward()
                opt.step()
                losses.append(loss.item())
        finally:
            if handle is not None:
                handle.detach()
        return losses

    assert run(True) == run(False)
