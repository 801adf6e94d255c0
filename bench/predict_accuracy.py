"""How well does batchmon's memory model predict? Peak memory at larger batches and the largest batch, on a GPU.

For each architecture (MLP, CNN, GPT-style LM in fp32, tied-weight GPT under bf16 autocast):

1. a fresh model trains 3 steps at two small batch sizes (the larger first, as a run whose last batch is short);
   each step is measured the way the agent measures it (components per DESIGN.md, allocator peak, reserved,
   NVML per-process use) and becomes a protocol.Step;
2. batchmon.memory_model.fit() on those steps predicts the largest batch that fits the device, and the peak
   allocated at four batch sizes up to it (25/50/75/100% of the predicted largest batch);
3. those four batch sizes are run, one step each, and torch.cuda.max_memory_allocated() is compared;
4. the real largest batch is found by bisection (each trial one step from a clean allocator: cache emptied,
   peak stats reset; torch.cuda.OutOfMemoryError caught);
5. Lightning's batch-size finder ('binsearch' mode: start at 2, double until OOM, then bisect) is simulated on
   the same model, counting its trials, steps (Lightning runs 3 steps a trial by default) and OOMs.

Usage (GPU with torch; no textual, no agent needed):  python3 bench/predict_accuracy.py [--quick]
Results: $OUT/predict_accuracy.json and $OUT/predict_accuracy.md (OUT defaults to ./out); the table is printed.
`--cpu-smoke` runs the same code on tiny CPU models against a fake device size (a test of the script itself:
its "peak" is the sum of the measured components, so its errors say nothing about a real allocator).

Over 400 lines: the models, the two searches (batchmon's and Lightning's), the per-architecture comparison
and the report are one experiment; the devices and the Runner are in bench/bench_runner.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torch.utils.checkpoint  # noqa: E402

from batchmon.memory_model import MemoryModel, WhatIf, fit  # noqa: E402
from batchmon.protocol import ADDED_FIELDS, Step, with_added  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_runner.py beside this file
from bench_runner import (BLOCK, OOM, OOM_LIKE, Arch, CudaDevice, Runner, SmokeDevice,  # noqa: E402,F401 - re-exported
                          _storage_bytes)

LIGHTNING_STEPS_PER_TRIAL = 3  # Lightning's scale_batch_size default
LIGHTNING_INIT = 2
LIGHTNING_MAX_TRIALS = 25


# ----------------------------------------------------------------------------------------------- models


class MLP(nn.Module):
    """The seed's network: L Linear+ReLU layers of width H, applied per token of a (B, T, H) input."""

    def __init__(self, width: int, layers: int, out: int) -> None:
        super().__init__()
        body: list[nn.Module] = []
        for _ in range(layers):
            body += [nn.Linear(width, width), nn.ReLU()]
        self.body = nn.Sequential(*body)
        self.head = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class CNN(nn.Module):
    """Conv3x3-BatchNorm-ReLU blocks at full resolution (large per-sample activations), pooled classifier."""

    def __init__(self, channels: int, layers: int, classes: int = 10) -> None:
        super().__init__()
        blocks: list[nn.Module] = [nn.Conv2d(3, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
        for _ in range(layers - 1):
            blocks += [nn.Conv2d(channels, channels, 3, padding=1, bias=False), nn.BatchNorm2d(channels), nn.ReLU()]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, d: int, heads: int, layers: int, tied: bool) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)
        if tied:
            self.head.weight = self.tok.weight
        self.checkpointing = False

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            if self.checkpointing:
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.head(self.ln(x))


