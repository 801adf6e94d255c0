#!/usr/bin/env python3
"""DistributedDataParallel training of a small MLP, one process per rank: the torchrun example.

    torchrun --nproc-per-node 2 examples/train_ddp.py --steps 300                  # NCCL on GPUs, else gloo on CPU
    batchmon run -- torchrun --nproc-per-node 2 examples/train_ddp.py --steps 0    # every rank attaches by itself
    torchrun --nproc-per-node 2 examples/train_ddp.py --attach                     # batchmon.attach() in the script

Each rank trains on its own shard of synthetic data. ``--rank-batch-step N`` gives rank r a batch of
``--batch-size + r*N`` rows (uneven shards, as when a dataset does not split evenly), so the ranks' activation
and batch memory differ: the imbalance batchmon shows between ranks. ``--report`` prints one JSON line per rank
at the end with its losses and what its agent saw.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import agent_report  # noqa: E402
from train_mlp import build_model  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200, help="optimizer steps; 0 runs until interrupted (default 200)")
    p.add_argument("--batch-size", type=int, default=256, help="rows per rank per step (default 256)")
    p.add_argument("--rank-batch-step", type=int, default=0,
                   help="rank r gets --batch-size + r*N rows: uneven shards (default 0, all equal)")
    p.add_argument("--vary-batch", action="store_true",
                   help="cycle each rank's batch through 1/4, 1/2 and 1x its size (feeds the memory model)")
    p.add_argument("--input-dim", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--classes", type=int, default=16)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU even where CUDA is available")
    p.add_argument("--sleep", type=float, default=0.0, help="seconds to pause after each step (for watching)")
    p.add_argument("--attach", action="store_true", help="call batchmon.attach(model, optimizer) in the script")
    p.add_argument("--report", action="store_true", help="print a JSON line per rank at the end")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 0 or args.batch_size < 1 or args.layers < 1 or args.rank_batch_step < 0:
        p.error("--steps and --rank-batch-step must be >= 0, --batch-size and --layers >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    cuda = torch.cuda.is_available() and not args.cpu
    if cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if cuda else {}))
    torch.manual_seed(args.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)
    model = DistributedDataParallel(build_model(args.input_dim, args.hidden, args.layers, args.classes, nn.GELU).to(device),
                                    device_ids=[local] if cuda else None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    criterion = nn.CrossEntropyLoss()
    if args.attach:
        import batchmon

        batchmon.attach(model, optimizer, name="train_ddp")
    gen = torch.Generator(device="cpu").manual_seed(args.seed * 1000 + rank)  # each rank its own shard
    full = args.batch_size + rank * args.rank_batch_step
    sizes = [max(1, full // 4), max(1, full // 2), full] if args.vary_batch else [full]
    losses: list[float] = []
    t0 = time.perf_counter()
    steps = itertools.count(1) if args.steps == 0 else range(1, args.steps + 1)
    code = 0
    try:
        for step in steps:
            b = sizes[(step - 1) % len(sizes)]
            x = torch.randn(b, args.input_dim, generator=gen).to(device, non_blocking=True)
            y = torch.randint(0, args.classes, (b,), generator=gen).to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x), y)
            loss.backward()
            optimizer.step()
            losses.append(round(loss.item(), 6))
            if rank == 0 and (step == 1 or step % 50 == 0):
                print(f"step {step:5d}  loss {losses[-1]:.4f}  {time.perf_counter() - t0:.1f}s", flush=True)
            if args.sleep > 0:
                time.sleep(args.sleep)
    except KeyboardInterrupt:
        code = 130
    finally:
        if args.report:
            line = json.dumps({"rank": rank, "world_size": world, "batch_size": full, "losses": losses,
                               "agent": agent_report()})
            if code == 0:  # one rank at a time: lines the ranks write at the same moment can share a line
                for turn in range(world):
                    if turn == rank:
                        print(line, flush=True)
                    dist.barrier()
            else:  # interrupted: the other ranks may be gone, no barrier
                print(line, flush=True)
        if code == 0:
            dist.destroy_process_group()
    return code


if __name__ == "__main__":
    sys.exit(main())
