"""`batchmon --host HOST` against a real OpenSSH server on loopback that the test starts.

The "remote" box is this machine: sshd runs `python -m batchmon stream` of this venv (BATCHMON_REMOTE_COMMAND)
with its own socket folder holding a protocol peer, while the local side looks at an empty folder, so every
agent seen came through ssh.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batchmon import protocol
from batchmon.monitor.hub import Hub
from batchmon.monitor.hub_state import HubState
from batchmon.monitor.render import NO_AGENTS
from batchmon.protocol import step_components
from hub_peer import FakeAgent, LivePid, make_hello, make_step, wait_for

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
SSH = shutil.which("ssh")
HOST = "testhost"
HOST2 = "testhost2"  # a second alias of the same sshd: --host is repeatable



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    """A throwaway sshd on 127.0.0.1: its own host key, one authorized user key, no PAM, logs to a file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir()
        self.port = free_port()
        for name in ("host_key", "user_key"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(root / name)], check=True)
        (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
        self.config = root / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {root / 'host_key'}",
            f"AuthorizedKeysFile {root / 'authorized_keys'}", "PermitRootLogin yes", "StrictModes no",
            "UsePAM no", f"PidFile {root / 'sshd.pid'}", "PubkeyAuthentication yes",
            "PasswordAuthentication no", "KbdInteractiveAuthentication no", "LogLevel ERROR", ""]))
        self.client_config = root / "ssh_config"
        user = os.environ.get("USER") or __import__("pwd").getpwuid(os.getuid()).pw_name
        self.client_config.write_text("\n".join([
            f"Host {HOST} {HOST2}", "  HostName 127.0.0.1", f"  Port {self.port}", f"  User {user}",
            f"  IdentityFile {root / 'user_key'}", "  IdentitiesOnly yes", "  UserKnownHostsFile /dev/null",
            "  StrictHostKeyChecking no", "  LogLevel ERROR", ""]))
        self.proc: subprocess.Popen | None = None
        self.log = root / "sshd.log"

    def start(self) -> "Sshd":
        if os.getuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation folder (Debian's service makes it)
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(self.config)], stdout=log, stderr=log)
        wait_for(lambda: self._listening() or self.proc.poll() is not None, timeout=10, what="sshd listening")
        if self.proc.poll() is not None:
            pytest.fail(f"sshd did not start: {self.log.read_text()[-2000:]}")
        return self

    def _listening(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def stream_pids(self) -> list[int]:
        """Pids of the `batchmon stream` processes running in this sshd's sessions."""
        import psutil

        out = []
        for p in psutil.Process(self.proc.pid).children(recursive=True):
            try:
                cmd = p.cmdline()
            except psutil.Error:
                continue
            if "batchmon" in cmd and "stream" in cmd:
                out.append(p.pid)
        return out

    def stop(self) -> None:
        """Stop the listener only (sessions already open live on, as with a real sshd restart)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def sshd(tmp_path):
    if SSHD is None or SSH is None:
        pytest.skip("OpenSSH server/client not installed (apt-get install openssh-server openssh-client)")
    server = Sshd(tmp_path / "sshd")
    yield server
    # end the sessions' streams we started, then the listener
    if server.proc is not None:
        try:
            pids = server.stream_pids() if server.proc.poll() is None else []
        except Exception:  # noqa: BLE001
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    server.stop()


@pytest.fixture
def remote_env(tmp_path, sshd, monkeypatch):
    """Env for a local batchmon whose --host testhost runs this venv's stream on the 'remote' socket folder."""
    remote_dir = protocol.ensure_socket_dir(tmp_path / "remote_sock")
    local_dir = protocol.ensure_socket_dir(tmp_path / "local_sock")
    command = (f"cd {shlex.quote(os.getcwd())} && env BATCHMON_DIR={shlex.quote(str(remote_dir))} "
               f"{shlex.quote(sys.executable)} -m batchmon stream")
    env = {"BATCHMON_DIR": str(local_dir), "BATCHMON_REMOTE_COMMAND": command,
           "BATCHMON_SSH_OPTIONS": f"-F {shlex.quote(str(sshd.client_config))}"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return remote_dir, local_dir, dict(os.environ)


@pytest.fixture
def remote_agent(remote_env):
    remote_dir = remote_env[0]
    pid = LivePid()
    hello = make_hello(pid.pid)
    steps = [make_step(n, batch=8 if n < 5 else 16) for n in range(1, 31)]
    agent = FakeAgent(remote_dir, pid.pid, hello, steps)
    yield pid.pid, hello, steps
    agent.close()
    pid.kill()


def test_once_json_shows_remote_host(sshd, remote_env, remote_agent):
    sshd.start()
    pid, hello, steps = remote_agent
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "batchmon", "--host", HOST, "--once", "--json", "--interval", "0.3"],
                       capture_output=True, text=True, env=remote_env[2], timeout=30)
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["agents"] == []  # the local folder is empty: what follows came through ssh
    assert [w for w in out["warnings"] if w["source"] == HOST] == []
    assert len(out["remote"]) == 1
    remote = out["remote"][0]
    assert remote["source"] == HOST
    assert remote["host"]["hostname"] == socket.gethostname()
    assert remote["host"]["memory_total"] > 0
    assert remote["nvml"]["available"] is False  # the remote box's own NVML answer (no GPU here)
    [agent] = remote["agents"]
    assert agent["source"] == HOST and agent["pid"] == pid and agent["host"] == hello.host
    assert agent["step"] == steps[-1].step
    assert agent["components"] == step_components(steps[-1])
    assert elapsed < 15

    table = subprocess.run([sys.executable, "-m", "batchmon", "--host", HOST, "--host", HOST2, "--once"],
                           capture_output=True, text=True, env=remote_env[2], timeout=30)
    assert table.returncode == 0, table.stderr
    local_part, _, remote_part = table.stdout.partition(f"({HOST})")
    first, _, second = remote_part.partition(f"({HOST2})")
    assert first and second, table.stdout  # each remote box's section is headed with its host name, in order
    for part in (first, second):
        assert str(pid) in part and f"step {steps[-1].step}" in part
    assert NO_AGENTS in local_part


