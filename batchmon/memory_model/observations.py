"""The fit's inputs: a measured step reduced to what the model needs, and the straight line it fits."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from batchmon.protocol import COMPONENTS, SAVED_SPLIT_SEQUENCE, Step, cache_and_context

FIXED = ("parameters", "gradients", "optimizer")
PER_SAMPLE = ("activations", "batch")


def _bytes_or_none(value: object) -> int | None:
    """A byte count from an optional step field (an int >= 0), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


@dataclass(frozen=True)
class Observation:
    """One measured training step, reduced to what the model needs."""

    step: int
    batch_size: int
    components: dict[str, int]
    peak_allocated: int | None = None
    reserved: int | None = None
    device_used: int | None = None
    num_alloc_retries: int | None = None
    step_seconds: float | None = None  # wall time of the step (the advisor's measured step-time factors)
    own_peaks: dict[str, int] | None = None  # each phase's own allocator peak (Step.phase_own_peaks, sampled steps)
    # each segment's own peak, the backward split at the model output's gradient (Step.segment_peaks)
    segment_peaks: dict[str, int] | None = None
    saved_split: dict[str, Any] | None = None  # the agent's measured split of the saved bytes (Step.saved_split)
    # the allocator's bytes in free blocks split off segments that hold live blocks, at the step's end
    # (torch.cuda.memory_stats()["inactive_split_bytes.all.current"]: the free space a flush cannot give back);
    # None: not reported (Step.inactive_split, where an agent sends it)
    inactive_split: int | None = None

    @classmethod
    def from_step(cls, step: Step) -> "Observation | None":
        """None for a step the model cannot use (no batch size, or no components)."""
        if not step.batch_size or step.batch_size < 1 or not step.components:
            return None
        comps = {name: max(0, int(step.components.get(name, 0) or 0)) for name in COMPONENTS}
        return cls(step.step, step.batch_size, comps, step.peak_allocated, step.reserved, step.device_used,
                   step.num_alloc_retries, step.step_seconds, step.phase_own_peaks, step.segment_peaks,
                   getattr(step, "saved_split", None), _bytes_or_none(getattr(step, "inactive_split", None)))

    @property
    def cache(self) -> int | None:
        """reserved - peak allocated (protocol.cache_and_context, strict: None without a peak)."""
        return cache_and_context(self.peak_allocated, None, self.reserved, self.device_used, strict=True)[0]

    @property
    def context(self) -> int | None:
        """device used - reserved; None when unmeasured or when the reading predates the step's pool
        (device used < reserved: see stale_context). protocol.cache_and_context, strict."""
        return cache_and_context(self.peak_allocated, None, self.reserved, self.device_used, strict=True)[1]

    @property
    def stale_context(self) -> int | None:
        """For a reading taken before the pool grew (device used < reserved): device used - parameters, an
        upper bound of the context (the pool held at least the parameters then). None otherwise."""
        if self.reserved is None or self.device_used is None or self.device_used >= self.reserved:
            return None
        return max(0, self.device_used - self.components.get("parameters", 0))


