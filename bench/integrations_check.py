#!/usr/bin/env python3
"""Issue 6 point 4 on the GPU: the Lightning and Hugging Face callbacks attach the agent with the trainer's model,
optimizer and batch size, checked from a monitor's side of the agent's socket.

For each library: a small model trains a few steps on CUDA (a short last batch included) twice with the same
seed, once plain and once with ``BatchmonCallback``; a plain socket client connects while the second run trains
and reads hello, steps and bye. Checked: the hello (model class, parameter count, optimizer, rank, device), one
step message per optimizer step with the batch size each forward really got, parameters / gradients /
optimizer bytes against references computed here from the model and the optimizer state (each tensor
rounded up to the CUDA allocator's 512-byte block), batch bytes against the tensors the forward received,
activations > 0, identical losses with and without the callback, the agent detached after training, no error
swallowed by the callback. Recorded on CUDA (not checked): sum(components) - peak_allocated per step.

    python3 bench/integrations_check.py          # CUDA (the H200)
    python3 bench/integrations_check.py --cpu    # the same on the CPU (a smoke test)
    python3 bench/integrations_check.py --only lightning
    python3 bench/integrations_check.py --ddp 2  # Lightning under DDP on 2 GPUs (with --cpu: 2 gloo processes);
                                                 # every rank checks its own agent -> integrations_check_ddp.json

Writes $OUT/integrations_check.json (OUT defaults to ./out) and prints a summary; exit 0 when every library
that is installed passed, 1 otherwise (a library that is not installed is reported as skipped).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS: the two runs' losses compare
if "--ddp" not in sys.argv:
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "0")  # one GPU: the HF Trainer would use DataParallel on several
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from batchmon import protocol  # noqa: E402
from batchmon.agent import handle as agent  # noqa: E402
from batchmon.protocol import Bye, Hello, Step  # noqa: E402

CUDA_BLOCK = 512


# ------------------------------------------------------------------------------------------------ monitor side


class SocketReader:
    """A monitor's view of one agent: connect to its socket, decode protocol lines."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.sock.settimeout(0.05)
        self.buf = protocol.LineBuffer()
        self.messages: list[Any] = []
        self.eof = False

    def until(self, done: Callable[[list[Any]], bool], timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(self.messages):
            if self.eof:
                return False
            try:
                data = self.sock.recv(1 << 16)
            except (socket.timeout, BlockingIOError):
                continue
            if not data:
                self.eof = True
                continue
            self.messages.extend(protocol.decode(line) for line in self.buf.feed(data))
        return done(self.messages)

    def of(self, kind: type) -> list[Any]:
        return [m for m in self.messages if isinstance(m, kind)]

    def close(self) -> None:
        self.sock.close()


def connect_to_agent(state: dict[str, Any]) -> None:
    """Called inside the run right after the callback attached: connect and wait for the hello."""
    state["rank"], state["world_size"] = _rank(), _world()
    handle = agent.current()
    if handle is None or handle.socket_path is None:
        state["connect_error"] = "no agent attached (or no socket) when training started"
        return
    reader = SocketReader(handle.socket_path)
    if not reader.until(lambda ms: any(isinstance(m, Hello) for m in ms)):
        state["connect_error"] = "no hello within 30 s"
    state["reader"] = reader


# ------------------------------------------------------------------------------------------------ references


def block(n: int, device: torch.device) -> int:
    return -(-n // CUDA_BLOCK) * CUDA_BLOCK if device.type == "cuda" else n


def tensor_bytes(tensors: Any, device: torch.device) -> int:
    """Distinct storages on the device: numel * element_size each, rounded up to the allocator's block on CUDA."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type == device.type:
            seen[t.untyped_storage().data_ptr()] = block(t.numel() * t.element_size(), device)
    return sum(seen.values())


def flat_tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict) or (hasattr(obj, "keys") and hasattr(obj, "__getitem__") and not isinstance(obj, str)):
        return [t for k in obj.keys() for t in flat_tensors(obj[k])]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in flat_tensors(v)]
    return []


def verify(name: str, state: dict[str, Any], *, model: nn.Module, optimizer: torch.optim.Optimizer,
           seen: list[tuple[int, int]], losses: list[float], plain_losses: list[float], device: torch.device,
           expected_sizes: list[int], errors: list[str], model_cls: str) -> dict[str, Any]:
    """Compare what the monitor read with the references; every check is a named boolean."""
    result: dict[str, Any] = {"library": name}
    reader: SocketReader | None = state.get("reader")
    if reader is None:
        result.update(passed=False, error=state.get("connect_error", "no reader"))
        return result
    reader.until(lambda ms: any(isinstance(m, Bye) for m in ms))
    reader.close()
    hellos, steps = reader.of(Hello), reader.of(Step)
    hello = hellos[-1] if hellos else None
    if "refs" in state:  # taken during training (see check_lightning)
        params, opt_bytes = state["refs"]
    else:
        params = tensor_bytes([*model.parameters(), *model.buffers()], device)
        opt_bytes = tensor_bytes([t for st in optimizer.state.values() for t in st.values()], device)
    checks: dict[str, bool] = {
        "hello": hello is not None,
        "bye": bool(reader.of(Bye)),
        "hello_model": hello is not None and hello.model is not None and hello.model.cls == model_cls
        and hello.model.parameters == sum(p.numel() for p in model.parameters()),
        "hello_optimizer": hello is not None and hello.optimizer == type(optimizer).__name__,
        "hello_rank": hello is not None and (hello.rank, hello.world_size) == (state["rank"], state["world_size"]),
        "hello_device": hello is not None and hello.device.split(":")[0] == device.type,
        "one_step_per_optimizer_step": [s.step for s in steps] == list(range(1, len(expected_sizes) + 1)),
        "batch_size_per_step": [s.batch_size for s in steps] == [size for size, _ in seen] == expected_sizes,
        "parameters": bool(steps) and all(s.components["parameters"] == params for s in steps),
        "gradients": bool(steps) and all(s.components["gradients"] == params for s in steps),
        "optimizer": bool(steps) and all(s.components["optimizer"] == opt_bytes for s in steps),
        "batch_bytes": len(steps) == len(seen) and all(s.components["batch"] == b for s, (_, b) in zip(steps, seen)),
        "activations": bool(steps) and all(s.components["activations"] > 0 for s in steps),
        "losses_unchanged": losses == plain_losses and len(losses) > 0,
        "detached_after_training": agent.current() is None,
        "no_callback_errors": errors == [],
    }
    if device.type == "cuda":  # recorded, not checked: a property of the agent's memory model, not of the callbacks
        result["cuda"] = {
            "sum_components_minus_peak": [sum(s.components.values()) - (s.peak_allocated or 0) for s in steps],
            "peak_le_reserved": all((s.peak_allocated or 0) <= (s.reserved or 0) for s in steps)}
    result.update(
        passed=all(checks.values()), checks=checks,
        hello=hello.to_dict() if hello is not None else None,
        steps=[{"step": s.step, "batch_size": s.batch_size, "components": s.components,
                "peak_allocated": s.peak_allocated, "reserved": s.reserved, "device_used": s.device_used}
               for s in steps],
        expected={"batch_sizes": expected_sizes, "seen_batch_sizes": [size for size, _ in seen],
                  "batch_bytes": [b for _, b in seen], "parameters": params, "gradients": params,
                  "optimizer": opt_bytes},
        losses={"with_callback": losses, "plain": plain_losses}, callback_errors=errors)
    return result


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _rank() -> int:
    return torch.distributed.get_rank() if _distributed() else 0


def _world() -> int:
    return torch.distributed.get_world_size() if _distributed() else 1


# ------------------------------------------------------------------------------------------------ Lightning


def check_lightning(device: torch.device, steps: int, tmp: Path, ddp: int = 0) -> dict[str, Any]:
    try:
        import lightning.pytorch as L
    except ImportError:
        import pytorch_lightning as L  # type: ignore[no-redef]
    from batchmon.agent.integrations.lightning import BatchmonCallback

    dim, hidden, classes, batch = 256, 1024, 10, 64
    ranks = max(1, ddp)
    samples = ranks * ((steps - 1) * batch + batch // 2)  # each rank's last batch is half a batch

    class MLP(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, classes))
            self.losses: list[float] = []
            self.seen: list[tuple[int, int]] = []

        def training_step(self, batch_: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch_
            self.seen.append((x.shape[0], tensor_bytes(flat_tensors(batch_), x.device)))
            loss = F.cross_entropy(self.net(x), y)  # the module's own forward never runs
            self.losses.append(loss.item())
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    state: dict[str, Any] = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            connect_to_agent(state)

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            # the references while model and optimizer are still on the training device: Lightning's teardown
            # moves both back to the CPU after fit
            state["device"] = pl_module.device
            state["refs"] = (tensor_bytes([*pl_module.parameters(), *pl_module.buffers()], pl_module.device),
                             tensor_bytes([t for st in trainer.optimizers[0].state.values() for t in st.values()],
                                          pl_module.device))

    def fit(callbacks: list[Any]) -> tuple[Any, Any]:
        L.seed_everything(0, verbose=False)
        data = torch.utils.data.TensorDataset(torch.randn(samples, dim), torch.randint(0, classes, (samples,)))
        module = MLP()
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=ranks,
                            strategy="ddp" if ddp else "auto", max_epochs=1,
                            logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=str(tmp),
                            callbacks=callbacks, deterministic=True)
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=batch, shuffle=not ddp))
        return module, trainer

    plain, _ = fit([])
    callback = BatchmonCallback(name="integrations_check-lightning", activation_every=1)
    module, trainer = fit([callback, Probe()])
    device = state.get("device", module.device)  # under DDP, this rank's GPU
    result = verify("lightning", state, model=module, optimizer=trainer.optimizers[0], seen=module.seen,
                    losses=module.losses, plain_losses=plain.losses, device=device,
                    expected_sizes=[batch] * (steps - 1) + [batch // 2], errors=callback.session.errors,
                    model_cls="MLP")
    result["version"] = L.__version__ if hasattr(L, "__version__") else None
    result["package"] = L.__name__
    result["rank"] = state.get("rank", trainer.global_rank)
    return result


# ------------------------------------------------------------------------------------------------ transformers


def check_transformers(device: torch.device, steps: int, tmp: Path) -> dict[str, Any]:
    import transformers as hf
    from batchmon.agent.integrations.transformers import BatchmonCallback

    vocab, seq, batch = 1024, 64, 8
    samples = (steps - 1) * batch + batch // 2

    class Tokens(torch.utils.data.Dataset):
        def __init__(self) -> None:
            self.ids = torch.randint(0, vocab, (samples, seq), generator=torch.Generator().manual_seed(1))

        def __len__(self) -> int:
            return samples

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": self.ids[i], "labels": self.ids[i]}

    state: dict[str, Any] = {}

    class Probe(hf.TrainerCallback):
        def on_train_begin(self, args: Any, state_: Any, control: Any, **kwargs: Any) -> None:
            connect_to_agent(state)

    def train(callbacks: list[Any]) -> dict[str, Any]:
        hf.set_seed(0)
        config = hf.GPT2Config(vocab_size=vocab, n_positions=seq, n_embd=128, n_layer=2, n_head=4,
                               bos_token_id=0, eos_token_id=0)
        model = hf.GPT2LMHeadModel(config)
        seen: list[tuple[int, int]] = []
        losses: list[float] = []

        def record(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            seen.append((kwargs["input_ids"].shape[0],
                         tensor_bytes(flat_tensors([list(args), kwargs]), kwargs["input_ids"].device)))
            losses.append(out.loss.item())

        model.register_forward_hook(record, with_kwargs=True)
        args = hf.TrainingArguments(output_dir=str(tmp / "hf"), per_device_train_batch_size=batch,
                                    num_train_epochs=1, use_cpu=device.type == "cpu", report_to="none",
                                    save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                                    full_determinism=True)
        trainer = hf.Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
        trainer.train()
        return {"model": model, "trainer": trainer, "seen": seen, "losses": losses}

    plain = train([])
    callback = BatchmonCallback(name="integrations_check-transformers", activation_every=1)
    run = train([callback, Probe()])
    wrapped = run["trainer"].optimizer
    optimizer = getattr(wrapped, "optimizer", wrapped)  # accelerate's wrapper holds the torch optimizer
    result = verify("transformers", state, model=run["model"], optimizer=optimizer, seen=run["seen"],
                    losses=run["losses"], plain_losses=plain["losses"], device=device,
                    expected_sizes=[batch] * (steps - 1) + [batch // 2], errors=callback.session.errors,
                    model_cls="GPT2LMHeadModel")
    result["version"] = hf.__version__
    return result


# ------------------------------------------------------------------------------------------------ main


CHECKS = {"lightning": check_lightning, "transformers": check_transformers}
REQUIRES: dict[str, list[tuple[str, ...]]] = {"lightning": [("lightning", "pytorch_lightning")], "transformers": [("transformers",), ("accelerate",)]}


def missing(name: str) -> str | None:
    """What is not installed for this library's check (one of each group is needed), None when all is."""
    import importlib.util

    for group in REQUIRES[name]:
        if not any(importlib.util.find_spec(m) is not None for m in group):
            return " or ".join(group) + " not installed"
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run on the CPU (smoke test without a GPU)")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps per run, the last on half a batch")
    p.add_argument("--only", choices=sorted(CHECKS), help="check one library only")
    p.add_argument("--ddp", type=int, default=0, metavar="N",
                   help="Lightning only, under DDP with N processes (gloo with --cpu, else N GPUs): every rank "
                        "checks its own agent; writes integrations_check_ddp.json")
    args = p.parse_args(argv)
    out = Path(os.environ.get("OUT", "out"))
    out.mkdir(parents=True, exist_ok=True)
    if args.steps < 2:
        p.error("--steps must be at least 2")
    if not args.cpu and not torch.cuda.is_available():
        print("integrations_check: CUDA is not available (use --cpu for the CPU smoke test)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda:0")
    os.environ.setdefault("BATCHMON_DIR", tempfile.mkdtemp(prefix="bmint"))  # DDP's other ranks inherit it
    if args.ddp:
        return main_ddp(args.ddp, device, args.steps, out)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "integrations_check", "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": torch.__version__, "python": platform.python_version(), "time": time.time(), "libraries": {}}
    for name in [args.only] if args.only else sorted(CHECKS):
        why = missing(name)
        if why is not None:
            report["libraries"][name] = {"library": name, "passed": None, "skipped": why}
            continue
        with tempfile.TemporaryDirectory(prefix=f"bm-{name}-") as tmp:
            try:
                report["libraries"][name] = CHECKS[name](device, args.steps, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one library failing must not hide the other's result
                report["libraries"][name] = {"library": name, "passed": False,
                                             "error": f"{type(exc).__name__}: {exc}",
                                             "traceback": traceback.format_exc()}
        agent.detach()  # in case a failed run left it attached
        if device.type == "cuda":
            torch.cuda.empty_cache()
    results = report["libraries"].values()
    report["passed"] = all(r["passed"] is not False for r in results) and any(r["passed"] for r in results)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    (out / "integrations_check.json").write_text(json.dumps(report, indent=2) + "\n")
    for r in results:
        if r["passed"] is None:
            print(f"{r['library']}: skipped ({r['skipped']})")
            continue
        failed = [k for k, ok in r.get("checks", {}).items() if not ok]
        sizes = [s["batch_size"] for s in r.get("steps", [])]
        hello = r.get("hello") or {}
        print(f"{r['library']} {r.get('version', '')}: {'PASS' if r['passed'] else 'FAIL'}  "
              f"batch sizes {sizes}, rank {hello.get('rank')}/{hello.get('world_size')}, device {hello.get('device')}"
              + (f"  failed: {failed}" if failed else "") + (f"  error: {r['error']}" if r.get("error") else ""))
        if r.get("steps"):
            print(f"  step 1 components: {r['steps'][0]['components']}")
    print(f"integrations_check: {'PASS' if report['passed'] else 'FAIL'} in {report['seconds']} s -> "
          f"{out / 'integrations_check.json'}")
    return 0 if report["passed"] else 1


def main_ddp(ranks: int, device: torch.device, steps: int, out: Path) -> int:
    """Every rank (Lightning starts the others by running this script again) checks its own agent and
    writes its result; rank 0 waits for the others' and writes the whole."""
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bm-ddp-") as tmp:
        try:
            result = check_lightning(device, steps, Path(tmp), ddp=ranks)
        except Exception as exc:  # noqa: BLE001
            result = {"library": "lightning", "passed": False, "error": f"{type(exc).__name__}: {exc}",
                      "traceback": traceback.format_exc(), "rank": int(os.environ.get("LOCAL_RANK", "0"))}
    rank = int(result.get("rank") or 0)
    result["pid"] = os.getpid()
    (out / f"integrations_check_ddp_rank{rank}.json").write_text(json.dumps(result, indent=2) + "\n")
    if rank != 0:
        return 0 if result["passed"] else 1
    files = [out / f"integrations_check_ddp_rank{r}.json" for r in range(ranks)]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not all(f.exists() for f in files):
        time.sleep(0.1)
    per_rank = [json.loads(f.read_text()) if f.exists() else {"rank": r, "passed": False, "error": "no result file"}
                for r, f in enumerate(files)]
    pids = {r.get("pid") for r in per_rank}
    report = {"benchmark": "integrations_check_ddp", "device": str(device), "ranks": ranks,
              "torch": torch.__version__, "python": platform.python_version(), "time": time.time(),
              "passed": all(r.get("passed") for r in per_rank) and len(pids) == ranks,
              "seconds": round(time.perf_counter() - t0, 2), "per_rank": per_rank}
    (out / "integrations_check_ddp.json").write_text(json.dumps(report, indent=2) + "\n")
    for r in per_rank:
        hello = r.get("hello") or {}
        print(f"lightning DDP rank {r.get('rank')}: {'PASS' if r.get('passed') else 'FAIL'}  pid {hello.get('pid')} "
              f"rank {hello.get('rank')}/{hello.get('world_size')} device {hello.get('device')} "
              f"batch sizes {[s['batch_size'] for s in r.get('steps', [])]}"
              + (f"  failed: {[k for k, ok in r.get('checks', {}).items() if not ok]}" if not r.get("passed") else "")
              + (f"  error: {r['error']}" if r.get("error") else ""))
    print(f"integrations_check --ddp {ranks}: {'PASS' if report['passed'] else 'FAIL'} in {report['seconds']} s -> "
          f"{out / 'integrations_check_ddp.json'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
