"""Prediction truth on architectures nobody here tuned on (issue 13, point 5), on one GPU.

For each architecture, built from a config (no downloads): observe 3 steps at a small batch and a short last
batch through batchmon's real agent (bench/predict_accuracy.py's observe_with_agent), fit, predict the peak at
a few batch sizes and the largest batch; then run those batch sizes for real and find the real largest batch by
bisection (each trial one step from a clean allocator). GPT-2 and T5 also run their AMP and checkpointing
what-ifs for real, ViT-B/16 its AMP what-if: the what-if's largest batch predicted from the fp32 observation -
derived from the split the agent measured on a sampled step (Step.saved_split: batchmon.agent.saved_split), as a
user's monitor predicts it, with the documented rules' answer beside it - against the real one under the what-if.

The device is emulated smaller with ``torch.cuda.set_per_process_memory_fraction`` (default 24 GiB of the
H200's 141 GiB) so that bisection is fast: the caching allocator raises OutOfMemoryError past the cap. The cap
bounds what the allocator reserves, not the CUDA context, so the prediction's device size is cap + the measured
context (the model's ``total`` counts the context); the JSON says so.

Usage (H200, from the checkout; the whole run is budgeted to finish within 9 minutes):
    python3 bench/predict_zoo.py --out bench/results/predict_zoo_h200.json
    python3 bench/predict_zoo.py --markdown bench/results/predict_zoo_h200.json   # README table
    python3 bench/predict_zoo.py --cpu-smoke --out /tmp/zoo.json                  # tiny, on CPU: tests the script
    python3 bench/predict_zoo.py --reevaluate bench/results/predict_zoo_h200.json # the current model, offline
    python3 bench/predict_zoo.py --reevaluate RUN.json --splits SPLITS.json  # what-ifs from a given split
    python3 bench/predict_zoo.py --merge a.json b.json --out bench/results/predict_zoo_h200.json  # two calls

JSON: {"device", "emulated_device_memory", "emulation", ..., "results": [{arch, points: [{batch,
predicted_peak, measured_peak}], predicted_max_batch, real_max_batch, what_ifs: [{what_if, predicted_max_batch,
real_max_batch, spec, trial_log, timing}], observed_steps, observed_allocator, fit, trials, timing, ...}]}.
Everything a later model change needs is recorded: the observed steps as the agent reported them (``--reevaluate``
refits on them without a GPU), each trial's allocator figures (reserved and inactive split bytes at the boundary:
what the margin must cover), the peak of each phase of a step at the observed batch sizes (forward, backward with
the loss's backward apart, optimizer), and step times (plain, 2 and 4 accumulation micro-batches, each what-if) at one
batch: the advisor's step-time factors measured on the device. The observed steps carry each phase's own peak
(``phase_own_peaks``, the agent's sampled CUDA steps) and each segment's (``segment_peaks``: the backward split
where the model output's gradient arrives), so ``--reevaluate`` refits per segment (per phase on a file recorded
before the split); ``predicted_max_batch_per_phase`` is the same steps fitted per phase. What explains a miss afterwards:
``phase_peaks_at_real`` (each segment's own peak at the real largest batch, plain and under each what-if; since
run 9 ``model_backward``, the model's backward's own, beside the whole backward's; bench/zoo_segments.py sets
them against the model's segment lines; since run 9 also ``block_backward_peaks``, each checkpointed block's
backward's peak) and ``amp_walk_detail`` (the agent's graph walk per saving op at the small batch: bytes now,
under autocast), since run 9 beside ``amp_real_detail`` (what the autocast forward's own graph saved, per first
saving op, field and dtype). Over 400 lines: one runner
for eleven architectures, their what-ifs and timings (the models are in bench/zoo_models.py, the offline half -
reevaluate, merge, the table - in bench/zoo_offline.py, its side measurements in bench/zoo_probes.py). With
--cpu-smoke the "peak" is the sum of measured
components on a fake device (SmokeDevice), so its figures say nothing about a real allocator.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))  # predict_accuracy.py beside this file
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # batchmon from the checkout

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import predict_accuracy  # noqa: E402
from batchmon.memory_model import SavedSplit, WhatIf, fit  # noqa: E402
from batchmon.protocol import Step, with_saved_split  # noqa: E402
from zoo_models import HFLogits, GRUSeq2Seq, LSTMLM, UNet  # noqa: E402
from zoo_probes import measure_saved_split, phase_peaks  # noqa: E402
from zoo_offline import (exact_boundary, markdown, merge, per_phase_max, reevaluate,  # noqa: E402,F401 - CLI, tests
                         reevaluation_text, step_peaks_only_max, with_inactive_split)
from predict_accuracy import (GPT, OOM_LIKE, Arch, CudaDevice, Runner, SmokeDevice, observe_with_agent,  # noqa: E402
                              pct)

GIB = 2**30
BUDGET_S = 510.0


def _replace_keeping_split(obj: Any, **changes: Any) -> Any:
    """dataclasses.replace that keeps a Step's saved_split (an added field that is not an __init__ argument, so
    replace drops it): predict_accuracy.observe_with_agent replaces each step's device_used with the bench's own
    reading, and the agent's measured split must survive that."""
    made = dataclasses.replace(obj, **changes)
    split = getattr(obj, "saved_split", None)
    return with_saved_split(made, split) if split is not None and isinstance(made, Step) else made


