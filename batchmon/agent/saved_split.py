"""What the saved activations of one sampled step are made of, measured by the agent (issue 13, point 2).

The AMP and checkpointing what-ifs are derived from this instead of a rule of thumb. Measured once, on a sampled
step (``SplitProbe``; batchmon.agent.handle calls ``begin`` in the root's forward pre hook and ``end`` in its
post hook, and puts the result in the optional ``Step.saved_split`` field of the sampled steps after it):

* **inside the checkpointed blocks** (``in_blocks``, ``block_inputs``, ``blocks``, ``block_max``): the growth of
  the agent's own saved-bytes counter between each block's forward pre and post hooks (``BlockSplitMeter``, hooks
  on the blocks for that one forward, removed at its end), the largest single block's growth, and the blocks'
  tensor inputs, each storage once. The blocks are those ``gradient_checkpointing_enable()`` wraps
  (``checkpoint_blocks``): a Hugging Face model's every layer of every stack - zoo run 7's T5-small had only its
  encoder's 6 blocks measured (the largest run of one ModuleList), so the decoder's were counted as outside the
  blocks, kept under checkpointing, and its what-if said 143 where 321 ran - else the largest run of same-class
  blocks. A checkpoint per block keeps the blocks' inputs and drops the rest, recomputing one block at a time in
  the backward. Of those inputs, ``block_inputs_fixed`` do not grow with the batch (shaped as one sample's at a
  batch above 1, saved by no op: T5's relative position biases, 10.5 MiB at any batch), so the what-if keeps them
  as fixed bytes instead of a share of each sample's activations.
* **the output** (``output``): the bytes of the model output's storage (the logits), whose fp32 gradient is
  cast back to 16-bit under autocast.
* **under autocast** (``amp_saved``): which saved bytes autocast would lower to 16-bit, from the autograd graph the
  forward just built (``amp_bytes``): the graph is walked from the model's output (each node's ``_raw_saved_*``
  tensors: read as packed, so no unpack hook - a checkpoint's recomputation, an offloading hook's copy back - ever
  runs; what another hook packed is not a tensor and is left alone). A saved tensor's size under autocast follows the
  op that saves it: matmul/conv-class ops (autocast's lower-precision list) save their inputs' 16-bit casts (half: a
  copy per op that reads an fp32 input - autocast caches only the casts of leaves that require grad, so a normed
  hidden state read by q, k and v is cast three times - of the view it reads; one copy shared by all readers where the
  input is 16-bit already; a copy more where the model's own code upcasts a 16-bit input first, as T5's ``wo`` does:
  ``fp32_input_modules``); fp32-list ops (softmax, log_softmax, norms, pow, losses) save fp32 (full); an elementwise
  or view op saves its inputs and result in the dtype they arrive in, which is 16-bit only when every input of the op
  that produced it is (a residual stream that adds an fp32 tensor stays fp32). A storage saved by ops that disagree is
  counted in both dtypes (a cast copy beside the original). sdpa's math fallback's bmm saves fp32 upcasts of q, k and
  v (full, known). Where the device's 16-bit attention lays its output out as the query (CUDA cuDNN or flash
  attention, sm80+: ``attention_follows_query``), a ``.contiguous()`` copy of a permuted attention output that
  layout makes contiguous is no copy (nn.MultiheadAttention's before ``out_proj``: ViT-B/16, 3.6 MB a sample). An
  op not in these lists, and what the walk does not reach, is kept at full size: the cut is a lower bound, never an
  overestimate of the shrink. Parameters are left out (their 16-bit copies are the what-if's own
  term); a batch input that a matmul-class op saves adds its 16-bit copy. The lists follow torch's autocast policy for
  CUDA, or for CPU (where softmax and layer_norm are not in the fp32 list) when the model is on the CPU.

Cost: one forward's block hooks and one graph walk (a few thousand nodes for a 12-layer transformer: tens of
milliseconds), once per process, on a sampled step. Nothing here raises into the training: every error ends the
measurement (``SplitProbe.errors``) and the step goes on.

Over 400 lines: autocast's op lists, the graph walk, the block finder and meter, and the probe that runs them are
one measurement taken at one call site; split apart, each piece would only be read through the probe.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from batchmon.agent import accounting
from batchmon.agent.saved_kinds import repeated_blocks

#: ops autocast runs in 16-bit (torch's lower-precision lists): they save 16-bit casts of their inputs
MATMUL_OPS = frozenset({
    "Addmm", "Mm", "Bmm", "Baddbmm", "Addbmm", "Addmv", "Mv", "Dot", "Vdot", "Linear", "Convolution",
    "CudnnConvolution", "MkldnnConvolution", "ConvolutionBackwardOverrideable", "SlowConv2D", "ConvDepthwise2D",
    "CudnnConvolutionTranspose", "SlowConvTranspose2D", "ScaledDotProductEfficientAttention",
    "ScaledDotProductFlashAttention", "ScaledDotProductCudnnAttention", "ScaledDotProductFlashAttentionForCpu",
    "ScaledDotProductAttentionMath", "Prelu", "LinalgVecdot"})
#: ops autocast runs in fp32 on CUDA (torch's fp32 list, the ones that save tensors): they save fp32
FP32_OPS_CUDA = frozenset({
    "Softmax", "LogSoftmax", "NativeLayerNorm", "NativeGroupNorm", "LinalgVectorNorm", "Norm", "NllLoss",
    "NllLoss2D", "MseLoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "BinaryCrossEntropyWithLogits",
    "BinaryCrossEntropy", "KlDiv", "SoftMarginLoss", "Exp", "Expm1", "Log", "Log10", "Log2", "Log1P",
    "Reciprocal", "Rsqrt", "Pow", "Acos", "Asin", "Cosh", "Sinh", "Tan", "Erfinv", "Softplus", "Cumsum",
    "Cumprod", "Prod", "Sum", "Logsumexp", "Dist", "Cdist", "Renorm", "FusedRmsNorm", "RmsNorm", "SafeSoftmax"})
#: the CPU's fp32 list is shorter: softmax, layer_norm, pow, exp... run in the input's dtype there
FP32_OPS_CPU = frozenset({
    "NllLoss", "NllLoss2D", "MseLoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "BinaryCrossEntropyWithLogits",
    "BinaryCrossEntropy", "KlDiv", "SoftMarginLoss", "Prod", "Cdist", "Cumprod", "Cumsum"})
#: elementwise, view and pooling ops: output (and what they save) in the dtype of their inputs
FOLLOW_OPS = frozenset({
    "Mul", "Div", "Add", "Sub", "Neg", "Tanh", "Sigmoid", "Gelu", "Relu", "Threshold", "Silu", "Hardswish",
    "Hardsigmoid", "LeakyRelu", "Elu", "Mish", "Where", "MaskedFill", "NativeDropout", "FusedDropout", "Clone",
    "View", "UnsafeView", "Reshape", "ReshapeAlias", "Transpose", "T", "Permute", "Expand", "Squeeze",
    "Unsqueeze", "Slice", "Select", "Split", "SplitWithSizes", "Unbind", "Cat", "Stack", "AsStrided", "Alias",
    "Index", "Gather", "CudnnBatchNorm", "NativeBatchNorm", "MiopenBatchNorm", "MaxPool2DWithIndices",
    "MaxPool2D", "AvgPool2D", "AdaptiveAvgPool2D", "UpsampleNearest2D", "UpsampleBilinear2D", "Abs", "Clamp",
    "ClampMin", "Hardtanh", "Flip", "Roll", "Repeat", "ConstantPadNd", "Mean", "Lerp", "Addcmul", "Addcdiv"})
#: on the CPU the CUDA fp32 list's elementwise ops (softmax, layer_norm, pow, exp, ...) follow their input
FOLLOW_OPS_CPU = FOLLOW_OPS | (FP32_OPS_CUDA - FP32_OPS_CPU)
#: what a matmul-class op saves of its own outputs stays fp32 under autocast where it is a statistic
FP32_OUTPUT_FIELDS = ("logsumexp", "log_sumexp", "philox", "rng", "seed", "offset")
FP32 = torch.float32


def _op(node: Any) -> str:
    """'AddmmBackward0' -> 'Addmm'; an AccumulateGrad (a leaf: a parameter) -> its C++ name."""
    name = node.name()
    cut = name.rfind("Backward")
    return name[:cut] if cut > 0 else name


class _Lowered:
    """Whether a node's output is 16-bit under autocast (its producing op: matmul-class yes; fp32-list,
    leaves, casts and unknown ops no; elementwise ops when every input is - an input without a gradient, whose
    dtype the graph does not say, counts as fp32)."""

    def __init__(self, follow_ops: frozenset[str]) -> None:
        self.follow = follow_ops
        self.memo: dict[int, bool] = {}
        self.alive: list[Any] = []  # the nodes whose id() is memoised stay alive for the walk

    def __call__(self, node: Any) -> bool:
        if node is None:
            return False
        memo = self.memo
        stack = [node]
        while stack:
            n = stack[-1]
            key = id(n)
            if key in memo:
                stack.pop()
                continue
            op = _op(n)
            if op in MATMUL_OPS or op not in self.follow:
                memo[key] = op in MATMUL_OPS
                self.alive.append(n)
                stack.pop()
                continue
            inputs = [m for m, _ in n.next_functions]
            if any(m is None for m in inputs):
                if not _scalar_operands(n, inputs):
                    memo[key] = False
                    self.alive.append(n)
                    stack.pop()
                    continue
                inputs = [m for m in inputs if m is not None]
            if not inputs:
                memo[key] = False
                self.alive.append(n)
                stack.pop()
                continue
            pending = [m for m in inputs if id(m) not in memo]
            if pending:
                stack.extend(pending)
                continue
            memo[key] = all(memo[id(m)] for m in inputs)
            self.alive.append(n)
            stack.pop()
        return memo[id(node)]


def _scalar_operands(node: Any, inputs: list[Any]) -> bool:
    """Are the inputs without a gradient (None) 0-dim tensors - Python numbers wrapped, which never change the
    result's dtype? Only an op that saves them (``self``, ``other``) says; else they may be fp32 tensors."""
    for index, m in enumerate(inputs):
        if m is not None:
            continue
        field = "_raw_saved_self" if index == 0 else "_raw_saved_other" if index == 1 else None
        tensors = _packed(getattr(node, field)) if field is not None and hasattr(node, field) else []
        if not tensors or tensors[0].dim() != 0:
            return False
    return True


