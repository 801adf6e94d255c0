"""Issue 13 point 1: the backward's own peak split where the model output's gradient arrives (PhaseTracker.
follow_output), on the CPU with real torch: the hooks and autograd are real; the allocator is the injection point
(a fake one with the caching allocator's two counters, fed by custom autograd functions that hold a temporary in
their backward, or a reader of the real parameter gradients that exist at each boundary). The CUDA readings are
checked in tests/test_agent_peak_phase.py on the GPU machine."""

from __future__ import annotations

import gc
import io
import warnings
import weakref
from collections import OrderedDict

import pytest
import torch
import torch.nn as nn

from agent_helpers import FakeAllocator
from batchmon.agent.peak_phase import MAX_FOLLOWED, NOT_FOLLOWED, PhaseTracker, output_tensor, phases_of
from batchmon.protocol import SEGMENTS


class _Temporary(torch.autograd.Function):
    """Identity whose backward holds ``n`` bytes of the fake allocator for a moment (a temporary there)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, alloc: FakeAllocator, n: int) -> torch.Tensor:  # type: ignore[override]
        ctx.alloc, ctx.n = alloc, n
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        ctx.alloc.alloc(ctx.n)
        ctx.alloc.free(ctx.n)
        return grad.clone(), None, None


class Decoder(nn.Module):
    """A model whose backward holds ``model_tmp`` bytes (after the output's gradient arrived)."""

    def __init__(self, alloc: FakeAllocator, model_tmp: int) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 32)
        self.alloc, self.model_tmp = alloc, model_tmp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Temporary.apply(self.lin(x), self.alloc, self.model_tmp)


def _followed(model_tmp: int) -> tuple[FakeAllocator, Decoder, PhaseTracker]:
    """A decoder on a fake allocator and a tracker following a step that has just started (its peak reset)."""
    alloc = FakeAllocator(1000)
    model = Decoder(alloc, model_tmp=model_tmp)
    tracker = PhaseTracker(alloc.read_and_reset)
    alloc.read_and_reset()
    tracker.start()
    return alloc, model, tracker


def _step(model: Decoder, tracker: PhaseTracker, loss_tmp: int, *, follow: bool = True, micro_batches: int = 1,
          opt_tmp: int = 5, marks: list[str] | None = None) -> object:
    """One followed step as the agent sees it: the peak reset at its start, a mark at each backward's start and
    end, the root forward's result passed to follow_output; the loss's backward holds ``loss_tmp`` bytes.
    ``marks``: gets the names of the segments closed, in order."""
    alloc = model.alloc
    alloc.read_and_reset()
    tracker.start()
    for _ in range(micro_batches):
        out = model(torch.randn(4, 8))
        if follow:
            tracker.follow_output(out)
        loss = _Temporary.apply(out, alloc, loss_tmp).square().mean()
        tracker.mark("forward")
        loss.backward()
        tracker.mark("backward")
    alloc.alloc(opt_tmp)
    alloc.free(opt_tmp)
    if marks is not None:
        marks.extend(name for name, _ in tracker._marks)
    return tracker.finish(alloc.read_and_reset())


def test_the_backward_splits_at_the_output_gradient_and_the_phases_mean_what_they_meant():
    alloc = FakeAllocator(1000)
    model = Decoder(alloc, model_tmp=300)
    tracker = PhaseTracker(alloc.read_and_reset)
    reading = _step(model, tracker, loss_tmp=700)
    assert reading.segments == {"forward": 1000, "loss_backward": 1700, "backward": 1300, "optimizer": 1005}
    assert tuple(reading.segments) == SEGMENTS
    # the phase figures: the loss's backward is part of the backward, as with one segment for the whole backward
    unsplit = _step(model, tracker, loss_tmp=700, follow=False)
    assert unsplit.segments is None
    assert (reading.phase, reading.peaks, reading.own, reading.peak) == \
        (unsplit.phase, unsplit.peaks, unsplit.own, unsplit.peak) == \
        ("backward", {"forward": 1000, "backward": 1700, "optimizer": 1700},
         {"forward": 1000, "backward": 1700, "optimizer": 1005}, 1700)
    # the model's backward larger: the split still says which part holds what
    reading = _step(model, tracker, loss_tmp=100)
    assert reading.segments == {"forward": 1000, "loss_backward": 1100, "backward": 1300, "optimizer": 1005}
    assert reading.own["backward"] == 1300 and reading.phase == "backward"
    assert not tracker.active and tracker._handles == []


