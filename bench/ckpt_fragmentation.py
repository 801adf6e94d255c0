"""The checkpointing what-if's fragmentation, from the allocator model, against the H200's recorded boundaries.

For T5-small (512 -> 128 tokens) and GPT-2 124M (sequence 512), fp32, AdamW, with Hugging Face's
``gradient_checkpointing_enable()`` - bench/predict_zoo.py's models - one real training step is recorded on this
CPU at three small batch sizes (bench/step_alloc_trace.py: every op's new storage, and its free), scaled to a
line per allocation, and run through batchmon.memory_model.allocator_sim under the zoo's emulated 24 GiB: the
largest batch that runs, and the pool's share beyond the peak there. Compared with the H200's zoo run 12
(bench/results/predict_zoo_h200_run12.json): T5 ran 321 (reserved 25.76 GB for a 20.66 GB peak: 24.7%), GPT-2 70.

Also (``--synth``) the same from the step the memory model synthesises out of what the agent measured
(``batchmon.memory_model.ckpt_trace``), the what-if's own derivation.

Usage: python3 bench/ckpt_fragmentation.py [--arch t5-small,gpt2-fp32] [--run ZOO.json] [--synth] [--out FILE]
(the traces are read from bench/results/ckpt_traces_cpu.json.gz; delete it to record them again, ~1 min)
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from batchmon.agent.accounting import ActivationCounter  # noqa: E402
from batchmon.agent.saved_split import BlockSplitMeter, checkpoint_blocks  # noqa: E402
from batchmon.memory_model import WhatIf, fit  # noqa: E402
from batchmon.memory_model.ckpt_trace import synthesise  # noqa: E402
from batchmon.memory_model.step_trace import (StepTrace, largest_batch, required_limit,  # noqa: E402
                                              simulate)
from batchmon.protocol import Step  # noqa: E402
from step_alloc_trace import record, scaled  # noqa: E402
from zoo_models import HFLogits  # noqa: E402
from zoo_offline import with_inactive_split  # noqa: E402

GIB = 2**30
H200_RUN = Path(__file__).resolve().parent / "results" / "predict_zoo_h200_run12.json"
EMULATED = 24 * GIB
TRACES = Path(__file__).resolve().parent / "results" / "ckpt_traces_cpu.json.gz"
SEQUENCES = Path(__file__).resolve().parent / "results" / "ckpt_block_seq_cpu.json"


def build(arch: str, checkpointing: bool = True) -> tuple[torch.nn.Module, int, int | None, int]:
    """The checkpointed model (``checkpointing``: else the plain one), its vocabulary, its encoder length (None:
    decoder only), its sequence."""
    if arch == "t5-small":
        from transformers import T5Config, T5ForConditionalGeneration

        cfg = T5Config(d_model=512, d_ff=2048, num_layers=6, num_heads=8, d_kv=64, vocab_size=32128)
        cfg.use_cache = False
        model = T5ForConditionalGeneration(cfg)
        if checkpointing:
            model.gradient_checkpointing_enable()
        return HFLogits(model, src_len=512), 32128, 512, 128
    if arch == "gpt2-fp32":
        from transformers import GPT2Config, GPT2LMHeadModel

        # the CPU's sdpa falls back to its math path with dropout (softmax-sized tensors the H200's
        # memory-efficient kernel never makes): attention dropout off here, as bench/zoo_split_cpu.py does
        g = GPT2LMHeadModel(GPT2Config(attn_pdrop=0.0))
        g.config.use_cache = False
        if checkpointing:
            g.gradient_checkpointing_enable()
        return HFLogits(g), 50257, None, 512
    raise ValueError(f"unknown arch {arch!r}")


def _ce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """bench/predict_zoo.py's loss: cross entropy on fp32 logits, as Hugging Face models compute it."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))


def cuda_dropout() -> None:
    """F.dropout as CUDA runs it: the fused kernel (its output and a bool mask), where the CPU's composite makes
    a float noise tensor four times the mask's size (aten's dropout takes the fused path on CUDA only)."""
    plain = F.dropout

    def dropout(input: torch.Tensor, p: float = 0.5, training: bool = True, inplace: bool = False) -> torch.Tensor:
        if training and 0 < p < 1 and input.numel() and not inplace:
            return torch.native_dropout(input, p, True)[0]
        return plain(input, p, training, inplace)

    F.dropout = dropout  # type: ignore[assignment]


