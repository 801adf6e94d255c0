"""Issue 13 point 3: the memory model against a real FSDP2 (``fully_shard``) run, per rank.

A GPT-2-sized decoder (12 layers, d=768, 12 heads, vocabulary 50257, sequence 512, untied head: 163M
parameters, fp32) is wrapped with ``fully_shard`` per block and then at the root, and trained with AdamW on
``--world-size`` GPUs (2), each rank a process (NCCL; gloo on CPU). Every rank attaches batchmon's agent
(``batchmon.agent.handle.attach(model, optimizer)``) and is observed for 3 steps at a small batch and one
shorter step; the memory model is fitted on each rank's own steps. Then:

(a) the per-rank peak the model predicts at larger batches (1/4 and 1/2 of the predicted largest batch, and
    the predicted largest batch) against the peak each rank measures there;
(b) the predicted largest batch per rank against the real one, found by bisection on a device emulated smaller
    with ``torch.cuda.set_per_process_memory_fraction`` (as bench/predict_zoo.py does; the cap bounds the
    allocator, so the prediction's device size is cap + the measured context) inside a time budget;
(c) ``what_if_from_unsharded``: the same model unsharded on one GPU, observed the same way, and the sharding
    what-if ``WhatIf(shards=N)`` with the model's parameter layout (the root and the repeated blocks, as
    ``fully_shard`` wraps them) against the sharded run's measured per-rank peaks and real largest batch.

An out-of-memory error on one rank while the other waits in a collective would hang the pair, so every trial
runs in a session of rank processes that the parent (this script) drives: a session keeps running trials
while they all succeed; after any failure (or a rank that does not answer within the trial timeout) the
parent ends that session's processes (by their pids) and starts a new one for the next trial.

Usage (from the repo root, PYTHONPATH with the checkout as bench/h200_run.sh lays it out):
    python3 bench/fsdp_predict.py --out $OUT/fsdp_predict_h200_x2.json        # 2 GPUs, ~3-4 minutes
    python3 bench/fsdp_predict.py --cpu-smoke --out /tmp/fsdp.json            # 2 gloo processes on the CPU

Over 400 lines: the rank side, the session driver that survives a rank's out-of-memory error, the bisection and the
comparison belong to one experiment and are read together.

JSON: {model, world_size, points: [{batch, predicted_peak, measured_peak}], predicted_max_batch,
real_max_batch, what_if_from_unsharded: {...}, ranks: [...per-rank detail...], ...}. ``predicted_peak`` and
``measured_peak`` are the largest over the ranks (each rank's are under ``ranks``). With --cpu-smoke the
"peak" is the agent's component sum on a fake device (CPU has no allocator): it tests the plumbing only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import queue
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # predict_accuracy.py beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # batchmon from the checkout

import torch  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from batchmon.memory_model import ParamLayout, WhatIf, fit  # noqa: E402
from batchmon.protocol import Step  # noqa: E402

GIB = 2**30
OOM_TEXT = ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_ALLOC_FAILED", "smoke device full")


@dataclass(frozen=True)
class Config:
    """What every process builds and how it is observed."""

    vocab: int = 50257
    seq: int = 512
    d: int = 768
    heads: int = 12
    layers: int = 12
    observe: tuple[int, int] = (4, 2)  # (larger, smaller) observed batch sizes
    cap: int = 24 * GIB  # emulated device size per rank (bytes the allocator may reserve)
    smoke: bool = False
    trial_timeout_s: float = 90.0

    @property
    def name(self) -> str:
        return (f"GPT decoder {self.layers}L d={self.d} h={self.heads} V={self.vocab} T={self.seq}, untied head, "
                f"fp32, AdamW, fully_shard per block + root")


def build_model(cfg: Config) -> torch.nn.Module:
    from predict_accuracy import GPT  # a GPT-2-like decoder built from scratch (pre-norm blocks, SDPA)

    torch.manual_seed(0)
    return GPT(cfg.vocab, cfg.seq, cfg.d, cfg.heads, cfg.layers, tied=False)


def param_layout(model: torch.nn.Module) -> ParamLayout:
    """The units fully_shard is applied to here: each block, and the root with everything else."""
    blocks = list(model.blocks)  # type: ignore[attr-defined]
    sizes = [sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks]
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    return ParamLayout(root=total - sum(sizes), largest_unit=max(sizes), units=len(blocks))


def _batch(cfg: Config, b: int, dev: torch.device, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, cfg.vocab, (b, cfg.seq), device=dev, generator=gen)
    return x, torch.roll(x, -1, 1)


def _step(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, b: int, dev: torch.device,
          gen: torch.Generator) -> None:
    x, y = _batch(cfg, b, dev, gen)
    logits = model(x)
    loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    del logits
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or any(t in str(exc) for t in OOM_TEXT)


# --------------------------------------------------------------------------------------------- the rank side


class _Device:
    """The rank's device: allocator figures on CUDA, the agent's component sum on the CPU smoke device."""

    def __init__(self, cfg: Config, rank: int) -> None:
        self.cfg = cfg
        if cfg.smoke:
            self.kind, self.device, self.cuda = "cpu-smoke", torch.device("cpu"), None
        else:
            from predict_accuracy import CudaDevice

            torch.cuda.set_device(rank)
            self.cuda = CudaDevice()
            self.kind, self.device = "cuda", self.cuda.device
            total = torch.cuda.mem_get_info(self.device)[1]
            torch.cuda.set_per_process_memory_fraction(min(1.0, cfg.cap / total), self.device)
        self.fake_total: int | None = None  # smoke: the fake device size, set by the parent after observing

    def clean(self) -> None:
        if self.cuda is not None:
            self.cuda.clean()

    def stats(self) -> dict[str, Any]:
        if self.cuda is None:
            return {}
        self.cuda.sync()
        return self.cuda.stats()


def _observe(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, dev: _Device,
             gen: torch.Generator) -> dict[str, Any]:
    """The agent's steps at (big, big, big, small); device_used read synchronously after each step (the agent's
    NVML sample is once a second and can predate the step's pool, as bench/predict_accuracy.py explains)."""
    from batchmon.agent import handle as bm_agent

    big, small = cfg.observe
    folder = tempfile.mkdtemp(prefix="batchmon-fsdp-")
    handle = bm_agent.attach(model, opt, activation_every=1, socket_dir=folder)
    used: list[int | None] = []
    try:
        for b in (big, big, big, small):
            _step(model, opt, cfg, b, dev.device, gen)
            used.append(dev.stats().get("device_used"))
        steps = [s.to_dict() for s in handle.steps]
        error = handle.error
    finally:
        handle.detach()
    for d, u in zip(steps, used, strict=False):
        if u is not None and d.get("peak_allocated") is not None:
            d["device_used"] = u
    return {"steps": steps, "error": None if error is None else str(error)}