predict_accuracy.replace = _replace_keeping_split  # type: ignore[attr-defined]
#: what each trial records: the allocator at the trial's end (reserved - peak at the boundary is the overhead a
#: margin must cover; inactive_split_peak the part of it inside live segments, which a retry cannot release)
TRIAL_FIELDS = ("batch", "ok", "peak_allocated", "reserved", "inactive_split_peak", "num_alloc_retries",
                "device_used", "seconds")
#: timed steps per measurement (after one warm-up step) for the measured step-time factors
TIMED_STEPS = 3
ACCUMULATION_TIMED = (2, 4)  # the whole run, leaving time to write the results inside the coordinator's 9 minutes


# ----------------------------------------------------------------------------------------------- the zoo


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross entropy on fp32 logits, as Hugging Face models compute their loss (logits.float())."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def _tokens(vocab: int, length: int, target: int | None = None) -> Callable:
    def batch(b: int, dev: torch.device, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randint(0, vocab, (b, length + 1), device=dev, generator=g)
        if target is None:
            return x[:, :-1].contiguous(), x[:, 1:].contiguous()
        return x[:, :-1].contiguous(), x[:, -target:].contiguous()  # y: the decoder part, shifted by one
    return batch


def _images(size: int, classes: int, dense: bool = False) -> Callable:
    def batch(b: int, dev: torch.device, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(b, 3, size, size, device=dev, generator=g)
        shape = (b, size, size) if dense else (b,)
        return x, torch.randint(0, classes, shape, device=dev, generator=g)
    return batch


def _opt(kind: str) -> Callable[[nn.Module], torch.optim.Optimizer]:
    def make(m: nn.Module) -> torch.optim.Optimizer:
        params = [p for p in m.parameters() if p.requires_grad]
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1)
        if kind == "sgdm":
            return torch.optim.SGD(params, lr=0.01, momentum=0.9)
        return torch.optim.AdamW(params, lr=1e-4)
    return make


@dataclass
class Entry:
    arch: Arch
    optimizer_name: str
    needs: str = ""  # module to import first ("torchvision", "transformers"): skipped without it
    what_ifs: tuple[str, ...] = ()  # "amp", "checkpointing" (run for real)
    checkpoint_layers: int | None = None
    compiled: bool = False
    checkpointed: Callable[[], nn.Module] | None = None  # the model with a checkpoint per block (HF's switch)


def _hf_gpt2(smoke: bool, checkpointing: bool = False) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=64) if smoke else GPT2Config()
    model = GPT2LMHeadModel(cfg)
    model.config.use_cache = False
    if checkpointing:
        model.gradient_checkpointing_enable()
    return HFLogits(model)


