"""DDP under real torchrun (gloo on the CPU here; NCCL on two H200s is recorded in tests/fixtures/ddp_h200_*.jsonl):
every rank attaches, both under `batchmon run -- torchrun ...` and with batchmon.attach() in the script, the
monitor groups the ranks into one job with their imbalance, and attached ranks train exactly as unattached ones.

Two torchrun jobs (each a launcher and two workers that import torch); the unattached reference ranks fork from the
session's torch-preloaded server (tests/preloaded.py) with torchrun's worker environment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from agent_helpers import EXAMPLES, batchmon_cmd, wait_for
from batchmon import protocol
from batchmon.monitor.hub import Hub
from batchmon.jobs import group_jobs

SMALL = ["--cpu", "--hidden", "64", "--input-dim", "32", "--layers", "2", "--batch-size", "16",
         "--rank-batch-step", "48"]


def free_port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
            "--master-port", free_port(), str(EXAMPLES / "train_ddp.py"), *SMALL, *args]


@pytest.fixture
def sockdir(tmp_path, monkeypatch):
    path = protocol.ensure_socket_dir(tmp_path / "s")
    monkeypatch.setenv("BATCHMON_DIR", str(path))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    return path


def two_ranks_stepping(hub: Hub):
    snap = hub.snapshot()
    jobs = [j for j in group_jobs(snap.agents) if j.world_size == 2]
    if len(jobs) == 1 and len(jobs[0].ranks) == 2 and all(a.last_step and a.last_step.step >= 3
                                                            for a in jobs[0].ranks):
        return jobs[0]
    return None


#: the run under `batchmon run` trains this many paced steps (0.05 s each): ~10 s alive, time enough for the monitor's
#: checks while both ranks step, then it ends by itself with its report
STEPS = 200


def check_the_job_of_two_ranks(hub: Hub, proc: subprocess.Popen) -> None:
    """Every rank attached, the monitor groups them into one job with rank 1 the heaviest, and `--once --json`
    lists that job (while the ranks step)."""
    job = wait_for(lambda: two_ranks_stepping(hub), 120, "two DDP ranks stepping")
    r0, r1 = job.ranks
    assert (r0.hello.rank, r1.hello.rank) == (0, 1) and r0.hello.world_size == r1.hello.world_size == 2
    assert r0.hello.job and r0.hello.job == r1.hello.job  # the rendezvous both share
    assert r0.hello.pid != r1.hello.pid and proc.pid not in (r0.hello.pid, r1.hello.pid)  # workers, not torchrun
    assert r0.hello.model is not None and r0.hello.model.parameters == r1.hello.model.parameters
    # parameters, gradients and optimizer are replicated; rank 1's bigger shard costs it activations and batch
    for name in ("parameters", "gradients", "optimizer"):
        assert r0.last_step.components[name] == r1.last_step.components[name] > 0
    assert (r0.last_step.batch_size, r1.last_step.batch_size) in {(16, 64)}
    found = job.imbalance()
    assert found is not None and found.heaviest_rank == 1 and found.lightest_rank == 0
    assert {"activations", "batch"} <= set(found.by_component) and found.spread > 0
    once = subprocess.run(batchmon_cmd("--once", "--json"), capture_output=True, text=True, timeout=120)
    assert once.returncode == 0, once.stderr
    (listed,) = [j for j in json.loads(once.stdout)["jobs"] if j["world_size"] == 2]
    assert listed["ranks"] == [r0.key, r1.key] and listed["imbalance"]["heaviest_rank"] == 1


def test_every_rank_attached_in_the_script_and_the_monitor_groups_them(sockdir) -> None:
    proc = subprocess.Popen(torchrun("--steps", "0", "--sleep", "0.05", "--attach"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    hub = Hub(interval=0.1, socket_dir=sockdir).start()
    try:
        check_the_job_of_two_ranks(hub, proc)
    finally:
        hub.stop()
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    assert "batchmon:" not in err, err[-2000:]  # no agent warning from any rank (torchrun's own SIGTERM noise aside)


def reports(out: str) -> dict[int, dict]:
    """Each rank's --report object, each a whole line of its own (the ranks take turns to print them)."""
    found = {}
    for line in out.splitlines():
        if line.startswith('{"rank": '):
            d = json.loads(line)
            found[d["rank"]] = d
    return found


def plain_ranks(preloaded, *args: str) -> dict[int, dict]:
    """The unattached reference run: train_ddp.py's two ranks forked from the session's torch-preloaded server,
    with the environment torchrun gives its workers (rank, world, rendezvous, one OpenMP thread each)."""
    port = free_port()
    ranks = [preloaded.popen([str(EXAMPLES / "train_ddp.py"), *SMALL, *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "GROUP_RANK": "0",
                                  "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                                  "MASTER_PORT": port, "OMP_NUM_THREADS": "1"})
             for rank in (0, 1)]
    found: dict[int, dict] = {}
    for proc in ranks:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        found.update(reports(out))
    return found


def test_batchmon_run_of_torchrun_attaches_every_rank_groups_them_and_trains_exactly_like_unattached(
        sockdir, preloaded) -> None:
    """One `batchmon run -- torchrun ...` (its injection reaches both workers): the monitor groups the ranks while
    they step; at the end each rank's losses are bit for bit those of the same ranks unattached."""
    proc = subprocess.Popen(batchmon_cmd("run", "--", *torchrun("--steps", str(STEPS), "--sleep", "0.05", "--report")),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    hub = Hub(interval=0.1, socket_dir=sockdir).start()
    try:
        check_the_job_of_two_ranks(hub, proc)
    finally:
        hub.stop()
        try:
            out, err = proc.communicate(timeout=180)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert "batchmon:" not in err, err[-2000:]  # no agent warning from any rank
    before, after = plain_ranks(preloaded, "--steps", str(STEPS), "--report"), reports(out)
    assert set(before) == set(after) == {0, 1}
    for rank in (0, 1):
        assert not before[rank]["agent"]["attached"] and after[rank]["agent"]["attached"]
        assert after[rank]["agent"]["steps"] == STEPS and after[rank]["agent"]["model"] == "DistributedDataParallel"
        assert len(before[rank]["losses"]) == STEPS and before[rank]["losses"] == after[rank]["losses"]
    assert before[0]["losses"] != before[1]["losses"]  # the ranks did train on different shards