def _trial(model: torch.nn.Module, opt: torch.optim.Optimizer, cfg: Config, dev: _Device, b: int,
           gen: torch.Generator) -> dict[str, Any]:
    """One optimizer step at ``b`` from a clean allocator: ok and the peak (smoke: the agent's component sum
    against the fake device size)."""
    opt.zero_grad(set_to_none=True)
    dev.clean()
    t0 = time.perf_counter()
    if dev.cuda is None:
        from batchmon.agent import handle as bm_agent

        handle = bm_agent.attach(model, opt, activation_every=1, socket_dir=tempfile.mkdtemp(prefix="batchmon-fsdp-"))
        try:
            _step(model, opt, cfg, b, dev.device, gen)
            steps = list(handle.steps)
        finally:
            handle.detach()
        peak = sum(steps[-1].components.values()) if steps else None
        ok = peak is not None and (dev.fake_total is None or peak <= dev.fake_total)
        return {"batch": b, "ok": ok, "peak_allocated": peak, "seconds": round(time.perf_counter() - t0, 3)}
    _step(model, opt, cfg, b, dev.device, gen)
    s = dev.stats()
    return {"batch": b, "ok": True, "peak_allocated": s.get("peak_allocated"), "reserved": s.get("reserved"),
            "inactive_split_peak": s.get("inactive_split_peak"), "num_alloc_retries": s.get("num_alloc_retries"),
            "device_used": s.get("device_used"), "seconds": round(time.perf_counter() - t0, 3)}


