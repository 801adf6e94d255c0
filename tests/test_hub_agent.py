"""The hub against the real agent side: the agent's transport in-process, and batchmon.attach in a torch process."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from batchmon import protocol
from batchmon.monitor.hub import Hub
from batchmon.protocol import Bye
from hub_peer import make_hello, make_step, wait_for


@pytest.fixture
def sockdir(tmp_path):
    return protocol.ensure_socket_dir(tmp_path / "sock")


def started_transport(sockdir, steps: int):
    """The agent's real transport in this process, with a hello and ``steps`` steps of history."""
    transport_mod = pytest.importorskip("batchmon.agent.transport")
    transport = transport_mod.Transport(protocol.socket_path(os.getpid(), sockdir))
    transport.set_hello(make_hello(os.getpid()))
    for n in range(1, steps + 1):
        transport.put(make_step(n))
    transport.start()
    return transport


def test_hub_with_the_agent_transport(sockdir):
    transport = started_transport(sockdir, 1500)
    hub = None
    try:
        wait_for(lambda: transport.running)
        snap = Hub(socket_dir=sockdir).sample_once(max_wait=10.0, quiet=0.5)  # a monitor that connects late
        (view,) = snap.agents
        assert view.hello.pid == os.getpid() and len(view.history) == 1500 and view.invalid_lines == 0

        hub = Hub(interval=0.05, socket_dir=sockdir).start()
        hub.GONE_GRACE_S = 0.2
        wait_for(lambda: hub.snapshot().agents and hub.snapshot().agents[0].last_step.step == 1500)
        transport.put(make_step(1501, batch=32))
        wait_for(lambda: hub.snapshot().agents[0].last_step.step == 1501, what="live step")
        transport.close(Bye())
        # the run ended: it stays as an ended run with its summary (tests/test_ended_runs.py), not running
        ended = wait_for(lambda: hub.snapshot().agents[0].state == "ended" and hub.snapshot().agents[0],
                         what="the run ended")
        assert ended.ended.how == "detached" and ended.ended.steps == 1501 and hub.snapshot().running == ()
        assert hub.running and hub.error is None
    finally:
        transport.close()
        if hub is not None:
            hub.stop()


def test_once_waits_for_exactly_the_history_the_hello_announced(sockdir):
    transport = started_transport(sockdir, 1800)
    try:
        wait_for(lambda: transport.running)
        # quiet=0: no waiting for the lines to go quiet; only the announced count can make the burst complete
        snap = Hub(socket_dir=sockdir).sample_once(max_wait=60.0, quiet=0.0)
        (view,) = snap.agents
        assert view.hello.history == 1800 and len(view.history) == 1800 and view.last_step.step == 1800
    finally:
        transport.close()


TRAIN = textwrap.dedent("""
    import sys, torch, batchmon
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    opt = torch.optim.Adam(model.parameters())
    handle = batchmon.attach(model, opt, name="hubtest")

    def train(steps):
        for _ in range(steps):
            loss = model(torch.randn(8, 32)).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()

    train(20)
    print("trained", flush=True)
    sys.stdin.readline()
    train(5)
    print("more", flush=True)
    sys.stdin.readline()
    handle.detach()
    print("detached", flush=True)
    sys.stdin.readline()
""")


def test_hub_with_a_real_attached_training_process(sockdir):
    pytest.importorskip("batchmon.agent.handle")
    pytest.importorskip("torch")
    env = dict(os.environ, BATCHMON_DIR=str(sockdir))
    proc = subprocess.Popen([sys.executable, "-c", TRAIN], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    hub = None
    try:
        assert proc.stdout.readline().strip() == "trained", proc.stderr.read() if proc.poll() is not None else ""
        hub = Hub(interval=0.05, socket_dir=sockdir).start()  # started after 20 steps: gets them as history

        def view():
            agents = [a for a in hub.snapshot().agents if a.hello.pid == proc.pid]
            return agents[0] if agents else None

        # step numbers, not messages: the agent coalesces fast steps into windows (batchmon.agent.coalesce)
        v = wait_for(lambda: (v := view()) and v.last_step is not None and v.last_step.step >= 20 and v, timeout=30,
                     what="agent history")
        params = (32 * 64 + 64 + 64 * 4 + 4) * 4
        assert v.hello.optimizer == "Adam" and v.hello.name == "hubtest"
        assert v.last_step.components["parameters"] == params
        assert v.last_step.components["gradients"] in (0, params)  # measured at the step, before or after zero_grad
        assert v.last_step.components["optimizer"] >= 2 * params
        assert v.last_step.batch_size == 8
        first_steps = v.last_step.step
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "more"
        wait_for(lambda: view().last_step.step >= first_steps + 5, timeout=30, what="live steps")
        proc.stdin.write("\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "detached"
        # detach() says bye: the run has ended (the process goes on), with how many steps it made
        ended = wait_for(lambda: (v := view()) and v.state == "ended" and v, timeout=30, what="detach")
        assert ended.ended.how == "detached" and ended.ended.steps >= first_steps + 5
        proc.stdin.write("\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
        assert hub.snapshot().running == ()
        assert hub.error is None and not any(w.source.startswith("agent") for w in hub.snapshot().warnings)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if hub is not None:
            hub.stop()
