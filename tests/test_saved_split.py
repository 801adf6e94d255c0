"""batchmon/agent/saved_split.py with real torch on CPU: the graph walk's prediction of what autocast would save
against the bytes really saved under CPU autocast(bfloat16), and the agent measuring the split on a sampled
step and carrying it in Step.saved_split (then the memory model derives its what-ifs from it)."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from agent_helpers import agent_dir, train_token_model  # noqa: E402,F401 - fixture
from batchmon.agent.accounting import ActivationCounter  # noqa: E402
from batchmon.agent.saved_kinds import repeated_blocks  # noqa: E402
from batchmon.agent.saved_split import (BlockSplitMeter, amp_bytes, batch_independent_inputs,  # noqa: E402
                                        checkpoint_blocks)
from batchmon.memory_model import SavedSplit, WhatIf, fit  # noqa: E402
from batchmon.protocol import Step  # noqa: E402

VIEWS = {"TBackward0", "ViewBackward0", "TransposeBackward0", "PermuteBackward0", "ExpandBackward0",
         "UnsafeViewBackward0"}


class Block(nn.Module):
    """A pre-norm transformer block with the ops whose autocast dtypes differ: layer norm on the fp32 residual
    stream, linear, sdpa, gelu, a scalar multiply."""

    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, d)
        x = x + self.proj(a)
        return x + self.out(F.gelu(self.fc(self.ln2(x)) * 0.5))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 256, seq: int = 32, d: int = 64, heads: int = 4, layers: int = 3) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, d), nn.Embedding(seq, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _weight_copy(t: torch.Tensor) -> bool:
    """A parameter's 16-bit cast (autocast's cached copy, seen through views): the what-if's own term."""
    node = t.grad_fn
    while node is not None and node.name() in VIEWS:
        node = node.next_functions[0][0]
    if node is None or node.name() != "ToCopyBackward0":
        return False
    leaf = node.next_functions[0][0]
    return leaf is not None and "AccumulateGrad" in leaf.name()


def _saved_under_autocast(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes really saved by a forward under CPU autocast(bfloat16): storages once, parameters, the batch and
    the parameters' 16-bit copies left out (the activations' basis)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()} | {x.untyped_storage().data_ptr()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in skip and key not in seen and not _weight_copy(t):
            seen[key] = storage.nbytes()
        return t.detach()

    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(seen.values())


def _walk(model: nn.Module, x: torch.Tensor) -> tuple[int, int, int, int]:
    """(bytes saved by the fp32 forward as the agent counts them, the walk's bytes under autocast, reached,
    unclassified)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = {x.untyped_storage().data_ptr()}
    counter = ActivationCounter(torch.device("cpu"), (params, batch))
    counter.push()
    try:
        out = model(x)
    finally:
        counter.pop()
    under, reached, unknown = amp_bytes(out, counter.saved.keys, batch, 1, "cpu")
    return counter.bytes, under, reached, unknown


def test_graph_walk_predicts_the_bytes_saved_under_cpu_autocast():
    """The tiny GPT: every saved storage reached and classified, and the prediction equals what CPU autocast
    really saves (linear/sdpa inputs 16-bit; layer norm on the fp32 residual stream fp32; the GELU after the
    linear that feeds it 16-bit, a scalar multiply between them not promoting)."""
    torch.manual_seed(0)
    model = TinyGPT()
    x = torch.randint(0, 256, (4, 32))
    saved, under, reached, unknown = _walk(model, x)
    real = _saved_under_autocast(model, x)
    assert reached == saved and unknown == 0
    assert under == real, (under, real)
    assert 0.5 * saved < real < 0.8 * saved  # it does shrink, and far from half: the norms stay fp32


@pytest.mark.slow  # importing transformers alone takes ~8 s on the dev box
def test_graph_walk_never_predicts_more_shrink_than_real_on_hf_gpt2():
    """HF GPT-2 (tiny config): its tanh-GELU written out (``1.0 + tanh(...)``: an add whose other input has no
    gradient, which the graph cannot tell from an fp32 tensor, so kept fp32) and CPU's sdpa falling back to its
    math path with dropout (which upcasts q, k, v to fp32 for its bmm): the prediction is at or above what
    autocast really saves - conservative - and within 15%."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256,
                                                              n_positions=64, bos_token_id=0, eos_token_id=0))
    hf.train()

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = hf

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(input_ids=x).logits

    model = Logits()
    x = torch.randint(0, 256, (4, 64))
    saved, under, reached, _ = _walk(model, x)
    real = _saved_under_autocast(model, x)
    assert reached == saved
    assert real <= under <= 1.15 * real, (under, real)


