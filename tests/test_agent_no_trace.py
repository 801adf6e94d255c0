"""Issue 12 point 1: the agent leaves no trace on user objects (CPU, real torch).

With the agent attached, a model and its optimizer can be deep-copied, pickled, ``torch.save``d whole and
loaded; their state_dict keys are unchanged; user hooks run in the order they would without the agent;
``torch.compile`` before or after attach is measured like eager; ``.to()`` / ``.half()`` after attach keep the
counts right. Every loop runs unattached and attached from the same seed and must give bit-identical losses.
"""

from __future__ import annotations

import copy
import io
import os
import pickle
import struct
import subprocess
import sys
from typing import Callable

import pytest
import torch
import torch.nn as nn

import batchmon
from batchmon.agent import handle as agent
from batchmon.agent.torch_patches import AGENT_HOOKS
from agent_helpers import agent_dir  # noqa: F401 - fixture

D, H, O = 8, 32, 3


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(D, H), nn.GELU(), nn.Linear(H, O)
        self.register_buffer("seen", torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def bits(xs: list[float]) -> list[bytes]:
    return [struct.pack("<d", x) for x in xs]


def agent_hooks(module: nn.Module) -> list[object]:
    """The agent's hooks on ``module`` and its children, and a quiet step's instance _call_impl (quiet_steps)."""
    return [h for m in module.modules() for h in (*m._forward_pre_hooks.values(), *m._forward_hooks.values(),
                                                  m.__dict__.get("_call_impl"))
            if h in AGENT_HOOKS or getattr(h, "batchmon_quiet_call", False)]


def run(attached: bool, body: Callable[[nn.Module, torch.optim.Optimizer], list[float]], sgd: bool = False,
        **attach) -> list[float]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2) if sgd else torch.optim.Adam(model.parameters(), lr=1e-2)
    if attached:
        batchmon.attach(model, opt, **attach)
    return body(model, opt)


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, n: int = 3, batch: int = 5) -> list[float]:
    crit = nn.MSELoss()
    losses = []
    for _ in range(n):
        opt.zero_grad()
        loss = crit(model(torch.randn(batch, D)), torch.randn(batch, O))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_deepcopy_pickle_and_torch_save_of_model_and_optimizer(agent_dir):
    seen: dict[str, object] = {}

    def body(model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        losses = train_steps(model, opt)
        keys = (list(model.state_dict()), list(opt.state_dict()["state"]))
        ema = copy.deepcopy(model)  # how EMA copies are made
        opt_copy = copy.deepcopy(opt)
        blob = pickle.dumps(model)
        pickle.dumps(opt)
        buf = io.BytesIO()
        torch.save(model, buf)  # the whole model, as the word-LM example does at the end
        buf.seek(0)
        loaded = torch.load(buf, weights_only=False)
        seen[str(agent.current() is not None)] = (keys, ema, opt_copy, pickle.loads(blob), loaded, model)
        losses += train_steps(model, opt)  # the live model goes on training (and being measured)
        losses += train_steps(loaded, torch.optim.Adam(loaded.parameters(), lr=1e-2))
        losses += [p.sum().item() for p in ema.parameters()]
        return losses

    plain = run(False, body)
    attached = run(True, body)
    assert bits(attached) == bits(plain)
    keys_plain = seen["False"][0]
    keys, ema, opt_copy, unpickled, loaded, model = seen["True"]
    assert keys == keys_plain
    assert agent_hooks(model) != []  # the live model is still measured ...
    for copy_ in (ema, unpickled, loaded):  # ... its copies carry nothing of the agent
        assert agent_hooks(copy_) == [] and copy_._forward_hooks_always_called == {}
        assert list(copy_.state_dict()) == keys[0]
    assert "step" not in opt_copy.__dict__
    handle = agent.current()
    assert handle.model is model and [s.step for s in handle.steps] == list(range(1, 7))


NETDEF = """import torch.nn as nn


class SavedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 3)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
"""


def test_saved_model_loads_where_batchmon_is_not_importable(agent_dir, tmp_path, monkeypatch):
    (tmp_path / "netdef.py").write_text(NETDEF)
    monkeypatch.syspath_prepend(str(tmp_path))
    import netdef

    torch.manual_seed(0)
    model = netdef.SavedNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batchmon.attach(model, opt)
    train_steps(model, opt, n=2)
    torch.save(model, tmp_path / "model.pt")
    code = ("import sys; sys.modules['batchmon'] = None  # any import of batchmon fails\n"
            "import torch\n"
            "m = torch.load('model.pt', weights_only=False)\n"
            "print(m(torch.ones(1, 8)).shape, len(m._forward_pre_hooks), len(m._forward_hooks))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         cwd=str(tmp_path))
    assert out.returncode == 0, out.stderr[-2000:]
    assert "torch.Size([1, 3]) 0 0" in out.stdout


def test_user_hooks_run_in_their_own_order(agent_dir):
    order: dict[bool, list[str]] = {}

    def body(model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        calls: list[str] = []
        attached = agent.current() is not None
        model.register_forward_pre_hook(lambda m, a: calls.append("pre1"))
        model.register_forward_hook(lambda m, a, o: calls.append("post1"))
        model.register_forward_pre_hook(lambda m, a: calls.append("pre0"), prepend=True)
        model.register_forward_hook(lambda m, a, kw, o: calls.append("post-kw"), with_kwargs=True, always_call=True)
        model.fc1.register_forward_hook(lambda m, a, o: calls.append("fc1"))
        losses = train_steps(model, opt, n=2)
        order[attached] = calls
        return losses

    plain = run(False, body)
    assert bits(run(True, body)) == bits(plain)
    assert order[True] == order[False] == ["pre0", "pre1", "fc1", "post1", "post-kw"] * 2


@pytest.mark.parametrize("change", ["half", "double", "to"])
def test_dtype_or_device_change_after_attach_is_measured_at_once(agent_dir, change):
    def body(model: nn.Module, opt: torch.optim.Optimizer) -> list[float]:
        losses = train_steps(model, opt, n=4)  # step 4 is not a sampled step
        if change == "half":
            model.half()
            dtype = torch.float16
        elif change == "double":
            model.double()
            dtype = torch.float64
        else:
            model.to("cpu", torch.float64)
            dtype = torch.float64
        opt.zero_grad()
        loss = model(torch.randn(5, D, dtype=dtype)).float().square().mean()
        loss.backward()
        opt.step()
        return losses + [loss.item()]

    plain = run(False, body, sgd=True)
    assert bits(run(True, body, sgd=True, activation_every=10)) == bits(plain)
    handle = agent.current()
    step = handle.last_step
    n = D * H + H + H * O + O
    size = 2 if change == "half" else 8
    assert step.step == 5 and step.components["parameters"] == n * size + size  # + the scalar buffer
    assert step.components["gradients"] == n * size


def compiled_run(attached: str, backend: str) -> tuple[list[float], list]:
    """attached: 'no', 'before' (attach the compiled module) or 'after' (compile after attach)."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if attached == "after":
        batchmon.attach(model, opt, activation_every=1)
    compiled = torch.compile(model, backend=backend)
    if attached == "before":
        batchmon.attach(compiled, opt, activation_every=1)
    losses = train_steps(compiled, opt, n=4, batch=6)
    handle = agent.current()
    steps = handle.steps if handle is not None else []
    agent.detach()
    return losses, steps


def eager_steps() -> list:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=1)
    train_steps(model, opt, n=4, batch=6)
    steps = handle.steps
    agent.detach()
    return steps


def check_compiled_like_eager(backend: str) -> None:
    eager = eager_steps()
    plain, _ = compiled_run("no", backend)
    for when in ("before", "after"):
        losses, steps = compiled_run(when, backend)
        assert bits(losses) == bits(plain), when
        assert [s.batch_size for s in steps] == [6] * 4, when
        for mine, ref in zip(steps, eager):
            assert mine.components["batch"] == ref.components["batch"] > 0, when
            assert mine.components["parameters"] == ref.components["parameters"], when
            assert mine.components["gradients"] == ref.components["gradients"], when
            assert mine.components["activations"] > 0, when
            # a compiled graph may save fewer tensors than eager (it can recompute), never more
            assert mine.components["activations"] <= ref.components["activations"], when


def test_torch_compile_before_and_after_attach_is_measured_like_eager(agent_dir):
    check_compiled_like_eager("aot_eager")  # dynamo + AOTAutograd, the parts that meet the agent's hooks


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() and not os.environ.get("BATCHMON_TEST_INDUCTOR"),
                    reason="inductor's cold C++ build costs ~45 CPU s on a 2-core box (a minute of the suite): run on "
                           "the GPU machine (bench/h200_run.sh cudatests) or with BATCHMON_TEST_INDUCTOR=1; "
                           "dynamo and AOTAutograd, the parts that meet the agent, are tested above with aot_eager")
def test_torch_compile_inductor_is_measured_like_eager(agent_dir):
    try:
        torch.compile(nn.Linear(2, 2))(torch.randn(1, 2))
    except Exception as exc:  # noqa: BLE001 - no C++ compiler, or inductor unsupported here
        pytest.skip(f"inductor cannot compile on this machine: {type(exc).__name__}: {exc}")
    check_compiled_like_eager("inductor")
