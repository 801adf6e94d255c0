"""Closed-form training memory: the calculator's formulas (`batchmon predict`), for planning without a GPU.

Pure arithmetic, shared by the calculator and the fitted model (optimizer states per parameter). Nothing here
measures: the runtime parts (workspaces, allocator cache, CUDA context) are only known by attaching the agent.

* ``formula_breakdown``: parameters N*p, gradients N*g, optimizer k*N*s, activations, batch B*D*x, per dtype.
  Activations: B*L*H*a (one saved tensor per layer: exact for an L-layer ReLU MLP of width H, a lower bound
  for anything else), or, given the attention heads and the sequence length, a transformer's per-layer
  activations ``s*b*h*(34 + 5*a*s/h)`` bytes for 16-bit activations (Korthikanti et al., "Reducing Activation
  Recomputation in Large Transformer Models", MLSys 2023, no tensor/sequence parallelism, no recompute).
* ``formula_max_batch``: the largest B whose formula total fits a device.
"""

from __future__ import annotations

#: optimizer states per trainable parameter
OPTIMIZER_STATES: dict[str, int] = {"sgd": 0, "sgd-momentum": 1, "adam": 2, "adamw": 2}


def optimizer_kind(name: str | None) -> str | None:
    """Normalise an optimizer class or kind name: 'AdamW' -> 'adamw', 'SGD' -> 'sgd'; unknown -> None.

    Plain 'SGD' means SGD without momentum unless state was observed (see memory_model.fit)."""
    if not name:
        return None
    key = name.strip().lower().replace("_", "-")
    if key in OPTIMIZER_STATES:
        return key
    if key in ("sgdm", "sgd-nesterov", "momentum"):
        return "sgd-momentum"
    if "adamw" in key:
        return "adamw"
    if "adam" in key:
        return "adam"
    if key.startswith("sgd"):
        return "sgd"
    return None



DTYPES = ("fp32", "bf16", "amp")

#: bytes per element: (parameters, gradients, optimizer state, activations, batch, 16-bit weight copies in other)
_DTYPE_BYTES: dict[str, tuple[int, int, int, int, int, int]] = {
    "fp32": (4, 4, 4, 4, 4, 0),
    # pure bf16 training: weights, gradients, activations and inputs in 2 bytes; optimizer states kept in fp32
    # as mixed-precision optimizers do (torch.optim on bf16 parameters keeps bf16 states: half this figure)
    "bf16": (2, 2, 4, 2, 2, 0),
    # autocast: fp32 master weights, fp32 gradients and states; 16-bit saved activations; inputs as loaded
    # (fp32); autocast caches a 16-bit copy of the weights for the forward pass, counted in 'other'
    "amp": (4, 4, 4, 2, 4, 2),
}


ATTENTION = ("standard", "flash")
RECOMPUTE = ("none", "full")


