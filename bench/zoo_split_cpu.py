"""The saved split of zoo architectures measured on this machine's CPU, classified with CUDA's autocast lists: an
offline projection of what the agent measures on the H200, for ``bench/predict_zoo.py --reevaluate FILE --splits
OUT`` on runs recorded before the agent measured it (H200 zoo run 5).

For each architecture (full size, bench/predict_zoo.py's configs) one forward at ``--batch`` under the agent's own
ActivationCounter, with saved_split.BlockSplitMeter on the checkpointed blocks (checkpoint_blocks) and saved_split.amp_bytes on the graph with
the CUDA lists and the CUDA allocator's 512-byte rounding: exactly what batchmon.agent.saved_split.SplitProbe does
on a sampled CUDA step, except for the device. What differs on the CPU is stated, not corrected: CPU kernels can
save other tensors than CUDA's (the H200 agent counted GPT-2's activations at 541.9 MB a sample; this GPT-2 at
571.4), and sdpa with dropout falls back to its math path on the CPU (softmax-sized tensors saved where CUDA's
memory-efficient kernel saves none), so GPT-2's attention dropout is set to 0 here (``--no-attn-dropout``, the
default): the H200's kernel with dropout saves no mask either.

Usage: python3 bench/zoo_split_cpu.py --arch gpt2-fp32 --out bench/results/zoo_split_cpu.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from batchmon.agent.accounting import ActivationCounter  # noqa: E402
from batchmon.agent.saved_split import (BlockSplitMeter, Fp32InputMeter, amp_bytes,  # noqa: E402
                                        batch_independent_inputs, checkpoint_blocks, fp32_input_modules)

CUDA_BLOCK = 512


def measure(model: torch.nn.Module, x: torch.Tensor, batch: int) -> dict[str, int]:
    """The split of one forward of ``model`` on ``x`` as SplitProbe would report it on a CUDA device."""
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    inputs = {x.untyped_storage().data_ptr()}
    counter = ActivationCounter(torch.device("cpu"), (params, inputs))
    counter.saved.block = CUDA_BLOCK
    blocks = checkpoint_blocks(model)
    meter = BlockSplitMeter(blocks, lambda: counter.bytes, CUDA_BLOCK) if blocks else None
    upcast = Fp32InputMeter(fp32_input_modules(model))
    counter.push()
    try:
        out = model(x)
    finally:
        counter.pop()
        upcast.remove()
    inside, block_inputs, n, largest = (meter.inside, meter.inputs, meter.blocks, meter.largest) if meter \
        else (0, 0, 0, 0)
    broadcast = meter.broadcast_inputs() if meter else {}
    if meter:
        meter.remove()
    under, reached, unknown = amp_bytes(out, counter.saved.keys, inputs, CUDA_BLOCK, "cuda",
                                       upcast=upcast.ids)
    missed = max(0, counter.bytes - reached)
    split = {"batch": batch, "saved": counter.bytes, "in_blocks": inside, "block_inputs": block_inputs, "blocks": n,
             "amp_saved": under + missed, "amp_unknown": unknown + missed,
             "output": -(-out.untyped_storage().nbytes() // CUDA_BLOCK) * CUDA_BLOCK}
    if n:
        split["block_max"] = largest
        fixed = batch_independent_inputs(out, broadcast, batch)
        if fixed:
            split["block_inputs_fixed"] = fixed
    return split


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="gpt2-fp32", help="comma-separated zoo architecture names")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--attn-dropout", action="store_true", help="keep GPT-2's attention dropout (CPU math path)")
    args = ap.parse_args(argv)
    if args.batch < 1:
        print("zoo_split_cpu: --batch must be >= 1", file=sys.stderr)
        return 2
    import predict_zoo

    entries = {e.arch.name: e for e in predict_zoo.zoo(smoke=False)}
    wanted = [a for a in args.arch.split(",") if a]
    unknown = [a for a in wanted if a not in entries]
    if unknown:
        print(f"zoo_split_cpu: unknown architecture {', '.join(unknown)} (known: {', '.join(entries)})",
              file=sys.stderr)
        return 2
    splits: dict[str, Any] = {}
    notes: dict[str, str] = {}
    for name in wanted:
        entry = entries[name]
        torch.manual_seed(0)
        model = entry.arch.build()
        model.train()
        if name == "gpt2-fp32" and not args.attn_dropout:
            for module in model.modules():
                if hasattr(module, "attn_dropout"):
                    module.attn_dropout.p = 0.0
            notes[name] = "attention dropout 0 (CUDA's memory-efficient sdpa saves no mask; CPU's math path would)"
        x, _ = entry.arch.batch(args.batch, torch.device("cpu"), torch.Generator().manual_seed(0))
        t0 = time.perf_counter()
        splits[name] = measure(model, x, args.batch)
        print(f"{name}: {json.dumps(splits[name])} ({time.perf_counter() - t0:.1f} s)", flush=True)
    doc = {"what": "saved split measured on the CPU with CUDA's autocast lists (a projection of the H200 agent's)",
           "torch": torch.__version__, "notes": notes, "splits": splits}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
