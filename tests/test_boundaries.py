"""The import contract (Harlequin style): the core never imports textual, the monitor never imports torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# batchmon/agent/ runs inside the training process and may import torch (lazily); nothing else may.
TRAINING_SIDE = ROOT / "batchmon" / "agent"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def _core_files() -> list[Path]:
    return sorted([*ROOT.joinpath("batchmon").rglob("*.py"), *ROOT.joinpath("probes").rglob("*.py")])


def test_core_and_probes_never_import_textual():
    offenders = [str(p.relative_to(ROOT)) for p in _core_files() if "textual" in _imports(p)]
    assert offenders == []


def test_monitor_side_modules_never_import_torch():
    offenders = []
    for path in _core_files():
        rel = path.relative_to(ROOT)
        if path.is_relative_to(TRAINING_SIDE):
            continue
        if "torch" in _imports(path):
            offenders.append(str(rel))
    assert offenders == []


def test_importing_the_monitor_loads_neither_torch_nor_textual():
    modules = ["batchmon", "batchmon.cli.main", "batchmon.protocol", "batchmon.snapshot", "batchmon.memory_model",
               "batchmon.probes.nvml", "batchmon.probes.host"]
    for path in ROOT.joinpath("batchmon").rglob("*.py"):
        rel = path.relative_to(ROOT).with_suffix("")
        if path.is_relative_to(TRAINING_SIDE) or rel.name in {"__init__", "__main__"}:
            continue
        if ".".join(rel.parts) in {"batchmon.cli.demo", "batchmon.cli.monitor"}:  # the UI's doors
            continue
        modules.append(".".join(rel.parts))
    code = ("import importlib, sys\n"
            f"for m in {sorted(set(modules))!r}: importlib.import_module(m)\n"
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'textual'))\n"
            "print(bad)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_import_linter_contracts_hold():
    """pyproject.toml's import-linter contracts (no cycles, counting imports inside functions; the agent never
    imports the monitor, the CLI or the UI; the UI reads only the shared language; only the agent imports
    torch; only the UI imports textual), checked on the package as installed (.ci/lint-imports lays it out)."""
    pytest.importorskip("importlinter")
    out = subprocess.run([str(ROOT / ".ci" / "lint-imports")], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout.split("Contracts:")[-1]
