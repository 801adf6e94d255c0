"""`batchmon predict`: the seed's memory formulas as a calculator, for planning without a GPU.

fp32 + Adam reproduces the seed's four lines exactly (parameters N*4, activations B*L*H*4, optimizer 2*N*4,
batch B*D*4) and adds gradients N*4, which the seed's equation leaves out. The formulas are exact for an L-layer
ReLU MLP of width H; for real networks activations are a lower bound (several saved tensors per layer), and
the runtime parts (workspaces, allocator cache, CUDA context) are only known by measuring: attach the agent.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

from batchmon.formulas import (DTYPES, OPTIMIZER_STATES, formula_breakdown, formula_max_batch,
                                formula_text)
from batchmon.protocol import COMPONENTS
from batchmon.units import format_bytes, format_count, parse_count, parse_size


def _checked(parse: Callable[[str], int], minimum: int, expected: str) -> Callable[[str], int]:
    """An argparse type: ``parse`` the text and require at least ``minimum``, so bad input is a one-line error."""
    def convert(text: str) -> int:
        if text.strip().startswith("-"):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        try:
            value = parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return convert


_positive_count = _checked(parse_count, 1, "a positive number")
_count = _checked(parse_count, 0, "a number >= 0")
_size = _checked(parse_size, 1, "a positive size")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `batchmon predict` (cli.py calls this while building the parser)."""
    parser.add_argument("--params", type=_positive_count, required=True, metavar="N",
                        help="number of parameters: 125M, 1.3B, 7e9 or a plain integer")
    parser.add_argument("--layers", type=_positive_count, required=True, metavar="L", help="number of layers")
    parser.add_argument("--hidden", type=_positive_count, required=True, metavar="H", help="hidden size (neurons per layer)")
    parser.add_argument("--input-dim", type=_count, required=True, metavar="D",
                        help="input values per sample (e.g. sequence length, or C*H*W)")
    parser.add_argument("--batch", type=_positive_count, required=True, metavar="B", help="batch size")
    parser.add_argument("--optimizer", choices=tuple(OPTIMIZER_STATES), default="adam",
                        help="optimizer: states per parameter sgd 0, sgd-momentum 1, adam/adamw 2 (default: adam)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32",
                        help="fp32; bf16 (2-byte weights, gradients, activations, inputs; fp32 optimizer states); "
                             "amp (autocast: fp32 master weights, 16-bit activations) (default: fp32)")
    parser.add_argument("--device-memory", type=_size, metavar="SIZE",
                        help="device memory, e.g. 141GiB or 80GB: also print the largest batch that fits")
    parser.add_argument("--json", action="store_true", dest="predict_json",
                        help="print JSON: components, total, max_batch, inputs")


def compute(args: argparse.Namespace) -> dict[str, Any]:
    """The JSON document: components (protocol names), total, max_batch (null without --device-memory), inputs."""
    if args.input_dim < 0:
        raise ValueError(f"--input-dim must be >= 0, got {args.input_dim}")
    shape = (args.params, args.layers, args.hidden, args.input_dim)
    components = formula_breakdown(*shape, args.batch, optimizer=args.optimizer, dtype=args.dtype)
    max_batch = (formula_max_batch(*shape, args.device_memory, optimizer=args.optimizer, dtype=args.dtype)
                 if args.device_memory else None)
    return {
        "components": components,
        "total": sum(components.values()),
        "max_batch": max_batch,
        "inputs": {"params": args.params, "layers": args.layers, "hidden": args.hidden,
                   "input_dim": args.input_dim, "batch": args.batch, "optimizer": args.optimizer,
                   "dtype": args.dtype, "device_memory": args.device_memory},
        "formulas": formula_text(args.optimizer, args.dtype),
    }


def render(doc: dict[str, Any]) -> str:
    """Human table: component, bytes, size, formula; then total and the largest batch."""
    i = doc["inputs"]
    lines = [f"{format_count(i['params'])} parameters, {i['layers']} layers x {i['hidden']} hidden, "
             f"input {i['input_dim']}, batch {i['batch']}, {i['optimizer']}, {i['dtype']}", ""]
    rows = [(name, doc["components"][name], doc["formulas"][name]) for name in COMPONENTS]
    rows.append(("total", doc["total"], "sum"))
    width = max(len(str(v)) for _, v, _ in rows)
    lines.append(f"{'component':<12} {'bytes':>{width}} {'size':>10}  formula")
    for name, value, formula in rows:
        lines.append(f"{name:<12} {value:>{width}} {format_bytes(value):>10}  {formula}")
    lines.append("")
    lines.append("N params, L layers, H hidden, D input dim, B batch. The seed's equation leaves out gradients "
                 "(N*4 in fp32); batchmon adds them.")
    if doc["max_batch"] is not None:
        device = i["device_memory"]
        if doc["max_batch"] == 0:
            lines.append(f"largest batch on {format_bytes(device)}: none (the batch-independent part alone "
                         f"does not fit)")
        else:
            lines.append(f"largest batch on {format_bytes(device)}: {doc['max_batch']} "
                         f"(formulas only, no margin: workspaces, allocator cache and CUDA context are not in them)")
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