@dataclass(frozen=True)
class SavedSplit:
    """What the saved activations of one measured forward are made of (the agent measures it once per run:
    batchmon.agent.saved_split, Step.saved_split): the derived checkpointing and AMP what-ifs rest on it instead
    of a rule of thumb. Bytes at ``batch``, on the same basis as the 'activations' component (storages counted
    once, parameters and the batch left out)."""

    batch: int
    saved: int  # bytes saved for backward (counted as the 'activations' component is)
    in_blocks: int  # of which saved inside the model's repeated blocks (what a per-block checkpoint drops)
    block_inputs: int  # bytes of the blocks' inputs (what a per-block checkpoint keeps)
    blocks: int  # the number of repeated blocks
    # bench/predict_zoo.py's older measure: the bytes the same forward saved under autocast, weight copies
    # included (recorded runs only; None: not measured)
    saved_amp: int | None = None
    # the agent's: the bytes these saved tensors would take under autocast, from the ops that save them (the
    # autograd graph: matmul/conv inputs 16-bit, fp32-list ops fp32, elementwise ops in their inputs' dtype),
    # parameters' 16-bit copies not included; None: not measured (the run already under autocast, a compiled
    # graph, an older agent)
    amp_saved: int | None = None
    amp_unknown: int = 0  # of the saved bytes, those under ops the walk could not classify (kept at full size)
    # the largest single block's saved bytes (what the backward recomputes at once under a checkpoint per block);
    # None: an older agent (the blocks' average is used)
    block_max: int | None = None
    output: int | None = None  # bytes of the model's output (the logits) at ``batch``; None: not measured
    # of block_inputs, the bytes that do not grow with the batch and that the forward saves nowhere (T5's relative
    # position biases): a checkpoint keeps them, the plain run freed them; 0: none, or not measured
    block_inputs_fixed: int = 0
    # the blocks' saved storages in creation order (the split's ``block_seq``: protocol._block_seq), from which
    # the checkpointed step's allocations are synthesised (ckpt_trace); None: an older agent, or not recorded
    sequence: dict[str, Any] | None = field(default=None, compare=False, hash=False, repr=False)

    @classmethod
    def from_wire(cls, d: dict[str, Any] | None) -> "SavedSplit | None":
        """From Step.saved_split (None when absent or not usable)."""
        if not d or d.get("batch", 0) < 1:
            return None
        try:
            return cls(batch=d["batch"], saved=d["saved"], in_blocks=d["in_blocks"], block_inputs=d["block_inputs"],
                       blocks=d["blocks"], amp_saved=d.get("amp_saved"), amp_unknown=d.get("amp_unknown", 0),
                       block_max=d.get("block_max"), output=d.get("output"),
                       block_inputs_fixed=min(d.get("block_inputs_fixed", 0), d["block_inputs"]),
                       sequence=d.get(SAVED_SPLIT_SEQUENCE))
        except KeyError:
            return None

    def checkpoint_share(self, n: int) -> float | None:
        """Share of the saved bytes a checkpoint per block keeps with ``n`` segments: outside the blocks, the
        blocks' inputs, one block's internals recomputed at a time. None when nothing was measured."""
        if self.saved <= 0 or self.blocks < 1 or self.in_blocks > self.saved:
            return None
        keep = (self.saved - self.in_blocks) + self.block_inputs + self.in_blocks / max(1, n)
        return min(1.0, keep / self.saved)

    def dropped_share(self) -> float | None:
        """Share of the saved bytes a checkpoint per block drops: what is saved inside the blocks, less their
        inputs (kept). A share, applied to the fitted activations' per-sample bytes: the split says what the
        saved bytes are made of, the steps how many there are. None when no block was measured."""
        if self.blocks < 1 or self.in_blocks <= 0 or self.saved <= 0 or self.in_blocks > self.saved:
            return None
        return max(0, self.in_blocks - self.per_sample_inputs) / self.saved

    @property
    def fixed_inputs(self) -> int:
        """Of the blocks' inputs, the bytes that do not grow with the batch (block_inputs_fixed, never more than
        block_inputs): the checkpointing what-if keeps them as fixed bytes."""
        return max(0, min(self.block_inputs_fixed, self.block_inputs))

    @property
    def per_sample_inputs(self) -> int:
        """The blocks' inputs that grow with the batch (the hidden states): block_inputs less fixed_inputs."""
        return self.block_inputs - self.fixed_inputs

    def block_share(self) -> float | None:
        """Share of the saved bytes inside the blocks (all of them; one block's is this / blocks)."""
        if self.blocks < 1 or self.saved <= 0 or self.in_blocks > self.saved:
            return None
        return self.in_blocks / self.saved

    def largest_block_share(self) -> float | None:
        """Share of the saved bytes inside the largest single block (what one recomputation holds), when
        measured (block_max); None for an older agent's split."""
        if self.block_max is None or self.blocks < 1 or self.saved <= 0 or self.block_max > self.saved:
            return None
        return self.block_max / self.saved

    def unknown_share(self) -> float:
        """Share of the saved bytes under ops the graph walk could not classify (0 when none or not measured)."""
        return min(1.0, self.amp_unknown / self.saved) if self.saved > 0 and self.amp_saved is not None else 0.0

    def amp_cut_share(self) -> float | None:
        """Share of the saved bytes autocast would not keep (negative: they grow), from the agent's graph walk.
        None when not measured."""
        if self.amp_saved is None or self.saved <= 0:
            return None
        return (self.saved - self.amp_saved) / self.saved

    def amp_share(self) -> float | None:
        """Saved bytes under autocast per saved byte of the observed (fp32) forward. None when not measured."""
        if self.amp_saved is not None and self.saved > 0:
            return self.amp_saved / self.saved
        if self.saved_amp is None or self.saved <= 0:
            return None
        return self.saved_amp / self.saved


@dataclass(frozen=True)
class ParamLayout:
    """How the parameters split into the units FSDP shards and gathers one at a time (bytes, unsharded): what
    the sharding what-if needs to count the parameters and gradients FSDP holds unsharded beside the shards.
    Per-block wrapping (``fully_shard`` on each repeated block, then on the root) is assumed."""

    root: int  # parameter bytes outside the wrapped blocks: FSDP2's root unit, gathered from forward to backward
    largest_unit: int  # parameter bytes of the largest wrapped block
    units: int  # number of wrapped blocks

    def gathered(self) -> int:
        """Bytes of parameters held unsharded at once at most: the root, the block being computed and the one
        prefetched."""
        return self.root + 2 * self.largest_unit


@dataclass(frozen=True)
class Line:
    """value(B) = fixed + per_sample * B."""

    fixed: float = 0.0
    per_sample: float = 0.0

    def at(self, batch: float) -> float:
        return self.fixed + self.per_sample * batch

    def __add__(self, other: "Line") -> "Line":
        return Line(self.fixed + other.fixed, self.per_sample + other.per_sample)

    def __sub__(self, other: "Line") -> "Line":
        return Line(self.fixed - other.fixed, self.per_sample - other.per_sample)

    def scaled(self, fixed: float = 1.0, per_sample: float = 1.0) -> "Line":
        return Line(self.fixed * fixed, self.per_sample * per_sample)


def fit_line(points: Sequence[tuple[int, int]], *, through_origin_when_single: bool = True) -> Line:
    """Least squares over (batch, bytes). One distinct batch size: per-sample only (value / B), or fixed only.

    A negative slope (noise) falls back to the mean as a fixed value, so every line is non-decreasing in B."""
    if not points:
        return Line()
    xs = [float(b) for b, _ in points]
    ys = [float(v) for _, v in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mean_x) ** 2 for x in xs)
    if sxx == 0:
        if through_origin_when_single:
            return Line(0.0, mean_y / mean_x)
        return Line(mean_y, 0.0)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    if slope < 0:
        return Line(mean_y, 0.0)
    return Line(mean_y - slope * mean_x, slope)
