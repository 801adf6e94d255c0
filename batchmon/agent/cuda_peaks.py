"""The script's own CUDA memory calls, patched while the agent is attached on CUDA (issue 12 point 4; split from
torch_patches, which re-exports these and undoes them at detach).

The agent resets the allocator's peak after every step, which would hide the script's peak from
``torch.cuda.max_memory_allocated()``; and a script's ``reset_peak_memory_stats()`` mid-step would hide the step's
peak from the agent. So the agent's own resets remember the peak they cleared (the script's
``memory_stats*()``/``max_memory_allocated()``/``max_memory_reserved()`` report the larger of it and the live peak,
until the script resets), and the script's resets remember the peak they cleared for the agent's step.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

_originals: dict[str, Any] = {}  # the patched functions' originals ("cuda_stats", "cuda_reset")


_user_missed: dict[int, list[int]] = {}  # device -> [allocated, reserved] peaks the agent's resets hid from the script
_agent_missed: dict[int, int] = {}  # device -> allocated peak the script's resets hid from the agent's step


def _index(device: Any) -> int:
    from torch.cuda._utils import _get_device_index

    return _get_device_index(device, optional=True)


def raw_stats(index: int) -> dict[str, Any]:
    """The allocator's nested stats as they are (the agent's view)."""
    fn = _originals.get("cuda_stats") or torch.cuda.memory.memory_stats_as_nested_dict
    return fn(index)


def agent_reset(index: int, stats: dict[str, Any]) -> None:
    """The agent resets the peak at a step's end; the script keeps seeing the peak it had."""
    if stats:
        missed = _user_missed.setdefault(index, [0, 0])
        missed[0] = max(missed[0], int(stats["allocated_bytes"]["all"]["peak"]))
        missed[1] = max(missed[1], int(stats["reserved_bytes"]["all"]["peak"]))
    torch._C._cuda_resetPeakMemoryStats(index)


def agent_missed(index: int, take: bool = True) -> int:
    """The allocated peak the script's own resets cleared since the agent's last reset (0 if none)."""
    return _agent_missed.pop(index, 0) if take else _agent_missed.get(index, 0)


def _script_reset(device: Any = None) -> Any:
    index = _index(device)
    try:
        stats = raw_stats(index)
        if stats:
            peak = int(stats["allocated_bytes"]["all"]["peak"])
            _agent_missed[index] = max(_agent_missed.get(index, 0), peak)
    except Exception:  # noqa: BLE001 - the script's call must still happen
        pass
    _user_missed.pop(index, None)
    return _originals["cuda_reset"](device)


def _script_stats(device: Any = None) -> Any:
    stats = raw_stats(device)
    try:
        missed = _user_missed.get(_index(device))
        if missed and stats:
            stats = dict(stats)
            for key, value in (("allocated_bytes", missed[0]), ("reserved_bytes", missed[1])):
                table = dict(stats[key])
                table["all"] = dict(table["all"], peak=max(int(table["all"]["peak"]), value))
                stats[key] = table
    except Exception:  # noqa: BLE001 - never break the script's own query
        pass
    return stats


def install_cuda_memory() -> None:
    """Patch the script-facing CUDA memory calls (idempotent; on a CUDA device only)."""
    if "cuda_stats" in _originals:
        return
    import torch.cuda.memory as cuda_memory

    _originals["cuda_stats"] = cuda_memory.memory_stats_as_nested_dict
    _originals["cuda_reset"] = cuda_memory.reset_peak_memory_stats
    functools.update_wrapper(_script_stats, _originals["cuda_stats"])
    functools.update_wrapper(_script_reset, _originals["cuda_reset"])
    for module in (cuda_memory, torch.cuda):
        if getattr(module, "memory_stats_as_nested_dict", None) is _originals["cuda_stats"]:
            module.memory_stats_as_nested_dict = _script_stats
        if getattr(module, "reset_peak_memory_stats", None) is _originals["cuda_reset"]:
            module.reset_peak_memory_stats = _script_reset


def uninstall_cuda_memory() -> None:
    stats, reset = _originals.pop("cuda_stats", None), _originals.pop("cuda_reset", None)
    if stats is None or reset is None:
        return
    import torch.cuda.memory as cuda_memory

    for module in (cuda_memory, torch.cuda):
        if getattr(module, "memory_stats_as_nested_dict", None) is _script_stats:
            module.memory_stats_as_nested_dict = stats
        if getattr(module, "reset_peak_memory_stats", None) is _script_reset:
            module.reset_peak_memory_stats = reset
    _user_missed.clear()
    _agent_missed.clear()
