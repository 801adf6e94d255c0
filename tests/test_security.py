"""Security (issue 7, point 4): another user cannot reach an agent's socket; message fields are only ever text.

The agent is a real training subprocess (CPU torch, batchmon.attach); the other user is ``nobody``, reached
through ``setpriv``/``runuser`` (the tests run as root). Markup-named processes and models go through the real
``--once`` subprocess and the real Textual app (Pilot), and must show literally and do nothing when clicked.
"""

from __future__ import annotations

import dataclasses
import os
import pwd
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

import tui_fixtures as fx
from batchmon import protocol
from batchmon.protocol import ModelInfo
from hub_peer import FakeAgent, LivePid, make_hello, make_step

MARKUP = ("[bold red]x[/]", "[link=file:///etc/passwd]y[/link]", "[@click=app.quit]z[/]")

TRAIN = r"""
import sys, torch, batchmon
torch.manual_seed(0)
model = torch.nn.Linear(8, 2)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
h = batchmon.attach(model, opt)
loss = model(torch.randn(4, 8)).sum(); loss.backward(); opt.step()
print(h.socket_path, flush=True)
sys.stdin.readline()  # hold the socket open until the test is done
"""

CONNECT = r"""
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
try:
    s.connect(sys.argv[1])
except PermissionError as e:
    print("EACCES", e.errno); sys.exit(3)
print("connected", s.recv(4096)[:40]); sys.exit(0)
"""


def as_nobody() -> list[str]:
    if shutil.which("setpriv"):
        return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]
    if shutil.which("runuser"):
        return ["runuser", "-u", "nobody", "--"]
    pytest.skip("neither setpriv nor runuser available")
    return []


@pytest.mark.skipif(os.getuid() != 0, reason="switching to nobody needs root")
def test_another_user_cannot_connect_to_the_agent_socket(preloaded) -> None:
    """The agent's process forks from the session's torch-preloaded server (tests/preloaded.py): its folder and
    socket modes are the agent's own, under the umask any process of this user has."""
    pwd.getpwnam("nobody")
    base = Path(tempfile.mkdtemp(prefix="bms"))
    base.chmod(0o755)  # the parent is open: only the agent's own folder and socket modes keep nobody out
    sockdir = base / "agent"
    proc = preloaded.popen(["-c", TRAIN], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                           env=dict(os.environ, BATCHMON_DIR=str(sockdir)))
    try:
        path = Path(proc.stdout.readline().strip())
        assert path.parent == sockdir and path.exists()
        assert stat.S_IMODE(os.stat(sockdir).st_mode) == 0o700  # created by the agent
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
        # the other user: refused by the kernel
        other = subprocess.run([*as_nobody(), sys.executable, "-c", CONNECT, str(path)], capture_output=True,
                               text=True, timeout=60)
        assert other.returncode == 3, (other.stdout, other.stderr)
        assert other.stdout.split() == ["EACCES", "13"]
        # even with the folder opened, the socket's own 0600 mode refuses nobody
        sockdir.chmod(0o711)
        try:
            other = subprocess.run([*as_nobody(), sys.executable, "-c", CONNECT, str(path)], capture_output=True,
                                   text=True, timeout=60)
        finally:
            sockdir.chmod(0o700)
        assert other.returncode == 3 and other.stdout.split() == ["EACCES", "13"], (other.stdout, other.stderr)
        # the owner (root here) connects and gets the hello
        mine = subprocess.run([sys.executable, "-c", CONNECT, str(path)], capture_output=True, text=True, timeout=60)
        assert mine.returncode == 0 and f'"pid":{proc.pid},' in mine.stdout, (mine.stdout, mine.stderr)
    finally:
        proc.stdin.close()
        proc.wait(30)
        shutil.rmtree(base, ignore_errors=True)
    assert proc.returncode == 0


@pytest.fixture
def sockdir(tmp_path):
    return protocol.ensure_socket_dir(tmp_path / "sock")


def test_markup_in_agent_fields_prints_literally_in_once(sockdir, tmp_path) -> None:
    pid = LivePid()
    hello = make_hello(pid.pid, argv=("train.py", MARKUP[0], MARKUP[1]), name=None,
                       model=ModelInfo(MARKUP[2], 1000, 4000), optimizer=MARKUP[0], device="cpu")
    agent = FakeAgent(sockdir, pid.pid, hello, [make_step(n) for n in range(1, 6)])
    canary = tmp_path / "canary"
    try:
        env = dict(os.environ, BATCHMON_DIR=str(sockdir), COLUMNS="200")
        r = subprocess.run([sys.executable, "-m", "batchmon", "--once"], capture_output=True, text=True, env=env,
                           timeout=60, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert MARKUP[0] in r.stdout and MARKUP[1] in r.stdout, r.stdout
        assert "\x1b]8;" not in r.stdout  # no OSC 8 hyperlink was made of the link markup
        # the JSON output carries them as plain strings too
        r = subprocess.run([sys.executable, "-m", "batchmon", "--once", "--json"], capture_output=True, text=True,
                           env=env, timeout=60, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        import json

        (a,) = json.loads(r.stdout)["agents"]
        assert a["argv"] == list(hello.argv) and a["model"]["class"] == MARKUP[2] and a["optimizer"] == MARKUP[0]
        assert not canary.exists() and not (tmp_path / "etc").exists()
    finally:
        agent.close()
        pid.kill()


def markup_snapshot():
    snap = fx.one_gpu(1, markup_names=True)
    (view,) = snap.agents
    hello = dataclasses.replace(view.hello, argv=("python", *MARKUP), name=None,
                                model=ModelInfo(MARKUP[2], 355_000_000, 355_000_000 * 4), optimizer=MARKUP[0])
    return dataclasses.replace(snap, agents=(dataclasses.replace(view, hello=hello),))


async def test_markup_in_names_is_literal_on_screen_and_clicking_it_does_nothing() -> None:
    from batchmon.tui.app import BatchmonApp

    app = BatchmonApp(snapshot=markup_snapshot())
    async with app.run_test(size=(160, 48)) as pilot:
        await fx.wait_for(pilot, lambda: app.renders >= 1)
        text = fx.screen_text(app)
        for m in MARKUP:
            assert m in text, m
        lines = text.splitlines()
        for m in MARKUP:
            for y, line in enumerate(lines):
                x = line.find(m)
                if x >= 0:
                    await pilot.click(offset=(x + len(m) - 3, y))  # on the 'z' / 'y' / 'x' of the markup
                    await pilot.pause()
        assert app.is_running and app.return_code is None
        assert MARKUP[2] in fx.screen_text(app)
