"""Issue 12 point 3: the batch dimension is found, not assumed; and said where it comes from (step.batch_source)."""

from __future__ import annotations

from collections import UserDict

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.rnn import pack_padded_sequence

import batchmon
from batchmon.agent import handle as agent
from agent_helpers import agent_dir  # noqa: F401 - fixture

VOCAB, EMB = 50, 12


class WordLM(nn.Module):
    """The word-language-model shape: (sequence, batch) token ids into a batch_first=False LSTM or Transformer."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        if kind == "lstm":
            self.body: nn.Module = nn.LSTM(EMB, EMB, num_layers=2)
        else:
            self.body = nn.TransformerEncoder(nn.TransformerEncoderLayer(EMB, 2, 24, dropout=0.0), 2,
                                              enable_nested_tensor=False)
        self.kind = kind
        self.out = nn.Linear(EMB, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        h = self.body(h)[0] if self.kind == "lstm" else self.body(h)
        return self.out(h)


def train(model: nn.Module, batches, **attach) -> list:
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, **attach)
    for x in batches:
        opt.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out.reshape(-1, VOCAB), torch.zeros(out.shape[0] * out.shape[1],
                                                                         dtype=torch.long)).backward()
        opt.step()
    return handle.steps


@pytest.mark.parametrize("kind,module", [("lstm", "LSTM"), ("transformer", "MultiheadAttention")])
def test_sequence_first_models_report_the_batch_not_the_sequence(agent_dir, kind, module):
    torch.manual_seed(0)
    batches = [torch.randint(0, VOCAB, (35, 20)) for _ in range(4)] + [torch.randint(0, VOCAB, (31, 20))]
    steps = train(WordLM(kind), batches)
    assert [s.batch_size for s in steps] == [20] * 5  # not 35 / 31, the sequence lengths
    assert {s.batch_source for s in steps} == {f"input dim 1 ({module} batch_first=False)"}


def test_batch_first_lstm_stays_dim_0(agent_dir):
    class Tagger(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(4, 8, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.lstm(x)[0])

    model = Tagger()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(6, 9, 4)).sum().backward()
        opt.step()
    assert [(s.batch_size, s.batch_source) for s in handle.steps] == [(6, "input dim 0")] * 3


def test_packed_sequence_batch(agent_dir):
    class Packed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gru = nn.GRU(4, 8)

        def forward(self, packed):
            return self.gru(packed)[1]

    model = Packed()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    for _ in range(2):
        x = torch.randn(10, 5, 4)  # (T, B, F), 5 sequences of lengths 10..6
        packed = pack_padded_sequence(x, torch.tensor([10, 9, 8, 7, 6]))
        opt.zero_grad()
        model(packed).sum().backward()
        opt.step()
    assert [(s.batch_size, s.batch_source) for s in handle.steps] == [(5, "packed sequence")] * 2


class Encoding(UserDict):
    """A tokenizer output: a mapping, not a dict."""


class HFStyle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, EMB)
        self.head = nn.Linear(EMB, 2)

    def forward(self, input_ids=None, attention_mask=None, batch=None):
        if batch is not None:
            input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        return self.head((self.emb(input_ids) * attention_mask[..., None]).mean(1))


@pytest.mark.parametrize("style", ["kwargs", "mapping", "list"])
def test_dict_list_and_tokenizer_batches(agent_dir, style):
    model = HFStyle()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt)
    for _ in range(2):
        enc = Encoding(input_ids=torch.randint(0, VOCAB, (3, 17)), attention_mask=torch.ones(3, 17))
        opt.zero_grad()
        if style == "kwargs":
            out = model(**enc)
        elif style == "mapping":
            out = model(batch=enc)
        else:
            out = model(*[enc["input_ids"], enc["attention_mask"]])
        out.sum().backward()
        opt.step()
    assert [s.batch_size for s in handle.steps] == [3, 3]


def test_batch_dim_from_attach_and_env(agent_dir, monkeypatch):
    class SeqFirstNoHint(nn.Module):  # sequence-first input, nothing in the model says so
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    model = SeqFirstNoHint()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    monkeypatch.setenv("BATCHMON_BATCH_DIM", "1")
    handle = batchmon.attach(model, opt)
    opt.zero_grad()
    model(torch.randn(30, 7, 4)).sum().backward()
    opt.step()
    assert (handle.last_step.batch_size, handle.last_step.batch_source) == (7, "input dim 1 (BATCHMON_BATCH_DIM)")
    batchmon.attach(model, opt, batch_dim=0)  # attach's argument wins
    opt.zero_grad()
    model(torch.randn(30, 7, 4)).sum().backward()
    opt.step()
    assert (handle.last_step.batch_size, handle.last_step.batch_source) == (30, "input dim 0 (batch_dim=)")
    with pytest.raises(ValueError):
        batchmon.attach(model, opt, batch_dim=-1)


def test_batch_size_fn_is_named_as_the_source(agent_dir):
    model = nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, batch_size_fn=lambda x: 11)
    opt.zero_grad()
    model(torch.randn(3, 4)).sum().backward()
    opt.step()
    assert (handle.last_step.batch_size, handle.last_step.batch_source) == (11, "batch_size_fn")
    assert agent.current() is handle


def test_sequence_first_classifier_batch_from_the_targets(agent_dir):
    class ConvOverTime(nn.Module):  # (T, B, F) input, no batch_first module: only the targets tell
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)

        def forward(self, x):
            return self.lin(x).mean(0)  # (B, 3)

    model = ConvOverTime()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    handle = batchmon.attach(model, opt)
    for _ in range(4):
        opt.zero_grad()
        crit(model(torch.randn(30, 7, 4)), torch.randint(0, 3, (7,))).backward()
        opt.step()
    assert [(s.batch_size, s.batch_source) for s in handle.steps] == [(7, "input dim 1 (matches the targets)")] * 4