def rank_main(rank: int, world: int, port: int, cfg: Config, sharded: bool, commands: Any, results: Any) -> None:
    """One rank of a session: build, shard, warm up; then answer the parent's commands until 'stop'. After an
    out-of-memory error it reports and exits at once (a peer may be waiting in a collective)."""
    try:
        import torch.distributed as dist

        dev = _Device(cfg, rank)
        if sharded:
            from torch.distributed.fsdp import fully_shard

            os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            backend = "gloo" if cfg.smoke else "nccl"
            kw = {} if cfg.smoke else {"device_id": dev.device}
            dist.init_process_group(backend, rank=rank, world_size=world, **kw)
        model = build_model(cfg).to(dev.device)
        if sharded:
            for block in model.blocks:  # type: ignore[attr-defined]
                fully_shard(block)
            fully_shard(model)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        gen = torch.Generator(device=dev.device).manual_seed(1 + rank)
        results.put((rank, "ready", None))
        while True:
            cmd, arg = commands.get()
            if cmd == "stop":
                break
            if cmd == "fake_total":
                dev.fake_total = arg
                continue
            if cmd == "observe":
                results.put((rank, "observed", _observe(model, opt, cfg, dev, gen)))
                continue
            if cmd == "warm":  # optimizer state exists, as in a running job (a new session's first step)
                _step(model, opt, cfg, arg, dev.device, gen)
                results.put((rank, "warm", None))
                continue
            try:
                r = _trial(model, opt, cfg, dev, arg, gen)
            except Exception as exc:  # noqa: BLE001 - an OOM is the answer; anything else is reported too
                r = {"batch": arg, "ok": False, "peak_allocated": None,
                     "failure": " ".join(f"{type(exc).__name__}: {exc}".split())[:200], "oom": _is_oom(exc)}
                results.put((rank, "trial", r))
                os._exit(3)  # a peer may be inside a collective this rank will never join
            results.put((rank, "trial", r))
        if sharded:
            dist.destroy_process_group()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which ends the session
        results.put((rank, "error", " ".join(f"{type(exc).__name__}: {exc}".split())[:300]))
        os._exit(4)


# ------------------------------------------------------------------------------------------ the parent side


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Session:
    """``world`` rank processes (one when unsharded) driven through queues; ended by their pids."""

    def __init__(self, cfg: Config, world: int, sharded: bool) -> None:
        ctx = mp.get_context("forkserver" if cfg.smoke else "spawn")
        if cfg.smoke:  # one server imports torch once; each smoke rank forks from it (~4.5 CPU s a rank less)
            ctx.set_forkserver_preload(["__main__", "torch.distributed.fsdp", "batchmon.agent.handle",
                                        "predict_accuracy"])
        self.cfg, self.world = cfg, world
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(world)]
        port = _free_port()
        self.procs = [ctx.Process(target=rank_main, args=(r, world, port, cfg, sharded, self.commands[r],
                                                          self.results), daemon=True) for r in range(world)]
        for p in self.procs:
            p.start()
        self.alive = True
        self.gather("ready", timeout=300.0)

    def gather(self, kind: str, timeout: float) -> list[Any]:
        """Every rank's answer of ``kind``. A failed trial is returned (ranks that never answered, stuck behind a
        peer's failure, are marked failed) and the session ended; anything else that goes wrong - a rank's error,
        a rank that dies or does not answer in time - ends the session and raises RuntimeError."""
        answers: dict[int, Any] = {}
        deadline = time.monotonic() + timeout
        while len(answers) < self.world and time.monotonic() < deadline:
            try:
                rank, got, payload = self.results.get(timeout=max(0.05, min(1.0, deadline - time.monotonic())))
            except queue.Empty:
                waiting = [p for r, p in enumerate(self.procs) if r not in answers]
                if all(not p.is_alive() for p in waiting):
                    break  # died without a word
                continue
            if got == "error":
                self.end()
                raise RuntimeError(f"rank {rank}: {payload}")
            answers[rank] = payload
            if got == "trial" and not payload["ok"]:  # a peer may be stuck in a collective: a moment, no more
                deadline = min(deadline, time.monotonic() + 5.0)
        failed = kind == "trial" and any(not a["ok"] for a in answers.values())
        if len(answers) < self.world or failed:
            self.end()
            if kind != "trial":
                raise RuntimeError(f"{kind}: {self.world - len(answers)} rank(s) did not answer")
            for r in range(self.world):
                answers.setdefault(r, {"ok": False, "peak_allocated": None, "failure": "no answer (a peer failed)"})
        return [answers[r] for r in range(self.world)]

    def send(self, cmd: str, arg: Any = None) -> None:
        for q in self.commands:
            q.put((cmd, arg))

    def end(self) -> None:
        """Stop the session: ask politely, then terminate and kill the rank processes by their own handles."""
        if not self.alive:
            return
        self.alive = False
        for q in self.commands:
            try:
                q.put(("stop", None))
            except Exception:  # noqa: BLE001
                pass
        for p in self.procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)