def _saved_fields(node: Any, cache: dict[str, list[str]]) -> list[str]:
    name = node.name()
    fields = cache.get(name)
    if fields is None:
        fields = cache[name] = [a for a in dir(node) if a.startswith("_raw_saved_")]
    return fields


def _packed(value: Any) -> list[torch.Tensor]:
    """The tensors of a ``_raw_saved_*`` value as packed (SavedTensor.data: no unpack hook runs)."""
    items = value if isinstance(value, (list, tuple)) else [value]
    out = []
    for item in items:
        try:
            data = item.data
        except Exception:  # noqa: BLE001 - a released or odd saved value: nothing to count
            continue
        if isinstance(data, torch.Tensor):
            out.append(data)
    return out


#: which input of a matmul-class op a saved field holds (the node's next_functions follow the op's inputs)
MATMUL_INPUTS = {
    "Addmm": {"mat1": 1, "mat2": 2}, "Baddbmm": {"batch1": 1, "batch2": 2}, "Addbmm": {"batch1": 1, "batch2": 2},
    "Addmv": {"mat": 1, "vec": 2}, "Mv": {"self": 0, "vec": 1}, "Mm": {"self": 0, "mat2": 1},
    "Bmm": {"self": 0, "mat2": 1}, "Convolution": {"input": 0, "weight": 1}}