def _tv(name: str, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None, **kw)
    return build


def zoo(smoke: bool) -> list[Entry]:
    """The architectures (tiny shapes with smoke). Observed at (larger, smaller) batch sizes."""
    s = smoke
    out: list[Entry] = []
    v, h, seq = (100, 16, 8) if s else (33278, 650, 35)
    out.append(Entry(Arch("lstm-lm", f"LSTM LM V={v} 2x{h} T={seq}, fp32, SGD", lambda: LSTMLM(v, h), _opt("sgd"),
                          _tokens(v, seq), _ce, (20, 10)), "SGD"))
    gv, gh, src, tgt = (100, 16, 6, 4) if s else (10000, 512, 40, 30)
    out.append(Entry(Arch("gru-seq2seq", f"GRU encoder-decoder V={gv} H={gh} {src}->{tgt}, fp32, AdamW",
                          lambda: GRUSeq2Seq(gv, gh, src), _opt("adamw"), _tokens(gv, src + tgt, tgt), _ce,
                          (8, 4) if s else (64, 32)), "AdamW"))
    img = 32 if s else 224
    out.append(Entry(Arch("vit-b16", "ViT-B/16 224, fp32, AdamW",
                          _tv("vit_b_16") if not s else _tv("vit_b_16", image_size=32), _opt("adamw"),
                          _images(img, 1000), F.cross_entropy, (4, 2) if s else (16, 8)), "AdamW", "torchvision",
                     what_ifs=("amp",)))
    out.append(Entry(Arch("resnet50", "ResNet-50 224, fp32, SGD momentum", _tv("resnet50"), _opt("sgdm"),
                          _images(img, 1000), F.cross_entropy, (4, 2) if s else (32, 16)), "SGD", "torchvision"))
    out.append(Entry(Arch("efficientnet-b0", "EfficientNet-B0 224, fp32, AdamW", _tv("efficientnet_b0"), _opt("adamw"),
                          _images(img, 1000), F.cross_entropy, (4, 2) if s else (32, 16)), "AdamW", "torchvision"))
    out.append(Entry(Arch("convnext-tiny", "ConvNeXt-T 224, fp32, AdamW", _tv("convnext_tiny"), _opt("adamw"),
                          _images(img, 1000), F.cross_entropy, (4, 2) if s else (16, 8)), "AdamW", "torchvision"))
    ui, ub = (32, 2) if s else (256, 32)
    out.append(Entry(Arch("unet", f"UNet 4 levels base {ub}, {ui}x{ui}, 2 classes, fp32, AdamW", lambda: UNet(ub),
                          _opt("adamw"), _images(ui, 2, dense=True), F.cross_entropy, (4, 2) if s else (8, 4)),
                     "AdamW"))

    def bert() -> nn.Module:
        from transformers import BertConfig, BertForMaskedLM

        cfg = (BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          vocab_size=256, max_position_embeddings=64) if s else BertConfig())
        return HFLogits(BertForMaskedLM(cfg))

    bv, bseq = (256, 32) if s else (30522, 512)
    out.append(Entry(Arch("bert-base-amp", f"BERT-base MLM T={bseq}, bf16 autocast, AdamW", bert, _opt("adamw"),
                          _tokens(bv, bseq), _ce, (4, 2) if s else (8, 4), amp=True), "AdamW", "transformers"))
    pv, pseq = (256, 32) if s else (50257, 512)
    out.append(Entry(Arch("gpt2-fp32", f"GPT-2 124M (HF) T={pseq}, fp32, AdamW, loss on logits.float()",
                          lambda: _hf_gpt2(s), _opt("adamw"), _tokens(pv, pseq), _ce, (4, 2) if s else (4, 2)),
                     "AdamW", "transformers", what_ifs=("amp", "checkpointing"), checkpoint_layers=2 if s else 12,
                     checkpointed=lambda: _hf_gpt2(s, checkpointing=True)))

    def t5(checkpointing: bool = False) -> nn.Module:
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = (T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=256) if s else
               T5Config(d_model=512, d_ff=2048, num_layers=6, num_heads=8, d_kv=64, vocab_size=32128))
        cfg.use_cache = False
        model = T5ForConditionalGeneration(cfg)
        if checkpointing:
            model.gradient_checkpointing_enable()
        return HFLogits(model, src_len=t5_src)

    t5_src, t5_tgt, t5v = (16, 8, 256) if s else (512, 128, 32128)
    out.append(Entry(Arch("t5-small", f"T5-small {t5_src}->{t5_tgt}, fp32, AdamW", t5, _opt("adamw"),
                          _tokens(t5v, t5_src + t5_tgt, t5_tgt), _ce, (4, 2) if s else (8, 4)),
                     "AdamW", "transformers", what_ifs=("amp", "checkpointing"),
                     checkpointed=lambda: t5(checkpointing=True)))
    cv, cseq, cd, ch, cl = (64, 16, 32, 4, 2) if s else (8192, 512, 512, 8, 8)
    out.append(Entry(Arch("gpt-compiled", f"GPT {cl}L d={cd} T={cseq} under torch.compile(dynamic=True), fp32, AdamW",
                          lambda: torch.compile(GPT(cv, cseq, cd, ch, cl, tied=False), dynamic=True,
                                                backend="eager" if s else "inductor"), _opt("adamw"),
                          _tokens(cv, cseq), _ce, (4, 2) if s else (8, 4)), "AdamW", compiled=True))
    return out