def test_the_loss_backward_ends_before_any_parameter_gradient_exists():
    """A reader of the real autograd state: the bytes of the parameter gradients that exist at each boundary.
    At the output's gradient none does (the model's backward has not started); at the backward's end all do."""
    model = nn.Sequential(nn.Embedding(100, 16), nn.Linear(16, 100))
    grad_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def read() -> int:
        return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)

    tracker = PhaseTracker(read)
    tracker.start()
    out = model(torch.randint(0, 100, (4, 6)))
    tracker.follow_output(out)
    loss = nn.functional.cross_entropy(out.reshape(-1, 100), torch.randint(0, 100, (24,)))
    tracker.mark("forward")
    loss.backward()
    tracker.mark("backward")
    reading = tracker.finish(read())
    assert reading.segments == {"forward": 0, "loss_backward": 0, "backward": grad_bytes, "optimizer": grad_bytes}


def test_gradient_accumulation_splits_every_backward():
    alloc = FakeAllocator(1000)
    model = Decoder(alloc, model_tmp=300)
    tracker = PhaseTracker(alloc.read_and_reset)
    reading = _step(model, tracker, loss_tmp=700, micro_batches=3)
    # the step's start, then forward / loss_backward / backward three times, then the step's end
    assert len(alloc.reads) == 1 + 3 * 3 + 1
    assert reading.segments == {"forward": 1000, "loss_backward": 1700, "backward": 1300, "optimizer": 1005}
    marks: list[str] = []
    _step(model, tracker, loss_tmp=10, micro_batches=3, marks=marks)
    assert marks == ["forward", "loss_backward", "backward"] * 3


def test_an_output_that_gets_no_gradient_changes_nothing():
    alloc, model, tracker = _followed(model_tmp=300)
    side = model(torch.randn(4, 8))
    tracker.follow_output(side)  # a forward whose output the loss does not use (an auxiliary pass)
    with torch.no_grad():
        tracker.follow_output(model(torch.randn(4, 8)))  # no grad: nothing registered
    out = model.lin(torch.randn(4, 8))
    loss = _Temporary.apply(out, alloc, 700).square().mean()
    tracker.mark("forward")
    loss.backward()
    tracker.mark("backward")
    reading = tracker.finish(alloc.read_and_reset())
    assert reading.segments is None and reading.own == {"forward": 1000, "backward": 1700, "optimizer": 1000}
    del side
    # not followed (an unsampled step): nothing registered, nothing read
    reads = len(alloc.reads)
    out = model(torch.randn(4, 8))
    tracker.follow_output(out)
    assert tracker._handles == [] and out._backward_hooks is None
    out.sum().backward()
    assert len(alloc.reads) == reads


@pytest.mark.parametrize("wrap", ["tensor", "tuple", "list", "dict", "dict-no-logits", "model-output"])
def test_the_output_tensor_of_common_results(wrap):
    logits = torch.randn(2, 3, requires_grad=True) * 2
    hidden = torch.randn(2, 3)
    result = {"tensor": lambda: logits, "tuple": lambda: (logits, hidden), "list": lambda: [None, logits],
              "dict": lambda: {"loss": hidden, "logits": logits},
              "dict-no-logits": lambda: {"aux": 3, "out": logits, "h": hidden},
              "model-output": lambda: _model_output(logits, hidden)}[wrap]()
    assert output_tensor(result) is logits
    assert output_tensor(3) is None and output_tensor({"a": 1}) is None and output_tensor(()) is None


def _model_output(logits: torch.Tensor, hidden: torch.Tensor) -> object:
    """An HF ModelOutput when transformers is installed, else an OrderedDict (what ModelOutput subclasses)."""
    try:
        from transformers.modeling_outputs import CausalLMOutput
    except ImportError:
        return OrderedDict(loss=hidden, logits=logits)
    return CausalLMOutput(loss=hidden, logits=logits)


def test_no_reference_to_the_output_is_kept_after_the_step():
    alloc, model, tracker = _followed(model_tmp=10)
    out = model(torch.randn(4, 8))
    tracker.follow_output(out)
    unused = model(torch.randn(4, 8))
    tracker.follow_output(unused)  # its hook never fires: removed at the step's end all the same
    hooks = (out._backward_hooks, unused._backward_hooks)
    assert all(len(h) == 1 for h in hooks)
    alive = [weakref.ref(out), weakref.ref(unused)]
    out.square().mean().backward()
    tracker.finish(alloc.read_and_reset())
    assert tracker._handles == [] and all(len(h) == 0 for h in hooks)  # the hooks are gone from both tensors
    del out, unused, hooks
    gc.collect()
    assert [r() for r in alive] == [None, None]