#: the attention kernels' saved inputs (query, key, value, the additive mask)
SDPA_INPUTS = {"query": 0, "key": 1, "value": 2, "attn_mask": 3, "attn_bias": 3}


def _producer(node: Any, field: str, op: str | None = None) -> Any:
    """The node that made the tensor saved in ``field``: the node itself for its result, input 0 for
    ``self``, input 1 for ``other`` (and a matmul-class ``op``'s inputs by name: MATMUL_INPUTS); "leaf" for an
    input without a gradient; None when the field does not say."""
    if field.startswith("_raw_saved_result"):
        return node
    name = field[len("_raw_saved_"):]
    index = {"self": 0, "other": 1}.get(name)
    if op is not None:
        table = SDPA_INPUTS if op.startswith("ScaledDotProduct") else MATMUL_INPUTS.get(
            "Convolution" if "Convolution" in op or op.startswith("SlowConv") else op, {})
        index = table.get(name, index)
    nexts = node.next_functions
    if index is None or index >= len(nexts):
        return None
    return nexts[index][0] or "leaf"


#: the fp32 attention kernel whose output is laid out (batch, query, heads, dim) whatever the query's layout, where
#: the 16-bit kernel autocast picks in its place (flash, and cuDNN's) allocates its output as the query is laid out
SDPA_OWN_LAYOUT = frozenset({"ScaledDotProductEfficientAttention"})
#: view ops between a saved tensor and the copy it views (no bytes of their own)
VIEW_OPS = frozenset({"View", "UnsafeView", "ReshapeAlias", "Alias"})
#: the stride permutations between an attention output and a copy of it, which the walk replays
PERMUTE_OPS = frozenset({"Permute", "Transpose"})


def attention_follows_query(device: torch.device) -> bool:
    """Does autocast's 16-bit attention on ``device`` lay its output out as the query is? On CUDA with compute
    capability 8.0 or more and flash or cuDNN attention enabled, yes: for 16-bit inputs without a mask sdpa picks
    one of them (cuDNN on the H200 with torch 2.11: zoo run 10's amp_real_detail), and both allocate the output
    like the query (flash: empty_like(q); cuDNN: strides in the query's order). Else no: the walk keeps every
    copy it sees."""
    try:
        if device.type != "cuda" or not (torch.backends.cuda.flash_sdp_enabled()
                                         or torch.backends.cuda.cudnn_sdp_enabled()):
            return False
        return torch.cuda.get_device_capability(device) >= (8, 0)
    except Exception:  # noqa: BLE001 - no answer: keep the copies
        return False


def _copy_free(maker: Any, memo: dict[int, tuple[Any, bool]]) -> bool:
    """Is ``maker`` (through views) a ``.contiguous()`` copy of an attention output that autocast's 16-bit kernel
    would lay out contiguously already, so that under autocast there is no copy and its readers save the
    attention output itself? nn.MultiheadAttention (ViT-B/16) permutes the output to (query, batch, heads, dim)
    and makes it contiguous before ``out_proj``: in fp32 the memory-efficient kernel's (batch, query, heads, dim)
    output is copied; the 16-bit kernel's (cuDNN's or flash's) output, laid out as the query (a view of the
    (query, batch, ...) projection), is contiguous after that permute - on the H200 under bf16 out_proj saved the
    cuDNN kernel's own output (zoo run 10's amp_real_detail: no copy of its own). Only plain permutes and
    transposes between the two are replayed (on a meta tensor laid out as the query); anything else: a copy, as
    before. ``memo`` (one per walk) is keyed by the copy's node's id() and keeps that node: a graph node's Python
    object lives only while referenced, so an id() let go is soon another node's (zoo run 11's ViT-B/16: its
    out_proj copies answered, in turn, for the in-projection's input copies, which are copies - the agent's walk
    kept 10 of 12 attention-output copies, the bench's 5 of 12, where the rule drops all 12)."""
    node = maker
    for _ in range(8):
        if node is None or node == "leaf" or _op(node) not in VIEW_OPS:
            break
        node = node.next_functions[0][0] if node.next_functions else None
    if node is None or node == "leaf" or _op(node) != "Clone":
        return False
    key = id(node)
    if key not in memo:
        memo[key] = (node, False)
        chain: list[Any] = []
        below = node.next_functions[0][0] if node.next_functions else None
        while below is not None and _op(below) in PERMUTE_OPS and len(chain) < 8:
            chain.append(below)
            below = below.next_functions[0][0] if below.next_functions else None
        if below is not None and _op(below) in SDPA_OWN_LAYOUT:
            memo[key] = (node, _query_layout_contiguous(below, chain[::-1]))
    return memo[key][1]