# ----------------------------------------------------------------------------------------------- measuring


def _available(needs: str) -> str | None:
    if not needs:
        return None
    try:
        __import__(needs)
    except Exception as exc:  # noqa: BLE001 - an optional library missing is a skipped architecture
        return f"{needs} not importable ({type(exc).__name__})"
    return None


def _trial(runner: Runner, b: int, log: list[dict[str, Any]]) -> dict[str, Any]:
    try:
        r = runner.trial(b)
    except RuntimeError as exc:  # a compiled graph's OOM can surface as another RuntimeError
        if not any(text in str(exc) for text in OOM_LIKE):
            raise
        r = {"batch": b, "ok": False, "failure": " ".join(str(exc).split())[:160], "peak_allocated": None}
    log.append({k: r.get(k) for k in TRIAL_FIELDS})
    return r


def real_largest(runner: Runner, predicted: int, log: list[dict[str, Any]], deadline: float) -> dict[str, Any]:
    """The real largest batch, exact (to 1% past the deadline), by bisection around the prediction. A trial at
    the predicted batch comes first: whether a user who follows the prediction runs out of memory."""
    lo, hi = 0, None
    at_predicted = None
    if predicted > 0:
        at_predicted = _trial(runner, predicted, log)["ok"]
        lo, hi = (predicted, None) if at_predicted else (0, predicted)
    if lo == 0:
        if not _trial(runner, 1, log)["ok"]:
            return {"real_max_batch": 0, "ok_at_predicted": at_predicted, "exact": True}
        lo = 1
    step = 0.03
    while hi is None:
        b = max(lo + 1, int(lo * (1 + step)))
        if _trial(runner, b, log)["ok"]:
            lo, step = b, step * 2
        else:
            hi = b
    exact = True
    while hi - lo > 1:
        if time.perf_counter() > deadline and hi - lo <= max(1, lo // 100):
            exact = False
            break
        mid = (lo + hi) // 2
        if _trial(runner, mid, log)["ok"]:
            lo = mid
        else:
            hi = mid
    return {"real_max_batch": lo, "ok_at_predicted": at_predicted, "exact": exact, "first_failing": hi}


def time_steps(runner: Runner, batch: int, *, accumulation: int = 1, steps: int = TIMED_STEPS) -> float | None:
    """Median seconds of an optimizer step at ``batch`` (``accumulation`` micro-batches), after a warm-up step;
    None when it does not fit. For the advisor's step-time factors measured on the device."""
    try:
        runner.step(batch, count=False, accumulation=accumulation)
        runner.dev.sync()
        times = []
        for _ in range(steps):
            t0 = time.perf_counter()
            runner.step(batch, count=False, accumulation=accumulation)
            runner.dev.sync()
            times.append(time.perf_counter() - t0)
    except runner.dev.oom_types:
        return None
    except RuntimeError as exc:
        if not any(text in str(exc) for text in OOM_LIKE):
            raise
        return None
    finally:
        runner.opt.zero_grad(set_to_none=True)
        runner.dev.clean()
    return round(statistics.median(times), 5)


def model_internals(model: Any) -> dict[str, Any]:
    """What the fitted model rests on, for deriving a rule offline (bench/predict_zoo.py --reevaluate)."""
    return {"lines": {k: [v.fixed, v.per_sample] for k, v in model.lines.items()}, "cache": model.cache,
            "context": model.context, "frag_ratio": model.frag_ratio, "reserved_growth": model.reserved_growth,
            "alloc_retries": model.alloc_retries, "floor": model.floor, "slope_bound": model.slope_bound,
            "suspect": model.suspect, "curvature_slope": model.curvature_slope,
            "phase_lines": {k: [v.fixed, v.per_sample] for k, v in model.phase_lines.items()},
            "per_segment": model.per_segment,
            "segment_lines": {k: [v.fixed, v.per_sample] for k, v in model.segment_lines.items()},
            "phase_bounds": {k: [e, v.fixed, v.per_sample] for k, (e, v) in model.phase_bounds.items()},
            "time_line": None if model.time_line is None else [model.time_line.fixed, model.time_line.per_sample]}


def _peaks_at(runner: Runner, batch: int, deadline: float) -> dict[str, Any] | None:
    """phase_peaks at ``batch`` (one step; None past the deadline, at batch 0, or when it fails: a step at the
    real largest batch can run out where the bisection's did not, the allocator being in another state)."""
    if batch < 1 or time.perf_counter() > deadline:
        return None
    try:
        return phase_peaks(runner, batch)
    except Exception as exc:  # noqa: BLE001 - recorded for an explanation only
        _cleanup(runner.dev)
        return {"batch": batch, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:160]}"}


