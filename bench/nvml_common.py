"""Shared bits of the NVML bench scripts: output folder, batchmon import from a checkout, a torch child
process that holds GPU memory, nvidia-smi figures. No textual here; torch only inside the child process."""

from __future__ import annotations

import importlib.util
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MiB = 1 << 20
GiB = 1 << 30

CHILD_CODE = r"""
import sys, torch
n = int(sys.argv[1])
x = torch.empty(n, dtype=torch.uint8, device="cuda:0")
x.fill_(1)
torch.cuda.synchronize()
print("ready", torch.cuda.memory_reserved(0), torch.cuda.memory_allocated(0), flush=True)
sys.stdin.read()  # hold the memory until the parent closes our stdin
"""


def out_dir() -> Path:
    out = Path(os.environ.get("OUT") or "out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def import_batchmon() -> None:
    """Make `batchmon.probes` importable from a bare checkout too (probes/ installs as batchmon.probes)."""
    try:
        import batchmon.probes.nvml  # noqa: F401
        return
    except ImportError:
        pass
    sys.path.insert(0, str(ROOT))
    import batchmon  # noqa: F401

    spec = importlib.util.spec_from_file_location("batchmon.probes", ROOT / "probes" / "__init__.py",
                                                  submodule_search_locations=[str(ROOT / "probes")])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["batchmon.probes"] = module
    spec.loader.exec_module(module)


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


class Child:
    """A python process holding `nbytes` of cuda:0 through torch until stop()."""

    def __init__(self, nbytes: int, timeout: float = 180.0) -> None:
        self._stderr = tempfile.TemporaryFile(mode="w+")  # a file, not a pipe: chatty stderr never blocks it
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD_CODE, str(nbytes)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self._stderr, text=True)
        self.pid = self.proc.pid
        self.reserved: int | None = None
        self.allocated: int | None = None
        self.error: str | None = None
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        while time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], 0.5)
            if ready:
                line = self.proc.stdout.readline()
                if line.startswith("ready"):
                    _, reserved, allocated = line.split()
                    self.reserved, self.allocated = int(reserved), int(allocated)
                    return
                if not line:  # the child died before it was ready
                    break
            if self.proc.poll() is not None:
                break
        self.stop()
        self._stderr.seek(0)
        err = self._stderr.read()
        tail = err.strip().splitlines()[-1:] or ["timed out"]
        self.error = f"child process failed: {tail[0][:300]}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            except OSError:
                pass
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


SMI_QUERY = ["nvidia-smi", "--query-gpu=index,uuid,memory.used,memory.total", "--format=csv,noheader,nounits"]


def nvidia_smi() -> dict[int, dict[str, Any]] | None:
    """nvidia-smi's used/total MiB per GPU index, or None where nvidia-smi is missing or fails."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        text = subprocess.run(SMI_QUERY, capture_output=True, text=True, timeout=60, check=True).stdout
    except (subprocess.SubprocessError, OSError):
        return None
    rows: dict[int, dict[str, Any]] = {}
    for line in text.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            rows[int(parts[0])] = {"uuid": parts[1], "used_mib": int(parts[2]), "total_mib": int(parts[3])}
    return rows


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def pynvml_version() -> str | None:
    try:
        from importlib.metadata import version

        return version("nvidia-ml-py")
    except Exception:
        return None
