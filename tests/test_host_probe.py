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


# ----------------------------------------------------------------------------------------------- /proc, not psutil


def test_proc_reader_reads_what_psutil_reads() -> None:
    """The /proc reader (probes/procfs.py) gives psutil's figures for the host and for a busy child."""
    from batchmon.probes.procfs import ProcReader, PsutilReader

    procfs, ps = ProcReader(), PsutilReader()
    (total, used), (ps_total, ps_used) = procfs.memory(), ps.memory()
    assert total == ps_total
    assert abs(used - ps_used) < 64 << 20  # read a moment apart: the host's use moves a little between them
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        wait_for(lambda: procfs.times(busy.pid).cpu_seconds > 0.05, what="the child to use some CPU")
        mine, theirs = procfs.times(busy.pid), ps.times(busy.pid)
        # psutil read second: as much or a little more (to a float's rounding: psutil adds utime/HZ and stime/HZ,
        # procfs divides their sum, so 0.03 + 0.04 and 7/100 may differ in the last bit)
        assert -1e-9 <= theirs.cpu_seconds - mine.cpu_seconds < 0.5
        assert mine.rss and theirs.rss and abs(mine.rss - theirs.rss) < 8 << 20
        assert procfs.identity(busy.pid) == ps.identity(busy.pid)
        assert procfs.times(busy.pid).start == mine.start  # the same process: the same start
    finally:
        busy.kill()
        busy.wait()


def test_monitor_side_never_imports_psutil() -> None:
    """The host probe and the liveness check read /proc: psutil (~2 MiB of the monitor's RSS) stays unloaded."""
    code = (
        "import os, subprocess, sys\n"
        "from batchmon.probes.host import HostProbe\n"
        "from batchmon.monitor.agent_sockets import pid_alive\n"
        "p = HostProbe(); p.sample([os.getpid(), 1]); s = p.sample([os.getpid()])\n"
        "assert s.processes[os.getpid()].cpu_percent is not None and s.memory_used\n"
        "child = subprocess.Popen([sys.executable, '-c', 'pass'])\n"
        "import time\n"
        "while open(f'/proc/{child.pid}/stat').read().rsplit(')', 1)[1].split()[0] != 'Z': time.sleep(0.01)\n"
        "assert pid_alive(os.getpid()) and not pid_alive(child.pid)\n"
        "child.wait()\n"
        "print('psutil' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


def test_meminfo_figures_are_read_by_whole_line_name() -> None:
    """/proc/meminfo's figures are found by the name a line starts with: SwapCached is not Cached, and a name the
    kernel does not say is None (the reader then estimates the available memory as free does)."""
    from batchmon.probes.procfs import _meminfo

    text = b"MemTotal:  1000 kB\nMemFree:  200 kB\nSwapCached:  7 kB\nCached:  300 kB\n"
    assert _meminfo(text, b"Cached:") == 300 * 1024
    assert _meminfo(text, b"SwapCached:") == 7 * 1024
    assert _meminfo(text, b"MemTotal:") == 1000 * 1024
    assert _meminfo(text, b"MemAvailable:") is None
