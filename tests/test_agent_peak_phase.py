"""Issue 16 point 4: the phase of a sampled step in which the allocator's peak was reached.

The pure rule (phases_of) and the coalescer's handling run everywhere; the real readings need CUDA's
allocator: three scripts whose peak is built into one phase each (a large temporary in the forward, in a custom
backward, in a custom optimizer's step) run on the GPU machine (``python -m pytest tests/test_agent_peak_phase.py``
there, the ``cudatests`` stage of bench/h200_run.sh). On the CPU there is no allocator peak: no phase.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import batchmon
from agent_helpers import agent_dir  # noqa: F401 - fixture
from batchmon.agent.coalesce import StepCoalescer
from agent_helpers import FakeAllocator
from batchmon.agent.peak_phase import NOT_FOLLOWED, PhaseTracker, phases_of
from conftest import make_step

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
MIB = 1 << 20


def test_the_phase_is_where_the_running_peak_last_rose():
    assert phases_of([("forward", 10), ("backward", 30), ("optimizer", 30)])[:2] == (
        "backward", {"forward": 10, "backward": 30, "optimizer": 30})
    assert phases_of([("forward", 50), ("backward", 50), ("optimizer", 50)]).phase == "forward"
    assert phases_of([("forward", 10), ("backward", 20), ("optimizer", 25)]).phase == "optimizer"
    # gradient accumulation: the second micro-batch's forward set the high
    phase, peaks = phases_of([("forward", 10), ("backward", 20), ("forward", 35), ("backward", 35),
                              ("optimizer", 35)])[:2]
    assert phase == "forward" and peaks == {"forward": 35, "backward": 35, "optimizer": 35}


def _followed_step(alloc: FakeAllocator, tracker: PhaseTracker, fwd_scratch: int, bwd_scratch: int,
                   opt_scratch: int, micro_batches: int = 1):
    """One step with a temporary in each phase, over 1000 live bytes: activations (100 per micro-batch) kept
    from forward to backward, gradients (50) created in the first backward and freed at the step's end."""
    alloc.read_and_reset()  # the sampled step starts with the peak reset
    tracker.start()
    for i in range(micro_batches):
        alloc.alloc(100)  # activations
        alloc.alloc(fwd_scratch)
        alloc.free(fwd_scratch)
        tracker.mark("forward")
        alloc.alloc(bwd_scratch)
        alloc.free(bwd_scratch)
        if i == 0:
            alloc.alloc(50)  # gradients
        alloc.free(100)
        tracker.mark("backward")
    alloc.alloc(opt_scratch)
    alloc.free(opt_scratch)
    alloc.free(50)  # zero_grad(set_to_none=True)
    return tracker.finish(alloc.read_and_reset())


def test_each_phase_reads_its_own_peak_and_the_step_keeps_the_largest():
    alloc = FakeAllocator(1000)
    tracker = PhaseTracker(alloc.read_and_reset)
    # the forward's temporary is the step's peak; the backward's, lower, was invisible in the running peak
    reading = _followed_step(alloc, tracker, fwd_scratch=400, bwd_scratch=300, opt_scratch=20)
    assert reading.own == {"forward": 1500, "backward": 1400, "optimizer": 1070}
    assert reading.peak == 1500 and reading.phase == "forward"
    assert reading.peaks == {"forward": 1500, "backward": 1500, "optimizer": 1500}  # cumulative, as shown before
    assert len(alloc.reads) == 4  # the step's start, two boundaries, its end: one read each
    # the backward's grows past the forward's: it decides, and the cumulative readings rise in it
    reading = _followed_step(alloc, tracker, fwd_scratch=400, bwd_scratch=600, opt_scratch=20)
    assert reading.own == {"forward": 1500, "backward": 1700, "optimizer": 1070}
    assert (reading.phase, reading.peak) == ("backward", 1700)
    assert reading.peaks == {"forward": 1500, "backward": 1700, "optimizer": 1700}
    # the optimizer's scratch is the peak; the tracker stops after finish
    reading = _followed_step(alloc, tracker, fwd_scratch=0, bwd_scratch=0, opt_scratch=900)
    assert (reading.phase, reading.peak, reading.own["optimizer"]) == ("optimizer", 1950, 1950)
    assert not tracker.active and tracker.high == 0