def _derived(split: SavedSplit | None, wi: WhatIf) -> bool:
    """Does the what-if rest on the measured split (else on its documented rule)?"""
    if split is None:
        return False
    if wi.amp and split.amp_cut_share() is None:
        return False
    return not (wi.checkpointing and split.dropped_share() is None)


def _cleanup(dev: Any) -> None:
    gc.collect()
    dev.clean()


def run_entry(entry: Entry, dev: Any, deadline: float, smoke: bool) -> dict[str, Any]:
    arch = entry.arch
    t0 = time.perf_counter()
    result: dict[str, Any] = {"arch": arch.name, "description": arch.description, "points": [], "what_ifs": []}
    _cleanup(dev)
    runner = Runner(arch, dev)
    result["parameters"] = sum(p.numel() for p in runner.model.parameters())
    big, small = arch.observe
    steps, how = observe_with_agent(runner, [big, big, big, small])
    if steps is None:
        result["error"] = how
        return result
    # the split the agent measured on a sampled step (Step.saved_split): what a user's what-ifs rest on
    agent_split = next((s.saved_split for s in reversed(steps) if s.saved_split), None)
    result["saved_split"] = agent_split
    bench_split = None
    if not entry.compiled:  # the bench's own measure, for comparison (saved-tensor hooks would break a compiled graph)
        try:
            walk: dict[str, list[int]] = {}
            casts: dict[str, int] = {}
            real_walk: dict[str, int] = {}
            bench_split = measure_saved_split(runner, small, walk, casts, real_walk)
            result["amp_walk_detail"] = walk  # the agent's graph walk per saving op, at the small batch
            # what the autocast forward's own graph saved, per first saving op, field and dtype (the walk's
            # prediction set against it op by op)
            result["amp_real_detail"] = real_walk
            # the 16-bit parameter casts within bench_saved_split.saved_amp: the rest is what autocast saved of
            # the activations, to set against the walk's amp share
            result["bench_saved_amp_weight_casts"] = casts.get("weight_casts")
        except Exception as exc:  # noqa: BLE001 - recorded for comparison only
            result["bench_saved_split_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
            _cleanup(dev)
    result["bench_saved_split"] = None if bench_split is None else dataclasses.asdict(bench_split)
    try:
        result["phase_peaks"] = [phase_peaks(runner, b) for b in (big, small)]
    except Exception as exc:  # noqa: BLE001 - recorded for an offline derivation only
        result["phase_peaks_error"] = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"
        _cleanup(dev)
    model = fit(steps, optimizer=entry.optimizer_name, amp=arch.amp)  # the agent's split, as a user's monitor
    rule_model = fit([with_saved_split(s, None) for s in steps], optimizer=entry.optimizer_name,
                     amp=arch.amp)  # the what-ifs' documented rules (no split measured), for comparison
    assert model is not None and rule_model is not None
    device_total = dev.total + model.context  # the cap bounds the allocator; the context lies outside it
    p = model.predict(device_total=device_total)
    predicted = p.max_batch or 0
    result.update({
        "observer": how, "observed": [s.batch_size for s in steps], "basis": p.basis,
        "observed_steps": [s.to_dict() for s in steps], "optimizer": entry.optimizer_name, "amp": arch.amp,
        "observed_allocator": getattr(runner, "observed_allocator", None), "fit": model_internals(model),
        "conservative": p.basis_fields.conservative, "device_total_for_prediction": device_total,
        "predicted_max_batch": predicted, "predicted_max_batch_central": p.max_batch_central,
        # fitted per phase when the agent sent each phase's own peak (sampled CUDA steps): the phase deciding
        # the largest batch, and what the step's peaks alone (an older agent) would have given
        "deciding_phase": p.basis_fields.deciding_phase,
        # fitted per segment when the agent split the backward at the output's gradient (segment_peaks)
        "deciding_segment": p.basis_fields.deciding_segment,
        "predicted_max_batch_step_peaks_only": step_peaks_only_max(steps, entry.optimizer_name, arch.amp,
                                                                    device_total),
        "predicted_max_batch_per_phase": per_phase_max(steps, entry.optimizer_name, arch.amp, device_total),
    })
    log: list[dict[str, Any]] = []
    for frac in (0.25, 0.5):
        b = max(1, round(predicted * frac))
        r = _trial(runner, b, log)
        q = model.predict(WhatIf(batch_size=b), device_total=device_total)
        result["points"].append({"batch": b, "predicted_peak": q.peak_allocated, "predicted_peak_high":
                                 q.band.high - model.cache - model.context if q.band else None,
                                 "measured_peak": r.get("peak_allocated"), "ok": r["ok"]})
    real = real_largest(runner, predicted, log, deadline)
    result.update(real)
    ok_at = [t for t in log if t["batch"] == predicted and t["ok"]]
    if ok_at:
        q = model.predict(WhatIf(batch_size=predicted), device_total=device_total)
        result["points"].append({"batch": predicted, "predicted_peak": q.peak_allocated,
                                 "measured_peak": ok_at[0]["peak_allocated"], "ok": True})
    errors = [pct(pt["predicted_peak"], pt["measured_peak"]) for pt in result["points"]
              if pt["ok"] and pt["measured_peak"]]
    result["mean_error_pct"] = statistics.mean(errors) if errors else None
    result["worst_error_pct"] = max(errors) if errors else None
    result["max_batch_ratio"] = predicted / result["real_max_batch"] if result["real_max_batch"] else None
    timing_batch = max(ACCUMULATION_TIMED[-1], result["real_max_batch"] // 2)
    timing: dict[str, Any] = {"batch": timing_batch}
    if time.perf_counter() < deadline:
        timing["plain_s"] = time_steps(runner, timing_batch)
        for k in ACCUMULATION_TIMED:  # the same effective batch in k micro-batches: the accumulation factor
            timing[f"accumulation_{k}_s"] = time_steps(runner, timing_batch, accumulation=k)
    result["timing"] = timing
    result["phase_peaks_at_real"] = _peaks_at(runner, result["real_max_batch"], deadline)
    del runner
    _cleanup(dev)

    for what in entry.what_ifs:
        if time.perf_counter() > deadline:
            result["what_ifs"].append({"what_if": what, "skipped": "past the time budget"})
            continue
        wi = (WhatIf(amp=True) if what == "amp" else
              WhatIf(checkpointing=True, checkpoint_layers=entry.checkpoint_layers))
        # the prediction a user gets (derived from the split the agent measured, else the documented rules), and
        # the rules' for comparison
        q = model.predict(wi, device_total=device_total)
        rule_max = rule_model.max_batch(device_total, wi)
        if what == "amp":
            variant = replace(arch, amp=True)
        else:
            assert entry.checkpointed is not None, f"{arch.name}: a checkpointing what-if needs Entry.checkpointed"
            variant = replace(arch, build=entry.checkpointed)
        runner = Runner(variant, dev)
        runner.step(small, count=False)  # optimizer state exists, as in a running job
        wlog: list[dict[str, Any]] = []
        wreal = real_largest(runner, q.max_batch or 0, wlog, deadline)
        # the what-if's step time at the plain run's timing batch: the measured factor the advisor estimates
        wsec = time_steps(runner, timing_batch) if time.perf_counter() < deadline else None
        # each segment's own peak under the what-if at its real largest batch: which segment decided, and by how
        # much each of the what-if's per-segment changes missed (what explains a miss afterwards)
        wpeaks = _peaks_at(runner, wreal["real_max_batch"], deadline)
        plain_s = timing.get("plain_s")
        result["what_ifs"].append({"what_if": what, "assumptions": list(q.basis_fields.what_if),
                                   "predicted_max_batch": q.max_batch,
                                   "derived": _derived(model.saved_split, wi),
                                   "predicted_max_batch_rule": rule_max,
                                   "rule_assumptions": list(rule_model.predict(wi, device_total=device_total)
                                                            .basis_fields.what_if),
                                   **wreal,
                                   "ratio": (q.max_batch or 0) / wreal["real_max_batch"]
                                   if wreal["real_max_batch"] else None, "trials": len(wlog), "trial_log": wlog,
                                   "phase_peaks_at_real": wpeaks,
                                   "timing": {"batch": timing_batch, "seconds": wsec,
                                              "factor": round(wsec / plain_s, 4) if wsec and plain_s else None},
                                   "spec": {"amp": wi.amp, "checkpointing": wi.checkpointing,
                                            "checkpoint_layers": wi.checkpoint_layers}})
        del runner
        _cleanup(dev)
    result["trials"] = log
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result




def emulated_device(tool: str, cpu_smoke: bool, gib: float) -> tuple[Any, str] | None:
    """The device the zoo's trials run on and how it is emulated: the H200 capped at ``gib`` GiB
    (``set_per_process_memory_fraction``), or a fake 8 MiB one on the CPU; None (said on stderr) without CUDA."""
    if cpu_smoke:
        return SmokeDevice(total=8 << 20), "cpu-smoke: peak = sum of measured components, OOM past a fake 8 MiB device"
    if not torch.cuda.is_available():
        print(f"{tool}: no CUDA device (use --cpu-smoke to test the script on CPU)", file=sys.stderr)
        return None
    dev = CudaDevice()
    physical = dev.total
    cap = int(gib * GIB)
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / physical), dev.device)
    dev.total = cap
    return dev, (f"torch.cuda.set_per_process_memory_fraction({cap / physical:.4f}) of {physical / GIB:.1f} GiB: the "
                 f"caching allocator may reserve at most {gib:g} GiB; predictions use that + the measured CUDA "
                 f"context as the device size")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="JSON results (e.g. bench/results/predict_zoo_h200.json)")
    ap.add_argument("--markdown", type=Path, metavar="JSON", help="print the README table of a results file")
    ap.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                    help="merge the results of several device calls (same device and emulation) into --out")
    ap.add_argument("--reevaluate", type=Path, metavar="JSON",
                    help="refit the current model on a results file's recorded observations (no GPU); exit 1 when "
                         "a largest batch is above the real one")
    ap.add_argument("--splits", type=Path, metavar="JSON",
                    help="with --reevaluate: {arch: saved split} to derive the what-ifs from (a projection, e.g. "
                         "bench/zoo_split_cpu.py's) instead of what the recorded steps carry")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny models on CPU against a fake device")
    ap.add_argument("--device-memory-gib", type=float, default=24.0, help="emulated device size (default 24)")
    ap.add_argument("--arch", default="", help="comma-separated subset of the architecture names")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds for the whole run")
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(args.markdown.read_text())), end="")
        return 0
    if args.merge:
        if not args.out:
            ap.error("--merge needs --out")
        docs = [json.loads(path.read_text()) for path in args.merge]
        merged = merge(docs)
        args.out.write_text(json.dumps(merged, indent=1))
        print(markdown(merged), end="")
        return 0
    if args.reevaluate:
        splits = None
        if args.splits:
            try:
                splits = json.loads(args.splits.read_text())["splits"]
            except (OSError, ValueError, KeyError, TypeError) as exc:
                print(f"predict_zoo: cannot read --splits {args.splits}: {exc}", file=sys.stderr)
                return 2
        text, safe = reevaluation_text(reevaluate(json.loads(args.reevaluate.read_text()), splits))
        print(text, end="")
        return 0 if safe else 1
    if not args.out:
        ap.error("--out is required (or --markdown)")
    start = time.perf_counter()
    made = emulated_device("predict_zoo", args.cpu_smoke, args.device_memory_gib)
    if made is None:
        return 2
    dev, emulation = made
    entries = zoo(args.cpu_smoke)
    if args.arch:
        wanted = set(args.arch.split(","))
        entries = [e for e in entries if e.arch.name in wanted]
    results = []
    for i, entry in enumerate(entries):
        missing = _available(entry.needs)
        left = args.budget - (time.perf_counter() - start)
        if missing or left <= 5:
            results.append({"arch": entry.arch.name, "skipped": missing or "past the time budget"})
            print(f"{entry.arch.name}: skipped ({results[-1]['skipped']})", file=sys.stderr, flush=True)
            continue
        deadline = time.perf_counter() + left / (len(entries) - i)  # an equal share of what is left
        try:
            r = run_entry(entry, dev, deadline, args.cpu_smoke)
        except Exception as exc:  # noqa: BLE001 - one architecture failing must not lose the others' results
            r = {"arch": entry.arch.name, "error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}
            _cleanup(dev)
        results.append(r)
        print(f"{r['arch']}: predicted {r.get('predicted_max_batch')} real {r.get('real_max_batch')} "
              f"peak error mean {r.get('mean_error_pct')} what-ifs "
              f"{[(w['what_if'], w.get('predicted_max_batch'), w.get('real_max_batch')) for w in r.get('what_ifs', [])]}"
              f" {r.get('error', '')} ({r.get('seconds')} s)", flush=True)
    doc = {"device": dev.name, "emulated_device_memory": dev.total, "emulation": emulation,
           "torch": torch.__version__, "python": platform.python_version(),
           "mode": "cpu-smoke" if args.cpu_smoke else "cuda", "seconds": round(time.perf_counter() - start, 1),
           "results": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(markdown(doc), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