def _query_layout_contiguous(node: Any, chain: list[Any]) -> bool:
    """Would a 16-bit kernel laid out as the query, in place of attention ``node`` (no mask, head dim a multiple of
    8 up to 256, the same for query, key and value: what flash takes, and cuDNN too), give an output that ``chain``
    (permutes/transposes, from the output up) leaves contiguous?"""
    try:
        tensors = [_packed(getattr(node, f"_raw_saved_{name}", None)) for name in ("query", "key", "value")]
        if any(len(t) != 1 for t in tensors) or _packed(getattr(node, "_raw_saved_attn_bias", None)):
            return False
        query, key, value = (t[0] for t in tensors)
        dim = query.shape[-1]
        if query.dim() != 4 or dim > 256 or dim % 8 or key.shape[-1] != dim or value.shape[-1] != dim \
                or any(t.stride(-1) != 1 for t in (query, key, value)):
            return False
        out = torch.empty_like(query, device="meta")  # the query's stride order kept, as the 16-bit kernels do
        for link in chain:
            op = _op(link)
            out = out.permute(*link._saved_dims) if op == "Permute" else \
                out.transpose(link._saved_dim0, link._saved_dim1)
        return bool(out.is_contiguous())
    except Exception:  # noqa: BLE001 - not told: a copy
        return False