def test_own_peaks_with_gradient_accumulation_are_the_largest_segment_of_each_phase():
    alloc = FakeAllocator(1000)
    tracker = PhaseTracker(alloc.read_and_reset)
    reading = _followed_step(alloc, tracker, fwd_scratch=10, bwd_scratch=200, opt_scratch=0, micro_batches=3)
    # micro-batch 2 and 3 hold the gradients (50) made in the first backward: their segments peak 50 higher
    assert reading.own == {"forward": 1160, "backward": 1350, "optimizer": 1050}
    assert reading.phase == "backward" and reading.peak == 1350
    assert phases_of([("forward", 5), ("loss", 99), ("backward", 7)]).own == {"forward": 5, "backward": 7}


def test_a_step_not_followed_reads_nothing():
    alloc = FakeAllocator(1000)
    tracker = PhaseTracker(alloc.read_and_reset)
    tracker.mark("forward")  # not started: an unsampled step
    assert not alloc.reads and tracker.finish(1000) == NOT_FOLLOWED
    tracker.start()
    assert tracker.finish(1000) == NOT_FOLLOWED  # no boundary read (no backward)
    tracker.start()
    tracker.mark("forward")
    assert tracker.high == 1000  # what a mid-step reading (an OOM event's) adds back
    assert tracker.finish(None) == NOT_FOLLOWED  # the step's end could not be read
    unknown = PhaseTracker(lambda: None)
    unknown.start()
    unknown.mark("forward")
    assert unknown.finish(5) == NOT_FOLLOWED


def test_a_coalesced_window_keeps_the_phase_of_its_peak_or_of_its_last_sampled_step():
    c = StepCoalescer(interval=10.0, first_steps=0)
    sampled = make_step(5, 8, peak_allocated=100, peak_phase="backward", phase_peaks={"forward": 60, "backward": 100},
                        phase_own_peaks={"forward": 60, "backward": 100, "optimizer": 40})
    assert len(c.add(make_step(3, 8, peak_allocated=90), 0.0)) == 1  # the first window goes at once
    assert c.add(make_step(4, 8, peak_allocated=90), 0.05) == []
    assert c.add(sampled, 0.1) == []
    assert c.add(make_step(6, 8, peak_allocated=120), 0.2) == []  # the window's peak: not a sampled step
    [window] = c.flush(0.3)
    assert window.steps == 3 and window.peak_allocated == 120 and window.step == 6
    assert window.peak_phase == "backward" and window.phase_peaks == {"forward": 60, "backward": 100}
    assert window.phase_own_peaks == {"forward": 60, "backward": 100, "optimizer": 40}
    c.add(make_step(7, 8, peak_allocated=90), 0.4)
    c.add(make_step(8, 8, peak_allocated=80), 0.45)
    [plain] = c.flush(0.5)
    assert plain.peak_phase is None and plain.phase_peaks is None and plain.phase_own_peaks is None


def test_no_phase_off_cuda(agent_dir):
    model = nn.Linear(16, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    handle = batchmon.attach(model, opt, activation_every=1)
    try:
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(8, 16)).square().mean().backward()
            opt.step()
        assert len(handle.steps) >= 1 and all(s.peak_phase is None and s.phase_peaks is None
                                              and s.phase_own_peaks is None for s in handle.steps)
    finally:
        handle.detach()


class BigForward(nn.Module):
    """A forward with a large temporary freed before it returns: the step's peak is in the forward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            scratch = torch.ones(256 * MIB // 4, device=x.device)
            scale = scratch[:1].clone()
            del scratch
        return self.lin(x) * scale


class _WideGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        scratch = torch.ones(256 * MIB // 4, device=grad.device)
        out = grad * scratch[:1]
        del scratch
        return out


class BigBackward(nn.Module):
    """A backward with a large temporary: the step's peak is in the backward."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _WideGrad.apply(self.lin(x))


