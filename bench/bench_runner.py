"""The measuring half shared by bench/predict_accuracy.py, bench/predict_zoo.py and bench/fsdp_predict.py: an
architecture's recipe (Arch), the devices (CUDA with allocator statistics and NVML; a fake one for --cpu-smoke),
and the Runner that trains a step and counts its components the way the agent does. Split from
predict_accuracy.py so that file stays under 600 lines; it re-exports these names."""

from __future__ import annotations

import gc
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn as nn

from batchmon.protocol import Step

BLOCK = 512  # the CUDA caching allocator's block granularity
#: RuntimeErrors that mean "out of memory" near the limit (library workspaces), as in Lightning's is_oom_error
OOM_LIKE = ("CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED", "CUDNN_STATUS_NOT_SUPPORTED",
            "CUDNN_STATUS_ALLOC_FAILED", "CUDA_ERROR_OUT_OF_MEMORY", "CUDNN_STATUS_INTERNAL_ERROR")


@dataclass
class Arch:
    name: str
    description: str
    build: Callable[[], nn.Module]
    optimizer: Callable[[nn.Module], torch.optim.Optimizer]
    batch: Callable[[int, torch.device, torch.Generator], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    observe: tuple[int, int]  # (larger, smaller) observed batch sizes
    amp: bool = False


class OOM(Exception):
    """A trial that ran out of memory (real CUDA OOM, or the smoke device's budget)."""


class CudaDevice:
    """The real thing: allocator statistics from torch.cuda, per-process use from NVML where it works."""

    kind = "cuda"

    def __init__(self) -> None:
        self.device = torch.device("cuda", torch.cuda.current_device())
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        self.name = torch.cuda.get_device_name(self.device)
        self.total = torch.cuda.mem_get_info(self.device)[1]
        self._nvml = None
        try:
            import pynvml

            pynvml.nvmlInit()
            uuid = str(torch.cuda.get_device_properties(self.device).uuid)
            for i in range(pynvml.nvmlDeviceGetCount()):
                h = pynvml.nvmlDeviceGetHandleByIndex(i)
                u = pynvml.nvmlDeviceGetUUID(h)
                u = u.decode() if isinstance(u, bytes) else u
                if u.replace("GPU-", "") == uuid.replace("GPU-", ""):
                    self._nvml = (pynvml, h)
        except Exception:  # noqa: BLE001 - NVML is optional here
            self._nvml = None

    def clean(self) -> None:
        gc.collect()
        torch.cuda.synchronize(self.device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)

    def sync(self) -> None:
        torch.cuda.synchronize(self.device)

    def reset_peak(self) -> None:
        torch.cuda.reset_peak_memory_stats(self.device)

    def stats(self, components: dict[str, int] | None = None) -> dict[str, int | None]:
        s = torch.cuda.memory_stats(self.device)
        return {"peak_allocated": s.get("allocated_bytes.all.peak", 0), "reserved": s.get("reserved_bytes.all.current", 0),
                "allocated": s.get("allocated_bytes.all.current", 0), "num_alloc_retries": s.get("num_alloc_retries", 0),
                "num_ooms": s.get("num_ooms", 0), "device_used": self._used(),
                "inactive_split_peak": s.get("inactive_split_bytes.all.peak", 0)}

    def _used(self) -> int | None:
        if self._nvml is not None:
            pynvml, h = self._nvml
            try:
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(h):
                    if p.pid == os.getpid() and p.usedGpuMemory:
                        return int(p.usedGpuMemory)
            except Exception:  # noqa: BLE001
                pass
        free, total = torch.cuda.mem_get_info(self.device)
        return total - free  # the whole device: this process is alone on the bench machine

    def check(self, components: dict[str, int]) -> None:
        pass

    oom_types: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError, OOM)


class SmokeDevice:
    """CPU stand-in for --cpu-smoke: peak = sum of the measured components; OOM past a fake device size."""

    kind = "cpu-smoke"

    def __init__(self, total: int) -> None:
        self.device = torch.device("cpu")
        self.name = "cpu (smoke test, fake device)"
        self.total = total
        self.context = 1 << 20
        self._last: dict[str, int] = {}

    def clean(self) -> None:
        # no gc.collect() here: the smoke device's peak is the sum of the measured components, which garbage
        # does not change, and a full collection of a process with torch loaded costs ~0.2-0.5 s - most of the
        # CPU smokes' time (60 per run of predict_accuracy.py --cpu-smoke)
        self._last = {}

    def sync(self) -> None:
        pass

    def reset_peak(self) -> None:
        self._last = {}

    def check(self, components: dict[str, int]) -> None:
        self._last = components
        if sum(components.values()) + self.context > self.total:
            raise OOM("smoke device full")

    def stats(self, components: dict[str, int] | None = None) -> dict[str, int | None]:
        peak = sum((components or self._last).values())
        return {"peak_allocated": peak, "reserved": peak, "allocated": peak, "num_alloc_retries": 0, "num_ooms": 0,
                "device_used": peak + self.context, "inactive_split_peak": 0}

    oom_types: tuple[type[BaseException], ...] = (OOM,)