def test_walk_reads_packed_tensors_without_running_unpack_hooks():
    """A saved tensor packed by another hook (a checkpoint's handle, an offloading hook's copy) is not a tensor as
    packed: it is left alone, and no unpack hook runs (no recomputation, no copy back)."""
    unpacked = []

    def pack(t: torch.Tensor) -> tuple[torch.Tensor]:
        return (t.detach(),)

    def unpack(packed: tuple[torch.Tensor]) -> torch.Tensor:
        unpacked.append(1)
        return packed[0]

    w = torch.randn(8, 8, requires_grad=True)
    x = torch.randn(4, 8)
    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        out = torch.tanh(x @ w)
    under, reached, unknown = amp_bytes(out, {out.untyped_storage().data_ptr()}, set(), 1, "cpu")
    assert (under, reached, unknown) == (0, 0, 0) and unpacked == []
    out.sum().backward()  # the graph is intact
    assert unpacked and w.grad is not None


def test_agent_measures_the_split_once_and_sampled_steps_carry_it(agent_dir):
    """Through the real agent on CPU: a sampled step after the first carries Step.saved_split (blocks found,
    bytes inside them, the walk's AMP bytes), it survives the wire, the losses are those of a run without the
    agent, and the memory model fitted on the steps derives its what-ifs from it."""
    def train(attach: bool) -> tuple[list[float], list[Step]]:
        torch.manual_seed(0)
        model = TinyGPT()
        return train_token_model(model, torch.optim.AdamW(model.parameters(), lr=1e-3), 256, 32, attach)

    plain, _ = train(False)
    losses, steps = train(True)
    assert losses == plain
    carried = [s for s in steps if s.saved_split]
    assert carried and carried[0].step >= 2  # measured on a sampled step after the first
    split = carried[0].saved_split
    assert split["blocks"] == 3 and 0 < split["block_inputs"] < split["in_blocks"] < split["saved"]
    assert 0 < split["amp_saved"] < split["saved"] and split["amp_unknown"] == 0
    assert split["block_inputs"] < split["block_max"] < split["in_blocks"]  # one block of three, the largest
    assert split["output"] == split["batch"] * 32 * 256 * 4  # the logits' storage
    assert all(s.saved_split == split for s in carried)  # once per process
    wire = Step.from_dict(json.loads(json.dumps(carried[-1].to_dict())))
    assert wire.saved_split == split
    model = fit(steps, optimizer="AdamW")
    assert model is not None and model.saved_split == SavedSplit.from_wire(split)
    notes = model.predict(WhatIf(amp=True, batch_size=64)).basis_fields.what_if
    assert any("as measured from the ops that save them" in n for n in notes)
    notes = model.predict(WhatIf(checkpointing=True, batch_size=64)).basis_fields.what_if
    assert any("3 blocks (3 measured)" in n for n in notes)


@pytest.mark.slow  # importing transformers alone takes ~8 s on the dev box (0.8 s after the HF GPT-2 test's import)
def test_hf_t5_checkpointing_keeps_exactly_what_the_split_says():
    """HF T5 (tiny config, real CPU torch): gradient_checkpointing_enable() wraps the blocks of both stacks, and
    the split's account of what it keeps - the saved bytes outside the blocks plus the blocks' inputs, each
    storage once (the decoder's blocks share the encoder's output and the position bias) - equals, byte for byte,
    what the checkpointed model's forward saves. The largest run of one ModuleList (the finder before this) saw
    only the encoder's blocks: zoo run 7's T5 checkpointing what-if said 143 where 321 ran."""
    transformers = pytest.importorskip("transformers")

    def build(checkpointing: bool) -> nn.Module:
        torch.manual_seed(0)
        cfg = transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=256,
                                    use_cache=False)
        model = transformers.T5ForConditionalGeneration(cfg)
        model.train()
        if checkpointing:
            model.gradient_checkpointing_enable()
        return model

    def saved(model: nn.Module, meter: bool) -> tuple[int, BlockSplitMeter | None]:
        x = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(0))
        params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        counter = ActivationCounter(torch.device("cpu"), (params, {x.untyped_storage().data_ptr()}))
        blocks = checkpoint_blocks(model)
        m = BlockSplitMeter(blocks, lambda: counter.bytes, counter.saved.block) if meter else None
        counter.push()
        try:
            model(input_ids=x[:, :16], decoder_input_ids=x[:, 16:])
        finally:
            counter.pop()
            if m is not None:
                m.remove()
        return counter.bytes, m

    plain = build(False)
    blocks = checkpoint_blocks(plain)
    assert len(blocks) == 4 and {type(b).__name__ for b in blocks} == {"T5Block"}
    assert len(repeated_blocks(plain)) == 2  # one stack only
    total, meter = saved(plain, meter=True)
    assert meter is not None and meter.blocks == 4 and 0 < meter.inputs < meter.largest < meter.inside < total
    kept, _ = saved(build(True), meter=False)
    assert kept == total - meter.inside + meter.inputs


