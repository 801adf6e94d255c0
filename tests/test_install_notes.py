"""Issue 17 D18: a CPU-only box is told how to get PyTorch's CPU build, and the torch extra brings numpy (torch
warned "Failed to initialize NumPy" on every run without it). README's first two commands stay as they are."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]


def test_torch_extra_brings_numpy():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(re.match(r"numpy\b", req) for req in extras["torch"]), extras["torch"]


def test_run_it_says_how_a_cpu_only_box_gets_the_cpu_build():
    text = (ROOT / "README.md").read_text()
    run_it = text[: text.index("Test it")]
    assert 'pip install -e ".[torch]" && batchmon demo' in run_it
    assert "pip install torch --index-url https://download.pytorch.org/whl/cpu" in run_it
