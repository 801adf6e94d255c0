"""The step meter: what one training step holds, measured from the hooks' calls, returned as Step values.

(Over 400 lines: where a step ends, what it reports and the sampling that keeps it cheap are one state machine over
the same per-step fields.) It owns no hooks and no socket (batchmon.agent.handle wires it and publishes its Steps).

A step ends (README, "How a step is recognised") at the primary optimizer's ``step()`` (the first ``torch.optim``
optimizer that steps, or the one given to ``attach``; other optimizers' steps count for optimizer bytes only), at
``GradScaler.update()`` when the scaler skipped the optimizer step, or - with no optimizer step seen - at the next
training forward after a backward once the gradients were cleared or replaced (gradients left to accumulate: the same
step goes on; the last such step is published at detach/exit); never inside an optimizer step (an LBFGS closure's
forwards and backwards are that one step).

Forwards under ``no_grad``/``inference_mode`` (evaluation) are not part of any step. ``micro_batches`` is the
number of backward passes in the step (gradient accumulation's micro-batches; an LBFGS closure's evaluations).

What a step reports (the ``Step`` that ``finish`` returns):

- ``batch_size``: the batch dimension of the root forward's input (batchmon.agent.batch_dim), ``batch_source``
  saying how it was found; with gradient accumulation the last micro-batch's (what is in memory at once).
- ``batch``: storages of the tensors passed to the root forward (positional and keyword, nested), plus targets:
  tensors not requiring grad passed to a criterion module after the model's forward (a torch loss module, or a
  parameter-free ...Loss/...Criterion, looked for in the first 3 steps; a functional loss is not seen: its
  targets and saved tensors are in ``other`` on CUDA). The step reports its largest forward group.
- ``activations``: bytes saved for backward inside the root forward and the criterion's (same grouping).
- ``other``: on CUDA the allocator peak since the previous step minus the five above (>= 0); on CPU 0.
- on CUDA: ``allocated``, ``peak_allocated`` (the script's own peak calls still work: torch_patches),
  ``reserved``, ``num_alloc_retries``, ``num_ooms``, ``device_used`` (NVML's per-process figure, read by the
  agent thread once a second; null where NVML does not see this pid).
- ``step_seconds``: wall time between optimizer steps as the host sees it (no device sync is added).

Cost control (the overhead target is 1% of step time): activations are counted on *sampled* steps only - the
first 3 steps, every ``activation_every``-th step (default 10; env BATCHMON_ACTIVATION_EVERY under ``batchmon run``),
a step whose batch size differs from the last sampled one, a step after the model moved or changed dtype.

The fixed cost of the other steps (issue 14) grows with nothing in the model (the layout check reads one remembered
parameter); the allocator's figures (a nested dict) are read on sampled and first steps and at least once every
ALLOCATOR_READ_SECONDS, the peak reset only when read (a batch-size change resets it first). With the default
``activation_every`` samples are at least SAMPLE_SECONDS apart, and further where a sample costs more than
SAMPLE_SHARE of the time between them (its extra time over a steady step, at most SAMPLE_MAX_SECONDS apart:
``cost_sample``); first steps, batch-size changes and a moved model are sampled whatever the time; an explicit
``activation_every`` is exact. Sampled steps walk parameters, gradients and optimizer state again only
when something may have changed (first steps, batch size, moved model, grown optimizer state, or RECOUNT_SECONDS
passed). A step not sampled whose root inputs are plain tensors of the last step's shapes, dtypes and places carries
the last step's batch size and bytes and parameter/gradient/optimizer counts (new optimizer state: next sample); its
end is ``finish_carried`` (the last Step, copied) when nothing it reports differs; then steps run quiet (quiet_steps),
each ending in ``finish_quiet``: its end time joins a run of the last Step (step_runs), no Step made.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from typing import Any, Callable

import torch

from batchmon.agent import accounting
from batchmon.agent import torch_patches as patches
from batchmon.agent.placement import CudaFigures, cuda_figures, device_of, first_parameter, layout_of, signature
from batchmon.agent.peak_phase import NOT_FOLLOWED, PhaseTracker
from batchmon.agent.batch_dim import BatchSizer
from batchmon.agent.step_runs import RUN_MAX, QuietRun
from batchmon.protocol import Event, ModelInfo, Step, new_step, with_added

_perf_counter, _time, _new_object, _grad_enabled = time.perf_counter, time.time, object.__new__, torch.is_grad_enabled

FULL_STEPS = 3  # the first steps are always fully measured
ALLOCATOR_READ_SECONDS = 0.25  # the allocator's figures are read at least this often (and on sampled steps) until
# the transport says how often its monitors want them (pace.allocator_read_seconds: 0.25 s while a monitor refreshes
# faster than once a second, else 0.5 s): a read ends a quiet step through the full finish (a nested stats dict, a
# new Step and run); every 50 ms that was ~1/6 of the agent's main-thread samples on the H200's 2.7 ms MLP step, every
# 0.25 s still ~4.4 us a step (py-spy, bench/results/spy_h200_s14*/). The peak accumulates between reads (reset only
# when read; a batch-size change reads first), so no peak is lost, it shows up to this much later
SAMPLE_SECONDS = 0.25  # with the default activation_every: the every-N-th-step samples at most this often
SAMPLE_SHARE = 0.0005  # ... and further apart where a sample costs more: the samples' extra time <= this share
SAMPLE_MAX_SECONDS = 2.0  # ... but never further apart than this
RECOUNT_SECONDS = 2.0  # parameter/gradient/optimizer storages walked again at least this often on sampled steps
GRAD_MARKS = 4  # parameters whose .grad is watched to tell accumulation from a new step
PLACE_STEPS = 16  # a steady step looks at the model's place (moved? open_quiet) every this many steps and every N-th


class StepMeter:
    """Per-step measurement state (training thread). ``cuda(reset)`` reads the allocator, ``None`` off CUDA."""

    # Slots, the quiet step's first (issue 14 point 1): a quiet step reads and writes ~20 of the meter's ~60 fields
    # on every step, inside a real step whose own work leaves them out of the CPU's caches (on the H200's host a
    # line of the quiet path costs ~0.3-0.5 us in situ, several times a tight loop's). With more than 30
    # attributes an instance keeps a full dict (CPython's shared keys stop there); slots keep each field at a fixed
    # offset and the quiet path's together in a few cache lines. ``__dict__`` stays for anything else set on an
    # instance (a bench's or a test's timer wrapped around a method).
    __slots__ = (
        "_carried_batch", "step_open", "sizer", "step", "batch_size", "_sampled_batch_size", "activation_every",
        "batch_carried", "forwards", "_batch_max", "_step_sig", "run", "_template_key", "phases", "_on_cuda",
        "_figures_t", "read_seconds", "_last_step_end", "backwards", "_first_param", "_layout", "_sampled_t",
        "sample_gap",
        "sample_seconds", "_costed", "_cuda", "model_ref", "primary_ref", "optimizer_set", "_optimizer_refs",
        "device", "model_info", "optimizer_steps", "sampled", "root_depth", "root_counting", "crit_depth",
        "batch_source", "_first_forward_t", "_param_keys", "batch", "counter", "_acts_max", "_last_acts",
        "_static", "_static_state_len", "retries", "_lazy", "_backward_static", "_grad_marks", "_matcher",
        "_recount", "_recount_t", "_figures", "_last_batch_size", "_carry_peak", "_kind_of", "_template",
        "__dict__", "__weakref__",
    )

    def __init__(self, activation_every: int, sizer: BatchSizer,
                 cuda: Callable[[torch.device | None, bool], CudaFigures | None], explicit_every: bool = True) -> None:
        self.activation_every = activation_every
        self.sample_seconds = 0.0 if explicit_every else SAMPLE_SECONDS  # every-N-th samples this far apart at least
        self.sample_gap = self.sample_seconds  # ... and this far, from what the last one cost (cost_sample)
        self._costed = False  # the open step is an every-N-th sample and nothing else: its cost sets sample_gap
        self._sampled_t = float("-inf")  # perf_counter of the last sampled step's start
        self.sizer = sizer
        self._cuda = cuda
        self.model_ref: weakref.ReferenceType[torch.nn.Module] | None = None
        self.primary_ref: weakref.ReferenceType[Any] | None = None
        self.optimizer_set: "weakref.WeakSet[Any]" = weakref.WeakSet()  # dead optimizers drop out by themselves
        self._optimizer_refs: list[weakref.ReferenceType[Any]] = []  # the same, as a list: cheap to walk per step
        self._first_param: weakref.ReferenceType[torch.Tensor] | None = None  # whose layout open_step checks
        self.device: torch.device | None = None
        self.model_info: ModelInfo | None = None
        self.step = 0
        self.optimizer_steps = 0  # steps the primary optimizer ended (only whether 0 is read: quiet ones not counted)
        self.step_open = False
        self.sampled = False
        self.root_depth = 0
        self.root_counting = False
        self.crit_depth = 0
        self.batch_size: int | None = None
        self.batch_source: str | None = None
        self._first_forward_t: float | None = None
        self._last_step_end: float | None = None
        self._sampled_batch_size: int | None = None
        self._layout: tuple[Any, ...] | None = None
        self._param_keys: set[int] = set()
        self.batch: accounting.StorageSet | None = None
        self.counter: accounting.ActivationCounter | None = None
        self._batch_max = 0
        self._acts_max = 0
        self._last_acts = 0
        self._static: tuple[int, int, int] | None = None
        self._static_state_len = -1
        self.retries: int | None = None
        self.backwards = 0  # backward passes in the open step
        self.forwards = 0  # training forwards of the root in the open step
        self._lazy = False  # the model had uninitialised (lazy) parameters when last counted
        self._backward_static: tuple[int, int, int] | None = None
        self._grad_marks: list[tuple[weakref.ReferenceType[torch.Tensor], int, int]] = []
        self._matcher: tuple[torch.device, accounting.StorageSet] | None = None  # the batch's storage set
        self._recount = True  # this sampled step walks the parameter/gradient/optimizer storages again
        self._recount_t = float("-inf")  # perf_counter of the last walk
        self._figures: CudaFigures | None = None  # the allocator's figures as last read
        self._figures_t = 0.0  # perf_counter of that read
        self.read_seconds = ALLOCATOR_READ_SECONDS  # ... read again this long after (set_read_seconds)
        self._last_batch_size: int | None = None  # of the last step (a change resets the allocator's peak)
        # (inputs' signature, the step's batch bytes, the one input's (shape, dtype, is_cuda) when there is one)
        self._carried_batch: tuple[tuple[Any, ...], int, tuple[Any, ...] | None] | None = None
        self._step_sig: tuple[Any, ...] | None = None  # the open step's first forward's inputs, if plain tensors
        self.batch_carried = False  # the open step's batch bytes are the last step's (same inputs, not sampled)
        self.phases = PhaseTracker(self._segment_peak)  # each phase's own peak on a sampled step, and where it peaked
        self._carry_peak = 0  # the peak of unread steps, read when a sampled step reset it for its phases
        self._kind_of: torch.device | None = None  # the device whose type _on_cuda says
        self._on_cuda = False
        self._template: Step | None = None  # the last step finish made, when a carried step may repeat it
        self._template_key: tuple[Any, ...] | None = None  # the figures it was made of (finish_carried compares)
        self.run: QuietRun | None = None  # the quiet steps since the last Step (step_runs; finish_quiet adds to it)

    # -------------------------------------------------------------------------------------------- what

    @property
    def model(self) -> torch.nn.Module | None:
        return self.model_ref() if self.model_ref is not None else None

    @property
    def optimizers(self) -> list[Any]:
        found = [opt for ref in self._optimizer_refs if (opt := ref()) is not None]
        if len(found) != len(self._optimizer_refs):
            self._optimizer_refs = [weakref.ref(opt) for opt in found]
        return found

    def add_optimizer(self, optimizer: Any) -> bool:
        """Track an optimizer (its bytes count as optimizer state); False when it already was."""
        if optimizer in self.optimizer_set:
            return False
        self.optimizer_set.add(optimizer)
        self._optimizer_refs.append(weakref.ref(optimizer))
        return True

    def primary(self) -> Any:
        return self.primary_ref() if self.primary_ref is not None else None

    def device_or_cpu(self) -> torch.device:
        return self.device if self.device is not None else torch.device("cpu")

    def set_device(self, device: torch.device) -> None:
        self.device = device
        model = self.model
        if model is not None:
            params, nbytes = accounting.parameter_count(model)
            self.model_info = ModelInfo(type(model).__name__, params, nbytes)
            self._lazy = accounting.has_lazy(model)
        self._static = None

    # -------------------------------------------------------------------------------------------- forward

    def loop_boundary(self) -> bool:
        """At a training forward's start: did the previous step end without an optimizer step we saw?"""
        if not self.step_open or self.backwards == 0 or self.optimizer_steps > 0:
            return False
        return False if patches.step_depth > 0 else self._grads_changed()  # (in an LBFGS closure: the same step)

    def open_quiet(self, module: Any, args: tuple[Any, ...]) -> bool:
        """The root's forward starts (no keyword inputs; quiet steps call this first): True when it opened a
        steady step, carried (first training forward, the last measured inputs' signature, no sample due, the
        first parameter in place - looked at every PLACE_STEPS-th and every N-th step: a model moved with its inputs
        shows in their signature at once, one moved alone within PLACE_STEPS steps); False, having changed nothing,
        when the usual path must decide. ``module``: the root (every caller checked it: not looked at again)."""
        carried = self._carried_batch
        if self.step_open:  # a second forward in a quiet step (accumulation): its first one's backward ran unseen
            if _grad_enabled():
                self.quiet_backwards()
            return False
        if carried is None or self.sizer.fn is not None or not _grad_enabled():
            return False
        if len(args) == 1:
            a, one = args[0], carried[2]  # (compared field by field: no signature tuples made per step)
            if one is None or type(a) is not torch.Tensor or a.shape != one[0] or a.dtype is not one[1] \
                    or a.is_cuda is not one[2]:
                return False
        elif carried[0] != signature(args):
            return False
        n = self.step + 1
        if n <= FULL_STEPS or self.batch_size != self._sampled_batch_size:
            return False
        nth = n % self.activation_every == 0  # (activation_every >= 1: every step when it is 1)
        if nth or n % PLACE_STEPS == 0:  # a sample due? the model moved (its first parameter's storage)?
            first = self._first_param() if self._first_param is not None else None
            layout = self._layout
            if first is None or layout is None or first.data_ptr() != layout[2] \
                    or (nth and _perf_counter() - self._sampled_t >= self.sample_gap):
                return False
        self.step_open = self.batch_carried = True
        self.forwards = 1
        self._batch_max = carried[1]
        self._step_sig = carried[0]
        return True

    def quiet_backwards(self) -> None:
        """The open quiet step's backwards ran unseen (a quiet step has no backward wrapper, quiet_steps): take as
        many as the last measured step's, before the step goes on measured (a second forward, a skipped optimizer
        step's ``GradScaler.update``)."""
        key = self._template_key
        if self.backwards == 0 and key is not None:
            self.backwards = key[6]

    def open_step(self) -> bool:
        """A training forward of the root begins a step; returns whether the model moved (device changed)."""
        self.step_open = True
        self.backwards = 0
        self._grad_marks = []
        if self._first_forward_t is None:
            self._first_forward_t = time.perf_counter()
        n = self.step + 1
        first = self._first_param() if self._first_param is not None else None
        layout = self._layout
        # the layout changes with the storage (.to()/.half() give the parameter a new one): its address says it
        if first is None or layout is None or first.data_ptr() != layout[2]:
            layout = layout_of(first)
        now = time.perf_counter()
        other = (n <= FULL_STEPS or first is None or self.batch_size != self._sampled_batch_size
                 or layout != self._layout)
        self.sampled = other or self._nth_sample_due(n, now)
        self._costed = self.sampled and not other and self.sample_seconds > 0
        if self.sampled:
            self._sampled_t = now
        if self.batch_size != self._last_batch_size and self._figures is not None and self.step >= 1:
            self._cuda(self.device, True)  # the peak so far belongs to the previous batch size: not to this step
        moved = False
        if self.sampled:
            model = self.model
            self._recount = (n <= FULL_STEPS or first is None or layout != self._layout or not self._param_keys
                             or self.batch_size != self._sampled_batch_size
                             or time.perf_counter() - self._recount_t >= RECOUNT_SECONDS)
            if self._recount:
                first = first_parameter(model)
                self._first_param = weakref.ref(first) if first is not None else None
                self._layout = layout_of(first)
            self._sampled_batch_size = self.batch_size
            where = first.device if first is not None else (device_of(model) if model is not None else None)
            if where is not None and (where != self.device or self._lazy):
                self.set_device(where)  # moved, or lazy parameters materialised since: count the model again
                moved = self._recount = True
            if self._recount:
                found = accounting.parameter_storages(
                    model, self.device_or_cpu(), accounting.parameters_of(None, self.optimizers))
                self._param_keys = found.keys
            self._start_phases()
        return moved

    def _start_phases(self) -> None:
        """A sampled CUDA step follows its phases from a peak of its own: the allocator's peak is reset now
        unless the last step's end just did (the peak of the steps since the last read is kept for this step)."""
        device = self.device
        if device is None or device.type != "cuda":
            return
        if self._figures is None or self._figures_t != self._last_step_end:
            figures = self._cuda(device, True)
            if figures is None:
                return
            self._carry_peak = max(self._carry_peak, figures.peak)
        self.phases.start()

    def _segment_peak(self) -> int | None:
        """The allocator's peak since the last reset, then reset: a phase's own peak (sampled CUDA steps)."""
        figures = self._cuda(self.device, True)
        return figures.peak if figures is not None else None

    def _storages(self) -> accounting.StorageSet:
        """An empty StorageSet on the agent's device for the step's batch: one object per device, emptied for
        each forward group (made anew, with its device test, only when the device changes)."""
        device = self.device_or_cpu()
        cached = self._matcher
        if cached is None or (cached[0] is not device and cached[0] != device):
            cached = self._matcher = (device, accounting.StorageSet(device))
        return cached[1].reset()

    def add_inputs(self, inputs: list[torch.Tensor], count: bool = True) -> None:
        """The root forward's inputs are batch; ``count``: start counting saved tensors (forward begins)."""
        if self.batch is None:
            self.batch = self._storages()
        self.batch.add_all(inputs)
        if self.sampled and count:
            self.counter_for_group().push()

    def add_targets(self, tensors: Any) -> None:
        if self.batch_carried:
            return  # the steady step's shortcut: the targets are the last step's too
        if self.batch is None:
            self.batch = self._storages()
        targets = [t for t in tensors if not t.requires_grad]  # targets; the model's output requires grad
        self.batch.add_all(targets)
        corrected = self.sizer.observe_targets(targets)
        if corrected is not None:
            self.batch_size, self.batch_source = corrected.size, corrected.source
        if self.sampled:
            self.counter_for_group().push()

    def stop_counting(self) -> None:
        if self.counter is not None and self.counter.active:
            self.counter.pop()

    def counter_for_group(self) -> accounting.ActivationCounter:
        if self.counter is None:
            keys = self.batch.keys if self.batch is not None else set()
            self.counter = accounting.ActivationCounter(self.device_or_cpu(), (self._param_keys, keys))
        return self.counter

    def fold_group(self) -> None:
        """A forward group (forwards since the last backward) ended: keep the step's maximum."""
        counter = self.counter
        if counter is not None and not counter.active:
            self._acts_max = max(self._acts_max, counter.bytes)
            self.counter = None
        if self.batch is not None:
            self._batch_max = max(self._batch_max, self.batch.bytes)
            self.batch = None

    def begin_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
        """A training forward of the root starts: its batch size, the step (opened if need be), its inputs as
        batch, saved tensors counted on sampled steps. Returns whether the model moved (device changed).

        The steady step's shortcut: a step whose inputs are plain tensors of the same shapes, dtypes and places
        as the last step's keeps that step's batch size and batch bytes, unless it is sampled (then everything is
        measured again): the storages, the batch size and the loss's targets are not looked at."""
        self.forwards += 1
        if not self.step_open and not kwargs and self.sizer.fn is None:
            if self.open_quiet(self.model, args):  # the usual steady step, decided in one call
                return False
            sig = signature(args)
            carried = self._carried_batch
            self._step_sig = sig
            if sig is not None and carried is not None and carried[0] == sig:
                moved = self.open_step()
                if not self.sampled:
                    self.batch_carried = True
                    self._batch_max = carried[1]
                    return moved
                return self._measure_forward(args, kwargs, moved)
        elif not self.step_open:
            self._step_sig = None
        return self._measure_forward(args, kwargs, None)

    def _measure_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], moved: bool | None) -> bool:
        inputs = accounting.tensors_in((args, kwargs) if kwargs else args, depth=4)
        measured = self.sizer.measure(args, kwargs, inputs)
        self.batch_size, self.batch_source = measured.size, measured.source
        if moved is None:
            moved = not self.step_open and self.open_step()
        if self.sampled or self.step < FULL_STEPS:
            self.sizer.start_probe()
        self.add_inputs(inputs)
        return moved

    def end_forward(self, args: tuple[Any, ...], kwargs: dict[str, Any], counting: bool, discovered: bool) -> None:
        """The root forward ended (saved-tensor counting already stopped). ``discovered``: the forward in which
        discovery found the model, whose keyword inputs only the post hook sees."""
        if discovered and counting and kwargs:
            inputs = list(accounting.iter_tensors((args, kwargs), depth=4))
            measured = self.sizer.measure(args, kwargs, inputs)
            self.batch_size, self.batch_source = measured.size, measured.source
            self.add_inputs(inputs, count=False)
        learned = self.sizer.stop_probe()
        if learned is not None and counting:
            self.batch_size, self.batch_source = learned.size, learned.source

    # -------------------------------------------------------------------------------------------- backward

    def before_backward(self) -> None:
        """Backward starts: the forward (and loss) phase of a sampled step ended."""
        if self.step_open and self.phases.active:
            self.phases.mark("forward")

    def after_backward(self) -> None:
        if not self.step_open:
            return
        if self.phases.active:
            self.phases.mark("backward")
        self.backwards += 1
        if self.optimizer_steps > 0:
            return  # the optimizer's step ends steps: the loop rule (and its marks) is not needed
        marks = []
        model = self.model
        if model is not None:
            for p in model.parameters():
                g = p.grad
                if g is not None:
                    marks.append((weakref.ref(p), id(g), g._version))
                    if len(marks) >= GRAD_MARKS:
                        break
        self._grad_marks = marks
        self._backward_static = self.static_components(force=self.sampled and self._recount)  # (a loop step ends later)

    def _grads_changed(self) -> bool:
        """Gradients cleared or replaced since the last backward (accumulation leaves them as they were)."""
        for ref, gid, version in self._grad_marks:
            p = ref()
            if p is None:
                return True
            g = p.grad
            if g is None or id(g) != gid or g._version != version:
                return True
        return True if not self._grad_marks else False

    # -------------------------------------------------------------------------------------------- step end

    def finish_carried(self, device_used: int | None) -> Step | None:
        """A carried step's end (``batch_carried``): when every figure it reports is the last step's (counts,
        activations, batch bytes, size, source, micro-batches, allocator figures, no read due, the device figure),
        the last Step copied with its number and times; else None (then ``finish``). A quiet step ends through
        ``finish_quiet`` instead (no Step at all)."""
        if self.sampled or not self.step_open or self.batch is not None or self.counter is not None \
                or self.phases.active or self._template is None:
            return None
        now = _perf_counter()
        device = self.device
        if device is not self._kind_of:  # (torch.device.type costs ~0.7 us a read: once per device object)
            self._kind_of, self._on_cuda = device, device is not None and device.type == "cuda"
        cuda = None
        if self._on_cuda:
            cuda = self._figures
            if cuda is None or self.step < FULL_STEPS or now - self._figures_t >= self.read_seconds:
                return None
        else:
            device_used = None
        if self._last_step_end is None or self._template_key != (
                self._static, self._last_acts, self._batch_max, cuda, self.batch_size, self.batch_source,
                self.backwards, device_used):
            return None
        template, start = self._template, self._last_step_end
        self._last_step_end = now
        self.step = n = self.step + 1
        step = _new_object(Step)  # a frozen dataclass: its fields live in __dict__ (protocol.new_step)
        step.__dict__.update(template.__dict__, step=n, time=_time(), step_seconds=now - start,  # type: ignore
                             components=template.components.copy())  # type: ignore[union-attr]  # (key set)
        self._last_batch_size, self._backward_static = self.batch_size, None
        self._grad_marks = self._grad_marks and []  # (no new list unless marks)
        self.step_open = self.batch_carried = False
        self._batch_max = self.backwards = self.forwards = 0
        self.run = None
        patches.oom_requested = None  # as finish's take_oom_requested: a caught failure is not the next OOM's size
        return step

    def new_run(self) -> QuietRun | None:
        """The quiet steps from the next one on: a run of the last Step (step_runs; None without one), for the
        caller to publish; they end through ``finish_quiet`` while it is open."""
        template, start = self._template, self._last_step_end
        self.run = QuietRun(template, self.step + 1, start) if template is not None and start is not None else None
        return self.run

    def finish_quiet(self, device_used: int | None) -> bool:
        """A quiet step's end: True when it joined the open ``run`` of the last Step (only its end time kept, no
        Step: step_runs), comparing only what a quiet step can change (backwards, NVML's figure, an allocator read
        due); False, having changed nothing, when ``finish_carried``/``finish`` must end it."""
        run = self.run
        if run is None:
            return False
        key = self._template_key
        now = _perf_counter()
        if key is None or self.phases.active or (self._on_cuda and (  # (its backwards unseen: the template's)
                key[7] != device_used or now - self._figures_t >= self.read_seconds)):
            return False
        ends = run.ends
        if len(ends) >= RUN_MAX:
            return False  # (a Step, then a new run: a run's array stays bounded)
        ends.append(now)
        self._last_step_end = now
        self.step += 1
        self.step_open = self.batch_carried = False  # (the batch size is the last step's; marks only before an
        self._batch_max = self.backwards = self.forwards = 0  # optimizer step, and a quiet step has one)
        # (the OOM observer's last size is dropped by the full ends - an allocator read's, at least every 0.5 s - not
        # here: each real OOM calls the observer first, so a stale size can only reach an OOM raised by hand)
        return True

    def _close_step(self) -> None:  # the per-step state back to between-steps (finish; finish_carried resets its own)
        self.step_open = self.sampled = self.batch_carried = self._costed = False
        self.run = None
        self._acts_max = self._batch_max = self.backwards = self.forwards = 0
        self._grad_marks = []
        self._backward_static = None

    def _nth_sample_due(self, n: int, now: float) -> bool:
        """Step ``n`` is an every-N-th sample (``activation_every`` >= 1, attach checks it) at least
        ``sample_gap`` after the last (open_quiet inlines it: it runs every step)."""
        return n % self.activation_every == 0 and now - self._sampled_t >= self.sample_gap

    def set_read_seconds(self, seconds: float) -> None:
        """How often the allocator's figures are read from now on (the socket thread: what its monitors' refresh
        asks for, batchmon.agent.pace; a float written whole, read by the training thread at a step's end)."""
        self.read_seconds = seconds

    def set_every(self, activation_every: int) -> None:
        """An explicit ``activation_every``: exactly every N-th step is sampled, whatever a sample costs."""
        self.activation_every, self.sample_seconds, self.sample_gap = activation_every, 0.0, 0.0

    def cost_sample(self, seconds: float | None) -> None:
        """An every-N-th sample (default sampling) ended after ``seconds``: the next one comes no sooner than its
        extra time over the last carried step's (the template's ``step_seconds``, a steady step measured without
        a sample) allows at SAMPLE_SHARE of the training's time - SAMPLE_SECONDS apart at least, SAMPLE_MAX_SECONDS
        at most. A sample costs about a millisecond of host time (walking saved tensors, following the phases): on
        a 2.8 ms CUDA step every 0.25 s that was ~10 us a step (bench/agent_cost_paired.py on the H200), at 0.2%
        still ~8 (py-spy, bench/results/spy_h200_s14_after/), at 0.1% ~3.4 (spy_h200_s15_b/), hence 0.05% (a sample
        every ~2 s there: SAMPLE_MAX_SECONDS); a slow step's samples stay 0.25 s apart."""
        template = self._template
        steady = template.step_seconds if template is not None else None
        if seconds is None or steady is None:
            return
        extra = max(0.0, seconds - steady)
        self.sample_gap = min(SAMPLE_MAX_SECONDS, max(self.sample_seconds, extra / SAMPLE_SHARE))

    def finish(self, device_used: int | None, in_loop: bool = False) -> tuple[Step, list[Event]]:
        """The step ended: its Step and events (alloc_retry); resets the per-step state. ``in_loop``: ended by
        the loop rule (gradients already cleared): parameters, gradients, optimizer as at the last backward."""
        now = time.perf_counter()
        start = self._last_step_end if self._last_step_end is not None else self._first_forward_t
        self._last_step_end = now
        if self._costed:  # an every-N-th sample: what it cost spaces the next (before the template changes)
            self._costed = False
            self.cost_sample(now - start if start is not None else None)
        self.step += 1
        self.fold_group()
        n = self.step  # root forward not seen (fullgraph compile): sampled as open_step would have
        sampled = self.sampled or (not self.step_open and (n <= FULL_STEPS or self._static is None
                                                           or self._nth_sample_due(n, now)))
        self._sampled_t = now if sampled and not self.step_open else self._sampled_t
        if sampled:
            self._last_acts = self._acts_max if self.step_open else self._last_acts
        if in_loop and self._backward_static is not None:
            parameters, gradients, optimizer = self._backward_static
        elif self.batch_carried and not sampled and self._static is not None:
            # a carried step keeps the last counts: new optimizer state is looked for on the next sampled step
            parameters, gradients, optimizer = self._static
        else:
            parameters, gradients, optimizer = self.static_components(
                force=sampled and (self._recount or not self.step_open))
        acts, batch = self._last_acts, self._batch_max
        if self.step_open and not self.batch_carried:  # a measured step: the next one with these inputs carries it
            sig = self._step_sig
            self._carried_batch = (sig, batch, sig[0] if len(sig) == 1 else None) if sig is not None else None
        comps = {"parameters": parameters, "gradients": gradients, "optimizer": optimizer, "activations": acts,
                 "batch": batch, "other": 0}
        cuda: CudaFigures | None = None
        fresh = False
        device = self.device
        if device is not None and device.type == "cuda":
            if sampled or self.step <= FULL_STEPS or now - self._figures_t >= self.read_seconds \
                    or self._figures is None:
                cuda = self._cuda(device, True)
                fresh = cuda is not None
                if fresh:
                    self._figures, self._figures_t = cuda, now
            else:
                cuda = self._figures  # carried forward: the peak keeps growing until the next read
        reading = NOT_FOLLOWED
        if self.phases.active:
            if fresh and cuda is not None:
                reading = self.phases.finish(cuda.peak)  # cuda.peak: the last segment's own (peak reset per phase)
                # the step's peak is its largest segment's; an unread step before it that peaked higher still counts
                high = max(reading.peak or 0, self._carry_peak)
                if high > cuda.peak:
                    cuda = dataclasses.replace(cuda, peak=high)
                    self._figures = cuda
            else:
                self.phases.stop()
        self._carry_peak = 0 if fresh else self._carry_peak
        if cuda is not None:
            comps["other"] = max(0, cuda.peak - (parameters + gradients + optimizer + acts + batch))
        opened = self.step_open
        self._last_batch_size = self.batch_size if opened else self._last_batch_size
        step = new_step(self.step, time.time(), (now - start) if start is not None else None,
                        self.batch_size if opened else None, comps,
                        cuda.allocated if cuda else None, cuda.peak if cuda else None,
                        cuda.reserved if cuda else None, cuda.retries if cuda else None,
                        cuda.ooms if cuda else None, device_used if cuda is not None else None,
                        self.batch_source if opened else None, self.backwards if opened else None,
                        peak_phase=reading.phase, phase_peaks=reading.peaks, phase_own_peaks=reading.own,
                        segment_peaks=reading.segments)
        if reading is not NOT_FOLLOWED and cuda is not None:  # a followed step: the split free bytes at its end
            step = with_added(step, inactive_split=cuda.inactive)
        if opened and step.peak_phase is None and step.phase_peaks is None \
                and step.phase_own_peaks is None:  # what the next carried step may repeat
            self._template = step
            self._template_key = ((parameters, gradients, optimizer), acts, batch, cuda, self.batch_size,
                                  self.batch_source, self.backwards, device_used if cuda is not None else None)
        else:
            self._template = self._template_key = None
        self._close_step()
        events: list[Event] = []
        if cuda is not None and fresh:
            if self.retries is not None and cuda.retries > self.retries:
                events.append(Event(
                    kind="alloc_retry", components=step.components, time=step.time, step=step.step,
                    batch_size=step.batch_size,
                    message=f"the CUDA caching allocator freed its cache and retried {cuda.retries - self.retries} "
                            f"allocation(s) during step {step.step}: memory is nearly full or fragmented"))
            self.retries = cuda.retries
        patches.take_oom_requested()  # an allocation failure someone caught and survived is not the next OOM's size
        return step, events

    def _allocator_at_error(self) -> tuple[int | None, int | None, int | None]:
        """The caching allocator right after an out-of-memory error (live tensors, its pool, retries so far), for
        the post-mortem's fragmentation: the step's own reading (cuda_figures) without starting a new peak; None
        off CUDA or if torch cannot say (never raises: the error is the training's, the agent only reports it)."""
        try:
            figures = cuda_figures(self.device, reset=False)
        except Exception:  # noqa: BLE001
            figures = None
        if figures is None:
            return None, None, None
        return figures.allocated, figures.reserved, figures.retries

    def static_components(self, force: bool) -> tuple[int, int, int]:
        optimizers = self.optimizers
        state_len = 0
        for opt in optimizers:
            state = getattr(opt, "state", None)
            if state is not None:
                state_len += len(state)
        if force or self._static is None or state_len != self._static_state_len:
            device = self.device_or_cpu()
            model = self.model
            params = accounting.parameters_of(model, optimizers)
            pset = accounting.parameter_storages(model, device, accounting.parameters_of(None, optimizers))
            gset = accounting.gradient_storages(params, device, pset.keys)
            oset = accounting.optimizer_storages(optimizers, device, pset.keys | gset.keys)
            self._static = (pset.bytes, gset.bytes, oset.bytes)
            self._static_state_len = state_len
            self._recount_t = time.perf_counter()
        return self._static
