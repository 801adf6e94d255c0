"""Who this process is, for the hello line: host, argv, versions, device's NVML uuid, distributed rank and job.

Everything here is read from the process and its environment; nothing is measured.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import torch

from batchmon.protocol import Hello, ModelInfo


def env_int(name: str) -> int | None:
    """A positive integer from the environment, else None."""
    try:
        value = int(os.environ.get(name, ""))
    except ValueError:
        return None
    return value if value >= 1 else None


def env_int0(name: str) -> int:
    try:
        return max(0, int(os.environ.get(name, "0")))
    except ValueError:
        return 0


def cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def nvml_uuid(index: int) -> str | None:
    try:
        uuid = str(torch.cuda.get_device_properties(index).uuid)
    except Exception:  # noqa: BLE001
        return None
    if not uuid:
        return None
    return uuid if uuid.startswith(("GPU-", "MIG-")) else f"GPU-{uuid}"


def ranks() -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torch.distributed, else the torchrun environment, else 0/0/1."""
    rank = env_int0("RANK")
    local_rank = env_int0("LOCAL_RANK")
    world = env_int("WORLD_SIZE") or 1
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            rank, world = dist.get_rank(), dist.get_world_size()
    except Exception:  # noqa: BLE001
        pass
    return rank, local_rank, world


def job_id(world_size: int) -> str | None:
    """What every rank of one distributed job shares and two concurrent jobs don't: the rendezvous address
    (MASTER_ADDR:MASTER_PORT, set by torchrun and most launchers) and torchrun's run id. None alone."""
    if world_size <= 1:
        return None
    addr, port = os.environ.get("MASTER_ADDR"), os.environ.get("MASTER_PORT")
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    parts = [f"{addr}:{port}" if addr and port else None, run_id]
    text = " ".join(p for p in parts if p)
    return text[:256] or None


def hello(pid: int, device: torch.device | None, model: ModelInfo | None, optimizer: str | None,
          name: str | None) -> Hello:
    """The hello message for this process as it is now."""
    rank, local_rank, world_size = ranks()
    uuid = nvml_uuid(cuda_index(device)) if device is not None and device.type == "cuda" else None
    import socket  # here, not at import: `import torch` under batchmon run loads only what discovery needs

    return Hello(pid=pid, host=socket.gethostname(), argv=tuple(str(a) for a in sys.argv),
                 python=platform.python_version(), torch=torch.__version__,
                 device=str(device) if device is not None else "cpu", nvml_uuid=uuid, rank=rank,
                 local_rank=local_rank, world_size=world_size, model=model, optimizer=optimizer, name=name,
                 time=time.time(), job=job_id(world_size))