def test_hf_t5_block_inputs_that_do_not_grow_with_the_batch():
    """HF T5 (tiny config, real CPU torch): its blocks get the relative position biases, shaped (1, heads, q, k)
    at any batch and saved by no op (an addend of the attention scores), so the plain forward frees them and a
    checkpoint keeps them. The split measures them apart (batch_independent_inputs: the same bytes at batch 2 and
    4), and the checkpointed forward's saved bytes grow by exactly the rest of the kept account from batch 2 to 4:
    what the checkpointing what-if scales per sample. At batch 1 nothing is told apart (0)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, vocab_size=256,
                                use_cache=False)
    plain = transformers.T5ForConditionalGeneration(cfg).train()
    checkpointed = transformers.T5ForConditionalGeneration(cfg).train()
    checkpointed.gradient_checkpointing_enable()

    def forward(model: nn.Module, batch: int, measure: bool) -> tuple[int, dict[str, int]]:
        x = torch.randint(0, 256, (batch, 24), generator=torch.Generator().manual_seed(batch))
        params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
        counter = ActivationCounter(torch.device("cpu"), (params, {x.untyped_storage().data_ptr()}))
        meter = BlockSplitMeter(checkpoint_blocks(model), lambda: counter.bytes, counter.saved.block) \
            if measure else None
        counter.push()
        try:
            out = model(input_ids=x[:, :16], decoder_input_ids=x[:, 16:]).logits
        finally:
            counter.pop()
            if meter is not None:
                meter.remove()
        if meter is None:
            return counter.bytes, {}
        fixed = batch_independent_inputs(out, meter.broadcast_inputs(), batch)
        kept = counter.bytes - meter.inside + meter.inputs
        return counter.bytes, {"kept": kept, "fixed": fixed}

    split = {b: forward(plain, b, True)[1] for b in (1, 2, 4)}
    biases = 4 * 16 * 16 * 4 + 4 * 8 * 8 * 4 + 4 * 8 * 16 * 4  # encoder, decoder and cross-attention (zeros), fp32
    assert split[1]["fixed"] == 0 and split[2]["fixed"] == split[4]["fixed"] >= biases
    kept = {b: forward(checkpointed, b, False)[0] for b in (2, 4)}
    assert kept[2] == split[2]["kept"] and kept[4] == split[4]["kept"]
    per_sample = {b: split[b]["kept"] - split[b]["fixed"] for b in (2, 4)}
    assert kept[4] - kept[2] == per_sample[4] - per_sample[2]  # the fixed bytes do not grow
    assert kept[4] - kept[2] < split[2]["kept"]  # the old account (all of it per sample) over-counts


def test_a_freed_block_input_whose_address_a_saved_tensor_takes_is_not_saved():
    """The flake behind test_hf_t5_block_inputs_that_do_not_grow_with_the_batch: T5's encoder position bias is
    freed when the encoder returns, and a tensor the decoder saves may get its address. The meter keys its inputs
    by a weak reference to their storage, not by address: the freed bias stays a block input of its own (counted
    once, in block_inputs), is reported under a key no address can be, and is never called saved. The meter
    keeps no input alive."""
    from torch.multiprocessing.reductions import StorageWeakRef

    class Add(nn.Module):
        def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
            return x + bias  # an addend: saved by no op

    blocks = [Add(), Add()]
    meter = BlockSplitMeter(blocks, lambda: 0, 1)
    x = torch.ones(4, 2, 1024, requires_grad=True)
    bias = torch.ones(1, 2, 1024)
    address, ref = bias.untyped_storage().data_ptr(), StorageWeakRef(bias.untyped_storage())
    h = blocks[0](x, bias)
    del bias
    assert ref.expired()  # the meter held nothing
    kept = []
    for _ in range(64):  # a tensor that an op saves takes the freed address (glibc gives it back at once)
        kept.append(torch.ones(1, 2, 1024))
        if kept[-1].untyped_storage().data_ptr() == address:
            break
    other, zeros = kept[-1], torch.zeros(1, 2, 1024)
    out = blocks[1](h * other, zeros)  # Mul saves ``other``; ``zeros``, alive, is saved by no op
    meter.remove()
    broadcast = meter.broadcast_inputs()
    assert sorted(broadcast.values()) == [8192, 8192] and meter.inputs == 2 * 32768 + 2 * 8192
    assert [key < 0 for key in broadcast].count(True) == 1  # the freed bias: a key no address can be
    assert zeros.untyped_storage().data_ptr() in broadcast
    assert batch_independent_inputs(out, broadcast, 4) == 2 * 8192  # neither is saved, whoever has the address


def test_checkpoint_blocks_without_hugging_face_is_the_largest_run():
    """A model without Hugging Face's marks: the largest run of same-class blocks, as before (one stack: the
    conservative choice where nobody says which modules a user would wrap)."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ModuleList([nn.Linear(8, 8) for _ in range(3)]),
                          nn.ModuleList([nn.Conv1d(8, 8, 1) for _ in range(2)]))
    assert checkpoint_blocks(model) == list(model[1])

    class Stack(nn.Module):  # an older transformers' stack: the switch on the module that owns the layers
        def __init__(self, n: int) -> None:
            super().__init__()
            self.gradient_checkpointing = False
            self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(n)])

    class EncoderDecoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder, self.decoder = Stack(3), Stack(2)
            self.extra = nn.ModuleList([nn.Conv1d(8, 8, 1) for _ in range(4)])  # not a stack HF would wrap

    ed = EncoderDecoder()
    assert checkpoint_blocks(ed) == list(ed.encoder.layers) + list(ed.decoder.layers)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_graph_walk_on_cuda_is_at_or_above_what_cuda_autocast_saves(agent_dir):
    """On a GPU (the H200's cudatests stage: CUDATESTSX=tests/test_saved_split.py): CUDA's lists (layer norm,
    softmax fp32; sdpa's memory-efficient kernel saving 16-bit q, k, v and output, fp32 logsumexp) predict at or
    above the bytes CUDA autocast(bfloat16) really saves, within 10%; and the agent on a CUDA model carries the
    split with the AMP bytes in it."""
    import batchmon

    torch.manual_seed(0)
    dev = torch.device("cuda")
    model = TinyGPT(d=128, heads=4, seq=64).to(dev)
    x = torch.randint(0, 256, (8, 64), device=dev)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    batch = {x.untyped_storage().data_ptr()}
    counter = ActivationCounter(dev, (params, batch))
    counter.push()
    try:
        out = model(x)
    finally:
        counter.pop()
    under, reached, _ = amp_bytes(out, counter.saved.keys, batch, counter.saved.block, "cuda")
    assert reached == counter.bytes
    skip = params | batch
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and not _weight_copy(t):
            seen[storage.data_ptr()] = -(-storage.nbytes() // counter.saved.block) * counter.saved.block
        return t.detach()

    with torch.autocast("cuda", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    real = sum(seen.values())
    assert real <= under <= 1.10 * real, (under, real)
    opt = torch.optim.AdamW(model.parameters())
    handle = batchmon.attach(model, opt, activation_every=1)
    for _ in range(3):
        F.cross_entropy(model(x).reshape(-1, 256), x.reshape(-1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    splits = [s.saved_split for s in handle.steps if s.saved_split]
    handle.detach()
    assert splits and splits[0]["blocks"] == 3 and 0 < splits[0]["amp_saved"] < splits[0]["saved"]


class BiasNet(nn.Module):
    """Blocks that each get a position bias shaped (1, T, D) at any batch (an embedding of the positions, added to
    the hidden state: saved by no op), as T5's blocks get their relative position biases."""

    def __init__(self, vocab: int = 64, d: int = 32, t: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(t, d)
        self.blocks = nn.ModuleList(BiasBlock(d) for _ in range(3))
        self.head = nn.Linear(d, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.emb(x)
        bias = self.pos(torch.arange(x.shape[1])).unsqueeze(0)
        for block in self.blocks:
            h = block(h, bias)
        return self.head(h)


class BiasBlock(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc = nn.Linear(d, d)

    def forward(self, h: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return h + torch.relu(self.fc(self.norm(h + bias)))


def test_agent_measures_the_block_inputs_that_do_not_grow_with_the_batch(agent_dir):
    """Through the real agent on CPU: the sampled step's split carries block_inputs_fixed, the bias every block
    gets (16 x 32 fp32, the same at any batch, saved by no op), within block_inputs; the losses are those of a
    run without the agent; the memory model keeps it as fixed bytes under checkpointing."""
    def train(attach: bool) -> tuple[list[float], list[Step]]:
        torch.manual_seed(0)
        model = BiasNet()
        return train_token_model(model, torch.optim.SGD(model.parameters(), lr=0.1), 64, 16, attach)

    plain, _ = train(False)
    losses, steps = train(True)
    assert losses == plain
    split = next(s.saved_split for s in steps if s.saved_split)
    assert split["blocks"] == 3 and split["block_inputs_fixed"] == 16 * 32 * 4 < split["block_inputs"]
    wire = Step.from_dict(json.loads(json.dumps(steps[-1].to_dict())))
    assert wire.saved_split.get("block_inputs_fixed") == split["block_inputs_fixed"]  # protocol lists the name
    model = fit(steps, optimizer="SGD")
    assert model is not None and model.saved_split.block_inputs_fixed == 16 * 32 * 4
    notes = model.predict(WhatIf(checkpointing=True, batch_size=64)).basis_fields.what_if
    assert any("do not grow with the batch" in n for n in notes)
