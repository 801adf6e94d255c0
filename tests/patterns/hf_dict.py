"""Hugging Face style: a tokenizer-like collate returns a BatchEncoding-like mapping (input_ids, attention_mask,
labels), the model is called as ``model(**batch)`` and returns an output object with ``.loss``; AdamW with a
linear warm-up schedule, gradient clipping."""

from __future__ import annotations

from collections import UserDict
from dataclasses import dataclass

import torch
import torch.nn as nn

from pattern_common import Report, parse, seed

VOCAB = 100


class BatchEncoding(UserDict):
    """What a tokenizer returns: a mapping (not a dict) with attribute access and ``.to(device)``."""

    def __getattr__(self, name):
        try:
            return self.data[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device):
        self.data = {k: v.to(device) for k, v in self.data.items()}
        return self


@dataclass
class SequenceClassifierOutput:
    loss: torch.Tensor
    logits: torch.Tensor


class TinyBert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embeddings = nn.Embedding(VOCAB, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.classifier = nn.Linear(32, 3)

    def forward(self, input_ids=None, attention_mask=None, labels=None):
        h = self.encoder(self.embeddings(input_ids), src_key_padding_mask=attention_mask == 0)
        logits = self.classifier(h[:, 0])
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def collate(n: int, length: int) -> BatchEncoding:
    ids = torch.randint(1, VOCAB, (n, length))
    mask = torch.ones(n, length, dtype=torch.long)
    mask[:, length - 3:] = 0
    return BatchEncoding(input_ids=ids, attention_mask=mask, labels=torch.randint(0, 3, (n,)))


def main() -> None:
    args = parse(__doc__, steps=5)
    seed(args.device)
    report = Report("hf_dict", args)
    report.batch_source = "input dim 0"
    model = TinyBert().to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 3))
    model.train()
    for step in range(args.steps):
        batch = collate(6, 24).to(args.device)
        outputs = model(**batch)
        outputs.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        report.step(outputs.loss.item(), 6)
    report.write()


if __name__ == "__main__":
    main()