def step_fn(arch: str) -> tuple[Callable[[int], None], list[int]]:
    """One training step as the zoo's trial runs it (grads set to None before), and the persistent blocks:
    parameters, then the optimizer's state (made by a first step)."""
    cuda_dropout()
    torch.manual_seed(0)
    model, vocab, src, tgt = build(arch)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
    gen = torch.Generator().manual_seed(1)

    def step(b: int) -> None:
        x = torch.randint(0, vocab, (b, (src or 0) + tgt + 1), generator=gen)
        if src is None:
            x, y = x[:, :-1].contiguous(), x[:, 1:].contiguous()
        else:
            x, y = x[:, :-1].contiguous(), x[:, -tgt:].contiguous()
        loss = _ce(model(x), y) / 1  # as the zoo's Runner.step: the logits are held by nothing but the graph
        loss.backward()
        opt.step()

    step(1)
    opt.zero_grad(set_to_none=True)
    seen: set[int] = set()
    persistent: list[int] = []
    tensors = list(model.parameters()) + list(model.buffers())
    tensors += [v for s in opt.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
    for t in tensors:
        st = t.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            persistent.append(st.nbytes())

    def traced(b: int) -> None:
        step(b)
        opt.zero_grad(set_to_none=True)

    return traced, persistent


def real_trace(arch: str, batches: tuple[int, ...] = (2, 3, 4)) -> StepTrace:
    step, persistent = step_fn(arch)
    return scaled(persistent, {b: record(step, b) for b in batches})


def h200(arch: str) -> dict[str, Any]:
    """The H200's recorded checkpointing boundary for ``arch`` (zoo run 12)."""
    doc = json.loads(H200_RUN.read_text())
    r = next(x for x in doc["results"] if x["arch"] == arch)
    w = next(x for x in r["what_ifs"] if x["what_if"] == "checkpointing")
    ok = [t for t in w["trial_log"] if t["ok"] and t["batch"] == w["real_max_batch"]]
    t = ok[0] if ok else {}
    return {"real_max_batch": w["real_max_batch"], "predicted_max_batch_run12": w["predicted_max_batch"],
            "peak_allocated": t.get("peak_allocated"), "reserved": t.get("reserved"),
            "pool_share": (t["reserved"] / t["peak_allocated"] - 1) if t.get("peak_allocated") else None}


def report(trace: StepTrace, real: dict[str, Any], limit: int) -> dict[str, Any]:
    b = largest_batch(trace, limit, start=max(2, real["real_max_batch"] // 2))
    at_real = simulate(trace, real["real_max_batch"])
    need, _ = required_limit(trace, real["real_max_batch"])
    sim_b = simulate(trace, b, limit)
    need_b, run_b = required_limit(trace, b)
    return {"largest_batch": b, "ratio_to_real": b / real["real_max_batch"],
            "at_largest": {"peak_allocated": sim_b.peak_allocated, "peak_reserved": sim_b.peak_reserved,
                           "pool_share_needed": need_b / run_b.peak_allocated - 1},
            "at_real": {"peak_allocated": at_real.peak_allocated,
                        "peak_error_vs_h200": (at_real.peak_allocated / real["peak_allocated"] - 1)
                        if real.get("peak_allocated") else None,
                        "limit_needed": need, "pool_share_needed": need / at_real.peak_allocated - 1,
                        "fits_under_cap": need <= limit}}


def model_answer(arch: str, trace: StepTrace | None, sequence: dict[str, Any] | None = None) -> dict[str, Any]:
    """The memory model refitted on the H200 run's recorded observation (the agent's steps at batch 8 and 4 for
    T5, 4 and 2 for GPT-2, plain fp32): the checkpointing what-if's largest batch with the recorded step's pool
    simulated (``trace``), or without it (None: the fallback rule)."""
    doc = json.loads(H200_RUN.read_text())
    r = next(x for x in doc["results"] if x["arch"] == arch)
    w = next(x for x in r["what_ifs"] if x["what_if"] == "checkpointing")
    docs = [dict(d) for d in r["observed_steps"]]
    if sequence is not None:  # the blocks' sequence as the agent now measures it (here on the CPU, same batch)
        for d in docs:
            if d.get("saved_split"):
                assert d["saved_split"]["batch"] == sequence["batch"], "measure the sequence at the split's batch"
                d["saved_split"] = dict(d["saved_split"], block_seq=sequence["block_seq"])
    steps = with_inactive_split([Step.from_dict(d) for d in docs], r)
    model = fit(steps, optimizer=r.get("optimizer"), amp=bool(r.get("amp")), recompute_trace=trace)
    assert model is not None
    device_total = doc["emulated_device_memory"] + model.context
    spec = WhatIf(checkpointing=True, checkpoint_layers=w["spec"]["checkpoint_layers"])
    best = model.max_batch(device_total, spec) or 0
    real = w["real_max_batch"]
    p = model.predict(WhatIf(batch_size=best, checkpointing=True, checkpoint_layers=spec.checkpoint_layers),
                      device_total=device_total)
    out: dict[str, Any] = {"predicted_max_batch": best, "real_max_batch": real, "ratio": best / real,
                           "predicted_peak_at_it": p.peak_allocated, "cache_at_it": p.components["cache"],
                           "notes": [n for n in p.basis_fields.what_if if "pool" in n or "allocator" in n]}
    if trace is not None or sequence is not None:
        out["pool_share_at_it"] = model.pool_share(spec, best)
        out["pool_share_at_real"] = model.pool_share(spec, real)
    return out


def measure_sequence(arch: str, batch: int) -> dict[str, Any]:
    """What the agent measures of the plain model's forward at ``batch`` (its saved split with the blocks'
    sequence, batchmon.agent.saved_split.BlockSplitMeter as SplitProbe runs it, the CUDA allocator's 512-byte
    rounding), and the parameters' and optimizer state's bytes after a first step."""
    cuda_dropout()
    torch.manual_seed(0)
    model, vocab, src, tgt = build(arch, checkpointing=False)
    model.train()
    x = torch.randint(0, vocab, (batch, (src or 0) + tgt))
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    counter = ActivationCounter(torch.device("cpu"), (params, {x.untyped_storage().data_ptr()}))
    counter.saved.block = 512
    t0 = time.perf_counter()
    meter = BlockSplitMeter(checkpoint_blocks(model), lambda: counter.bytes, 512, pack=counter._pack, batch=batch)
    counter.push()
    try:
        out = model(x)
    finally:
        counter.pop()
    seq = meter.sequence(counter.bytes, 0)
    meter.remove()
    seconds = time.perf_counter() - t0
    t1 = time.perf_counter()
    plain = model(x)
    plain_seconds = time.perf_counter() - t1
    del plain
    pbytes = sum(p.untyped_storage().nbytes() for p in {p.untyped_storage().data_ptr(): p
                                                        for p in model.parameters()}.values())
    return {"batch": batch, "block_seq": seq, "output": out.untyped_storage().nbytes(), "saved": counter.bytes,
            "parameters": pbytes, "optimizer": 2 * pbytes, "forward_seconds_measured": round(seconds, 3),
            "forward_seconds_plain": round(plain_seconds, 3), "wire_bytes": len(json.dumps(seq))}


def synth_trace(m: dict[str, Any]) -> StepTrace:
    trace = synthesise(m["block_seq"], m["batch"], m["output"], m["parameters"], m["optimizer"])
    assert trace is not None
    return trace


def split_batch(arch: str) -> int:
    """The batch of the H200 agent's saved split for ``arch`` (the sequence is measured at it)."""
    doc = json.loads(H200_RUN.read_text())
    r = next(x for x in doc["results"] if x["arch"] == arch)
    return next(int(d["saved_split"]["batch"]) for d in r["observed_steps"] if d.get("saved_split"))


def save_traces(path: Path, traces: dict[str, StepTrace]) -> None:
    doc = {a: {"persistent": list(t.persistent), "events": [list(e) for e in t.events]} for a, t in traces.items()}
    with gzip.open(path, "wt") as f:
        json.dump(doc, f, separators=(",", ":"))


def load_traces(path: Path) -> dict[str, StepTrace]:
    with gzip.open(path, "rt") as f:
        doc = json.load(f)
    return {a: StepTrace(tuple(d["persistent"]), tuple((int(k), float(x), float(p)) for k, x, p in d["events"]))
            for a, d in doc.items()}


def main(argv: list[str] | None = None) -> int:
    global H200_RUN
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="t5-small,gpt2-fp32")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--run", type=Path, default=H200_RUN,
                    help="a predict_zoo results file with both architectures' checkpointing boundaries (default: run 12)")
    ap.add_argument("--traces", type=Path, default=TRACES,
                    help="recorded traces (json.gz): read when present, else recorded here and written")
    ap.add_argument("--synth", action="store_true",
                    help="also the step synthesised from what the agent measures (the blocks' sequence, measured here "
                         "on the plain model at the H200 split's batch; read from --sequences when present)")
    ap.add_argument("--sequences", type=Path, default=SEQUENCES)
    args = ap.parse_args(argv)
    sequences = json.loads(args.sequences.read_text()) if args.synth and args.sequences.exists() else {}
    measured = False
    H200_RUN = args.run
    traces = load_traces(args.traces) if args.traces.exists() else {}
    recorded = False
    out: dict[str, Any] = {"emulated_limit": EMULATED, "h200_run": args.run.name, "results": []}
    for arch in args.arch.split(","):
        t0 = time.perf_counter()
        real = h200(arch)
        if arch not in traces:
            traces[arch], recorded = real_trace(arch), True
        trace = traces[arch]
        row: dict[str, Any] = {"arch": arch, "h200": real, "events": len(trace.events),
                               "simulated_alone": report(trace, real, EMULATED),
                               "model_with_simulated_pool": model_answer(arch, trace),
                               "model_fallback_rule": model_answer(arch, None)}
        if args.synth:
            if arch not in sequences:
                batch = split_batch(arch)
                sequences[arch], measured = measure_sequence(arch, batch), True
            m = sequences[arch]
            synth = synth_trace(m)
            row["agent_measure"] = {k: v for k, v in m.items() if k != "block_seq"}
            row["synth_events"] = len(synth.events)
            row["synthesised_alone"] = report(synth, real, EMULATED)
            row["model_with_synthesised_pool"] = model_answer(arch, None, m)
        row["seconds"] = round(time.perf_counter() - t0, 1)
        out["results"].append(row)
        print(json.dumps(row, indent=1), flush=True)
    if recorded:
        save_traces(args.traces, traces)
    if measured:
        args.sequences.write_text(json.dumps(sequences) + "\n")
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