class Trials:
    """Runs trials in sessions of ``world`` ranks, starting a new session after a failure."""

    def __init__(self, cfg: Config, world: int, warm_batch: int, fake_total: int | None) -> None:
        self.cfg, self.world, self.warm_batch, self.fake_total = cfg, world, warm_batch, fake_total
        self.session: Session | None = None
        self.log: list[dict[str, Any]] = []
        self.sessions = 0

    def adopt(self, session: Session) -> None:
        self.session = session

    def run(self, b: int) -> dict[str, Any]:
        if self.session is None or not self.session.alive:
            self.session = Session(self.cfg, self.world, sharded=True)
            self.sessions += 1
            if self.fake_total is not None:
                self.session.send("fake_total", self.fake_total)
            self.session.send("warm", self.warm_batch)
            self.session.gather("warm", timeout=self.cfg.trial_timeout_s)
        self.session.send("trial", b)
        per_rank = self.session.gather("trial", timeout=self.cfg.trial_timeout_s)
        ok = all(r["ok"] for r in per_rank)
        peaks = [r.get("peak_allocated") for r in per_rank]
        entry = {"batch": b, "ok": ok, "peak_allocated": max(peaks) if ok and None not in peaks else None,
                 "per_rank": per_rank}
        self.log.append(entry)
        return entry

    def close(self) -> None:
        if self.session is not None:
            self.session.end()


