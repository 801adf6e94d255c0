"""Diagnosis for issue 13 (the LSTM language model): the allocator's own peak of each segment of a training step.

Segments: the forward, the loss, and the backward split where each top-level child's output gradient arrives
(bwd_before_out = the loss's backward, up to the model output's gradient; then the decoder's, the LSTM's, the
embedding's backward), then the optimizer. Batch sizes 10 .. 6000 on the GPU; prints MiB per segment and writes
the bytes. Result: bench/results/lstm_segments_h200.json (the loss's backward is a line of ~19 MiB/sample from
batch 10 to 6000; the step's peak moves into it between batch 10 and 20).

    python3 bench/lstm_segments.py OUT.json      (CUDA only)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from zoo_models import LSTMLM  # noqa: E402

VOCAB, HIDDEN, SEQ = 33278, 650, 35
BATCHES = (10, 20, 40, 80, 160, 361, 1000, 2000, 4000, 6000)


def main(out: str) -> int:
    if not torch.cuda.is_available():
        print("lstm_segments: needs CUDA", file=sys.stderr)
        return 2
    cu = torch.cuda
    torch.manual_seed(0)
    model = LSTMLM(VOCAB, HIDDEN).cuda()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    crit = nn.CrossEntropyLoss()
    marks: list[tuple[str, int, int]] = []

    def mark(name: str) -> None:
        marks.append((name, cu.max_memory_allocated(), cu.memory_allocated()))
        cu.reset_peak_memory_stats()

    def arm(name: str) -> Callable[..., None]:
        def post(mod: nn.Module, inp: Any, out: Any) -> None:
            t = out[0] if isinstance(out, tuple) else out
            if t.requires_grad:
                t.register_hook(lambda g: mark("bwd_before_" + name))
        return post

    for n, m in model.named_children():
        m.register_forward_hook(arm(n))
    res = []
    for b in BATCHES:
        cu.empty_cache()
        for _ in range(3):
            x = torch.randint(0, VOCAB, (b, SEQ), device="cuda")
            y = torch.randint(0, VOCAB, (b, SEQ), device="cuda")
            cu.synchronize()
            marks.clear()
            cu.reset_peak_memory_stats()
            start = cu.memory_allocated()
            logits = model(x)
            mark("forward")
            loss = crit(logits.reshape(-1, VOCAB), y.reshape(-1))
            mark("loss")
            loss.backward()
            mark("bwd_end")
            opt.step()
            opt.zero_grad(set_to_none=True)
            mark("opt")
            del logits, loss
        step_peak = max(p for _, p, _ in marks)
        res.append({"batch": b, "start": start, "step_peak": step_peak, "segments": [[n, p, a] for n, p, a in marks]})
        print(b, step_peak >> 20, [(n, p >> 20) for n, p, _ in marks], flush=True)
    Path(out).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]) if len(sys.argv) == 2 else 2)
