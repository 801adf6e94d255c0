"""Word-level language model in the shape of the classic PyTorch example: (sequence, batch) token batches
cut from one long stream (the last chunk shorter), an LSTM or a Transformer encoder with batch_first=False,
hidden state carried between chunks, manual SGD (``p.data.add_``, no torch.optim), gradient clipping,
evaluation under no_grad, and ``torch.save(model, f)`` of the whole model at the end."""

from __future__ import annotations

import math
import os
import tempfile

import torch
import torch.nn as nn

from pattern_common import Report, parse, seed

BPTT, BATCH, VOCAB = 35, 20, 200


class RNNModel(nn.Module):
    def __init__(self, ntoken: int, ninp: int, nhid: int, nlayers: int, dropout: float = 0.2) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = nn.LSTM(ninp, nhid, nlayers, dropout=dropout)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, bsz: int):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


class PositionalEncoding(nn.Module):
    def __init__(self, d_model: int, max_len: int = 500) -> None:
        super().__init__()
        pe = torch.zeros(max_len, d_model)
        position = torch.arange(0, max_len, dtype=torch.float).unsqueeze(1)
        div_term = torch.exp(torch.arange(0, d_model, 2).float() * (-math.log(10000.0) / d_model))
        pe[:, 0::2] = torch.sin(position * div_term)
        pe[:, 1::2] = torch.cos(position * div_term)
        self.register_buffer("pe", pe.unsqueeze(0).transpose(0, 1))

    def forward(self, x):
        return x + self.pe[: x.size(0), :]


class TransformerModel(nn.Module):
    def __init__(self, ntoken: int, ninp: int, nhead: int, nhid: int, nlayers: int) -> None:
        super().__init__()
        self.pos_encoder = PositionalEncoding(ninp)
        layer = nn.TransformerEncoderLayer(ninp, nhead, nhid, dropout=0.0)
        self.transformer_encoder = nn.TransformerEncoder(layer, nlayers, enable_nested_tensor=False)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.decoder = nn.Linear(ninp, ntoken)
        self.ninp = ninp

    def forward(self, src, mask):
        src = self.pos_encoder(self.encoder(src) * math.sqrt(self.ninp))
        return self.decoder(self.transformer_encoder(src, mask))


def batchify(data: torch.Tensor, bsz: int, device: str) -> torch.Tensor:
    nbatch = data.size(0) // bsz
    return data.narrow(0, 0, nbatch * bsz).view(bsz, -1).t().contiguous().to(device)


def get_batch(source: torch.Tensor, i: int):
    seq_len = min(BPTT, len(source) - 1 - i)
    return source[i:i + seq_len], source[i + 1:i + 1 + seq_len].reshape(-1)


def repackage_hidden(h):
    return h.detach() if isinstance(h, torch.Tensor) else tuple(repackage_hidden(v) for v in h)


def main() -> None:
    args = parse(__doc__, steps=5, extra=lambda p: p.add_argument("--model", choices=["lstm", "transformer"],
                                                                   default="lstm"))
    seed(args.device)
    report = Report(f"word_lm_{args.model}", args)
    report.batch_source = "input dim 1"
    stream = torch.randint(0, VOCAB, (BPTT * BATCH * (args.steps - 1) + 31 * BATCH + BATCH + 1,))
    train_data = batchify(stream, BATCH, args.device)
    val_data = batchify(torch.randint(0, VOCAB, (BPTT * 10 + 1,)), 10, args.device)
    if args.model == "lstm":
        model: nn.Module = RNNModel(VOCAB, 32, 32, 2).to(args.device)
    else:
        model = TransformerModel(VOCAB, 32, 2, 64, 2).to(args.device)
    criterion = nn.NLLLoss()
    lr = 5.0
    model.train()
    hidden = model.init_hidden(BATCH) if args.model == "lstm" else None
    for batch, i in enumerate(range(0, train_data.size(0) - 1, BPTT)):
        data, targets = get_batch(train_data, i)
        model.zero_grad()
        if args.model == "lstm":
            hidden = repackage_hidden(hidden)
            output, hidden = model(data, hidden)
        else:
            mask = nn.Transformer.generate_square_subsequent_mask(len(data)).to(args.device)
            output = model(data, mask)
        output = torch.log_softmax(output.view(-1, VOCAB), dim=-1)
        loss = criterion(output, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.25)
        for p in model.parameters():
            p.data.add_(p.grad, alpha=-lr)
        report.step(loss.item(), data.size(1))
        if batch == 1:  # evaluation between steps
            model.eval()
            with torch.no_grad():
                vd, vt = get_batch(val_data, 0)
                if args.model == "lstm":
                    model(vd, model.init_hidden(10))
                else:
                    model(vd, nn.Transformer.generate_square_subsequent_mask(len(vd)).to(args.device))
            model.train()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.pt")
        with open(path, "wb") as f:
            torch.save(model, f)
        with open(path, "rb") as f:
            torch.load(f, weights_only=False)
    report.write()


if __name__ == "__main__":
    main()
