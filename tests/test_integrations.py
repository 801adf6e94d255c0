"""The Lightning and Hugging Face callbacks with the real libraries, on CPU: a real Trainer runs a few steps of a
tiny model with the callback; a plain socket reader (a monitor's view) checks hello, steps and bye, and the
figures are compared with references computed here from the model, the optimizer and the batches themselves.
Training with the callback must give the very same losses as training without it.

Each library's tests skip where it is not installed (CI installs both through the ``test`` extra).
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import batchmon
from batchmon.agent import handle as agent
from batchmon.protocol import Bye, Hello, Step
from agent_helpers import ROOT, Reader, agent_dir  # noqa: F401 - fixture

D, H, O = 8, 16, 3  # the Lightning MLP: input, hidden, classes
N, B = 20, 6  # samples and batch size: batches of 6, 6, 6 and a short last one of 2
F32, I64 = 4, 8


def tensor_bytes(tensors: Any) -> int:
    """Bytes of the distinct storages among these tensors (what one copy of them holds)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor):
            seen[t.untyped_storage().data_ptr()] = t.numel() * t.element_size()
    return sum(seen.values())


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    return tensor_bytes(t for state in optimizer.state.values() for t in state.values())


def model_bytes(model: nn.Module) -> int:
    return tensor_bytes([*model.parameters(), *model.buffers()])


def read_until_bye(reader: Reader) -> tuple[Hello, list[Step]]:
    reader.until(lambda ms: any(isinstance(m, Bye) for m in ms), timeout=30)
    hellos = reader.of(Hello)
    assert hellos, "no hello"
    return hellos[-1], reader.of(Step)


def connect(probe: dict[str, Any]) -> None:
    """Inside the training run, right after the callback attached: connect as a monitor, wait for the hello."""
    handle = agent.current()
    assert handle is not None and handle.socket_path is not None
    reader = Reader(handle.socket_path)
    reader.until(lambda ms: any(isinstance(m, Hello) for m in ms), timeout=30)
    probe["reader"] = reader


def assert_no_import_of(missing: str, module: str, hint: str) -> None:
    code = (f"import sys\nfor name in {missing.split()!r}: sys.modules[name] = None\n"
            f"try:\n    import {module}\nexcept ImportError as e:\n    print('ImportError:', e)\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:1])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.splitlines()
    assert first.startswith("ImportError:") and hint in first
    assert second == "[]"  # the check comes before torch is imported


# ------------------------------------------------------------------------------------------------ Lightning


@pytest.fixture
def L() -> Any:
    try:
        import lightning.pytorch as lightning_pytorch
    except ImportError:
        lightning_pytorch = pytest.importorskip("pytorch_lightning")
    return lightning_pytorch


def lightning_module(L: Any, via_forward: bool) -> Any:
    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(D, H), nn.ReLU(), nn.Linear(H, O))
            self.losses: list[float] = []
            self.seen: list[tuple[int, int]] = []  # (batch size, bytes of the batch's tensors) per step

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            self.seen.append((x.shape[0], tensor_bytes(batch)))
            logits = self(x) if via_forward else self.net(x)  # the second never runs the module's forward
            loss = F.cross_entropy(logits, y)
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.parameters(), lr=0.01)

    return Tiny()


def fit(L: Any, tmp_path: Any, callbacks: list[Any], via_forward: bool = False,
        hook: Any = None) -> tuple[Any, Any]:
    L.seed_everything(0, verbose=False)
    data = torch.utils.data.TensorDataset(torch.randn(N, D), torch.randint(0, O, (N,)))
    module = lightning_module(L, via_forward)
    if hook is not None:
        module.register_forward_pre_hook(hook)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        default_root_dir=str(tmp_path), callbacks=callbacks)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=B, shuffle=True))
    return module, trainer