def real_largest(trials: Trials, predicted: int, deadline: float) -> dict[str, Any]:
    """The real largest batch per rank (every rank runs the same batch), by bisection around the prediction,
    exact unless the time budget runs out (then to 2%)."""
    lo, hi = 0, None
    at_predicted = None
    if predicted > 0:
        at_predicted = trials.run(predicted)["ok"]
        lo, hi = (predicted, None) if at_predicted else (0, predicted)
    if lo == 0:
        if not trials.run(1)["ok"]:
            return {"real_max_batch": 0, "ok_at_predicted": at_predicted, "exact": True}
        lo = 1
    step = 0.05
    while hi is None:
        b = max(lo + 1, int(lo * (1 + step)))
        if trials.run(b)["ok"]:
            lo, step = b, step * 2
        else:
            hi = b
    exact = True
    while hi - lo > 1:
        if time.perf_counter() > deadline and hi - lo <= max(1, lo // 50):
            exact = False
            break
        mid = (lo + hi) // 2
        if trials.run(mid)["ok"]:
            lo = mid
        else:
            hi = mid
    return {"real_max_batch": lo, "ok_at_predicted": at_predicted, "exact": exact, "first_failing": hi}


def _fit(steps: list[dict[str, Any]], layout: ParamLayout | None = None) -> Any:
    return fit([Step.from_dict(d) for d in steps], optimizer="AdamW", param_layout=layout)


def observe_unsharded(cfg: Config, layout: ParamLayout) -> tuple[Any, dict[str, Any]]:
    """The same model unsharded in one process on one GPU (rank 0's), observed the same way."""
    session = Session(cfg, 1, sharded=False)
    try:
        session.send("observe")
        (observed,) = session.gather("observed", timeout=300.0)
    finally:
        session.end()
    if observed["error"] or len(observed["steps"]) != 4:
        raise RuntimeError(f"unsharded observation: {len(observed['steps'])} steps ({observed['error']})")
    return _fit(observed["steps"], layout), observed


def run(cfg: Config, world: int, budget_s: float) -> dict[str, Any]:
    t0 = time.perf_counter()
    deadline = t0 + budget_s
    layout = param_layout(build_model(cfg))  # on the CPU, no device: sizes only
    out: dict[str, Any] = {"model": cfg.name, "world_size": world, "mode": "cpu-smoke" if cfg.smoke else "cuda",
                           "torch": torch.__version__, "python": platform.python_version(),
                           "emulated_device_memory": None if cfg.smoke else cfg.cap,
                           "observed": [cfg.observe[0]] * 3 + [cfg.observe[1]],
                           "param_layout": asdict(layout)}

    # (c) first: the unsharded single-GPU observation the sharding what-if is predicted from
    unsharded, unsharded_obs = observe_unsharded(cfg, layout)

    # the sharded observation, every rank attached
    session = Session(cfg, world, sharded=True)
    session.send("observe")
    observed = session.gather("observed", timeout=300.0)
    models = []
    for r, o in enumerate(observed):
        if o["error"] or len(o["steps"]) != 4:
            session.end()
            raise RuntimeError(f"rank {r}: agent gave {len(o['steps'])} steps for 4 ({o['error']})")
        models.append(_fit(o["steps"]))
    contexts = [m.context for m in models]

    def device_total(m: Any) -> int:
        return (fake_total if cfg.smoke else cfg.cap) + m.context

    fake_total = None
    if cfg.smoke:  # a fake device that holds about 6x the observed batch on the sharded fit
        fake_total = round(models[0].predict(WhatIf(batch_size=6 * cfg.observe[0])).peak_allocated)
        session.send("fake_total", fake_total)
    per_rank_max = [m.max_batch(device_total(m)) or 0 for m in models]
    predicted = min(per_rank_max)
    trials = Trials(cfg, world, cfg.observe[1], fake_total)
    trials.adopt(session)
    trials.sessions = 1

    points = []
    for b in sorted({max(1, round(predicted * f)) for f in (0.25, 0.5)}):
        t = trials.run(b)
        points.append(_point(models, unsharded, world, b, t))
    real = real_largest(trials, predicted, deadline)
    at_pred = next((t for t in trials.log if t["batch"] == predicted and t["ok"]), None)
    if at_pred is not None:
        points.append(_point(models, unsharded, world, predicted, at_pred))
    trials.close()

    shard = WhatIf(shards=world)
    unsharded_total = (fake_total if cfg.smoke else cfg.cap) + unsharded.context
    what_if_max = unsharded.max_batch(unsharded_total, shard) or 0
    plain_max = unsharded.max_batch(unsharded_total) or 0
    # the same what-if without the layout (the upper bound a user gets today: the agent reports no layout) and
    # with nothing gathered (the rule before FSDP's gathered units were counted), for comparison
    steps_unsharded = unsharded_obs["steps"]
    bound_max = _fit(steps_unsharded).max_batch(unsharded_total, shard) or 0
    nothing_gathered = _fit(steps_unsharded, ParamLayout(0, 0, 0)).max_batch(unsharded_total, shard) or 0
    errors = [abs(p["predicted_peak"] - p["measured_peak"]) / p["measured_peak"] * 100 for p in points
              if p["measured_peak"]]
    w_errors = [abs(p["what_if_peak"] - p["measured_peak"]) / p["measured_peak"] * 100 for p in points
                if p["measured_peak"]]
    out.update({
        "points": [{k: p[k] for k in ("batch", "predicted_peak", "measured_peak")} for p in points],
        "predicted_max_batch": predicted, "predicted_max_batch_per_rank": per_rank_max, **real,
        "max_batch_ratio": predicted / real["real_max_batch"] if real["real_max_batch"] else None,
        "mean_error_pct": sum(errors) / len(errors) if errors else None,
        "worst_error_pct": max(errors) if errors else None,
        "basis": models[0].predict(device_total=device_total(models[0])).basis,
        "what_if_from_unsharded": {
            "observed_unsharded_steps": unsharded_obs["steps"], "unsharded_max_batch": plain_max,
            "predicted_max_batch": what_if_max, "real_max_batch": real["real_max_batch"],
            "predicted_max_batch_without_layout": bound_max, "predicted_max_batch_nothing_gathered": nothing_gathered,
            "ratio": what_if_max / real["real_max_batch"] if real["real_max_batch"] else None,
            "points": [{"batch": p["batch"], "predicted_peak": p["what_if_peak"], "measured_peak": p["measured_peak"]}
                       for p in points],
            "mean_error_pct": sum(w_errors) / len(w_errors) if w_errors else None,
            "worst_error_pct": max(w_errors) if w_errors else None,
            "assumptions": list(unsharded.predict(shard, device_total=unsharded_total).basis_fields.what_if),
        },
        "ranks": [{"rank": r, "observed_steps": observed[r]["steps"], "context": contexts[r],
                   "predicted_max_batch": per_rank_max[r],
                   "points": [{"batch": p["batch"], "predicted_peak": p["per_rank_predicted"][r],
                               "measured_peak": p["per_rank_measured"][r]} for p in points]}
                  for r in range(world)],
        "trials": trials.log, "sessions": trials.sessions,
        "device_total_for_prediction": [device_total(m) for m in models],
        "fake_device_total": fake_total,
        "seconds": round(time.perf_counter() - t0, 1),
    })
    return out


def _point(models: list[Any], unsharded: Any, world: int, b: int, trial: dict[str, Any]) -> dict[str, Any]:
    """Predicted (largest over the ranks) and measured per-rank peaks at ``b``; the what-if's from unsharded."""
    pred = [round(m.predict(WhatIf(batch_size=b)).peak_allocated) for m in models]
    measured = [r.get("peak_allocated") for r in trial["per_rank"]]
    return {"batch": b, "predicted_peak": max(pred), "per_rank_predicted": pred,
            "measured_peak": max(measured) if trial["ok"] and None not in measured else None,
            "per_rank_measured": measured,
            "what_if_peak": round(unsharded.predict(WhatIf(batch_size=b, shards=world)).peak_allocated)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="JSON results")
    ap.add_argument("--cpu-smoke", action="store_true", help="a tiny decoder, 2 gloo processes on the CPU")
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--budget-s", type=float, default=200.0, help="bisection stops at 2%% past this (default 200)")
    ap.add_argument("--cap-gib", type=float, default=24.0, help="emulated device size per rank (default 24)")
    args = ap.parse_args(argv)
    if args.world_size < 1 or args.budget_s <= 0 or args.cap_gib <= 0:
        print("fsdp_predict: --world-size, --budget-s and --cap-gib must be positive", file=sys.stderr)
        return 2
    if args.cpu_smoke:
        cfg = Config(vocab=512, seq=32, d=64, heads=4, layers=2, observe=(8, 4), smoke=True, trial_timeout_s=60.0)
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() < args.world_size:
            print(f"fsdp_predict: needs {args.world_size} CUDA devices (or --cpu-smoke)", file=sys.stderr)
            return 2
        cfg = Config(cap=round(args.cap_gib * GIB))
    try:
        doc = run(cfg, args.world_size, args.budget_s)
    except RuntimeError as exc:
        print(f"fsdp_predict: {exc}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    w = doc["what_if_from_unsharded"]
    print(f"{doc['model']} on {doc['world_size']} ranks: predicted largest batch {doc['predicted_max_batch']}, real "
          f"{doc['real_max_batch']}{'' if doc['exact'] else ' (to 2%)'}; peak error mean "
          f"{doc['mean_error_pct']}, worst {doc['worst_error_pct']} %; from the unsharded run with WhatIf(shards="
          f"{doc['world_size']}): {w['predicted_max_batch']} (peak error worst {w['worst_error_pct']} %); "
          f"{doc['sessions']} session(s), {doc['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
