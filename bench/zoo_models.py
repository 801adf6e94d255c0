"""The small models of bench/predict_zoo.py built here from scratch (no downloads): an LSTM language model, a GRU
encoder-decoder, a UNet, and the wrapper that takes the logits out of a Hugging Face model's output."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class LSTMLM(nn.Module):
    """word_language_model's LSTM: embedding, 2-layer LSTM (batch_first), linear decoder to the vocabulary."""

    def __init__(self, vocab: int, hidden: int, layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, hidden)
        self.rnn = nn.LSTM(hidden, hidden, layers, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.rnn(self.emb(x))[0])


class GRUSeq2Seq(nn.Module):
    """GRU encoder-decoder with teacher forcing; x packs source and decoder input along the sequence."""

    def __init__(self, vocab: int, hidden: int, src_len: int) -> None:
        super().__init__()
        self.src_len = src_len
        self.emb = nn.Embedding(vocab, hidden)
        self.enc = nn.GRU(hidden, hidden, batch_first=True)
        self.dec = nn.GRU(hidden, hidden, batch_first=True)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.enc(self.emb(x[:, :self.src_len]))
        y, _ = self.dec(self.emb(x[:, self.src_len:]), h)
        return self.out(y)


class UNet(nn.Module):
    """A small UNet: conv blocks down with max-pooling, up with transposed convs and skip concatenation."""

    def __init__(self, base: int, depth: int = 4, classes: int = 2) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Module:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                                 nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        chans = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([block(3, chans[0])] + [block(chans[i], chans[i + 1]) for i in range(depth)])
        self.up = nn.ModuleList(nn.ConvTranspose2d(chans[i + 1], chans[i], 2, stride=2) for i in reversed(range(depth)))
        self.merge = nn.ModuleList(block(2 * chans[i], chans[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(chans[0], classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, down in enumerate(self.down):
            x = down(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for up, fuse in zip(self.up, self.merge, strict=True):
            x = fuse(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


class HFLogits(nn.Module):
    """A Hugging Face model called as model(x) -> logits (the bench's Runner calls model(x)). For an
    encoder-decoder, x packs the encoder input and the decoder input along the sequence."""

    def __init__(self, model: nn.Module, src_len: int | None = None) -> None:
        super().__init__()
        self.model = model
        self.src_len = src_len

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.src_len is None:
            return self.model(input_ids=x).logits
        return self.model(input_ids=x[:, :self.src_len], decoder_input_ids=x[:, self.src_len:]).logits