class ScratchSGD(torch.optim.SGD):
    """SGD whose step allocates a large temporary: the step's peak is in the optimizer phase."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        scratch = torch.ones(256 * MIB // 4, device=self.param_groups[0]["params"][0].device)
        del scratch
        return super().step(closure)


@cuda
@pytest.mark.parametrize("case, expected", [("forward", "forward"), ("backward", "backward"),
                                            ("optimizer", "optimizer")])
def test_the_peak_phase_of_real_steps(agent_dir, case, expected):
    device = "cuda"
    model: nn.Module = (BigForward() if case == "forward" else BigBackward() if case == "backward"
                        else nn.Linear(64, 64)).to(device)
    opt = (ScratchSGD if case == "optimizer" else torch.optim.SGD)(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt, activation_every=1)
    try:
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(32, 64, device=device)).square().mean().backward()
            opt.step()
        torch.cuda.synchronize()
        phased = [s for s in handle.steps if s.peak_phase is not None]
        assert len(phased) >= 3, [(s.step, s.peak_phase) for s in handle.steps]
        assert all(s.peak_phase == expected for s in phased[1:]), [(s.step, s.peak_phase) for s in phased]
        last = phased[-1]
        assert last.phase_peaks is not None and last.phase_peaks[expected] >= 256 * MIB
        assert last.phase_peaks["optimizer"] == max(last.phase_peaks.values()) <= last.peak_allocated
    finally:
        handle.detach()


class _Scratch(torch.autograd.Function):
    """Identity whose forward and backward each hold a temporary of the given size for a moment."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fwd: int, bwd: int) -> torch.Tensor:  # type: ignore[override]
        ctx.bwd = bwd
        scratch = torch.ones(fwd // 4, device=x.device)
        del scratch
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        scratch = torch.ones(ctx.bwd // 4, device=grad.device)
        del scratch
        return grad.clone(), None, None


class Scratches(nn.Module):
    """A temporary of 256 MiB in the forward, 128 MiB in the backward: the backward's is below the step's peak,
    hidden from the running peak (issue 13's LSTM at small batches), but not from its own."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Scratch.apply(self.lin(x), 256 * MIB, 128 * MIB)


class SmallScratchSGD(torch.optim.SGD):
    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        scratch = torch.ones(64 * MIB // 4, device=self.param_groups[0]["params"][0].device)
        del scratch
        return super().step(closure)


@cuda
def test_own_phase_peaks_of_real_steps(agent_dir):
    """Each phase's own peak on sampled steps (the peak reset at each boundary), the step's peak still the whole
    step's, the cumulative phase peaks as before, and the script's own max_memory_allocated() unaffected."""
    device = "cuda"
    model = Scratches().to(device)
    opt = SmallScratchSGD(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt, activation_every=1)
    try:
        live = {}  # handle.steps index -> bytes allocated when that step started: a peak is live memory + temporary
        for _ in range(6):
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()
            live[len(handle.steps)] = torch.cuda.memory_allocated()
            model(torch.randn(32, 64, device=device)).square().mean().backward()
            opt.step()
        torch.cuda.synchronize()
        script_peak = torch.cuda.max_memory_allocated()
        phased = [(i, s) for i, s in enumerate(handle.steps) if s.phase_own_peaks is not None and i in live]
        assert len(phased) >= 4, [(s.step, s.phase_own_peaks) for s in handle.steps]
        for i, s in phased[2:]:  # from the third step on the live memory is steady (cuBLAS keeps a workspace per
            # stream, ~32 MiB each on Hopper, first allocated in the first forward and the first backward)
            own, peaks, base = s.phase_own_peaks, s.phase_peaks, live[i]
            assert own is not None and peaks is not None and s.peak_allocated is not None
            assert base + 256 * MIB <= own["forward"] < base + 256 * MIB + 16 * MIB, (s.step, base, own)
            assert base + 128 * MIB <= own["backward"] < base + 128 * MIB + 16 * MIB, (s.step, base, own)
            assert base + 64 * MIB <= own["optimizer"] < base + 64 * MIB + 16 * MIB, (s.step, base, own)
            assert s.peak_phase == "forward" and s.peak_allocated == own["forward"]
            assert peaks == {"forward": own["forward"], "backward": own["forward"], "optimizer": own["forward"]}
            assert s.components["other"] >= 256 * MIB - sum(v for k, v in s.components.items() if k != "other")
        assert script_peak >= 256 * MIB  # the agent's resets are not the script's
    finally:
        handle.detach()


@cuda
def test_own_peaks_cost_reads_on_sampled_steps_only(agent_dir):
    """The phase boundaries read (and reset) the allocator on sampled steps only: three reads in each followed
    step (the backward's start, the output's gradient, the backward's end), none in the others (the step's start
    and end are read as before)."""
    device = "cuda"
    model = nn.Linear(64, 64).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt, activation_every=4)
    meter = handle._meter
    reads = [0]
    per_step: list[tuple[bool, int]] = []  # (followed, boundary reads during the step)
    inner_read = meter.phases._read

    def counted_read() -> int | None:
        reads[0] += 1
        return inner_read()

    def counted(finish):
        def wrapped(*args, **kwargs):
            out = finish(*args, **kwargs)
            step = out[0] if isinstance(out, tuple) else out
            if step is None or step is False:  # finish_carried/finish_quiet declined: finish ends it
                return out
            per_step.append((getattr(step, "phase_own_peaks", None) is not None, reads[0]))  # (True: a quiet step)
            reads[0] = 0
            return out
        return wrapped

    meter.phases._read = counted_read
    for name in ("finish", "finish_carried", "finish_quiet"):
        if hasattr(meter, name):
            setattr(meter, name, counted(getattr(meter, name)))
    try:
        for _ in range(20):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(32, 64, device=device)).square().mean().backward()
            opt.step()
        torch.cuda.synchronize()
        assert len(per_step) == 20
        assert any(f for f, _ in per_step) and not all(f for f, _ in per_step), per_step
        assert all(n == (3 if followed else 0) for followed, n in per_step), per_step
    finally:
        handle.detach()


class PinsASegment(nn.Module):
    """A forward whose temporary (3 MiB) is cut from a fresh 20 MiB segment, and whose first call keeps a 2 MiB
    tensor cut from that segment's rest: once the temporary is freed at the step's end, the segment's free
    bytes stay split around the kept tensor (what a flush at the limit cannot give back)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(64, 64)
        self.kept: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        temp = torch.ones(3 * MIB // 4, device=x.device)
        if not self.kept:
            self.kept.append(torch.ones(2 * MIB // 4, device=x.device))
        return self.lin(x) + temp.sum() * 0


@cuda
def test_sampled_real_steps_carry_the_allocators_inactive_split_at_their_end(agent_dir):
    """Step.inactive_split (what memory_model keeps for fragmentation at the limit) is the allocator's
    inactive-split bytes at a followed step's end, as torch.cuda reads them there; steps not followed carry none."""
    device = "cuda"
    torch.cuda.empty_cache()
    model = PinsASegment().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    handle = batchmon.attach(model, opt, activation_every=4)
    at_end: list[int] = []
    try:
        for _ in range(12):
            opt.zero_grad(set_to_none=True)
            model(torch.randn(32, 64, device=device)).square().mean().backward()
            opt.step()
            torch.cuda.synchronize()
            at_end.append(torch.cuda.memory_stats()["inactive_split_bytes.all.current"])
        steps = list(handle.steps)
        followed = [s for s in steps if s.phase_own_peaks is not None]
        assert followed and len(followed) < len(steps)
        # the pinned segment's free rest (20 - 2 MiB, the freed temporary's 3 MiB with it), as torch reads it
        assert all(s.inactive_split is not None and 15 * MIB <= s.inactive_split <= s.reserved
                   and s.inactive_split == at_end[s.step - 1] for s in followed), \
            [(s.step, s.inactive_split, s.reserved, at_end[s.step - 1]) for s in followed]
        assert all(s.inactive_split is None for s in steps if s.phase_own_peaks is None)
    finally:
        handle.detach()


class WideDecoder(nn.Module):
    """A language model's head over a wide vocabulary: the loss's backward (the logits' gradient and the softmax
    temporaries, 2-3 logits-sized tensors) dominates the step's peak; the model's backward makes small gradients.
    Issue 13's LSTM LM at batch 20 and beyond, with its LSTM left out."""

    VOCAB, HIDDEN = 32768, 64

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(self.VOCAB, self.HIDDEN)
        self.out = nn.Linear(self.HIDDEN, self.VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)))


@cuda
def test_segment_peaks_of_a_real_step_whose_loss_backward_dominates(agent_dir):
    """Issue 13 point 1 on the GPU: a followed step's backward is split where the model output's gradient
    arrives; segment_peaks has the loss's backward, and each segment's own peak equals torch.cuda's readings
    taken the same way without the agent (the peak read and reset at the backward's start, at the output's
    gradient, at the backward's end and after the optimizer step); the phase figures keep their meaning."""
    device, vocab = "cuda", WideDecoder.VOCAB
    torch.manual_seed(0)
    model = WideDecoder().to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    crit = nn.CrossEntropyLoss()
    x = torch.randint(0, vocab, (16, 64), device=device)  # 1024 tokens: logits of 128 MiB
    y = torch.randint(0, vocab, (16, 64), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        crit(model(x).reshape(-1, vocab), y.reshape(-1)).backward()
        opt.step()

    handle = batchmon.attach(model, opt, activation_every=1)
    try:
        for _ in range(8):
            step()
        torch.cuda.synchronize()
        split = [s for s in handle.steps if s.segment_peaks is not None]
    finally:
        handle.detach()
    assert len(split) >= 4, [(s.step, s.phase_own_peaks, s.segment_peaks) for s in handle.steps]

    def read() -> int:
        peak = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        return peak

    expected: dict[str, int] = {}
    for _ in range(4):  # the same step, read by hand the way the agent reads it
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        read()
        out = model(x)
        hook = out.register_hook(lambda g: expected.__setitem__("loss_backward", read()))
        loss = crit(out.reshape(-1, vocab), y.reshape(-1))
        del out  # as in step(): the logits are not kept through backward (the loss saves its softmax, not them)
        expected["forward"] = read()
        loss.backward()
        expected["backward"] = read()
        opt.step()
        expected["optimizer"] = read()
        hook.remove()
        del loss
    # the loss's backward dominates (H200, run 6: 465 MiB against the model's backward's 362 MiB)
    assert expected["loss_backward"] > expected["backward"] + 64 * MIB
    for s in split[2:]:
        seg, own = s.segment_peaks, s.phase_own_peaks
        assert seg is not None and own is not None
        assert list(seg) == ["forward", "loss_backward", "backward", "optimizer"], seg
        for name in ("loss_backward", "backward"):  # the backward's two parts: no step boundary blurs them
            assert abs(seg[name] - expected[name]) <= 4 * MIB, (s.step, name, seg, expected)
        for name in ("forward", "optimizer"):  # the step's start and end: the agent's own bookkeeping around them
            assert abs(seg[name] - expected[name]) <= 16 * MIB, (s.step, name, seg, expected)
        # the phase figures as before the split: the loss's backward is part of the backward
        assert own["backward"] == max(seg["loss_backward"], seg["backward"]) == seg["loss_backward"]
        assert own["forward"] == seg["forward"] and own["optimizer"] == seg["optimizer"]
        assert s.peak_phase == "backward" and s.peak_allocated == seg["loss_backward"]


@cuda
def test_segment_peaks_of_a_compiled_model_without_recompiles(agent_dir):
    """torch.compile: the agent's output-gradient hook is registered on the compiled module's output outside the
    compiled graph: the backward is split on followed steps, and after the first steps no frame is compiled
    again (torch._dynamo counters unchanged while followed steps continue)."""
    from torch._dynamo.utils import counters

    device, vocab = "cuda", 4096
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(vocab, 64), nn.Linear(64, vocab)).to(device)
    compiled = torch.compile(model, backend="aot_eager")
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randint(0, vocab, (8, 32), device=device)
    y = torch.randint(0, vocab, (8, 32), device=device)
    handle = batchmon.attach(compiled, opt, activation_every=1)
    try:
        def step() -> None:
            opt.zero_grad(set_to_none=True)
            nn.functional.cross_entropy(compiled(x).reshape(-1, vocab), y.reshape(-1)).backward()
            opt.step()

        for _ in range(3):
            step()
        before = (dict(counters["stats"]), dict(counters["frames"]), dict(counters["recompiles"]))
        for _ in range(6):
            step()
        torch.cuda.synchronize()
        after = (dict(counters["stats"]), dict(counters["frames"]), dict(counters["recompiles"]))
        split = [s for s in handle.steps[3:] if s.segment_peaks is not None]
    finally:
        handle.detach()
        torch._dynamo.reset()
    assert after == before
    assert len(split) >= 3 and all("loss_backward" in s.segment_peaks for s in split), \
        [(s.step, s.segment_peaks) for s in handle.steps]
