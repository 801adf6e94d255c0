"""Every way a script compiles a function that calls the attached model works attached as unattached (torch.compile
with fullgraph=True and False; of the model, of a parent module, of a function, ``model.compile()``, and
``from torch import compile`` imported before attach): same losses, same number of graphs, and the agent still sees
the steps. Under fullgraph=True a graph break is an error, so the agent's module hooks trace to nothing there
(torch_patches.eager): the forward inside the compiled call is not seen (no batch size, no activations measured),
the steps are (count, time, parameters, gradients, optimizer state; on CUDA the allocator's peaks).

Compiled with backend="aot_eager" wrapped in a graph counter: dynamo and AOTAutograd, the parts that meet the
agent's hooks and its instance ``_call_impl`` (inductor's cold C++ build is too slow for this suite)."""

from __future__ import annotations

from typing import Any, Callable

import pytest

torch = pytest.importorskip("torch")
import torch.nn as nn  # noqa: E402

import batchmon  # noqa: E402
from batchmon.agent import handle as agent  # noqa: E402
from agent_helpers import agent_dir  # noqa: E402,F401 - fixture

D, STEPS = 16, 7
_compile = torch.compile  # what a script that did `from torch import compile` before attach holds


class Parent(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) * 2


class Counter:
    """A backend: aot_eager, counting the graphs dynamo hands it."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: Any, example_inputs: Any) -> Any:
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs += 1
        return aot_eager(gm, example_inputs)


def _build(pattern: str, model: nn.Module, crit: nn.Module, fullgraph: bool, backend: Counter,
           compile_fn: Callable[..., Any]) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The loss of one step, through the compiled callable the pattern makes."""
    kw = {"fullgraph": fullgraph, "backend": backend}
    if pattern == "model":
        compiled = compile_fn(model, **kw)
        return lambda x, y: crit(compiled(x), y)
    if pattern == "model.compile":
        model.compile(**kw)
        return lambda x, y: crit(model(x), y)
    if pattern == "parent":
        parent = compile_fn(Parent(model), **kw)
        return lambda x, y: crit(parent(x), y)
    if pattern == "function":
        fn = compile_fn(lambda x: model(x).relu(), **kw)
        return lambda x, y: crit(fn(x), y)
    if pattern == "train_step":  # forward and loss in one compiled function (backward cannot be in a full graph)
        return compile_fn(lambda x, y: crit(model(x), y), **kw)
    raise ValueError(pattern)


def _patched(*args: Any, **kwargs: Any) -> Any:
    return torch.compile(*args, **kwargs)  # looked up at the call: the agent's patch while attached


def _run(pattern: str, fullgraph: bool, attached: bool, compile_fn: Callable[..., Any] = _patched,
         eager_first: int = 0) -> tuple[list[float], int, list[Any], int]:
    """(losses, graphs compiled, the agent's steps, walks over the parameters after the first 3 compiled steps). ``eager_first``: eager steps before compiling (the root
    goes quiet: its instance ``_call_impl`` is what dynamo meets)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    handle = batchmon.attach(model, opt, activation_every=1000) if attached else None
    gen = torch.Generator().manual_seed(1)
    losses: list[float] = []

    def step(loss_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        x, y = torch.randn(8, D, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = loss_of(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    for _ in range(eager_first):
        step(lambda x, y: crit(model(x), y))
    if handle is not None and eager_first:
        assert handle.quiet and handle._hooks.calling  # the closure is on the root when dynamo first meets it
    backend = Counter()
    loss_of = _build(pattern, model, crit, fullgraph, backend, compile_fn)
    from batchmon.agent import accounting

    walk = accounting.parameter_storages
    walks: list[int] = []

    def counted(*a: Any, **k: Any) -> Any:
        walks.append(1)
        return walk(*a, **k)

    accounting.parameter_storages = counted  # type: ignore[assignment]
    try:
        for i in range(STEPS):
            if i == 3:
                walks.clear()  # (the first steps are measured in full)
            step(loss_of)
    finally:
        accounting.parameter_storages = walk  # type: ignore[assignment]
    steps = list(handle.steps) if handle is not None else []
    agent.detach()
    torch._dynamo.reset()
    return losses, backend.graphs, steps, len(walks)


def _same(a: list[float], b: list[float]) -> bool:
    return [float(x).hex() for x in a] == [float(x).hex() for x in b]


_EAGER: dict[tuple[str, int], list[float]] = {}


def _not_compiled(fn: Any, **kwargs: Any) -> Any:
    return fn


def _plain(pattern: str, eager_first: int = 0) -> list[float]:
    """The unattached script's losses, run eagerly: aot_eager runs the same aten ops, bit for bit (checked by
    test_unattached_compiled_losses_are_the_eager_ones), so each test compiles only its attached run."""
    pattern = "model" if pattern == "model.compile" else pattern
    if (pattern, eager_first) not in _EAGER:
        _EAGER[pattern, eager_first] = _run(pattern, False, False, _not_compiled, eager_first)[0]
    return _EAGER[pattern, eager_first]


@pytest.mark.slow  # one more compile (~1.5 CPU s): what the other tests' eager reference rests on
def test_unattached_compiled_losses_are_the_eager_ones():
    pattern = "parent"
    losses, graphs, _, _ = _run("parent", True, attached=False)
    assert graphs == 1
    assert _same(losses, _plain(pattern))


_SLOW = pytest.mark.slow  # (each ~1 CPU s: one compile; the held compile's function case stays in the quick run)


@pytest.mark.parametrize(("pattern", "held"), [
    ("model", False), ("parent", False), ("function", False), ("train_step", False), ("function", True),
    pytest.param("model", True, marks=_SLOW), pytest.param("parent", True, marks=_SLOW),
    pytest.param("train_step", True, marks=_SLOW)])
def test_fullgraph_compile_works_attached_as_unattached(agent_dir, pattern, held):
    """``held``: the script holds torch's own compile from before attach (``from torch import compile``)."""
    losses, graphs, steps, walks = _run(pattern, True, attached=True, compile_fn=_compile if held else _patched)
    assert _same(losses, _plain(pattern)), pattern
    assert graphs == 1, pattern  # one graph, nothing of the agent's in it
    assert [s.step for s in steps] == list(range(1, STEPS + 1))  # every step seen, ended by the optimizer
    for s in steps:
        assert s.components["parameters"] == s.components["gradients"] > 0
        assert s.step_seconds is None or s.step_seconds >= 0
    if pattern == "model" and not held:
        # the patch saw the attached root compiled: the agent measures the compiled module, outside the graph
        assert [s.batch_size for s in steps] == [8] * STEPS and steps[0].components["activations"] > 0
    else:
        # the forward ran inside the full graph, where the agent's hooks are empty: not seen, not made up
        assert all(s.batch_size is None and s.components["activations"] == 0 for s in steps)
    assert walks == 0  # steps are sampled as any (every 1000th here): no walk over the parameters each step