def lightning_probe(L: Any, probe: dict[str, Any]) -> Any:
    class Probe(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            connect(probe)

    return Probe()


@pytest.mark.parametrize("via_forward", [False, True], ids=["net-in-training-step", "self-forward"])
def test_lightning_callback_reports_each_step_with_the_real_batch(agent_dir, tmp_path, L, via_forward):
    from batchmon.agent.integrations.lightning import BatchmonCallback

    plain, _ = fit(L, tmp_path, [], via_forward)
    probe: dict[str, Any] = {}
    callback = BatchmonCallback(activation_every=1)
    module, trainer = fit(L, tmp_path, [callback, lightning_probe(L, probe)], via_forward)

    assert module.losses == plain.losses and len(module.losses) == 4  # the callback changes nothing in training
    for mine, theirs in zip(module.parameters(), plain.parameters()):
        assert torch.equal(mine, theirs)
    hello, steps = read_until_bye(probe["reader"])
    probe["reader"].close()
    optimizer = trainer.optimizers[0]
    assert hello.model is not None and hello.model.cls == "Tiny"
    assert hello.model.parameters == sum(p.numel() for p in module.parameters())
    assert hello.model.parameter_bytes == tensor_bytes(module.parameters())
    assert (hello.optimizer, hello.rank, hello.world_size) == (type(optimizer).__name__, 0, 1)
    assert [s.step for s in steps] == [1, 2, 3, 4]
    assert [s.batch_size for s in steps] == [size for size, _ in module.seen] == [6, 6, 6, 2]
    params = model_bytes(module)
    for step, (size, batch_bytes) in zip(steps, module.seen):
        c = step.components
        assert (c["parameters"], c["gradients"], c["optimizer"]) == (params, params, state_bytes(optimizer))
        assert c["batch"] == batch_bytes == size * D * F32 + size * I64  # inputs and targets
        # saved for backward: at least the ReLU's output (the hidden layer) and the log-softmax's (the logits)
        assert size * (H + O) * F32 <= c["activations"] <= size * (H + O) * F32 + 64
        assert c["other"] == 0
    assert agent.current() is None  # the callback attached the agent, so it detached it
    assert "training_step" not in module.__dict__ and "forward" not in module.__dict__
    assert callback.session.errors == []
    assert callback.handle.steps[-1].batch_size == 2  # the handle stays readable after the fit


def test_lightning_callback_leaves_an_agent_it_did_not_attach(agent_dir, tmp_path, L):
    from batchmon.agent.integrations.lightning import BatchmonCallback

    handle = batchmon.attach(name="mine")
    callback = BatchmonCallback()
    module, trainer = fit(L, tmp_path, [callback])
    assert callback.handle is handle and agent.current() is handle and handle.enabled
    assert handle.model is module and handle.optimizers == [trainer.optimizers[0]]
    assert [s.batch_size for s in handle.steps] == [6, 6, 6, 2]
    assert "training_step" not in module.__dict__


def test_lightning_module_with_forward_hooks_of_its_own_is_not_routed(agent_dir, tmp_path, L):
    from batchmon.agent.integrations.lightning import BatchmonCallback

    inputs: list[int] = []

    def expects_features(module: nn.Module, args: tuple) -> None:
        inputs.append(args[0].shape[1])  # the forward's x: a tensor of D features, not (batch, batch_idx)

    callback = BatchmonCallback()
    module, _ = fit(L, tmp_path, [callback], via_forward=True, hook=expects_features)
    assert inputs == [D] * 4 and callback.session.errors == []
    assert [s.batch_size for s in callback.handle.steps] == [6, 6, 6, 2]  # seen at the module's own forward


def test_lightning_callback_error_is_one_warning_and_training_goes_on(agent_dir, tmp_path, L):
    from batchmon.agent.integrations.lightning import BatchmonCallback

    plain, _ = fit(L, tmp_path, [])
    callback = BatchmonCallback(activation_every=0)  # the agent refuses this setting: attach raises
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module, _ = fit(L, tmp_path, [callback])
    ours = [w for w in caught if "batchmon" in str(w.message)]
    assert len(ours) == 1 and issubclass(ours[0].category, RuntimeWarning)
    assert "on_train_start" in str(ours[0].message) and "activation_every" in str(ours[0].message)
    assert module.losses == plain.losses
    assert agent.current() is None and "training_step" not in module.__dict__


def test_lightning_missing_is_a_clear_import_error():
    assert_no_import_of("lightning pytorch_lightning", "batchmon.agent.integrations.lightning", "pip install lightning")


# ------------------------------------------------------------------------------------------------ transformers

T_LEN, VOCAB, SAMPLES = 8, 64, 10


@pytest.fixture
def hf() -> Any:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # the Trainer needs it
    return transformers


class TokenData(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (SAMPLES, T_LEN), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_hf(hf: Any, tmp_path: Any, callbacks: list[Any], batch: int = 4, accumulate: int = 1) -> dict[str, Any]:
    hf.set_seed(0)
    config = hf.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=16, n_layer=1, n_head=2,
                           bos_token_id=0, eos_token_id=0)
    model = hf.GPT2LMHeadModel(config)
    seen: list[tuple[int, int, float]] = []  # (batch size, bytes of the forward's tensors, loss) per forward

    def record(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        tensors = [*args, *kwargs.values()]
        seen.append((kwargs["input_ids"].shape[0], tensor_bytes(tensors), out.loss.item()))

    model.register_forward_hook(record, with_kwargs=True)
    args = hf.TrainingArguments(output_dir=str(tmp_path / "hf"), per_device_train_batch_size=batch,
                                gradient_accumulation_steps=accumulate, num_train_epochs=1, use_cpu=True,
                                report_to="none", save_strategy="no", logging_strategy="no", disable_tqdm=True,
                                seed=0)
    trainer = hf.Trainer(model=model, args=args, train_dataset=TokenData(), callbacks=callbacks)
    trainer.train()
    return {"model": model, "trainer": trainer, "seen": seen}


def hf_probe(hf: Any, probe: dict[str, Any]) -> Any:
    class Probe(hf.TrainerCallback):
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            connect(probe)

    return Probe()


def test_transformers_callback_reports_each_step_with_the_micro_batch(agent_dir, tmp_path, hf):
    from batchmon.agent.integrations.transformers import BatchmonCallback

    plain = train_hf(hf, tmp_path, [])
    probe: dict[str, Any] = {}
    callback = BatchmonCallback(activation_every=1)
    run = train_hf(hf, tmp_path, [callback, hf_probe(hf, probe)])

    assert [loss for *_, loss in run["seen"]] == [loss for *_, loss in plain["seen"]]
    assert len(run["seen"]) == 3
    hello, steps = read_until_bye(probe["reader"])
    probe["reader"].close()
    model, wrapped = run["model"], run["trainer"].optimizer
    optimizer = getattr(wrapped, "optimizer", wrapped)  # accelerate's wrapper holds the torch optimizer
    assert hello.model is not None and hello.model.cls == "GPT2LMHeadModel"
    assert hello.model.parameters == sum(p.numel() for p in model.parameters())
    assert hello.model.parameter_bytes == tensor_bytes(model.parameters())
    assert (hello.optimizer, hello.rank, hello.world_size) == (type(optimizer).__name__, 0, 1)
    assert [s.step for s in steps] == [1, 2, 3]
    assert [s.batch_size for s in steps] == [size for size, *_ in run["seen"]] == [4, 4, 2]
    params = model_bytes(model)
    for step, (size, batch_bytes, _) in zip(steps, run["seen"]):
        c = step.components
        assert (c["parameters"], c["gradients"], c["optimizer"]) == (params, params, state_bytes(optimizer))
        assert c["batch"] == batch_bytes >= 2 * size * T_LEN * I64  # input_ids and labels at least
        assert c["activations"] > size * T_LEN * VOCAB * F32  # the logits alone are saved for the loss
        assert c["other"] == 0
    assert agent.current() is None and callback.session.errors == []


def test_transformers_accumulation_reports_the_per_device_micro_batch(agent_dir, tmp_path, hf):
    from batchmon.agent.integrations.transformers import BatchmonCallback

    callback = BatchmonCallback()
    run = train_hf(hf, tmp_path, [callback], batch=2, accumulate=2)
    steps = callback.handle.steps
    assert len(run["seen"]) == 5  # five micro-batches of 2 ...
    assert len(steps) == 3 and [s.batch_size for s in steps] == [2, 2, 2]  # ... in three optimizer steps
    assert callback.session.errors == []


def test_transformers_error_is_one_warning_and_training_goes_on(agent_dir, tmp_path, hf):
    from batchmon.agent.integrations.transformers import BatchmonCallback

    plain = train_hf(hf, tmp_path, [])
    callback = BatchmonCallback(activation_every=-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = train_hf(hf, tmp_path, [callback])
    ours = [w for w in caught if "batchmon" in str(w.message)]
    assert len(ours) == 1 and "on_train_begin" in str(ours[0].message)
    assert [loss for *_, loss in run["seen"]] == [loss for *_, loss in plain["seen"]]
    assert agent.current() is None


def test_transformers_missing_is_a_clear_import_error():
    assert_no_import_of("transformers", "batchmon.agent.integrations.transformers", "pip install transformers")


def test_the_package_itself_imports_no_library():
    code = ("import sys, batchmon.agent.integrations\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'lightning', 'pytorch_lightning', 'transformers')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


def test_lightning_ddp_every_rank_attaches(tmp_path, L, preloaded):
    """Two CPU processes under Lightning's DDP (gloo): each rank's agent is read on its own socket by the bench
    script's check, with its rank in the hello and its own per-rank batches (Lightning's own redirection of
    training_step through the module's forward, not the callback's, is what the agent sees there). Rank 0 forks
    from the session's torch-preloaded server; Lightning starts rank 1 as a fresh interpreter, as it does."""
    import json
    import os
    import tempfile

    sockets = tempfile.mkdtemp(prefix="bmt")  # short: unix socket paths are limited to 107 bytes
    env = {**os.environ, "OUT": str(tmp_path / "out"), "BATCHMON_DIR": os.path.join(sockets, "s")}
    out = preloaded.run([str(ROOT / "bench" / "integrations_check.py"), "--cpu", "--ddp", "2", "--steps", "3"],
                        timeout=120, cwd=tmp_path, env=env)
    result = tmp_path / "out" / "integrations_check_ddp.json"
    assert out.returncode == 0 and result.exists(), out.stdout[-2000:] + out.stderr[-2000:]
    report = json.loads(result.read_text())
    ranks = report["per_rank"]
    assert report["passed"]
    assert [(r["hello"]["rank"], r["hello"]["world_size"]) for r in ranks] == [(0, 2), (1, 2)]
    assert len({r["hello"]["pid"] for r in ranks}) == 2
    assert all([s["batch_size"] for s in r["steps"]] == [64, 64, 32] for r in ranks)
    assert all(r["checks"]["parameters"] and r["checks"]["losses_unchanged"] for r in ranks)