def amp_bytes(output: torch.Tensor, counted: set[int], batch_keys: set[int], block: int,
              device_type: str, detail: dict[str, list[int]] | None = None,
              upcast: set[int] | None = None, query_layout: bool = False) -> tuple[int, int, int]:
    """(bytes the counted storages would take under autocast, bytes of counted storages the walk reached, bytes
    under ops it could not classify, kept at full size) for the graph ending at ``output``. ``counted``: the
    storages the agent counted as activations (data pointers); ``batch_keys``: the batch's storages (a
    matmul-class op saving one adds its 16-bit copy); ``block``: the allocator's rounding. ``detail``, when
    given, gets {first saving op: [bytes now, bytes under autocast]} (tests, the zoo bench). ``upcast``: ids of
    the matmul-class nodes whose input the model's own code casts to fp32 first (``Fp32InputMeter``): autocast
    casts it back there, a copy of its own, whatever dtype it arrived in.

    A matmul-class op's fp32 input is cast by autocast at that op, once per op that reads it (its cast cache
    holds only leaves that require grad - parameters, left out here): a normed hidden state read by three
    projections is saved as three 16-bit copies, an encoder output read by every decoder block's key and value
    projections as two per block. Each copy has the saved view's size (a cast copies the view: a classifier
    reading one token of a sequence casts that token). An input already 16-bit (made by a lowered op) is
    shared by all its readers: one copy. ``query_layout`` (``attention_follows_query``: the device's 16-bit
    attention lays its output out as the query): a ``.contiguous()`` copy of an attention output that would be
    contiguous already under autocast is no copy there (``_copy_free``): its readers save the attention output,
    which the kernel saves too (nothing more)."""
    cpu = device_type == "cpu"
    fp32_ops, follow_ops = (FP32_OPS_CPU, FOLLOW_OPS_CPU) if cpu else (FP32_OPS_CUDA, FOLLOW_OPS)
    saves, ops = _saved_tensors(output, counted | batch_keys)
    # sdpa's math fallback (the only maker of _safe_softmax) upcasts 16-bit q, k, v to fp32 before its bmm's
    matmul_ops = MATMUL_OPS - {"Bmm", "Baddbmm"} if "SafeSoftmax" in ops else MATMUL_OPS
    math_sdpa = matmul_ops is not MATMUL_OPS  # the math fallback's bmm: fp32 copies of q, k, v (known: full)
    lowered = _Lowered(follow_ops)
    variants: dict[int, set[str]] = {}
    casts: dict[int, dict[tuple[int, str], int]] = {}
    sizes: dict[int, int] = {}
    unknown: set[int] = set()
    first_op: dict[int, tuple[int, str]] = {}
    upcast = upcast or set()
    clones: dict[int, tuple[Any, bool]] = {}  # the nodes kept until the walk ends: their id()s stay theirs
    for key, size, fp32, node, op, field, numel in saves:
        sizes[key] = -(-size // block) * block
        if detail is not None:  # the op that saved it first (forward order), as a pack hook sees it
            seq = node._sequence_nr()
            if key not in first_op or seq < first_op[key][0]:
                first_op[key] = (seq, op)
        kinds = variants.setdefault(key, set())
        if not fp32:
            kinds.add("full")  # integer/bool masks and indices, 16-bit already: unchanged
        elif op in matmul_ops:
            if any(f in field for f in FP32_OUTPUT_FIELDS) or field.startswith("_raw_saved_result") \
                    or field == "_raw_saved_output":
                kinds.add("full" if any(f in field for f in FP32_OUTPUT_FIELDS) else "half")
                continue
            maker = _producer(node, field, op)
            if query_layout and id(node) not in upcast and _copy_free(maker, clones):
                continue  # no copy under autocast: the attention's own output, saved (and counted) by it
            if id(node) not in upcast and maker is not None and maker != "leaf" and lowered(maker):
                kinds.add("half")  # arrives 16-bit: the producer's one copy, shared by every reader
            else:  # fp32 at this op: autocast casts it here, once per op that reads it (its cache holds only
                # casts of leaves that require grad: parameters, left out here), a copy of the view read
                casts.setdefault(key, {})[(id(node), field)] = -(-(numel * 2) // block) * block
        elif math_sdpa and op in ("Bmm", "Baddbmm"):
            kinds.add("full")  # sdpa's math fallback saves fp32 upcasts of its 16-bit q, k, v: known, full size
        elif op in fp32_ops:
            kinds.add("full")
        elif op in follow_ops:
            maker = _producer(node, field)
            kinds.add("half" if maker is not None and maker != "leaf" and lowered(maker) else "full")
        else:
            kinds.add("full")
            unknown.add(key)
    under = reached = unclassified = 0
    for key, kinds in variants.items():
        size = sizes[key]
        half = -(-(size // 2) // block) * block
        if key in batch_keys and key not in counted:  # the input's 16-bit copies: new saved tensors
            under += (half if "half" in kinds else 0) + sum(casts.get(key, {}).values())
            continue
        reached += size
        amp = (size if "full" in kinds else 0) + (half if "half" in kinds else 0) + sum(casts.get(key, {}).values())
        under += amp
        if detail is not None:
            row = detail.setdefault(first_op[key][1], [0, 0])
            row[0] += size
            row[1] += amp
        if key in unknown:
            unclassified += size
    return under, reached, unclassified


def _saved_tensors(output: torch.Tensor, wanted: set[int]) -> tuple[list[tuple[Any, ...]], set[str]]:
    """Walk the graph from ``output``: every saved tensor whose storage is in ``wanted``, as (storage key, bytes,
    is fp32, saving node, its op, field, the tensor's elements); and the set of ops met."""
    fields_cache: dict[str, list[str]] = {}
    out: list[tuple[Any, ...]] = []
    ops: set[str] = set()
    seen: set[int] = set()
    nodes = [output.grad_fn] if output.grad_fn is not None else []
    keep: list[Any] = list(nodes)  # alive until the walk ends: id() stays unique
    while nodes:
        node = nodes.pop()
        op = _op(node)
        ops.add(op)
        for field in _saved_fields(node, fields_cache):
            try:
                tensors = _packed(getattr(node, field))
            except Exception:  # noqa: BLE001 - a field that cannot be read is not counted
                continue
            for t in tensors:
                try:
                    storage = t.untyped_storage()
                    key, size = storage.data_ptr(), storage.nbytes()
                except Exception:  # noqa: BLE001 - no plain storage (sparse, nested, fake)
                    continue
                if key in wanted:
                    out.append((key, size, t.dtype == FP32, node, op, field, t.numel()))
        for nxt, _ in node.next_functions:
            if nxt is not None and id(nxt) not in seen:
                seen.add(id(nxt))
                keep.append(nxt)
                nodes.append(nxt)
    return out, ops


def fp32_input_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The linear layers a model declares it keeps in fp32 (Hugging Face's ``_keep_in_fp32_modules``, matched by
    the module's own name): T5's ``wo``, whose caller casts its 16-bit input to the weight's dtype first, so under
    autocast the layer gets an fp32 input and casts it back - a 16-bit copy beside the activation the ReLU saved,
    which the fp32 graph cannot show (its cast is a no-op there). A declared module whose caller does not upcast
    gets one copy too many: the what-if's cut is then smaller, never larger."""
    names: set[str] = set()
    for module in model.modules():
        keep = getattr(type(module), "_keep_in_fp32_modules", None)
        if isinstance(keep, (list, tuple, set)):
            names.update(k for k in keep if isinstance(k, str))
    if not names:
        return []
    return [m for name, m in model.named_modules()
            if name and name.rsplit(".", 1)[-1] in names and isinstance(m, torch.nn.Linear)]


class Fp32InputMeter:
    """The matmul-class graph nodes of the ``fp32_input_modules`` for one forward (forward hooks, removed by
    ``remove``): each module's output's node, or the matmul under its views and bias add (a 3-d input's
    ``linear`` is a view of an ``mm``). The nodes are kept alive until the walk (their id()s are its keys)."""

    def __init__(self, modules: list[torch.nn.Module]) -> None:
        self.nodes: list[Any] = []
        self.errors = 0
        self._handles = [m.register_forward_hook(self._post) for m in modules]

    def _post(self, module: torch.nn.Module, args: Any, result: Any) -> None:
        try:
            node = result.grad_fn if isinstance(result, torch.Tensor) else None
            for _ in range(4):
                if node is None or _op(node) in MATMUL_OPS:
                    break
                node = next((m for m, _ in node.next_functions
                             if m is not None and "AccumulateGrad" not in m.name()), None)
            if node is not None and _op(node) in MATMUL_OPS:
                self.nodes.append(node)
        except Exception:  # noqa: BLE001 - metering must never break the forward
            self.errors += 1

    @property
    def ids(self) -> set[int]:
        return {id(n) for n in self.nodes}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


#: the base class of the layers Hugging Face's gradient_checkpointing_enable() wraps (transformers >= 4.52)
HF_CHECKPOINT_LAYER = "GradientCheckpointingLayer"


def checkpoint_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks a per-block checkpoint wraps, as the checkpointing what-if assumes (what
    ``gradient_checkpointing_enable()`` does): a Hugging Face model's every GradientCheckpointingLayer (an
    encoder-decoder's blocks of both stacks: T5's 6 + 6); on an older transformers, the repeated blocks of every
    module that has the ``gradient_checkpointing`` switch (T5Stack, GPT2Model, BertEncoder); else the largest run
    of same-class blocks (saved_kinds.repeated_blocks: one stack, the conservative choice where nobody says which
    modules a user would wrap). Outermost only: a block inside another is not counted twice."""
    marked = [m for m in model.modules() if any(c.__name__ == HF_CHECKPOINT_LAYER for c in type(m).__mro__)]
    if not marked:
        marked = []
        for owner in model.modules():
            if not isinstance(getattr(owner, "gradient_checkpointing", None), bool):
                continue
            for child in owner.children():
                if isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)):
                    marked.extend(repeated_blocks(child))
    if not marked:
        return repeated_blocks(model)
    inner: set[int] = set()
    for block in marked:
        inner.update(id(m) for m in block.modules() if m is not block)
    out, seen = [], set()
    for block in marked:
        if id(block) not in inner and id(block) not in seen:
            seen.add(id(block))
            out.append(block)
    return out


class BlockSplitMeter:
    """The saved bytes inside the checkpointed blocks for one forward (growth of ``read_bytes()`` between each
    block's forward pre and post hooks), the largest single block's (what the backward recomputes at once), and
    the bytes of the blocks' tensor inputs, each storage once (a checkpoint keeps them: hidden states, T5's shared
    position bias and, in the decoder, the encoder's output, which every decoder block gets). Nested or re-entered
    blocks count once (the outermost)."""

    def __init__(self, blocks: list[torch.nn.Module], read_bytes: Any, block: int = 512, pack: Any = None,
                 batch: int = 0, unpack: Any = None) -> None:
        self.blocks = len(blocks)
        self._read = read_bytes
        self._round = max(1, block)
        self.inside = 0
        self.largest = 0
        # the sequence (``sequence()``): with ``pack`` (the agent counter's pack hook), each block's saved storages
        # in creation order, through a saved_tensors_hooks of its own inside each block that calls ``pack``
        self._pack = pack
        self._unpack = unpack if unpack is not None else _unpack  # the counter's: what its pack returns, unpacked
        self._batch = batch
        # (input, saved, params, gap, fixed gap)
        self._seq: list[tuple[int, tuple[int, ...], tuple[int, ...], int, int]] = []
        self._cur: list[int] | None = None
        self._ctx: Any = None
        self._last = 0  # the counter after the last block (the gap before the next one is outside the blocks)
        self._first = True
        self._first_start = 0
        self._cur_in = 0
        self._cur_params: tuple[int, ...] = ()
        self._cur_gap = 0
        self._block_in: set[StorageWeakRef] = set()
        self._seen_in: set[StorageWeakRef] = set()
        self._cur_fixed = 0
        self.seq_ok = pack is not None
        # keyed by a weak reference to each input's storage, not its address: a storage freed within the forward
        # (the encoder's position bias, once the encoder returns) gives its address to later tensors - another
        # block's input, or a tensor an op saves - and a key by address would merge the two or call the freed
        # one saved. The weak reference keeps the storage's identity (its address is not reused while held),
        # never its memory: the training frees it when it would.
        self._inputs: dict[StorageWeakRef, int] = {}
        self._broadcast: set[StorageWeakRef] = set()  # laid out as one sample's (leading dim 1, own whole storage)
        self._depth = 0
        self._start = 0
        self.errors = 0
        self._handles: list[Any] = []
        for module in blocks:
            self._handles.append(module.register_forward_pre_hook(self._pre, with_kwargs=True))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))

    def _pre(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        try:
            if self._depth == 0:
                self._start = self._read()
                if self.seq_ok:
                    self._seq_begin(module, args, kwargs)
                for t in list(args) + list((kwargs or {}).values()):
                    if isinstance(t, torch.Tensor):
                        storage = t.untyped_storage()
                        ref = StorageWeakRef(storage)
                        self._inputs[ref] = self._size(t)
                        if _one_sample(t):
                            self._broadcast.add(ref)
            self._depth += 1
        except Exception:  # noqa: BLE001 - metering must never break the forward
            self.errors += 1

    def _post(self, module: torch.nn.Module, args: Any, result: Any) -> None:
        try:
            self._depth = max(0, self._depth - 1)
            if self._depth == 0:
                self._seq_end()
                grown = max(0, self._read() - self._start)
                self.inside += grown
                self.largest = max(self.largest, grown)
        except Exception:  # noqa: BLE001
            self.errors += 1

    # -- the sequence: what a synthesis of the checkpointed step needs (batchmon.memory_model.ckpt_trace)

    def _seq_begin(self, module: torch.nn.Module, args: Any, kwargs: Any) -> None:
        """A block starts: its hidden-state input (the first tensor argument: what its checkpoint keeps of its
        own), its parameters' storages, the saved bytes since the last block (outside the blocks), and a
        saved_tensors_hooks that passes every saved tensor to the counter's pack and notes what it added."""
        try:
            hidden = next((t for t in list(args) + list((kwargs or {}).values()) if isinstance(t, torch.Tensor)),
                          None)
            self._cur_in = self._size(hidden) if hidden is not None else 0
            self._cur_params = tuple(self._size(p) for p in module.parameters())[:SEQ_PARAMS]
            if self._first:
                self._first_start, self._cur_gap, self._first = self._start, 0, False
            else:
                self._cur_gap = self._start - self._last
            self._block_in = set()
            extra = fixed = 0
            for t in list(args) + list((kwargs or {}).values()):
                if not isinstance(t, torch.Tensor):
                    continue
                ref = StorageWeakRef(t.untyped_storage())
                self._block_in.add(ref)
                if t is hidden or ref in self._seen_in:
                    continue
                # another input (the encoder's output, a position bias): made outside the blocks and kept by every
                # checkpoint that gets it - counted once, with the bytes outside the blocks before this block
                self._seen_in.add(ref)
                if self._batch > 1 and _one_sample(t):
                    fixed += self._size(t)
                else:
                    extra += self._size(t)
            self._cur_gap += extra
            self._cur_fixed = fixed
            top = _top_saved_hooks(False) if _top_saved_hooks is not None else None
            if top is None or top[0] != self._pack:
                # another pair is innermost (a checkpoint's own, an offloading hook): the block's saved tensors are
                # its to pack - a pair pushed here would take them from it (a non-reentrant checkpoint's recompute
                # then fails). No sequence this run; the split stands
                self.seq_ok = False
                self._cur = None
                return
            self._cur = []
            ctx = torch.autograd.graph.saved_tensors_hooks(self._seq_pack, self._unpack)
            ctx.__enter__()
            self._ctx = ctx
        except Exception:  # noqa: BLE001 - no sequence this run; the split stands
            self.errors += 1
            self.seq_ok = False
            self._cur = None

    def _seq_pack(self, t: torch.Tensor) -> Any:
        before = self._read()
        out = self._pack(t)  # the counter's own pack: counted exactly as without this hook
        try:
            grown = self._read() - before
            cur = self._cur
            if grown > 0 and cur is not None:
                if StorageWeakRef(t.untyped_storage()) in self._block_in:
                    pass  # the block's own input: kept by its checkpoint, never recomputed
                elif len(cur) >= SEQ_SAVED:
                    self.seq_ok = False
                elif self._batch > 1 and _one_sample(t):
                    cur.append(-grown)  # shaped as one sample's at a batch above 1: does not grow with it
                else:
                    cur.append(grown)
        except Exception:  # noqa: BLE001
            self.seq_ok = False
        return out

    def _seq_end(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:
            ctx.__exit__(None, None, None)
        cur, self._cur = self._cur, None
        self._block_in = set()
        if cur is not None and self.seq_ok:
            self._seq.append((self._cur_in, tuple(cur), self._cur_params, self._cur_gap, self._cur_fixed))
        self._last = self._read()

    def _size(self, t: torch.Tensor) -> int:
        return _storage_bytes(t, self._round)

    def sequence(self, end_bytes: int, start_bytes: int) -> dict[str, Any] | None:
        """The blocks' saved storages in creation order, for the memory model's synthesis of the checkpointed
        step: ``{"kinds": [[input, [saved...], [params...]], ...], "order": [[kind, gap, fixed], ...], "before": b,
        "after": b}`` - each distinct block once (``kinds``: the hidden-state input's bytes, each saved storage's
        bytes as the counter added them, negative where it is shaped as one sample's, its parameters' bytes),
        ``order`` the blocks in forward order with the saved bytes outside the blocks since the previous one and
        the block's other inputs first seen there (the encoder's output; ``fixed``: those shaped as one sample's),
        ``before``/``after`` the saved bytes outside the blocks before the first and after the last (``start_bytes``
        and ``end_bytes``: the counter at the forward's start and end). None where it was not recorded whole or
        is larger than the caps (SEQ_KINDS distinct blocks, SEQ_SAVED storages each)."""
        if not self.seq_ok or not self._seq or len(self._seq) != self.blocks or self._ctx is not None:
            return None
        kinds: dict[tuple[int, tuple[int, ...], tuple[int, ...]], int] = {}
        order = []
        for hidden, saved, params, gap, fixed in self._seq:
            kind = kinds.setdefault((hidden, saved, params), len(kinds))
            order.append([kind, max(0, gap), fixed])
        if len(kinds) > SEQ_KINDS:
            return None
        before = self._first_start - start_bytes
        return {"kinds": [[h, list(s), list(p)] for (h, s, p) in kinds], "order": order,
                "before": max(0, before), "after": max(0, end_bytes - self._last)}

    @property
    def inputs(self) -> int:
        return sum(self._inputs.values())

    def broadcast_inputs(self) -> dict[int, int]:
        """{storage: bytes} of the inputs shaped as one sample's (leading dim 1, the whole storage): at a batch
        above 1 they do not grow with it - T5's relative position biases (1, heads, q, k), which every block of
        a stack gets - where the hidden states do. A storage still alive is keyed by its address (what the graph
        walk matches saved tensors by); one freed already is saved by no op, and gets a key no address can be
        (negative, one per storage): its address may be a later tensor's by now."""
        out: dict[int, int] = {}
        for dead, ref in enumerate(self._broadcast, start=1):
            try:
                key = None if ref.expired() else _alive_address(ref)
            except Exception:  # noqa: BLE001 - not told whether it lives: left out (counted per sample, as before)
                continue
            out[key if key is not None else -dead] = self._inputs[ref]
        return out

    def remove(self) -> None:
        ctx, self._ctx = self._ctx, None
        if ctx is not None:  # a block whose post hook never ran (never in a forward that returned)
            self.seq_ok = False
            try:
                ctx.__exit__(None, None, None)
            except Exception:  # noqa: BLE001
                self.errors += 1
        for handle in self._handles:
            handle.remove()
        self._handles = []


#: the sequence's caps (BlockSplitMeter.sequence): distinct blocks, saved storages per block, parameters per block
SEQ_KINDS = 16
SEQ_SAVED = 256
SEQ_PARAMS = 64


def _unpack(t: Any) -> Any:
    return t


_top_saved_hooks = accounting._top_saved_hooks  # (the innermost pair in force; without the query no sequence)


def _alive_address(ref: StorageWeakRef) -> int | None:
    """The address of the storage ``ref`` refers to, while it is alive (None once freed). The strong reference
    this takes to read it is dropped on return."""
    storage = torch.UntypedStorage._new_with_weak_ptr(ref.cdata)  # type: ignore[attr-defined]
    return None if storage is None else int(storage.data_ptr())


def _compiled(model: torch.nn.Module) -> bool:
    return hasattr(model, "_orig_mod") or type(model).__name__ == "OptimizedModule"


class SplitProbe:
    """Measures the saved split once, on the first sampled step after ``after_steps`` steps (handle.py: ``begin``
    at the root's pre hook of a sampled step, ``end`` at its post hook). ``result``: the Step.saved_split dict
    once measured."""

    def __init__(self, after_steps: int = 1) -> None:
        self.after_steps = after_steps
        self.result: dict[str, int] | None = None
        self.done = False
        self.errors = 0
        self._meter: BlockSplitMeter | None = None
        self._fp32: Fp32InputMeter | None = None
        self._counter: Any = None
        self._start = 0
        self._armed = False

    @property
    def armed(self) -> bool:
        return self._armed

    def begin(self, model: torch.nn.Module, step_meter: Any) -> None:
        """The root forward of a sampled step starts (the agent's counter is pushed): hook the blocks."""
        if self.done or self._armed or step_meter.step < self.after_steps:
            return
        if _compiled(model):  # its graph is one compiled node (nothing to classify) and hooks would recompile
            self.done = True
            return
        try:
            counter = step_meter.counter
            if counter is None:
                return
            self._counter = counter
            self._start = counter.bytes
            blocks = checkpoint_blocks(model)
            self._meter = BlockSplitMeter(blocks, lambda: counter.bytes, counter.saved.block, pack=counter._pack,
                                          unpack=counter._unpack,
                                          batch=int(step_meter.batch_size or 0)) if blocks else None
            upcast = fp32_input_modules(model)
            self._fp32 = Fp32InputMeter(upcast) if upcast else None
            self._armed = True
        except Exception:  # noqa: BLE001 - measuring must never break the forward
            self._stop()

    def end(self, output: Any, step_meter: Any, model: torch.nn.Module | None) -> dict[str, int] | None:
        """The root forward returned ``output`` (None: it raised): remove the hooks, walk the graph once."""
        if not self._armed:
            return self.result
        meter, counter, fp32 = self._meter, self._counter, self._fp32
        self._armed = False
        try:
            if fp32 is not None:
                fp32.remove()
            inside, inputs, blocks, largest = (meter.inside, meter.inputs, meter.blocks, meter.largest) \
                if meter is not None else (0, 0, 0, 0)
            broadcast = meter.broadcast_inputs() if meter is not None else {}
            sequence = None
            if meter is not None:
                try:
                    sequence = meter.sequence(counter.bytes, self._start) if counter is not None else None
                except Exception:  # noqa: BLE001 - no sequence: the checkpointing what-if's fallback
                    self.errors += 1
                meter.remove()
            tensor = _output_tensor(output)
            batch = step_meter.batch_size
            if tensor is None or counter is None or not batch or tensor.grad_fn is None:
                self._stop(done=output is not None)
                return self.result
            saved = counter.bytes - self._start
            split = {"batch": int(batch), "saved": int(saved), "in_blocks": int(inside),
                     "block_inputs": int(inputs), "blocks": int(blocks)}
            if blocks:
                split["block_max"] = int(largest)
                try:
                    fixed = batch_independent_inputs(tensor, broadcast, int(batch))
                except Exception:  # noqa: BLE001 - the rest of the split stands (all inputs per sample)
                    self.errors += 1
                    fixed = 0
                if fixed:
                    split["block_inputs_fixed"] = fixed
            split["output"] = int(_storage_bytes(tensor, counter.saved.block))
            if sequence is not None:
                split["block_seq"] = sequence  # type: ignore[assignment]
            if any(p.dtype == FP32 for p in (model.parameters() if model is not None else ())) and \
                    not torch.is_autocast_enabled(tensor.device.type):
                storages = counter.saved
                batch_keys: set[int] = set()
                for excluded in storages.exclude[1:]:
                    batch_keys |= excluded
                under, reached, unknown = amp_bytes(tensor, storages.keys, batch_keys, storages.block,
                                                    tensor.device.type, upcast=fp32.ids if fp32 else None,
                                                    query_layout=attention_follows_query(tensor.device))
                split["amp_saved"] = int(under + max(0, saved - reached))  # what the walk did not reach: full
                split["amp_unknown"] = int(unknown + max(0, saved - reached))
            self.result = split
            self.done = True
        except Exception:  # noqa: BLE001
            self.errors += 1
            self._stop()
        self._meter = self._counter = self._fp32 = None
        return self.result

    def _stop(self, done: bool = True) -> None:
        for meter in (self._meter, self._fp32):
            if meter is not None:
                try:
                    meter.remove()
                except Exception:  # noqa: BLE001
                    pass
        self._meter = self._counter = self._fp32 = None
        self._armed = False
        self.done = done


def batch_independent_inputs(output: torch.Tensor, broadcast: dict[int, int], batch: int) -> int:
    """Bytes of the blocks' inputs that a checkpoint keeps beside the hidden states but that do not grow with the
    batch: inputs shaped as one sample's at a batch above 1 (``broadcast``: {storage: bytes}) that no op of the
    graph ending at ``output`` saves - the plain forward frees them when the blocks return (T5's relative
    position biases: an addend of the attention scores, whose add saves nothing), a checkpoint holds them until
    the backward. At batch 1 nothing can be told apart (0: every input counted per sample, the larger share);
    one that an op saves stays with the saved bytes (0 for it: as before)."""
    if batch < 2 or not broadcast:
        return 0
    saves, _ = _saved_tensors(output, set(broadcast))
    saved = {entry[0] for entry in saves}
    return int(sum(size for key, size in broadcast.items() if key not in saved))


def _one_sample(t: torch.Tensor) -> bool:
    """Shaped as one sample's (a leading dimension of 1, at least 2 dimensions) and its storage's whole: a block
    input or saved tensor that does not grow with the batch (T5's relative position bias)."""
    return t.dim() >= 2 and t.shape[0] == 1 and t.numel() * t.element_size() == t.untyped_storage().nbytes()


def _storage_bytes(tensor: torch.Tensor, block: int) -> int:
    """The bytes of the model output's storage, rounded as the allocator does (the logits: the tensor the loss
    turns fp32 and whose gradient crosses back into 16-bit under autocast)."""
    return -(-tensor.untyped_storage().nbytes() // max(1, block)) * max(1, block)


def _output_tensor(result: Any) -> torch.Tensor | None:
    """The model output whose graph is walked: the tensor itself, a dict's (an HF ModelOutput's) ``logits`` or
    first tensor, a tuple's first tensor."""
    if isinstance(result, torch.Tensor):
        return result
    values: Any = ()
    if isinstance(result, dict):
        logits = result.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        values = result.values()
    elif isinstance(result, (tuple, list)):
        values = result
    return next((v for v in values if isinstance(v, torch.Tensor)), None)
