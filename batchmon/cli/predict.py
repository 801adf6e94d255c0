"""`batchmon predict`: closed-form training memory as a calculator, for planning without a GPU.

fp32 + Adam gives parameters N*4, gradients N*4, optimizer 2*N*4, batch B*D*4. Activations: with ``--heads``
and ``--seq-len``, a transformer's per-layer ``s*B*h*(34 + 5*a*s/h)`` bytes for 16-bit activations
(Korthikanti et al., MLSys 2023; flash attention, full recompute and fp32 variants: batchmon.formulas);
without a sequence length, B*L*H*a - exact only for an L-layer ReLU MLP of width H, a lower bound for anything
else, and the output says so. The runtime parts (workspaces, allocator cache, CUDA context) are only known by
measuring: attach the agent.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from batchmon.formulas import (ATTENTION, DTYPES, OPTIMIZER_STATES, RECOMPUTE, formula_breakdown,
                               formula_max_batch, formula_text)
from batchmon.protocol import COMPONENTS
from batchmon.units import format_bytes, format_count, parse_count, parse_size

#: the largest values the calculator takes: far beyond any real model or device, small enough that every
#: figure stays an exact integer that formats (values of 1e400 overflowed float formatting)
MAXIMUM = {"params": 10**15, "layers": 10**6, "hidden": 10**9, "input_dim": 10**12, "batch": 2**40,
           "heads": 10**6, "seq_len": 10**9, "device_memory": 2**60}


def _checked(parse: Callable[[str], int], minimum: int, maximum: int, expected: str,
             show: Callable[[int], str] = format_count) -> Callable[[str], int]:
    """An argparse type: ``parse`` the text and require minimum..maximum, so bad input is a one-line error."""
    def convert(text: str) -> int:
        if text.strip().startswith("-"):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"expected at most {maximum:,} ({show(maximum)}), got {text!r}")
        return value

    return convert


def _count(name: str, minimum: int = 1) -> Callable[[str], int]:
    return _checked(parse_count, minimum, MAXIMUM[name], "a positive number" if minimum else "a number >= 0")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `batchmon predict` (cli/main.py calls this while building the parser)."""
    parser.add_argument("--params", type=_count("params"), required=True, metavar="N",
                        help="number of parameters: 125M, 1.3B, 7e9 or a plain integer")
    parser.add_argument("--layers", type=_count("layers"), required=True, metavar="L", help="number of layers")
    parser.add_argument("--hidden", type=_count("hidden"), required=True, metavar="H",
                        help="hidden size (neurons per layer, a transformer's model width)")
    parser.add_argument("--input-dim", type=_count("input_dim", 0), required=True, metavar="D",
                        help="input values per sample (e.g. tokens per sequence, or C*H*W)")
    parser.add_argument("--batch", type=_count("batch"), required=True, metavar="B", help="batch size")
    parser.add_argument("--heads", type=_count("heads"), metavar="A",
                        help="attention heads: with --seq-len, transformer activations per layer "
                             "s*B*h*(34+5*a*s/h) bytes (16-bit; Korthikanti et al. 2023)")
    parser.add_argument("--seq-len", type=_count("seq_len"), metavar="S",
                        help="sequence length (transformers); without it activations are a lower bound")
    parser.add_argument("--attention", choices=ATTENTION, default="standard",
                        help="flash: no s x s attention matrix saved (drops the 5*a*s/h term) (default: standard)")
    parser.add_argument("--recompute", choices=RECOMPUTE, default="none",
                        help="full: activation checkpointing of every layer, 2*s*B*h bytes a layer kept "
                             "(default: none)")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATES), default="adam",
                        help="optimizer: states per parameter sgd 0, sgd-momentum 1, adam/adamw 2 (default: adam)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="fp32; bf16 (2-byte weights, gradients, activations, inputs; fp32 optimizer states); "
                             "amp (autocast: fp32 master weights, 16-bit activations) (default: fp32)")
    parser.add_argument("--device-memory", type=_checked(parse_size, 1, MAXIMUM["device_memory"], "a positive size",
                                                              format_bytes),
                        metavar="SIZE", help="device memory, e.g. 141GiB or 80GB: also print the largest batch")
    parser.add_argument("--json", action="store_true", dest="predict_json",
                        help="print JSON: components, total, max_batch, inputs")


