"""batchmon/agent/saved_kinds.py with real torch on CPU: the blocks a checkpoint would wrap, and the saved
bytes inside them against the agent's ActivationCounter total."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

from batchmon.agent.accounting import ActivationCounter  # noqa: E402
from batchmon.agent.saved_kinds import dtype_kind, repeated_blocks  # noqa: E402
from batchmon.agent.saved_split import BlockSplitMeter  # noqa: E402


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.relu(self.fc1(x)))


class LM(nn.Module):
    def __init__(self, vocab: int = 500, d: int = 32, layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def test_repeated_blocks_finds_the_layers():
    model = LM(layers=4)
    assert repeated_blocks(model) == list(model.blocks)
    assert repeated_blocks(nn.Linear(3, 3)) == []


def test_block_split_meter_splits_saved_bytes_inside_and_outside_the_blocks():
    torch.manual_seed(0)
    model = LM(layers=4)
    x = torch.randint(0, 500, (8, 16))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    counter = ActivationCounter(torch.device("cpu"), (params, {x.untyped_storage().data_ptr()}))
    meter = BlockSplitMeter(repeated_blocks(model), lambda: counter.bytes, block=1)
    counter.push()
    try:
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 500), torch.randint(0, 500, (128,)))
    finally:
        counter.pop()
    assert meter.blocks == 4 and 0 < meter.inside < counter.bytes
    # each block's (8, 16, 32) fp32 input, each storage once (block k's input is block k-1's output): what a
    # checkpoint keeps
    assert meter.inputs == 4 * 8 * 16 * 32 * 4
    # each block saves its input (fc1's) and the relu output (relu's and fc2's input, one storage):
    # 8*16*(32 + 128) fp32 values; the blocks are equal, so the largest is a quarter
    assert meter.inside == 4 * 8 * 16 * (32 + 128) * 4 and meter.largest == meter.inside // 4
    # outside: the head's input is the last block's output, the logits' log-softmax, the embedding's indices
    assert counter.bytes - meter.inside >= 8 * 16 * 500 * 4
    loss.backward()  # the hooks did not change the training
    assert meter.errors == 0
    meter.remove()
    assert not model.blocks[0]._forward_hooks and not model.blocks[0]._forward_pre_hooks


def test_dtype_kind():
    assert dtype_kind(torch.zeros(1, dtype=torch.bfloat16)) == "16-bit"
    assert dtype_kind(torch.zeros(1)) == "fp32"
    assert dtype_kind(torch.zeros(1, dtype=torch.bool)) == "other"