def _adam(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.Adam(m.parameters(), lr=1e-4)


def _adamw(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(m.parameters(), lr=1e-4)


def _sgdm(m: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9)


def _ce_tokens(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def architectures(smoke: bool) -> list[Arch]:
    s = smoke
    seq, width, mlp_layers = (16, 32, 4) if s else (1024, 256, 32)
    img, ch, cnn_layers = (8, 8, 3) if s else (64, 64, 16)
    vocab, tseq, d, heads, gpt_layers = (64, 16, 32, 4, 2) if s else (2048, 512, 512, 8, 8)

    def mlp_batch(b, dev, g):
        return (torch.randn(b, seq, width, device=dev, generator=g), torch.randn(b, seq, 16, device=dev, generator=g))

    def img_batch(b, dev, g):
        return (torch.randn(b, 3, img, img, device=dev, generator=g), torch.randint(0, 10, (b,), device=dev, generator=g))

    def tok_batch(b, dev, g):
        x = torch.randint(0, vocab, (b, tseq + 1), device=dev, generator=g)
        return x[:, :-1].contiguous(), x[:, 1:].contiguous()

    return [
        Arch("mlp", f"ReLU MLP {mlp_layers}x{width} per token, T={seq}, fp32, Adam",
             lambda: MLP(width, mlp_layers, 16), _adam, mlp_batch, F.mse_loss, (8, 4) if s else (64, 32)),
        Arch("cnn", f"CNN {cnn_layers}x conv3x3-BN-ReLU, {ch} ch, {img}x{img}, fp32, SGD-momentum",
             lambda: CNN(ch, cnn_layers), _sgdm, img_batch, F.cross_entropy, (8, 4) if s else (64, 32)),
        Arch("gpt", f"GPT {gpt_layers}L d={d} T={tseq} V={vocab}, fp32, AdamW",
             lambda: GPT(vocab, tseq, d, heads, gpt_layers, tied=False), _adamw, tok_batch, _ce_tokens,
             (4, 2) if s else (16, 8)),
        Arch("gpt-amp-tied", f"GPT {gpt_layers}L d={d} T={tseq} V={vocab}, tied embeddings, bf16 autocast, AdamW",
             lambda: GPT(vocab, tseq, d, heads, gpt_layers, tied=True), _adamw, tok_batch, _ce_tokens,
             (4, 2) if s else (32, 16), amp=True),
    ]


# ----------------------------------------------------------------------------------------------- searches


def real_boundary(runner: Runner, start_ok: int | None, start_bad: int | None, precision: float,
                  log: list[dict[str, Any]]) -> tuple[int, int]:
    """Largest batch that runs, by search up from a known-good batch then bisection. Returns (batch, trials)."""
    trials = 0

    def run(b: int) -> bool:
        nonlocal trials
        trials += 1
        r = runner.trial(b)
        log.append(r)
        return r["ok"]

    lo, hi = start_ok, start_bad
    if lo is None:
        lo = 1
        if not run(1):
            return 0, trials
    step = 0.04  # up by 4%, then 8%, 16%, ... until a trial runs out of memory
    while hi is None:
        b = max(lo + 1, math.ceil(lo * (1 + step)))
        if run(b):
            lo, step = b, step * 2
        else:
            hi = b
    while hi - lo > max(1, int(lo * precision)):
        mid = (lo + hi) // 2
        if run(mid):
            lo = mid
        else:
            hi = mid
    return lo, trials


def lightning_binsearch(runner: Runner, log: list[dict[str, Any]]) -> dict[str, int]:
    """Lightning's scale_batch_size(mode='binsearch'): double from init_val until OOM, then bisect."""
    new_size, low, high, count, trials, ooms, steps = LIGHTNING_INIT, 1, None, 0, 0, 0, 0
    while True:
        trials += 1
        r = runner.trial(new_size)
        log.append(r)
        if r["ok"]:
            steps += LIGHTNING_STEPS_PER_TRIAL
            count += 1
            if count > LIGHTNING_MAX_TRIALS:
                break
            low = new_size
            if high:
                if high - low <= 1:
                    break
                new_size = (high + low) // 2
            else:
                new_size = new_size * 2
        else:
            steps += 1  # the OOM ends the trial's first step
            ooms += 1
            high = new_size
            new_size = (high + low) // 2
            if high - low <= 1:
                break
    return {"found": new_size, "trials": trials, "ooms": ooms, "steps": steps}


# ----------------------------------------------------------------------------------------------- one architecture


def pct(pred: int, real: int) -> float:
    return abs(pred - real) / real * 100.0


def observe_with_agent(runner: Runner, sizes: list[int]) -> tuple[list[Step] | None, str]:
    """The observed steps as batchmon's own agent reports them (None and why, when it can't)."""
    try:
        from batchmon.agent import handle as bm_agent
    except Exception as exc:  # noqa: BLE001 - the bench runs without the agent too
        return None, f"agent not importable: {type(exc).__name__}: {exc}"
    folder = tempfile.mkdtemp(prefix="batchmon-bench-")
    readings: list[int | None] = []
    allocator: list[dict[str, Any]] = []
    try:
        handle = bm_agent.attach(runner.model, runner.opt, activation_every=1, socket_dir=folder)
        try:
            for b in sizes:
                runner.step(b, count=False)
                runner.dev.sync()
                stats = runner.dev.stats() if runner.dev.kind == "cuda" else {}
                readings.append(stats.get("device_used"))
                # the allocator after the step, as the bench reads it (inactive split: free space inside live
                # segments, the fragmentation a retry cannot release), for deriving the margin offline
                allocator.append({k: stats.get(k) for k in ("reserved", "inactive_split_peak", "num_alloc_retries")})
            steps = list(handle.steps)
            error = handle.error
        finally:
            handle.detach()
    except Exception as exc:  # noqa: BLE001
        return None, f"agent failed: {type(exc).__name__}: {exc}"
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    if error or len(steps) != len(sizes):
        return None, f"agent gave {len(steps)} steps for {len(sizes)} ({error or 'no error'})"
    # The agent samples NVML once a second on its thread, so its device_used can predate the step's pool (run 1:
    # 813 MB against 2.6 GB reserved, context 0). The bench reads the process's use synchronously after each
    # step (same pool as the step's reserved) and uses that; the agent's figure is kept as agent_device_used.
    runner.agent_device_used = [step.device_used for step in steps]  # type: ignore[attr-defined]
    runner.observed_allocator = allocator  # type: ignore[attr-defined]
    replaced = 0
    for i, (step, used) in enumerate(zip(steps, readings)):
        if step.peak_allocated is not None and used is not None and used != step.device_used:
            # the added fields (saved_split, inactive_split) are not __init__ arguments: replace() would drop them
            added = {k: getattr(step, k) for k in ADDED_FIELDS if getattr(step, k) is not None}
            steps[i] = with_added(replace(step, device_used=used), **added)
            replaced += 1
    how = "batchmon.agent.handle"
    if replaced:
        how += f" (device_used read by the bench after each step, {replaced} differed from the agent's NVML sample)"
    return steps, how


def bench_arch(arch: Arch, dev: Any, quick: bool, deadline: float, observer: str) -> dict[str, Any]:
    t0 = time.perf_counter()
    dev.clean()
    runner = Runner(arch, dev)
    n_params = sum(p.numel() for p in runner.model.parameters())
    big, small = arch.observe
    steps, how = None, "bench accounting"
    if observer == "agent":
        steps, how = observe_with_agent(runner, [big, big, small])
        if steps is None:
            print(f"{arch.name}: {how}; observing with the bench's own accounting", file=sys.stderr)
            how = f"bench accounting ({how})"
    if steps is None:
        steps = [runner.observe(big), runner.observe(big), runner.observe(small)]
    model = fit(steps, optimizer=type(runner.opt).__name__, amp=arch.amp)
    assert model is not None
    pred_max = model.max_batch(dev.total) or 0
    pred_max_no_margin = model.max_batch(dev.total, margin=0) or 0
    result: dict[str, Any] = {
        "arch": arch.name, "description": arch.description, "parameters": n_params, "observer": how,
        "observed": [s.to_dict() for s in steps], "basis": model.basis,
        "fit": {"lines": {k: [v.fixed, v.per_sample] for k, v in model.lines.items()}, "cache": model.cache,
                "context": model.context, "frag_ratio": model.frag_ratio, "alloc_retries": model.alloc_retries},
        "agent_device_used": getattr(runner, "agent_device_used", None),
        "device_total": dev.total, "predicted_max_batch": pred_max, "predicted_max_batch_without_margin": pred_max_no_margin,
        "predicted_max_batch_central": model.predict(device_total=dev.total).max_batch_central,
    }
    log: list[dict[str, Any]] = []

    # 1. four batch sizes up to the predicted largest batch: predicted vs measured peak allocated
    points = []
    for frac in (0.25, 0.5, 0.75, 1.0):
        b = max(1, round(pred_max * frac))
        p = model.predict(WhatIf(batch_size=b), device_total=dev.total)
        r = runner.trial(b)
        log.append(r)
        points.append({"batch": b, "predicted_peak": p.peak_allocated, "measured_peak": r["peak_allocated"],
                       "ok": r["ok"], "error_pct": pct(p.peak_allocated, r["peak_allocated"]) if r["ok"] else None,
                       "predicted_total": p.total, "measured_reserved": r["reserved"]})
    errors = [pt["error_pct"] for pt in points if pt["error_pct"] is not None]
    result["points"] = points
    result["mean_error_pct"] = statistics.mean(errors) if errors else None
    result["worst_error_pct"] = max(errors) if errors else None
    batchmon_ooms = sum(1 for pt in points if not pt["ok"])
    result["batchmon_ooms"] = batchmon_ooms
    result["batchmon_steps"] = len(steps)

    # 2. the real boundary, starting from what is known to run (or not)
    ok_batches = [pt["batch"] for pt in points if pt["ok"]]
    bad_batches = [pt["batch"] for pt in points if not pt["ok"]]
    real, trials = real_boundary(runner, max(ok_batches) if ok_batches else None,
                                 min(bad_batches) if bad_batches else None, 0.005 if quick else 0.0, log)
    result["real_max_batch"] = real
    result["boundary_trials"] = trials
    result["boundary_exact"] = not quick
    result["max_batch_error_pct"] = pct(pred_max, real) if real else None
    result["max_batch_ratio"] = pred_max / real if real else None

    # 3. Lightning's finder on the same model
    if time.perf_counter() < deadline:
        result["lightning"] = lightning_binsearch(runner, log)
    else:
        result["lightning"] = None
    result["trials"] = log
    result["seconds"] = round(time.perf_counter() - t0, 1)
    del runner
    dev.clean()
    return result


def what_if_checks(arch: Arch, dev: Any, model_fp32: MemoryModel, batch: int) -> list[dict[str, Any]]:
    """Each what-if predicted from the fp32 observation, then run for real at one batch size."""
    out = []

    def measure(make: Callable[[], Runner], b: int, accumulation: int = 1) -> dict[str, Any]:
        dev.clean()
        runner = make()
        runner.step(max(1, b // 64), count=False)  # optimizer state exists, as in a running job
        r = runner.trial(b, accumulation=accumulation)
        del runner
        dev.clean()
        return r

    def with_(**changes: Any) -> Callable[[], Runner]:
        def make() -> Runner:
            a = Arch(**{**arch.__dict__, **{k: v for k, v in changes.items() if k in arch.__dict__}})
            runner = Runner(a, dev)
            if changes.get("checkpointing"):
                runner.model.checkpointing = True
            return runner
        return make

    layers = len(getattr(arch.build(), "blocks", [])) or None
    cases = [
        ("amp (bf16 autocast)", WhatIf(batch_size=batch, amp=True), with_(amp=True), 1),
        ("optimizer -> sgd", WhatIf(batch_size=batch, optimizer="sgd"),
         with_(optimizer=lambda m: torch.optim.SGD(m.parameters(), lr=1e-3)), 1),
        ("accumulation x4", WhatIf(batch_size=batch, accumulation_steps=4), with_(), 4),
        (f"checkpointing ({layers} blocks)", WhatIf(batch_size=batch, checkpointing=True, checkpoint_layers=layers),
         with_(checkpointing=True), 1),
    ]
    for name, wi, make, acc in cases:
        p = model_fp32.predict(wi, device_total=dev.total)
        r = measure(make, batch, acc)
        out.append({"what_if": name, "batch": batch, "predicted_peak": p.peak_allocated,
                    "measured_peak": r["peak_allocated"], "ok": r["ok"],
                    "error_pct": pct(p.peak_allocated, r["peak_allocated"]) if r["ok"] else None})
    return out


# ----------------------------------------------------------------------------------------------- report


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def markdown(doc: dict[str, Any]) -> str:
    lines = [f"# batchmon predict_accuracy — {doc['device']} ({gib(doc['device_total'])} GiB), torch {doc['torch']}",
             "", f"mode: {doc['mode']}; {doc['seconds']} s", "",
             "Predicted from 3 observed steps at two small batch sizes (no OOM trial); measured one step each.", "",
             "| arch | params | observed batches | peak error mean % | worst % | predicted max batch | real max batch "
             "| pred/real | batchmon OOMs | Lightning trials | Lightning steps | Lightning OOMs | Lightning found |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in doc["results"]:
        lt = r.get("lightning") or {}
        lines.append(
            f"| {r['arch']} | {r['parameters'] / 1e6:.1f}M | {', '.join(str(s['batch_size']) for s in r['observed'])} "
            f"| {fmt(r['mean_error_pct'])} | {fmt(r['worst_error_pct'])} | {r['predicted_max_batch']} "
            f"| {r['real_max_batch']}{'' if r['boundary_exact'] else ' (±0.5%)'} | {fmt(r['max_batch_ratio'], '.3f')} "
            f"| {r['batchmon_ooms']} | {lt.get('trials', '-')} | {lt.get('steps', '-')} | {lt.get('ooms', '-')} "
            f"| {lt.get('found', '-')} |")
    lines += ["", "Per point (peak allocated, GiB):", "", "| arch | batch | predicted | measured | error % |",
              "|---|---:|---:|---:|---:|"]
    for r in doc["results"]:
        for pt in r["points"]:
            lines.append(f"| {r['arch']} | {pt['batch']} | {gib(pt['predicted_peak'])} | "
                         f"{gib(pt['measured_peak']) if pt['ok'] else 'OOM'} | {fmt(pt['error_pct'])} |")
    if doc.get("what_if"):
        lines += ["", f"What-ifs predicted from the fp32 {doc['what_if_arch']} observation, then run:", "",
                  "| what-if | batch | predicted GiB | measured GiB | error % |", "|---|---:|---:|---:|---:|"]
        for w in doc["what_if"]:
            lines.append(f"| {w['what_if']} | {w['batch']} | {gib(w['predicted_peak'])} | "
                         f"{gib(w['measured_peak']) if w['ok'] else 'OOM'} | {fmt(w['error_pct'])} |")
    s = doc["summary"]
    lines += ["", f"Summary: mean peak error {fmt(s['mean_error_pct'])}% (target ≤ 3), worst {fmt(s['worst_error_pct'])}% "
              f"(target ≤ 5); largest batch within {fmt(s['worst_max_batch_error_pct'])}% of the real boundary "
              f"(target ≤ 5) with {s['batchmon_ooms']} OOM trials; Lightning's finder needed {s['lightning_trials']} "
              f"trials ({s['lightning_steps']} steps) and {s['lightning_ooms']} OOMs in all."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="boundary to 0.5%% instead of exact; no what-if checks")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny CPU models against a fake device (tests the script)")
    ap.add_argument("--arch", default="", help="comma-separated subset of: mlp, cnn, gpt, gpt-amp-tied")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later parts are skipped past it")
    ap.add_argument("--observer", choices=("auto", "agent", "bench"), default="auto",
                    help="who measures the observed steps: batchmon's agent, or the bench's own accounting "
                         "(auto: the agent on CUDA when importable, the bench's accounting with --cpu-smoke)")
    args = ap.parse_args(argv)
    out = Path(os.environ.get("OUT", "./out"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    deadline = start + args.budget

    if args.cpu_smoke:
        dev: Any = SmokeDevice(total=12 << 20)
    elif not torch.cuda.is_available():
        print("predict_accuracy: no CUDA device (use --cpu-smoke to test the script on CPU)", file=sys.stderr)
        return 2
    else:
        dev = CudaDevice()
    archs = architectures(args.cpu_smoke)
    if args.arch:
        wanted = set(args.arch.split(","))
        archs = [a for a in archs if a.name in wanted]

    observer = args.observer if args.observer != "auto" else ("bench" if args.cpu_smoke else "agent")
    results = []
    for arch in archs:
        if time.perf_counter() > deadline:
            print(f"skipping {arch.name}: past the time budget", file=sys.stderr)
            continue
        r = bench_arch(arch, dev, args.quick, deadline, observer)
        results.append(r)
        lt = r.get("lightning") or {}
        print(f"{arch.name}: peak error mean {fmt(r['mean_error_pct'])}% worst {fmt(r['worst_error_pct'])}%; "
              f"max batch predicted {r['predicted_max_batch']} real {r['real_max_batch']}; "
              f"Lightning {lt.get('trials')} trials {lt.get('ooms')} OOMs; {r['seconds']} s", flush=True)

    what_if: list[dict[str, Any]] = []
    gpt = next((a for a in archs if a.name == "gpt"), None)
    gpt_result = next((r for r in results if r["arch"] == "gpt"), None)
    if gpt and gpt_result and not args.quick and time.perf_counter() < deadline:
        steps = [Step.from_dict(s) for s in gpt_result["observed"]]
        model = fit(steps, optimizer="AdamW")
        batch = max(1, gpt_result["real_max_batch"] // 3)
        what_if = what_if_checks(gpt, dev, model, batch)

    errors = [e for r in results for e in (pt["error_pct"] for pt in r["points"]) if e is not None]
    mb_errors = [r["max_batch_error_pct"] for r in results if r["max_batch_error_pct"] is not None]
    lts = [r["lightning"] for r in results if r.get("lightning")]
    doc = {
        "device": dev.name, "device_total": dev.total, "torch": torch.__version__, "python": platform.python_version(),
        "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "mode": ("cpu-smoke" if args.cpu_smoke else "cuda") + (" quick" if args.quick else ""),
        "seconds": round(time.perf_counter() - start, 1), "results": results, "what_if": what_if, "what_if_arch": "gpt",
        "summary": {
            "mean_error_pct": statistics.mean(errors) if errors else None,
            "worst_error_pct": max(errors) if errors else None,
            "worst_max_batch_error_pct": max(mb_errors) if mb_errors else None,
            "batchmon_ooms": sum(r["batchmon_ooms"] for r in results),
            "lightning_trials": sum(lt["trials"] for lt in lts), "lightning_steps": sum(lt["steps"] for lt in lts),
            "lightning_ooms": sum(lt["ooms"] for lt in lts),
        },
    }
    (out / "predict_accuracy.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    (out / "predict_accuracy.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