def compute(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON document: components (protocol names), total, max_batch (null without --device-memory), inputs,
    formulas, and whether the activations are only a lower bound (no sequence length)."""
    if args.input_dim < 0:
        raise ValueError(f"--input-dim must be >= 0, got {args.input_dim}")
    heads, seq_len = getattr(args, "heads", None), getattr(args, "seq_len", None)
    attention, recompute = getattr(args, "attention", "standard"), getattr(args, "recompute", "none")
    if heads is not None and seq_len is None:
        raise ValueError("--heads needs --seq-len (the attention term grows with the sequence length)")
    if seq_len is not None and heads is None and attention == "standard" and recompute == "none":
        raise ValueError("--seq-len needs --heads for standard attention (or use --attention flash)")
    transformer = seq_len is not None
    extra: dict[str, Any] = ({"heads": heads, "seq_len": seq_len, "attention": attention, "recompute": recompute}
                             if transformer else {})
    shape = (args.params, args.layers, args.hidden, args.input_dim)
    components = formula_breakdown(*shape, args.batch, optimizer=args.optimizer, dtype=args.dtype, **extra)
    max_batch = (formula_max_batch(*shape, args.device_memory, optimizer=args.optimizer, dtype=args.dtype, **extra)
                 if args.device_memory else None)
    return {
        "components": components,
        "total": sum(components.values()),
        "max_batch": max_batch,
        "activations_lower_bound": not transformer,
        "inputs": {"params": args.params, "layers": args.layers, "hidden": args.hidden,
                   "input_dim": args.input_dim, "batch": args.batch, "optimizer": args.optimizer,
                   "dtype": args.dtype, "device_memory": args.device_memory, "heads": heads, "seq_len": seq_len,
                   "attention": attention, "recompute": recompute},
        "formulas": formula_text(args.optimizer, args.dtype, transformer=transformer, attention=attention,
                                 recompute=recompute),
    }


def render(doc: dict[str, Any]) -> str:
    """Human table: component, bytes, size, formula; then total and the largest batch."""
    i = doc["inputs"]
    shape = f"{i['layers']} layers x {i['hidden']} hidden"
    if i["seq_len"] is not None:
        shape += f", sequence {i['seq_len']}" + (f", {i['heads']} heads" if i["heads"] else "")
        if i["attention"] != "standard":
            shape += f", {i['attention']} attention"
        if i["recompute"] != "none":
            shape += f", {i['recompute']} recompute"
    lines = [f"{format_count(i['params'])} parameters, {shape}, input {i['input_dim']}, batch {i['batch']}, "
             f"{i['optimizer']}, {i['dtype']}", ""]
    rows = [(name, doc["components"][name], doc["formulas"][name]) for name in COMPONENTS]
    rows.append(("total", doc["total"], "sum"))
    width = max(len(str(v)) for _, v, _ in rows)
    lines.append(f"{'component':<12} {'bytes':>{width}} {'size':>10}  formula")
    for name, value, formula in rows:
        lines.append(f"{name:<12} {value:>{width}} {format_bytes(value):>10}  {formula}")
    lines.append("")
    if doc["activations_lower_bound"]:
        lines.append("N params, L layers, H hidden, D input dim, B batch. Activations are a lower bound: B*L*H "
                     "counts one saved tensor per layer (exact for a ReLU MLP); a transformer saves far more - "
                     "give --heads and --seq-len.")
    else:
        lines.append("N params, L layers, h hidden, a heads, s sequence, D input dim, B batch. Transformer layers "
                     "only (Korthikanti et al. 2023): embeddings and logits are not in the activations.")
    if doc["max_batch"] is not None:
        device = i["device_memory"]
        if doc["max_batch"] == 0:
            lines.append(f"largest batch on {format_bytes(device)}: none (the batch-independent part alone "
                         f"does not fit)")
        elif doc["activations_lower_bound"]:
            lines.append(f"largest batch on {format_bytes(device)}: at most {doc['max_batch']} (activations are a "
                         f"lower bound, so the real largest batch is smaller, for a transformer by orders of "
                         f"magnitude; no margin: workspaces, allocator cache and CUDA context are not in it)")
        else:
            lines.append(f"largest batch on {format_bytes(device)}: {doc['max_batch']} (formulas only, no margin: "
                         f"logits, workspaces, allocator cache and CUDA context are not in them)")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from batchmon.errors import CliError

    try:
        doc = compute(args)
    except ValueError as exc:
        raise CliError(str(exc), code=2) from None
    if getattr(args, "predict_json", False):
        print(json.dumps(doc, indent=2))
    else:
        print(render(doc))
    return 0
