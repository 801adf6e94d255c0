"""The checkpointing what-if's pool from what the agent measures: the blocks' saved storages in creation order
(batchmon.agent.saved_split.BlockSplitMeter.sequence), carried in the split's ``block_seq``, synthesised into the
checkpointed step's allocations (batchmon.memory_model.ckpt_trace) and run through the allocator's model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from batchmon.agent.accounting import ActivationCounter
from batchmon.agent.saved_split import BlockSplitMeter, checkpoint_blocks
from batchmon.memory_model import WhatIf, fit
from batchmon.memory_model.ckpt_trace import synthesise
from batchmon.memory_model.step_trace import POOL_SCAN, largest_batch, simulate
from batchmon.protocol import Step, decode, encode

BENCH = Path(__file__).resolve().parent.parent / "bench"
MIB = 2**20
D, VOCAB, SEQ = 64, 512, 32


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(D)
        self.up = torch.nn.Linear(D, 4 * D)
        self.down = torch.nn.Linear(4 * D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(F.gelu(self.up(self.norm(x))))


class Net(torch.nn.Module):
    def __init__(self, blocks: int = 4, ckpt: bool = False) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, D)
        self.blocks = torch.nn.ModuleList(Block() for _ in range(blocks))
        self.head = torch.nn.Linear(D, VOCAB)
        self.ckpt = ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for block in self.blocks:
            h = checkpoint(block, h, use_reentrant=False) if self.ckpt else block(h)
        return self.head(h)


def _measure(model: Net, batch: int, sequence: bool = True) -> tuple[dict | None, ActivationCounter, BlockSplitMeter]:
    x = torch.randint(0, VOCAB, (batch, SEQ))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counter = ActivationCounter(torch.device("cpu"), (params, {x.untyped_storage().data_ptr()}))
    meter = BlockSplitMeter(checkpoint_blocks(model), lambda: counter.bytes, 1,
                            pack=counter._pack if sequence else None, batch=batch)
    counter.push()
    try:
        model(x)
    finally:
        counter.pop()
    seq = meter.sequence(counter.bytes, 0)
    meter.remove()
    return seq, counter, meter


def test_the_sequence_counts_what_the_counter_counts_and_dedupes_equal_blocks():
    torch.manual_seed(0)
    model = Net(blocks=4)
    seq, counter, meter = _measure(model, 8)
    _, plain, plain_meter = _measure(model, 8, sequence=False)
    assert seq is not None and meter.errors == 0
    assert counter.bytes == plain.bytes and meter.inside == plain_meter.inside  # counted exactly as without it
    assert len(seq["kinds"]) == 1 and len(seq["order"]) == 4  # four equal blocks: one kind
    hidden, saved, params = seq["kinds"][0]
    assert hidden == 8 * SEQ * D * 4
    assert sorted(params) == sorted(p.numel() * 4 for p in model.blocks[0].parameters())
    # each block's own input (saved by its norm) is left out: kept by its checkpoint, never recomputed
    assert sum(saved) * 4 + 4 * hidden == meter.inside
    assert seq["before"] == 0 and seq["after"] > 0  # the head saves the last hidden state


def test_the_sequence_travels_in_the_split_and_a_bad_one_leaves_the_split():
    torch.manual_seed(0)
    seq, _, _ = _measure(Net(blocks=2), 4)
    split = {"batch": 4, "saved": 1000, "in_blocks": 800, "block_inputs": 100, "blocks": 2, "block_seq": seq}
    step = Step.from_dict(dict(_step(), saved_split=split))
    back = decode(encode(step))
    assert isinstance(back, Step) and back.saved_split is not None and back.saved_split["block_seq"] == seq
    bad = dict(split, block_seq={"kinds": [[1, ["x"], []]], "order": [[0, 0]]})
    back = decode(encode(Step.from_dict(dict(_step(), saved_split=bad))))
    assert isinstance(back, Step) and back.saved_split is not None
    assert "block_seq" not in back.saved_split and back.saved_split["in_blocks"] == 800
    assert len(json.dumps(seq)) < 2000  # small on the wire


def _step(batch: int = 4) -> dict:
    return {"v": 1, "type": "step", "step": 5, "time": 1.0, "step_seconds": 0.1, "batch_size": batch,
            "components": {"parameters": 10, "gradients": 10, "optimizer": 20, "activations": 100, "batch": 4,
                           "other": 0}}


def test_the_synthesised_step_peaks_with_the_real_checkpointed_one():
    """bench/step_alloc_trace.py records the real checkpointed step op by op; the synthesis from the plain run's
    measured sequence peaks within 15% of it at two batch sizes, and both grow with the batch."""
    sys.path.insert(0, str(BENCH))
    from step_alloc_trace import record, scaled

    torch.manual_seed(0)
    model = Net(blocks=6, ckpt=True)
    opt = torch.optim.AdamW(model.parameters(), foreach=True)

    def step(b: int) -> None:
        x = torch.randint(0, VOCAB, (b, SEQ))
        F.cross_entropy(model(x).reshape(-1, VOCAB), x.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(1)
    persistent = [p.untyped_storage().nbytes() for p in model.parameters()]
    persistent += [v.untyped_storage().nbytes() for s in opt.state.values() for k, v in s.items() if k != "step"]
    real = scaled(persistent, {b: record(step, b) for b in (2, 3, 4)})
    model.ckpt = False
    seq, counter, _ = _measure(model, 4)
    pbytes = sum(p.numel() * 4 for p in model.parameters())
    synth = synthesise(seq, 4, 4 * SEQ * VOCAB * 4, pbytes, 2 * pbytes)
    assert synth is not None
    peaks = []
    for b in (64, 256):
        r, s = simulate(real, b), simulate(synth, b)
        assert abs(s.peak_allocated / r.peak_allocated - 1) < 0.15, (b, s.peak_allocated, r.peak_allocated)
        peaks.append(s.peak_allocated)
    assert peaks[1] > 2 * peaks[0]


def test_the_largest_batch_is_below_every_failure_near_it():
    torch.manual_seed(0)
    seq, _, _ = _measure(Net(blocks=3), 4)
    trace = synthesise(seq, 4, 4 * SEQ * VOCAB * 4, 4 * MIB, 8 * MIB)
    assert trace is not None
    limit = 900 * MIB
    best = largest_batch(trace, limit, start=8)
    assert best > 0 and not simulate(trace, best * 2, limit).ok
    assert all(simulate(trace, b, limit).ok for b in range(max(1, int(best * (1 - POOL_SCAN))), best + 1))


def test_fit_synthesises_the_pool_from_the_agents_sequence_and_falls_back_without_it():
    torch.manual_seed(0)
    seq, counter, meter = _measure(Net(blocks=4), 8)
    assert seq is not None
    act = counter.bytes
    split = {"batch": 8, "saved": act, "in_blocks": meter.inside, "block_inputs": meter.inputs, "blocks": 4,
             "block_max": meter.largest, "output": 8 * SEQ * VOCAB * 4}
    comps = {"parameters": 4 * MIB, "gradients": 4 * MIB, "optimizer": 8 * MIB, "batch": 0, "other": 0}

    def steps(with_seq: bool) -> list[Step]:
        out = []
        for i, b in enumerate((8, 8, 4)):
            d = dict(_step(b), step=i + 1, components=dict(comps, activations=act * b // 8))
            d["saved_split"] = dict(split, block_seq=seq) if with_seq else split
            out.append(Step.from_dict(d))
        return out

    spec = WhatIf(checkpointing=True)
    synthesised = fit(steps(True), optimizer="AdamW")
    fallback = fit(steps(False), optimizer="AdamW")
    assert synthesised is not None and fallback is not None
    assert synthesised.recompute_trace is not None and fallback.recompute_trace is None
    total = 2 * 2**30
    best = synthesised.max_batch(total, spec)
    assert best and best > 8
    p = synthesised.predict(WhatIf(batch_size=best, checkpointing=True), device_total=total)
    assert any("pool simulated" in n for n in p.basis_fields.what_if)
    limit = total - synthesised.context - p.margin
    assert simulate(synthesised.recompute_trace, best, limit).ok


def test_the_checkpointing_what_if_simulates_a_bounded_number_of_steps(monkeypatch):
    """On a large device the answer is large: the non-monotone pool's check simulates at most POOL_SCAN_PROBES
    batches below it, not every batch of 10% (a tiny GPT on 24 GiB: 4900 simulations, 27 s in the monitor)."""
    import math

    from batchmon.memory_model import model as model_module
    from batchmon.memory_model.step_trace import POOL_SCAN_PROBES

    torch.manual_seed(0)
    seq, counter, meter = _measure(Net(blocks=4), 8)
    assert seq is not None
    act = counter.bytes
    split = {"batch": 8, "saved": act, "in_blocks": meter.inside, "block_inputs": meter.inputs, "blocks": 4,
             "block_max": meter.largest, "output": 8 * SEQ * VOCAB * 4, "block_seq": seq}
    comps = {"parameters": 4 * MIB, "gradients": 4 * MIB, "optimizer": 8 * MIB, "batch": 0, "other": 0}
    steps = [Step.from_dict(dict(_step(b), step=i + 1, components=dict(comps, activations=act * b // 8),
                                 saved_split=split)) for i, b in enumerate((8, 8, 4))]
    model = fit(steps, optimizer="AdamW")
    assert model is not None and model.recompute_trace is not None
    calls = [0]
    real = model_module.simulate

    def counted(*args, **kwargs):
        calls[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(model_module, "simulate", counted)
    best = model.max_batch(256 * 2**30, WhatIf(checkpointing=True))
    assert best is not None and best > 10 * POOL_SCAN_PROBES  # large enough that every batch of 10% is many more
    assert calls[0] <= 2 * math.ceil(math.log2(best)) + POOL_SCAN_PROBES + 4, (best, calls[0])
