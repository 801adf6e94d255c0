#!/usr/bin/env python3
"""A small GPT trained with AdamW on synthetic tokens: the GPU example for batchmon.

The model (written here, GPT-2 style: learned positions, pre-LayerNorm blocks, tied embeddings, causal
scaled-dot-product attention) has 111M parameters with the defaults (12 layers, 12 heads, width 768, vocabulary
32768, context 1024). The loss is computed inside the model's forward, so the agent sees the targets as
batch and the loss's saved tensors (the log-softmax output) as activations.

    python examples/train_gpt.py --steps 20 --batch-size 8                 # CUDA if available
    batchmon run -- python examples/train_gpt.py --check --check-out gpt_check.json
    python examples/train_gpt.py --tiny --device cpu --steps 3             # seconds on a CPU

``--check`` compares the agent's components with torch.cuda.memory_allocated() deltas measured in the same
run (see memcheck.py); ``--amp`` trains under bf16 autocast.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import memcheck  # noqa: E402
from common import pick_device  # noqa: E402 - bench/agent_overhead.py calls it as train_gpt.pick_device

if __name__ == "__main__":
    memcheck.prepare_allocator(sys.argv[1:])

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 32768
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0


TINY = GPTConfig(block_size=64, vocab_size=512, n_layer=2, n_head=2, n_embd=64)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        self.dropout = cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(b, t, c)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one storage, counted once
        self.apply(self._init)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        _, t = idx.shape
        pos = torch.arange(t, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: nn.Module, lr: float = 3e-4, weight_decay: float = 0.1) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def make_batch(cfg: GPTConfig, batch_size: int, seq_len: int, device: torch.device,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Synthetic tokens, made on the CPU and moved, as a data loader would."""
    x = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=generator)
    y = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=generator)
    return x.to(device), y.to(device)


def autocast(device: torch.device, enabled: bool):  # noqa: ANN201 - a context manager
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=20, help="optimizer steps (default 20)")
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step (default 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence (default: the context, 1024)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default auto)")
    p.add_argument("--tiny", action="store_true", help="a 2-layer width-64 model for CPU smoke tests")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--attach", action="store_true", help="call batchmon.attach(model, optimizer) explicitly")
    p.add_argument("--seed", type=int, default=0)
    memcheck.add_arguments(p)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1:
        p.error("--steps and --batch-size must be >= 1")
    if args.check and args.steps < 3:
        p.error("--check needs --steps >= 3 (the checked step must not be one of the first two)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    device = pick_device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = TINY if args.tiny else GPTConfig()
    if args.layers:
        cfg = GPTConfig(**{**cfg.__dict__, "n_layer": args.layers})
    seq_len = args.seq_len or cfg.block_size

    meter = memcheck.Meter(device)
    model = GPT(cfg)
    before = meter.allocated()
    model.to(device)
    meter.record("parameters", before, meter.allocated())
    optimizer = make_optimizer(model, lr=args.lr)

    handle = None
    if args.attach or args.check:
        import batchmon

        handle = batchmon.attach(model, optimizer, name="train_gpt", activation_every=1 if args.check else None)
    print(f"train_gpt: {param_count(model) / 1e6:.1f}M parameters, {cfg.n_layer} layers, device {device}, "
          f"batch {args.batch_size}x{seq_len}, amp={args.amp}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)
    memcheck.run_steps(meter, optimizer, args.steps, lambda: make_batch(cfg, args.batch_size, seq_len, device, gen),
                       model, amp=args.amp)

    if args.check:
        result = memcheck.compare("train_gpt", meter, handle.last_step if handle else None,
                                  {"amp": args.amp, "parameters_count": param_count(model),
                                   "config": {**cfg.__dict__, "seq_len": seq_len}})
        return memcheck.report(result, args.check_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
