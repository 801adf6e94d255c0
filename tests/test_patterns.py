"""Issue 12 point 5: the pattern corpus (tests/patterns/), each script plain and under ``batchmon run``.

Real subprocesses: the same script, same seed, once plain and once under ``batchmon run``; the losses must be
bit-identical, the agent must see one step per step the script took (tests/patterns/pattern_common.py: each
script reports its own steps and batch sizes), with the script's batch sizes, and where the script says where
its batch dimension is, the agent must name it (``batch_source``). The same corpus runs on CUDA with
``bench/patterns_run.py`` (every attached run a real ``batchmon run``). Here the runs fork from the session's
torch-preloaded server (tests/preloaded.py) but for FRESH_LAUNCH's attached runs. Marked slow: ~1-2 minutes.
"""

from __future__ import annotations

import dataclasses
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "patterns"))

import corpus  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture
def short_dir():
    """A short folder: the agent's socket path (at most 107 bytes) lives under it."""
    path = Path(tempfile.mkdtemp(prefix="bmpat"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _on_this_box(pattern: corpus.Pattern) -> corpus.Pattern:
    """The spawn pattern with one worker here: each spawned worker imports torch (~4 CPU s on this 2-core box),
    and one spawned worker already shows a worker neither attaching nor disturbing training (fork keeps two;
    bench/patterns_run.py runs the corpus as listed, two spawn workers)."""
    if pattern.name == "loader_workers_spawn":
        return dataclasses.replace(pattern, args=(*pattern.args, "--workers", "1"))
    return pattern


#: patterns whose attached run is a real ``batchmon run`` of a fresh interpreter here: a plain script, and the one
#: whose spawned workers start from the launched process's environment
FRESH_LAUNCH = {"word_lm_lstm", "loader_workers_spawn"}


@pytest.mark.parametrize("pattern", corpus.PATTERNS, ids=[p.name for p in corpus.PATTERNS])
def test_pattern_plain_and_under_batchmon_run(pattern, short_dir, preloaded):
    """The plain reference run forks from the session's torch-preloaded server (its losses and batch sizes are
    the script's own, whatever process runs it). The attached run: for FRESH_LAUNCH a real ``batchmon run`` of
    a fresh interpreter, as a user's; for the others a child of the same server with ``batchmon run``'s
    environment (child_env: the bootstrap's sitecustomize attaches the agent, torch being imported already),
    since what each pattern tests is the agent inside its training, not the launch (tests/test_launcher.py,
    test_agent_examples.py, test_ddp.py and test_ended_runs.py launch real ones)."""
    pattern = _on_this_box(pattern)
    attached_runner = None if pattern.name in FRESH_LAUNCH else preloaded.run
    row = corpus.run_pattern(pattern, "cpu", short_dir, plain_runner=preloaded.run, attached_runner=attached_runner)
    assert row.problems == [], row.problems
    assert row.ok and row.loss_unchanged and row.batch_right
    assert row.steps_seen == row.steps_expected > 0
    assert row.components_sum_to_peak is None  # CPU: no allocator peak to sum to
