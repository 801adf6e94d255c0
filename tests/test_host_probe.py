"""HostProbe on real processes of this machine: ourselves, busy and exited children, pids that never were."""

from __future__ import annotations

import json
import os
import pwd
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from batchmon.probes.host import HostProbe, HostSample, ProcessInfo, sample_from_dict, sample_to_dict
from conftest import wait_until


def wait_for(predicate: Any, timeout: float = 10.0, what: str = "condition") -> Any:
    """conftest.wait_until with this module's default deadline."""
    return wait_until(predicate, timeout, what)


def unused_pid() -> int:
    limit = Path("/proc/sys/kernel/pid_max")
    pid_max = int(limit.read_text()) if limit.exists() else 1 << 22
    return pid_max + 1  # above the kernel's limit: can never exist


def test_host_memory_and_name() -> None:
    s = HostProbe().sample()
    assert s.hostname == socket.gethostname()
    assert s.memory_total and s.memory_total > 0
    assert s.memory_used is not None and 0 < s.memory_used <= s.memory_total
    assert s.processes == {}
    assert abs(s.time - time.time()) < 60


def test_own_process() -> None:
    probe = HostProbe()
    me = probe.sample([os.getpid()]).processes[os.getpid()]
    assert me.state == "ok"
    assert me.user == pwd.getpwuid(os.getuid()).pw_name
    assert me.command and Path(sys.executable).name in me.command
    assert me.rss and me.rss > 1 << 20
    assert me.cpu_percent is None  # first sample: no interval to measure over yet
    again = probe.sample([os.getpid()]).processes[os.getpid()]
    assert again.cpu_percent is not None and again.cpu_percent >= 0


def test_cpu_percent_measures_between_samples() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        probe = HostProbe()
        assert probe.sample([busy.pid]).processes[busy.pid].cpu_percent is None
        # kept psutil.Process objects make the second reading the busy share since the first one
        wait_for(lambda: (probe.sample([busy.pid]).processes[busy.pid].cpu_percent or 0) > 20,
                 what="a busy child to show CPU use")
        # a pid nobody asks about is forgotten: asked again later, it starts over
        probe.sample([])
        assert probe.sample([busy.pid]).processes[busy.pid].cpu_percent is None
    finally:
        busy.kill()
        busy.wait()


def test_exited_process_is_gone_not_a_crash() -> None:
    probe = HostProbe()
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    first = probe.sample([child.pid]).processes[child.pid]
    assert first.state == "ok" and first.command and "sys.stdin.read()" in first.command
    child.stdin.close()  # type: ignore[union-attr]
    child.wait(timeout=30)  # reaped: the pid is gone
    gone = probe.sample([child.pid]).processes[child.pid]
    assert gone == ProcessInfo(child.pid, None, None, None, None, state="gone")


def test_zombie_process_is_gone() -> None:
    probe = HostProbe()
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        probe.sample([child.pid])
        wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE, what="the child to exit")
        assert probe.sample([child.pid]).processes[child.pid].state == "gone"
    finally:
        child.wait()


def test_pids_that_cannot_exist() -> None:
    pid = unused_pid()
    s = HostProbe().sample([pid, -1, 0, True])  # type: ignore[list-item]
    assert list(s.processes) == [pid]
    assert s.processes[pid].state == "gone" and s.processes[pid].user is None


def test_dict_round_trip_and_json() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    probe = HostProbe()
    probe.sample([os.getpid()])
    s = probe.sample([os.getpid(), child.pid])
    d = json.loads(json.dumps(sample_to_dict(s), allow_nan=False))
    assert [p["pid"] for p in d["processes"]] == sorted(s.processes)
    assert sample_from_dict(d) == s
    # also accepted: processes keyed by pid (what a dict-minded writer would produce)
    keyed = dict(d, processes={str(p["pid"]): {k: v for k, v in p.items() if k != "pid"} for p in d["processes"]})
    assert sample_from_dict(keyed) == s


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ([], "expected an object"),
        ({"memory_total": 1}, "hostname"),
        ({"hostname": "h", "memory_total": "lots"}, "memory_total"),
        ({"hostname": "h", "processes": [{"pid": 1, "state": "sleeping"}]}, "state"),
        ({"hostname": "h", "processes": [{"user": "x"}]}, r"processes\[0\]\.pid"),
        ({"hostname": "h", "processes": [{"pid": 1, "rss": -5}]}, "rss"),
        ({"hostname": "h", "processes": 7}, "processes"),
    ],
)
def test_sample_from_dict_rejects_malformed_input(data: Any, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        sample_from_dict(data)


def test_sample_from_dict_minimal() -> None:
    s = sample_from_dict({"hostname": "gpu1"})
    assert s == HostSample(hostname="gpu1", memory_total=None, memory_used=None, processes={}, time=0.0)
