"""bench/predict_zoo.py's CPU path (--cpu-smoke): the H200 script's code runs end to end through the real
agent, writes the JSON issue 13 asks for, and its markdown writer reads it back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "predict_zoo.py"


@pytest.mark.slow
def test_cpu_smoke_writes_the_issue_13_json_and_a_table(tmp_path):
    out = tmp_path / "zoo.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cpu-smoke", "--arch", "lstm-lm,unet,gpt-compiled",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = json.loads(out.read_text())
    assert doc["mode"] == "cpu-smoke" and "fake" in doc["emulation"]
    assert [r["arch"] for r in doc["results"]] == ["lstm-lm", "unet", "gpt-compiled"]
    for r in doc["results"]:
        assert "error" not in r, r.get("error")
        assert r["observer"].startswith("batchmon.agent"), r["observer"]
        assert r["observed"] == [r["observed"][0]] * 3 + [r["observed"][0] // 2]
        assert r["predicted_max_batch"] > 0 and r["real_max_batch"] > 0
        assert r["points"] and all({"batch", "predicted_peak", "measured_peak"} <= set(pt) for pt in r["points"])
        assert isinstance(r["what_ifs"], list)
    table = subprocess.run([sys.executable, str(SCRIPT), "--markdown", str(out)], capture_output=True, text=True,
                           timeout=60)
    assert table.returncode == 0 and "| lstm-lm | 20, 20, 20, 10 |" in table.stdout
    # everything an offline re-derivation needs is recorded, and --reevaluate refits on it to the same answer
    for r in doc["results"]:
        assert len(r["observed_steps"]) == 4 and r["observed_steps"][0]["components"]
        assert {"cache", "context", "frag_ratio", "slope_bound", "floor", "lines"} <= set(r["fit"])
        assert {"batch", "plain_s", "accumulation_2_s", "accumulation_4_s"} <= set(r["timing"])
        assert all({"reserved", "inactive_split_peak"} <= set(t) for t in r["trials"])
    rows = _zoo().reevaluate(doc)
    assert [row["predicted"] for row in rows] == [r["predicted_max_batch"] for r in doc["results"]]
    # the saved activations' make-up (derived what-ifs): measured where hooks may run, not under torch.compile
    by_arch = {r["arch"]: r for r in doc["results"]}
    unet = by_arch["unet"]["saved_split"]
    assert unet["blocks"] >= 2 and 0 < unet["in_blocks"] <= unet["saved"] and unet["block_inputs"] > 0
    assert by_arch["gpt-compiled"]["saved_split"] is None
    # what explains a what-if's miss afterwards: the bench's walk per saving op (UNet's convolutions halve, its
    # batch norms follow their input) and the largest block; the segment peaks at the real largest batch (CUDA
    # only: None here)
    walk = by_arch["unet"]["amp_walk_detail"]
    assert walk["Convolution"][1] < walk["Convolution"][0] and all(v[1] <= 2 * v[0] for v in walk.values())
    assert 0 < by_arch["unet"]["bench_saved_split"]["block_max"] <= by_arch["unet"]["bench_saved_split"]["in_blocks"]
    assert unet["output"] > 0 and 0 < unet["block_max"] <= unet["in_blocks"]
    assert all("phase_peaks_at_real" in r and r["phase_peaks_at_real"] is None for r in doc["results"])


def _zoo():
    import importlib.util

    if "predict_zoo" in sys.modules:
        return sys.modules["predict_zoo"]
    spec = importlib.util.spec_from_file_location("predict_zoo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["predict_zoo"] = module  # its dataclasses resolve their module while it loads
    spec.loader.exec_module(module)
    return module


RECORDED = sorted((SCRIPT.parent / "results").glob("predict_zoo_h200*.json"))
# the runs that found a what-if above the real largest batch, as recorded: the model since then is held to it by
# the re-evaluation below (T5-small's AMP what-if said 82 of a real 79: since counted, its unclassified ops' casts)
RECORDED_ABOVE = {("predict_zoo_h200_run6.json", "t5-small", "amp")}


@pytest.mark.parametrize("path", RECORDED, ids=lambda p: p.name)
def test_recorded_zoo_never_above_real_and_the_current_model_neither(path):
    """Issue 13's rule on the recorded H200 runs: no largest batch above the real one, plain or what-if, as
    recorded; and where the run kept its observation, the current memory model refitted on it neither (a model
    change that would send a user into an OOM on a recorded architecture fails here)."""
    doc = json.loads(path.read_text())
    for r in doc["results"]:
        if r.get("skipped") or r.get("error"):
            continue
        assert r["predicted_max_batch"] <= r["real_max_batch"], r["arch"]
        for w in r["what_ifs"]:
            if w.get("real_max_batch") and (path.name, r["arch"], w["what_if"]) not in RECORDED_ABOVE:
                assert w["predicted_max_batch"] <= w["real_max_batch"], (r["arch"], w["what_if"])
    zoo = _zoo()
    rows = zoo.reevaluate(doc)
    _, safe = zoo.reevaluation_text(rows)
    assert safe, zoo.reevaluation_text(rows)[0]
    for row in rows:
        if "skipped" in row:
            continue
        assert row["predicted"] <= row["real"], row
        assert all(w["predicted"] <= w["real"] for w in row["what_ifs"]), row


def test_reevaluate_refits_a_recorded_observation(tmp_path, capsys):
    """--reevaluate on a hand-built result: the current model's answer from the recorded steps, the exact
    boundary from the trials, and exit 1 when a prediction is above it."""
    from test_memory_model import Truth

    truth = Truth()
    steps = [truth.step(i, b).to_dict() for i, b in enumerate((32, 32, 32, 16), start=1)]
    from batchmon.memory_model import WhatIf, fit
    from batchmon.protocol import Step

    model = fit([Step.from_dict(s) for s in steps], optimizer="AdamW")
    cap = 24 * 2**30
    pred = model.max_batch(cap + model.context)
    doc = {"emulated_device_memory": cap, "results": [
        {"arch": "truth", "observed_steps": steps, "optimizer": "AdamW", "amp": False, "predicted_max_batch": pred,
         "real_max_batch": pred + 5, "trials": [{"batch": pred + 5, "ok": True}, {"batch": pred + 6, "ok": False}],
         "what_ifs": [{"what_if": "checkpointing", "predicted_max_batch": 1, "real_max_batch": 10,
                       "spec": {"amp": False, "checkpointing": True, "checkpoint_layers": 12}, "trial_log": []}]},
        {"arch": "old", "predicted_max_batch": 1, "real_max_batch": 2}]}
    zoo = _zoo()
    rows = zoo.reevaluate(doc)
    assert rows[0]["predicted"] == pred and rows[0]["real"] == pred + 5  # the exact boundary from the trials
    ckpt = model.max_batch(cap + model.context, WhatIf(checkpointing=True, checkpoint_layers=12))
    assert ckpt > 10 and rows[0]["what_ifs"][0]["predicted"] == ckpt
    assert rows[1]["skipped"]
    path = tmp_path / "zoo.json"
    path.write_text(json.dumps(doc))
    assert zoo.main(["--reevaluate", str(path)]) == 1  # the command line, in process (torch loads once)
    out = capsys.readouterr().out
    assert "truth: checkpointing" in out and "**above**" in out
    doc["results"][0]["what_ifs"] = []
    path.write_text(json.dumps(doc))
    assert zoo.main(["--reevaluate", str(path)]) == 0
    assert "**above**" not in capsys.readouterr().out


def test_reevaluate_refits_per_segment_when_the_steps_carry_segment_peaks():
    """A zoo result whose observed steps carry segment peaks (the H200's LSTM LM figures, observed at 20, 20, 20,
    10): --reevaluate refits per segment, within 3% of the real largest batch and not above it, and reports what
    the same steps fitted per phase (the backward not split) would say: above the real one."""
    from test_memory_model_lstm import _device_where_only, _h200_observed, _h200_segments

    from batchmon.memory_model import fit

    segments = _h200_segments()
    steps = _h200_observed(segments)
    model = fit(steps, optimizer="SGD")
    real = 1000
    cap = _device_where_only(model, max(segments[real].values())) - model.context
    doc = {"emulated_device_memory": cap, "results": [
        {"arch": "lstm-lm", "observed_steps": [s.to_dict() for s in steps], "optimizer": "SGD", "amp": False,
         "predicted_max_batch": 0, "real_max_batch": real, "trials": [], "what_ifs": []}]}
    zoo = _zoo()
    (row,) = zoo.reevaluate(doc)
    assert 0.97 * real <= row["predicted"] <= real and row["fit"] == "per segment (loss_backward decides)"
    assert row["per_phase"] > real  # what the per-phase fit of the same steps promised: an OOM
    text, safe = zoo.reevaluation_text([row])
    assert safe and "| per segment (loss_backward decides) | " in text


def test_the_h200_lstm_with_segment_peaks_meets_issue_13s_targets():
    """The H200 zoo run with the agent's segment peaks (run 4, the LSTM LM alone): refitted with the current model
    it is fitted per segment with the loss's backward deciding, its largest batch at least 0.95 of the real one
    and not above it; the same steps per phase (the backward not split) stay at the old 0.867."""
    doc = json.loads((SCRIPT.parent / "results" / "predict_zoo_h200_run4_lstm.json").read_text())
    (row,) = _zoo().reevaluate(doc)
    assert row["fit"] == "per segment (loss_backward decides)"
    assert 0.95 * row["real"] <= row["predicted"] <= row["real"], row
    assert row["per_phase"] < 0.9 * row["real"]
    (r,) = doc["results"]
    assert r["mean_error_pct"] <= 1.0 and r["worst_error_pct"] <= 3.0


def test_merge_joins_device_calls_and_refuses_another_device():
    zoo = _zoo()
    head = {"device": "NVIDIA H200", "emulated_device_memory": 24 * 2**30, "emulation": "cap", "torch": "2.11"}
    a = {**head, "seconds": 50.0, "results": [{"arch": "lstm-lm"}, {"arch": "unet"}]}
    b = {**head, "seconds": 130.0, "results": [{"arch": "t5-small"}]}
    merged = zoo.merge([a, b])
    assert [r["arch"] for r in merged["results"]] == ["lstm-lm", "unet", "t5-small"]
    assert merged["runs"] == [{"archs": ["lstm-lm", "unet"], "seconds": 50.0}, {"archs": ["t5-small"], "seconds": 130.0}]
    assert merged["seconds"] == 180.0 and merged["emulation"] == "cap"
    with pytest.raises(SystemExit):
        zoo.merge([a, {**b, "device": "NVIDIA A100"}])


def _recalibrate():
    sys.path.insert(0, str(SCRIPT.parent))
    import recalibrate_margin

    return recalibrate_margin


def test_frag_survival_keeps_every_recorded_h200_boundary_out():
    """FRAG_SURVIVAL is derived, not tuned: it exceeds the share of phi x peak that every OOM boundary recorded on
    the H200 left room for - predict_accuracy's runs refitted on their observations, and the zoo recorded before
    it kept them projected from its recorded peak line with phi as an interval (the end needing more taken) -
    and no plain largest batch lands above the real one on either."""
    from batchmon.memory_model import FRAG_SURVIVAL

    rm = _recalibrate()
    for name in ("predict_accuracy_h200_run1.json", "predict_accuracy_h200.json"):
        doc = json.loads((SCRIPT.parent / "results" / name).read_text())
        for result in doc["results"]:
            e = rm.evaluate(result, doc["device_total"])
            assert e["needed_share"] < FRAG_SURVIVAL, (name, e["arch"])
            assert e["predicted"] <= e["exact"], (name, e["arch"])
    zoo = json.loads((SCRIPT.parent / "results" / "predict_zoo_h200.json").read_text())
    rows = rm.project_zoo(zoo)
    assert len(rows) == 11
    for row in rows:
        if row["conservative"]:  # the band's high side decides there; the projection uses the central line
            continue
        assert row["needed_share"] < FRAG_SURVIVAL, row["arch"]
        assert max(row["projected"]) <= row["real"], row["arch"]
    # zoo run 5 (all eleven, observations recorded): refitted, the share each first failing batch left room
    # for with the margin the model keeps now (the cache's growth, not the pool's: fit._cache_growth)
    run5 = json.loads((SCRIPT.parent / "results" / "predict_zoo_h200_run5.json").read_text())
    shares = {r["arch"]: _needed_share(r, run5["emulated_device_memory"]) for r in run5["results"]}
    assert all(share < FRAG_SURVIVAL for share in shares.values()), shares
    # the largest need is one boundary's (the GRU seq2seq's, since the margin stopped counting the optimizer
    # state twice; UNet's 0.19 before), and FRAG_SURVIVAL keeps a stated margin above it - at least 15% (it is
    # 0.25: 1.2 x 0.209 = 0.251), not a constant that just covers the recordings: the README says so
    top = max([r["needed_share"] for r in rows if not r["conservative"]] + list(shares.values()))
    assert 1.15 * top < FRAG_SURVIVAL <= 1.25 * top
    assert max(shares, key=shares.get) == "gru-seq2seq"


def _needed_share(r: dict, cap: int) -> float:
    """The share of phi x the model's central peak that the first failing batch left room for (what
    bench/recalibrate_margin.py --derive computes), on a zoo result refitted from its recorded steps."""
    from batchmon.memory_model import fit
    from batchmon.protocol import Step

    model = fit([Step.from_dict(d) for d in r["observed_steps"]], optimizer=r["optimizer"], amp=r["amp"])
    fail = min(t["batch"] for t in r["trials"] if not t["ok"])
    peak = model.peak_at(fail)
    room = cap - peak - model.reserved_growth - (model.cache if model.alloc_retries else 0)
    return room / (model.frag_ratio * peak)


def test_the_bench_tells_autocasts_parameter_casts_from_activations():
    """bench/zoo_probes.measure_saved_split's saved_amp holds autocast's 16-bit casts of the weights besides the
    activations; the zoo records their bytes apart (bench_saved_amp_weight_casts) so what autocast saved of the
    activations can be set against the agent's walk. A Linear's saved transposed weight cast and a conv's weight
    cast are parameter casts; the casts of activations and of an input that gets no gradient are not."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    from zoo_probes import _is_parameter_cast

    lin, norm, conv = torch.nn.Linear(64, 64), torch.nn.LayerNorm(64), torch.nn.Conv2d(3, 8, 3)
    found: list[tuple[tuple[int, ...], torch.dtype, bool]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        found.append((tuple(t.shape), t.dtype, _is_parameter_cast(t)))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lin(lin(norm(torch.randn(4, 64))).relu())
            conv(torch.randn(2, 3, 8, 8))
    casts = {(shape, dtype) for shape, dtype, cast in found if cast}
    assert casts == {((64, 64), torch.bfloat16), ((8, 3, 3, 3), torch.bfloat16)}
    assert any(dtype == torch.bfloat16 and not cast for _, dtype, cast in found)  # activations' casts
    assert not any(cast for _, dtype, cast in found if dtype == torch.float32)


def test_the_allocators_split_free_bytes_bound_every_recorded_boundarys_fragmentation():
    """MemoryModel.frag_share's second bound, psi (the allocator's inactive-split peak / the peak at the reference
    batch, as an agent reporting Step.inactive_split sends it; the zoo read it after each observed step): every
    OOM boundary of zoo runs 5-8 left room for at most 0.72 psi x the model's central peak (the GRU seq2seq of
    run 6), so psi itself bounds what survives - no factor. Where it is below 0.25 phi it decides: EfficientNet-B0
    (phi 0.218: whole cached segments, given back at the limit; psi 0.046) 270 -> 273 of 286."""
    from batchmon.memory_model import fit
    from batchmon.protocol import Step

    zoo = _zoo()
    worst = 0.0
    for run in (5, 6, 7, 8):
        doc = json.loads((SCRIPT.parent / "results" / f"predict_zoo_h200_run{run}.json").read_text())
        for r in doc["results"]:
            steps = zoo.with_inactive_split([Step.from_dict(d) for d in r["observed_steps"]], r)
            model = fit(steps, optimizer=r["optimizer"], amp=r["amp"])
            assert model.split_ratio is not None, (run, r["arch"])
            fail = min(t["batch"] for t in r["trials"] if not t["ok"])
            peak = model.peak_at(fail)
            room = doc["emulated_device_memory"] - peak - model.reserved_growth - (
                model.cache if model.alloc_retries else 0)
            worst = max(worst, room / (model.split_ratio * peak))
        rows = {row["arch"]: row for row in zoo.reevaluate(doc)}
        if "efficientnet-b0" in rows:
            row = rows["efficientnet-b0"]
            assert row["predicted"] / row["real"] >= 0.95 and row["predicted"] <= row["real"], row
    assert 0.5 < worst < 1.0


def test_the_next_runs_probes_per_op_under_autocast_and_per_block_backward():
    """bench/zoo_probes.py's two measurements for the next H200 run, on CPU: the autocast forward's own graph per
    first saving op, field and dtype (amp_real_detail: a linear's input saved 16-bit, the weights' casts apart),
    and each checkpointed block's backward in backward order under Hugging Face's checkpointing (the hooks on the
    forward's block inputs only: a recomputation adds none), every hook removed."""
    import torch

    sys.path.insert(0, str(SCRIPT.parent))
    from zoo_probes import block_backward_meter, graph_saved_by_op

    lin = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    saved: set[int] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        out = lin(torch.randn(8, 32))
    by_op = graph_saved_by_op(out, saved)
    assert by_op["Addmm:mat1:bfloat16"] == 8 * 32 * 2 * 2  # both linears' inputs, 16-bit
    assert by_op["cast:Addmm:mat2:bfloat16"] == 32 * 4 * 2  # the second's (the first's input needs no grad)
    assert by_op["Gelu:self:bfloat16"] == 8 * 32 * 2

    transformers = pytest.importorskip("transformers")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=3, n_embd=32, n_head=2, vocab_size=64,
                                                                 n_positions=16))
    model.gradient_checkpointing_enable()
    model.train()
    ticks = iter(range(100, 1000))
    peaks, handles = block_backward_meter(model, lambda: next(ticks), lambda: None)
    try:
        logits = model(input_ids=torch.randint(0, 64, (2, 16))).logits
    finally:
        for handle in handles:
            handle.remove()
    assert peaks == []
    logits.float().sum().backward()
    assert [index for index, _ in peaks] == [2, 1, 0] and [p for _, p in peaks] == [100, 101, 102]
    assert all(not block._forward_pre_hooks for block in model.transformer.h)
    # a compiled model is left alone: hooks on its modules would make it recompile
    assert block_backward_meter(torch.compile(model), lambda: 0, lambda: None) == ([], [])