def transformer_activations(layers: int, hidden: int, heads: int, seq_len: int, batch: int, dtype: str = "bf16",
                            attention: str = "standard", recompute: str = "none") -> int:
    """Bytes saved for backward by ``layers`` transformer layers (Korthikanti et al., MLSys 2023, Eq. 1, no
    tensor or sequence parallelism): per layer ``s*b*h*(34 + 5*a*s/h)`` with 16-bit activations (the 34 counts
    the 16-bit tensors and 1-byte dropout masks of attention and MLP; 5*a*s/h the attention scores, softmax
    and its dropout). Variants: flash attention keeps no s x s matrix (``s*b*h*34``); full recompute keeps only
    each layer's input (``2*s*b*h``); fp32 activations double every term. Embeddings, the final norm and the
    logits are not in it (a lower bound by those)."""
    if attention not in ATTENTION:
        raise ValueError(f"unknown attention {attention!r} (expected one of {', '.join(ATTENTION)})")
    if recompute not in RECOMPUTE:
        raise ValueError(f"unknown recompute {recompute!r} (expected one of {', '.join(RECOMPUTE)})")
    for name, value in (("layers", layers), ("hidden", hidden), ("heads", heads), ("seq_len", seq_len),
                        ("batch", batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    width = 2 if dtype == "fp32" else 1  # the formula's bytes are for 16-bit activations
    s, b, h, a = seq_len, batch, hidden, heads
    if recompute == "full":
        per_layer = 2 * s * b * h
    elif attention == "flash":
        per_layer = 34 * s * b * h
    else:
        per_layer = 34 * s * b * h + 5 * a * s * s * b
    return layers * per_layer * width


def transformer_text(dtype: str = "bf16", attention: str = "standard", recompute: str = "none") -> str:
    """The formula transformer_activations uses, for tables."""
    width = "2*" if dtype == "fp32" else ""
    if recompute == "full":
        return f"{width}L*2*s*B*h"
    if attention == "flash":
        return f"{width}L*34*s*B*h"
    return f"{width}L*s*B*h*(34+5*a*s/h)"


def formula_breakdown(params: int, layers: int, hidden: int, input_dim: int, batch: int,
                      optimizer: str = "adam", dtype: str = "fp32", *, heads: int | None = None,
                      seq_len: int | None = None, attention: str = "standard",
                      recompute: str = "none") -> dict[str, int]:
    """Training memory by component (protocol names): parameters N*p, gradients N*g, optimizer k*N*s,
    activations, batch B*D*x, other (autocast's 16-bit weight copies). Activations: with ``seq_len`` (and
    ``heads`` unless flash attention or full recompute), transformer_activations; without, B*L*H*a - one
    saved tensor per layer, exact for an L-layer ReLU MLP of width H, a lower bound for anything else."""
    kind = optimizer_kind(optimizer)
    if kind is None:
        raise ValueError(f"unknown optimizer {optimizer!r} (expected one of {', '.join(OPTIMIZER_STATES)})")
    if dtype not in _DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r} (expected one of {', '.join(DTYPES)})")
    for name, value in (("params", params), ("layers", layers), ("hidden", hidden), ("batch", batch)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if input_dim < 0:
        raise ValueError(f"input_dim must be >= 0, got {input_dim}")
    p, g, s, a, x, w = _DTYPE_BYTES[dtype]
    if seq_len is not None:
        if heads is None and attention == "standard" and recompute == "none":
            raise ValueError("a sequence length needs the number of attention heads (or flash attention)")
        activations = transformer_activations(layers, hidden, heads or 1, seq_len, batch, dtype, attention, recompute)
    else:
        activations = batch * layers * hidden * a
    return {
        "parameters": params * p,
        "gradients": params * g,
        "optimizer": OPTIMIZER_STATES[kind] * params * s,
        "activations": activations,
        "batch": batch * input_dim * x,
        "other": params * w,
    }


def formula_text(optimizer: str = "adam", dtype: str = "fp32", *, transformer: bool = False,
                 attention: str = "standard", recompute: str = "none") -> dict[str, str]:
    """The formula behind each component of formula_breakdown, for tables."""
    kind = optimizer_kind(optimizer) or optimizer
    p, g, s, a, x, w = _DTYPE_BYTES[dtype]
    k = OPTIMIZER_STATES.get(kind, 0)
    return {
        "parameters": f"N*{p}",
        "gradients": f"N*{g}",
        "optimizer": f"{k}*N*{s}" if k else "0",
        "activations": transformer_text(dtype, attention, recompute) if transformer else f"B*L*H*{a}",
        "batch": f"B*D*{x}",
        "other": f"N*{w} (16-bit weight copies)" if w else "0",
    }


def formula_max_batch(params: int, layers: int, hidden: int, input_dim: int, device_total: int,
                      optimizer: str = "adam", dtype: str = "fp32", **transformer: object) -> int:
    """Largest B with formula total <= device_total (no margin: the formulas measure nothing). 0 if none.
    ``transformer``: heads, seq_len, attention, recompute as formula_breakdown takes them (every term is
    linear in B)."""
    def total(b: int) -> int:
        return sum(formula_breakdown(params, layers, hidden, input_dim, b, optimizer, dtype,
                                     **transformer).values())  # type: ignore[arg-type]

    fixed = 2 * total(1) - total(2)
    per_sample = total(2) - total(1)
    if device_total < fixed + per_sample:
        return 0
    return (device_total - fixed) // per_sample