def test_once_unreachable_host_is_a_warning(sshd, remote_env):
    # sshd not started: nothing listens on its port
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "batchmon", "--host", HOST, "--once", "--json"],
                       capture_output=True, text=True, env=remote_env[2], timeout=30)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["remote"] == []
    [w] = [w for w in out["warnings"] if w["source"] == HOST]
    assert w["message"].startswith("cannot connect, retrying in ")
    assert "refused" in w["message"].lower()
    assert time.monotonic() - t0 < 10


def test_once_without_ssh_client_is_a_warning(remote_env, tmp_path):
    env = dict(remote_env[2], PATH=str(tmp_path / "empty_bin"))
    r = subprocess.run([sys.executable, "-m", "batchmon", "--host", HOST, "--once", "--json"],
                       capture_output=True, text=True, env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    [w] = [w for w in json.loads(r.stdout)["warnings"] if w["source"] == HOST]
    assert "ssh not found" in w["message"]


def test_bad_host_name_is_usage_error(remote_env):
    r = subprocess.run([sys.executable, "-m", "batchmon", "--host=-oProxyCommand=x", "--once"],
                       capture_output=True, text=True, env=remote_env[2], timeout=30)
    assert r.returncode == 2 and "bad host name" in r.stderr and "Traceback" not in r.stderr


def _remote(hub: Hub):
    snap = hub.snapshot()
    return next((r for r in snap.remote if r.source == HOST), None)


def _host_warnings(hub: Hub) -> list[str]:
    return [w.message for w in hub.snapshot().warnings if w.source == HOST]


def test_hub_shows_lost_connection_and_reconnects(sshd, remote_env, remote_agent):
    sshd.start()
    pid, hello, steps = remote_agent
    hub = Hub(interval=0.2, socket_dir=remote_env[1], hosts=[HOST]).start()
    try:
        # the history comes as a burst over ssh: a snapshot may land inside it, so wait for its last step
        remote = wait_for(lambda: (r := _remote(hub)) and r.agents and r.agents[0].last_step
                          and r.agents[0].last_step.step == steps[-1].step and r,
                          timeout=15, what="remote agent through ssh, its whole history")
        view = remote.agents[0]
        assert view.source == HOST and view.hello.pid == pid and view.connected
        assert hub.snapshot().agents == ()  # local side sees nothing
        assert _host_warnings(hub) == []
        [link] = hub.links
        assert link.connects == 1

        # The box goes away: sshd stops listening and its stream dies -> the link is lost and retried.
        streams = wait_for(sshd.stream_pids, timeout=5, what="the remote stream process")
        sshd.stop()
        for spid in streams:
            os.kill(spid, signal.SIGKILL)
        msgs = wait_for(lambda: [m for m in _host_warnings(hub) if m.startswith("connection lost, retrying in ")],
                        timeout=10, what="connection lost warning")
        assert len(msgs) == 1
        assert not _remote(hub).agents[0].connected  # kept, shown as disconnected
        attempts = link.attempts
        wait_for(lambda: link.attempts > attempts, timeout=10, what="a retry while sshd is down")
        assert link.connects == 1

        # sshd comes back on the same port: the link reconnects, the warning goes, the agent is live again.
        sshd.start()
        wait_for(lambda: link.connects == 2, timeout=15, what="reconnect after sshd restart")
        wait_for(lambda: _host_warnings(hub) == [] and (r := _remote(hub)) and r.agents
                 and r.agents[0].connected and r.agents[0].last_step is not None
                 and r.agents[0].last_step.step == steps[-1].step, timeout=10,
                 what="remote agent back with its whole history, warning gone")
        assert _remote(hub).agents[0].last_step.step == steps[-1].step
    finally:
        hub.stop()
    assert not hub.running


def body(message) -> dict:
    return json.loads(protocol.encode(message))


def test_link_records_in_hub_state():
    """The state side, without ssh: lost marks the host's agents disconnected and warns; connected clears both."""
    state = HubState()
    hello = make_hello(4242)
    state.ingest({"t": 1.0, "kind": "agent", "source": HOST, "key": "box:4242", "data": body(hello)})
    state.ingest({"t": 1.0, "kind": "agent", "source": HOST, "key": "box:4242", "data": body(make_step(1))})
    state.ingest({"t": 1.1, "kind": "link", "source": HOST, "data": {"state": "connected"}})  # first connect
    state.ingest({"t": 1.2, "kind": "agent", "source": HOST, "key": "box:4242", "data": body(hello)})
    snap = state.snapshot(2.0)
    assert [a.key for a in snap.remote[0].agents] == ["box:4242"] and snap.warnings == ()
    state.ingest({"t": 3.0, "kind": "link", "source": HOST,
                  "data": {"state": "lost", "message": "Connection reset", "retry_in": 4}})
    snap = state.snapshot(3.0)
    assert [(w.source, w.message) for w in snap.warnings] == [
        (HOST, "connection lost, retrying in 4s (Connection reset)")]
    assert snap.remote[0].source == HOST and not snap.remote[0].agents[0].connected
    state.ingest({"t": 4.0, "kind": "link", "source": HOST, "data": {"state": "connected"}})
    snap = state.snapshot(4.0)
    assert snap.warnings == () and snap.remote == ()  # old agents dropped: the new stream resends them
    state.ingest({"t": 5.0, "kind": "link", "source": HOST, "data": {"state": "bogus"}})
    assert [(w.source, w.message) for w in state.snapshot(5.0).warnings] == [
        (HOST, "bad link record: {'state': 'bogus'}")]