# ----------------------------------------------------------------------------------------------- measuring


def _storage_bytes(tensors, on: torch.device, exclude: set[int] = frozenset(), block: int = 1) -> tuple[int, set[int]]:
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if not torch.is_tensor(t) or t.device.type != on.type:
            continue
        st = t.untyped_storage()
        key = st.data_ptr()
        if key in seen or key in exclude or st.nbytes() == 0:
            continue
        seen.add(key)
        total += -(-st.nbytes() // block) * block
    return total, seen


@dataclass
class Runner:
    arch: Arch
    dev: Any
    model: nn.Module = field(init=False)
    opt: torch.optim.Optimizer = field(init=False)
    steps_run: int = 0

    def __post_init__(self) -> None:
        torch.manual_seed(0)
        self.model = self.arch.build().to(self.dev.device)
        self.opt = self.arch.optimizer(self.model)
        self.block = BLOCK if self.dev.kind == "cuda" else 1
        self.gen = torch.Generator(device=self.dev.device).manual_seed(1)

    def step(self, batch: int, *, count: bool, accumulation: int = 1) -> dict[str, int] | None:
        """One optimizer step at `batch` (split into `accumulation` micro-batches). Components when count."""
        model, opt, dev = self.model, self.opt, self.dev.device
        opt.zero_grad(set_to_none=True)
        micro = -(-batch // accumulation)
        params, pkeys = _storage_bytes(list(model.parameters()) + list(model.buffers()), dev, block=self.block)
        act_bytes = batch_bytes = 0
        for _ in range(accumulation):
            x, y = self.arch.batch(micro, dev, self.gen)
            excluded = pkeys | {x.untyped_storage().data_ptr(), y.untyped_storage().data_ptr()}
            saved: dict[int, int] = {}

            def pack(t: torch.Tensor) -> torch.Tensor:
                if t.device.type == dev.type:
                    st = t.untyped_storage()
                    if st.data_ptr() not in excluded and st.nbytes():
                        saved[st.data_ptr()] = -(-st.nbytes() // self.block) * self.block
                return t.detach()

            hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count else None
            if hooks:
                hooks.__enter__()
            try:
                with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.arch.amp):
                    loss = self.arch.loss(model(x), y) / accumulation
            finally:
                if hooks:
                    hooks.__exit__(None, None, None)
            act_bytes = max(act_bytes, sum(saved.values()))
            batch_bytes = max(batch_bytes, _storage_bytes([x, y], dev, block=self.block)[0])
            if count and self.dev.kind != "cuda":
                self.dev.check({"parameters": params, "activations": act_bytes, "batch": batch_bytes})
            loss.backward()
            del loss, x, y
        grads, _ = _storage_bytes([p.grad for p in model.parameters() if p.grad is not None], dev, pkeys, self.block)
        opt.step()
        state = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
        optim, _ = _storage_bytes(state, dev, pkeys, self.block)
        self.steps_run += 1
        comps = {"parameters": params, "gradients": grads, "optimizer": optim, "activations": act_bytes,
                 "batch": batch_bytes, "other": 0}
        if self.dev.kind != "cuda":
            self.dev.check(comps)
        return comps if count else None

    def observe(self, batch: int) -> Step:
        """A measured step, as the agent would report it."""
        self.dev.reset_peak()
        start = time.perf_counter()
        comps = self.step(batch, count=True)
        self.dev.sync()
        s = self.dev.stats(comps)
        comps["other"] = max(0, s["peak_allocated"] - sum(comps.values()))
        return Step(step=self.steps_run, time=time.time(), step_seconds=time.perf_counter() - start, batch_size=batch,
                    components=comps, allocated=s["allocated"], peak_allocated=s["peak_allocated"],
                    reserved=s["reserved"], num_alloc_retries=s["num_alloc_retries"], num_ooms=s["num_ooms"],
                    device_used=s["device_used"])

    def trial(self, batch: int, *, accumulation: int = 1) -> dict[str, Any]:
        """One step at `batch` from a clean allocator: ok, peak allocated, reserved, seconds."""
        self.opt.zero_grad(set_to_none=True)
        self.dev.clean()
        start = time.perf_counter()
        ok, failure = True, None
        try:
            self.step(batch, count=self.dev.kind != "cuda", accumulation=accumulation)
            self.dev.sync()
        except self.dev.oom_types:
            ok, failure = False, "oom"
        except RuntimeError as exc:  # what Lightning's is_oom_error also counts as out of memory
            if not any(text in str(exc) for text in OOM_LIKE):
                raise
            ok, failure = False, " ".join(str(exc).split())[:160]
        seconds = time.perf_counter() - start
        s = self.dev.stats() if ok else {}
        self.opt.zero_grad(set_to_none=True)
        self.dev.clean()
        return {"batch": batch, "ok": ok, "failure": failure, "peak_allocated": s.get("peak_allocated"),
                "reserved": s.get("reserved"), "device_used": s.get("device_used"),
                "num_alloc_retries": s.get("num_alloc_retries"),
                "inactive_split_peak": s.get("inactive_split_peak"), "seconds": round(seconds, 4)}