@pytest.mark.parametrize("pattern", ["parent", pytest.param("model.compile", marks=pytest.mark.slow)])
def test_compile_with_graph_breaks_allowed_still_measures_the_forward(agent_dir, pattern):
    """fullgraph=False: the agent's hooks run eagerly at a graph break (as before), the forward is measured.
    (``model.compile(fullgraph=True)`` fails without the agent on torch 2.13: "found no compiled frames".)"""
    losses, graphs, steps, walks = _run(pattern, False, attached=True)
    assert _same(losses, _plain(pattern))
    assert graphs >= 1
    assert [s.batch_size for s in steps] == [8] * STEPS
    assert steps[0].components["activations"] > 0


def test_compile_imported_before_attach_after_quiet_eager_steps(agent_dir):
    """A script holding torch's own compile (``from torch import compile`` before attach) compiles a function of a
    root already quiet (its instance ``_call_impl`` is on it): works, fullgraph or not, same losses; the closure
    goes when a step misses its forward (one more graph: the known cost of this case)."""
    for pattern, fullgraph in (("function", True), ("parent", False)):
        losses, graphs, steps, walks = _run(pattern, fullgraph, attached=True, eager_first=6, compile_fn=_compile)
        assert _same(losses, _plain(pattern, 6)), pattern
        assert graphs <= 2 if fullgraph else graphs >= 1
        assert [s.step for s in steps] == list(range(1, 6 + STEPS + 1)), pattern


def test_the_patched_compile_takes_the_closure_off_first(agent_dir):
    """The agent's own torch.compile patch (the usual case): a quiet root's closure leaves before dynamo meets it,
    so a full-graph compile of a parent costs no extra graph."""
    losses, graphs, steps, walks = _run("parent", True, attached=True, eager_first=6, compile_fn=_patched)
    assert _same(losses, _plain("parent", 6))
    assert graphs == 1
    assert [s.step for s in steps] == list(range(1, 6 + STEPS + 1))


def test_batchmon_run_discovery_with_a_full_graph_function(agent_dir):
    """Under ``batchmon run`` (auto-attach: global discovery hooks until the model's first forward) a full-graph
    compiled function calling the model used to fail (dynamo traced the discovery hook into registering hooks);
    now the discovery hooks trace to nothing there, training is as unattached and the steps are seen."""
    from batchmon.agent import global_hooks

    agent._auto_attach()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    crit = nn.CrossEntropyLoss()
    backend = Counter()
    fn = _compile(lambda x: model(x).relu(), fullgraph=True, backend=backend)
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        x, y = torch.randn(8, D, generator=gen), torch.randint(0, 4, (8,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = crit(fn(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    handle = agent.current()
    assert _same(losses, _plain("function")) and backend.graphs == 1
    assert handle is not None and [s.step for s in handle.steps] == list(range(1, STEPS + 1))
    agent.detach()
    torch._dynamo.reset()
    assert global_hooks.live() == 0