def test_a_saved_output_does_not_carry_the_hook():
    """torch.save of the output during a followed step (a script logging its logits) works as without the
    agent, without a warning: torch does not serialize a tensor's backward hooks, and ours is marked so."""
    tracker = PhaseTracker(lambda: 1)
    tracker.start()
    out = nn.Linear(4, 4)(torch.randn(2, 4))
    tracker.follow_output(out)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns about a hook it cannot serialize unless it is marked
        torch.save({"logits": out}, buf)
    buf.seek(0)
    assert torch.equal(torch.load(buf)["logits"], out.detach())
    tracker.stop()


def test_the_hook_never_raises_into_training():
    def broken() -> int:
        raise RuntimeError("allocator unreadable")

    model = nn.Linear(8, 8)
    x = torch.randn(4, 8)
    model(x).square().mean().backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    tracker = PhaseTracker(broken)
    tracker.start()
    tracker._marks.append(("forward", 1))  # as if the backward's start had been read
    out = model(x)
    tracker.follow_output(out)
    out.square().mean().backward()  # the hook's read raises: caught, the backward completes
    assert all(torch.equal(p.grad, e) for p, e in zip(model.parameters(), expected))
    assert tracker._marks == [("forward", 1)]
    tracker.stop()

    class NoHooks(torch.Tensor):
        def register_hook(self, hook):  # type: ignore[no-untyped-def, override]
            raise RuntimeError("no hooks on this tensor type")

    tracker.start()
    tracker.follow_output(torch.randn(2, requires_grad=True).as_subclass(NoHooks))  # refused: nothing happens
    assert tracker._handles == []
    tracker.stop()


def test_hooks_per_step_are_bounded():
    tracker = PhaseTracker(lambda: 1)
    tracker.start()
    w = torch.randn(3, requires_grad=True)
    outs = [w * 2 for _ in range(MAX_FOLLOWED + 5)]
    for out in outs:
        tracker.follow_output(out)
    assert len(tracker._handles) == MAX_FOLLOWED
    tracker.stop()
    assert tracker._handles == [] and all(not o._backward_hooks for o in outs)


def test_an_output_reached_twice_or_outside_a_marked_backward_splits_once():
    reads = []
    tracker = PhaseTracker(lambda: reads.append(len(reads)) or len(reads))
    tracker.start()
    w = torch.randn(3, requires_grad=True)
    out = w * 2
    tracker.follow_output(out)
    torch.autograd.grad(out.sum(), w, retain_graph=True)  # a gradient penalty before the backward: not marked
    assert reads == []
    tracker.mark("forward")
    out.sum().backward(retain_graph=True)
    out.sum().backward()  # a second backward without a mark at its start (no root step boundary): no split
    tracker.mark("backward")
    reading = tracker.finish(9)
    assert [n for n in reading.segments] == ["forward", "loss_backward", "backward", "optimizer"]
    assert len(reads) == 3
    assert phases_of([("forward", 5), ("loss_backward", 9), ("backward", 7)]).own == {"forward": 5, "backward": 9}
    assert phases_of([("loss_backward", 9)]).segments == {"loss_backward": 9} and NOT_FOLLOWED.segments is None


def test_compiled_module_output_hook_causes_no_recompile():
    """torch.compile: the tensor hook on a compiled module's output (and that output fed to a compiled loss) is
    registered outside the compiled graphs: after the first step, followed and unfollowed steps alternate with no
    new frame compiled and no recompile (torch._dynamo counters), and the backward is split."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = torch.compile(nn.Sequential(nn.Embedding(50, 16), nn.Linear(16, 50)), backend="aot_eager")
    loss_fn = torch.compile(lambda out, y: nn.functional.cross_entropy(out.reshape(-1, 50), y.reshape(-1)),
                            backend="aot_eager")
    reads: list[int] = []
    tracker = PhaseTracker(lambda: reads.append(1) or len(reads))

    def step(follow: bool) -> object:
        tracker.start()
        x, y = torch.randint(0, 50, (4, 7)), torch.randint(0, 50, (4, 7))
        out = model(x)
        if follow:
            tracker.follow_output(out)
        loss = loss_fn(out, y)
        tracker.mark("forward")
        loss.backward()
        tracker.mark("backward")
        return tracker.finish(0)

    try:
        first = step(True)
        compiled = (dict(counters["stats"]), dict(counters["frames"]))
        assert compiled[0].get("unique_graphs", 0) >= 2, compiled
        readings = [step(i % 2 == 0) for i in range(6)]
        assert (dict(counters["stats"]), dict(counters["frames"])) == compiled
        assert not counters["recompiles"]
        assert first.segments is not None and set(first.segments) == set(SEGMENTS)
        assert all((r.segments is not None) == (i % 2 == 0) for i, r in enumerate(readings))
    finally:
        torch._dynamo.reset()
