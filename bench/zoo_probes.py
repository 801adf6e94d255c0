"""bench/predict_zoo.py's side measurements of one architecture at a small batch, recorded beside the agent's for
an offline derivation: the bench's own saved split (compared with the agent's Step.saved_split) and the
allocator's peak in each phase of a step. Split from predict_zoo.py so that file stays a runner."""

from __future__ import annotations

from typing import Any

import torch

from batchmon.memory_model import SavedSplit
from predict_accuracy import Runner


def measure_saved_split(runner: Runner, batch: int, detail: dict[str, list[int]] | None = None,
                        casts: dict[str, int] | None = None,
                        real_detail: dict[str, int] | None = None) -> SavedSplit:
    """What the saved activations are made of at ``batch``: bytes saved in one forward (storages counted once,
    parameters and the batch's tensors excluded, as the agent counts activations), the part saved inside the
    checkpointed blocks, the largest block's, and the blocks' input bytes (each storage once: the agent's own
    batchmon.agent.saved_split.checkpoint_blocks and BlockSplitMeter, what a per-block checkpoint drops and keeps),
    and the bytes the same forward saves under bf16 autocast. ``detail``, when given, gets the agent's graph walk
    per saving op ({op: [bytes, bytes under autocast as the walk says]}, saved_split.amp_bytes): what explains an
    AMP what-if's miss afterwards. ``casts``, when given, gets ``weight_casts``: the bytes of the forward under
    autocast that are 16-bit casts of parameters (in ``saved_amp``, not activations: what autocast really saved
    of the activations is saved_amp less them). ``real_detail``, when given, gets what the autocast forward's own
    graph saves per first saving op, field and dtype ({"Addmm:mat1:bfloat16": bytes}, parameters' casts under
    "cast:..."): set beside ``detail`` it says which op's saved bytes the walk mis-sizes on this device (the
    ViT-B/16 and T5-small AMP misses of zoo run 8). Each forward is followed by its backward (the graph freed)
    and no optimizer step: the training state is untouched."""
    from batchmon.agent.saved_split import (BlockSplitMeter, Fp32InputMeter, amp_bytes, attention_follows_query,
                                            checkpoint_blocks, fp32_input_modules)

    model, dev = runner.model, runner.dev.device
    blocks = checkpoint_blocks(model)
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def forward(amp: bool) -> tuple[int, int, int, int]:
        x, y = runner.arch.batch(batch, dev, runner.gen)
        inputs = {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
        excluded = params | inputs
        saved: dict[int, int] = {}
        total = [0]
        weight_casts = [0]

        def pack(t: torch.Tensor) -> torch.Tensor:
            if t.device.type == dev.type:
                st = t.untyped_storage()
                key = st.data_ptr()
                if key not in excluded and key not in saved and st.nbytes():
                    saved[key] = st.nbytes()
                    total[0] += st.nbytes()
                    if amp and _is_parameter_cast(t):
                        weight_casts[0] += st.nbytes()
            return t

        meter = BlockSplitMeter(blocks, lambda: total[0], 1) if blocks else None
        upcast = Fp32InputMeter(fp32_input_modules(model)) if not amp else None
        try:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(x)
                    in_model = set(saved)
                    loss = runner.arch.loss(out, y)
            inside, block_inputs, largest = (meter.inside, meter.inputs, meter.largest) if meter else (0, 0, 0)
        finally:
            if meter:
                meter.remove()
            if upcast:
                upcast.remove()
        if detail is not None and not amp and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            try:
                amp_bytes(out, in_model, inputs, 512, dev.type, detail, upcast=upcast.ids if upcast else None,
                          query_layout=attention_follows_query(dev))
            except Exception as exc:  # noqa: BLE001 - recorded for an explanation only
                detail[f"error: {type(exc).__name__}"] = [0, 0]
        if real_detail is not None and amp and isinstance(out, torch.Tensor) and out.grad_fn is not None:
            try:
                real_detail.update(graph_saved_by_op(out, set(saved)))
            except Exception as exc:  # noqa: BLE001 - recorded for an explanation only
                real_detail[f"error: {type(exc).__name__}"] = 0
        del out
        loss.backward()
        runner.opt.zero_grad(set_to_none=True)
        last_weight_casts[0] = weight_casts[0]
        return total[0], inside, block_inputs, largest

    last_weight_casts = [0]

    saved, inside, inputs, largest = forward(False)
    saved_amp = None
    if not runner.arch.amp:
        try:
            saved_amp = forward(True)[0]
            if casts is not None:
                casts["weight_casts"] = last_weight_casts[0]
        except RuntimeError:  # an op without a 16-bit kernel here (oneDNN's LSTM on CPU): the AMP share unknown
            runner.opt.zero_grad(set_to_none=True)
    runner.dev.clean()
    return SavedSplit(batch=batch, saved=saved, in_blocks=inside, block_inputs=inputs, blocks=len(blocks),
                      saved_amp=saved_amp, block_max=largest if blocks else None)


def graph_saved_by_op(output: torch.Tensor, wanted: set[int]) -> dict[str, int]:
    """The bytes the graph ending at ``output`` saves of the storages in ``wanted``, each storage once, under the
    op that saves it first (forward order), its field and dtype: "Addmm:mat1:bfloat16"; a parameter's 16-bit cast
    under "cast:...". The walk's own reader (saved_split._saved_tensors), on the graph autocast really built."""
    from batchmon.agent.saved_split import _saved_tensors

    saves, _ = _saved_tensors(output, wanted)
    first: dict[int, tuple[int, str, int]] = {}
    for key, size, _fp32, node, op, field, _numel in saves:
        seq = node._sequence_nr()
        if key not in first or seq < first[key][0]:
            tensor = next((t for t in _packed_field(node, field) if t.untyped_storage().data_ptr() == key), None)
            dtype = str(tensor.dtype).replace("torch.", "") if tensor is not None else "?"
            cast = "cast:" if tensor is not None and _is_parameter_cast(tensor) else ""
            first[key] = (seq, f"{cast}{op}:{field.replace('_raw_saved_', '')}:{dtype}", size)
    out: dict[str, int] = {}
    for _, name, size in first.values():
        out[name] = out.get(name, 0) + size
    return out


def _packed_field(node: Any, field: str) -> list[torch.Tensor]:
    from batchmon.agent.saved_split import _packed

    try:
        return _packed(getattr(node, field))
    except Exception:  # noqa: BLE001 - for an explanation only
        return []


def block_backward_meter(model: torch.nn.Module, read: Any, reset: Any) -> tuple[list[tuple[int, int]], list[Any]]:
    """Forward pre-hooks on the checkpointed blocks (saved_split.checkpoint_blocks) that hook each block's input
    hidden state: when its gradient arrives the block's backward (its recomputation, under a checkpoint) is done,
    and ``read()`` (the allocator's peak since the previous arrival) is recorded as (block index in forward order,
    peak), then ``reset()`` (the peak statistics). Which block's recomputation makes the model's backward peak, and by how much it rises
    above what the kept tensors hold - what the checkpointing what-if's model's backward assumes (T5-small's miss
    of zoo run 8). The list fills during the backward; the hooks are removed by the caller after the forward."""
    from batchmon.agent.saved_split import checkpoint_blocks

    peaks: list[tuple[int, int]] = []

    def pre(index: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, kwargs: Any) -> None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            if isinstance(hidden, torch.Tensor) and hidden.requires_grad and torch.is_grad_enabled():
                def arrived(grad: torch.Tensor) -> None:
                    peaks.append((index, read()))
                    reset()
                hidden.register_hook(arrived)
        return hook

    if hasattr(model, "_orig_mod"):  # a compiled model: hooks on its modules would recompile it (minutes)
        return peaks, []
    try:
        blocks = checkpoint_blocks(model)
    except Exception:  # noqa: BLE001 - for an explanation only
        return peaks, []
    return peaks, [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]


def _is_parameter_cast(t: torch.Tensor) -> bool:
    """Is ``t`` (or the tensor it views) autocast's cast of a parameter (a copy of a leaf that gets a gradient)?"""
    try:
        fn = (t._base if t._base is not None else t).grad_fn  # a view (the weight's transpose) shares its storage
        if fn is None or type(fn).__name__ != "ToCopyBackward0":
            return False
        return any(nxt is not None and type(nxt).__name__ == "AccumulateGrad" for nxt, _ in fn.next_functions)
    except Exception:  # noqa: BLE001 - for an explanation only: never fails the measure
        return False


def phase_peaks(runner: Runner, batch: int) -> dict[str, Any] | None:
    """The allocator's peak in each phase of one step at ``batch`` (forward with the loss, backward, optimizer
    step; the peak statistics reset between them): which phase peaks, and how each grows with the batch - the
    data a phase-wise fit needs (issue 13: the LSTM's peak moves from the forward to the backward as the batch
    grows). The backward is also split where the model output's gradient arrives, as the agent splits it
    (``loss_backward``: the loss's backward; ``model_backward``: the model's backward's own peak after it, which
    a what-if changes differently; ``backward`` stays the whole backward's peak), and within the model's
    backward each checkpointed block's (``block_backward_peaks``: [block index in forward order, the allocator's
    peak from the previous block's end to this block's input gradient], in backward order: under a checkpoint
    per block, which recomputation makes the peak). None off CUDA."""
    if runner.dev.kind != "cuda":
        return None
    dev = runner.dev.device
    model, opt, arch = runner.model, runner.opt, runner.arch
    opt.zero_grad(set_to_none=True)
    runner.dev.clean()
    out: dict[str, Any] = {"batch": batch}
    x, y = arch.batch(batch, dev, runner.gen)
    loss_peak: list[int | None] = [None]
    blocks, handles = block_backward_meter(model, lambda: torch.cuda.max_memory_allocated(dev),
                                           lambda: torch.cuda.reset_peak_memory_stats(dev))

    def at_output_grad(grad: torch.Tensor) -> None:
        out["loss_backward"] = torch.cuda.max_memory_allocated(dev)  # the stream's order: what is allocated so far
        # the model's backward's own peak from here on (the allocator's counters are kept on the host, in the
        # order of the calls): where it stays below the loss's backward, 'backward' alone cannot say by how much
        loss_peak[0] = out["loss_backward"]
        torch.cuda.reset_peak_memory_stats(dev)

    try:
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=arch.amp):
            logits = model(x)
            if isinstance(logits, torch.Tensor) and logits.requires_grad:
                logits.register_hook(at_output_grad)
            loss = arch.loss(logits, y)
            del logits  # as the Runner's step: the output is not kept through backward
    finally:
        for handle in handles:  # the forward's block inputs are hooked; a recomputation's are not
            handle.remove()
    torch.cuda.synchronize(dev)
    out["forward"] = torch.cuda.max_memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    loss.backward()
    torch.cuda.synchronize(dev)
    model_peak = max([torch.cuda.max_memory_allocated(dev)] + [p for _, p in blocks])
    if blocks:
        out["block_backward_peaks"] = [[index, peak] for index, peak in blocks]
    if loss_peak[0] is not None:
        out["model_backward"] = model_peak
    out["backward"] = max(model_peak, loss_peak[0] or 0)
    # the pool after the backward and the free bytes inside segments with live blocks at their peak since the
    # last reset (the model's backward's last block, or its whole backward): the allocator's own figures for
    # the fragmentation a what-if's boundary meets (RECOMPUTE_FRAG's, derived from T5-small's reserved alone)
    out["reserved_after_backward"] = torch.cuda.memory_reserved(dev)
    out["inactive_split_backward"] = torch.cuda.memory_stats(dev).get("inactive_split_bytes.all.peak")
    torch.cuda.reset_peak_memory_stats(dev)
    del loss, x, y
    opt.step()
    torch.cuda.synchronize(dev)
    out["optimizer"] = torch.cuda.max_memory_allocated(dev)
    opt.zero_grad(set_to_none=True)
    runner.dev.clean()
    return out
