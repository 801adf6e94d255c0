"""bench/h200_run.sh, the device session's script: one device command may call it more than once, and only what
lies under $OUT comes back - each call must leave the archives of the calls before it (a command of three calls
once brought back only the last call's files)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
def test_two_calls_in_one_command_keep_both_archives(tmp_path):
    out = tmp_path / "out"
    copy = Path("/tmp/bm")  # where the script lays the checkout out as the package installs
    had_copy = copy.exists()
    try:
        for tag in ("first", "second"):
            env = {**os.environ, "SMOKE": "1", "OUT": str(out), "RUN_TAG": tag}
            done = subprocess.run(["bash", "bench/h200_run.sh", "env"], cwd=ROOT, env=env, capture_output=True,
                                  text=True, timeout=120)
            assert done.returncode == 0, done.stderr[-2000:]
    finally:
        if not had_copy:
            shutil.rmtree(copy, ignore_errors=True)
    assert sorted(p.name for p in out.iterdir()) == ["results_first.tar.gz", "results_second.tar.gz"]
    for tag in ("first", "second"):
        with tarfile.open(out / f"results_{tag}.tar.gz") as archive:
            names = archive.getnames()
        assert "./r/env.txt" in names and not any(n.startswith("./results_") for n in names)
