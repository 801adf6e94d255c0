"""`batchmon run`: real child processes; exit codes, signals, stdio, errors, and the agent attached in the child."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from batchmon.protocol import Hello, Step
from agent_helpers import EXAMPLES, ROOT, Reader, agent_dir, batchmon_cmd, run_batchmon, wait_for  # noqa: F401

PY = sys.executable


def default_signals() -> None:
    """In the launcher before exec: the signals it is sent start at their defaults, as from a terminal, whatever
    this test process holds at that moment (an ignored SIGINT would be inherited by the child and lost)."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def test_exit_code_passes_through():
    result = run_batchmon("run", "--", PY, "-c", "import sys; sys.exit(3)")
    assert result.returncode == 3 and result.stderr == ""


def test_stdin_stdout_stderr_pass_through():
    code = "import sys; data = sys.stdin.read(); print(data.upper()); print('to-err', file=sys.stderr)"
    result = run_batchmon("run", PY, "-c", code, input="hello batchmon\n")
    assert result.returncode == 0
    assert result.stdout == "HELLO BATCHMON\n\n" and result.stderr == "to-err\n"


def test_empty_command_is_a_usage_error():
    for args in (["run"], ["run", "--"]):
        result = run_batchmon(*args)
        assert result.returncode == 2
        assert result.stderr.strip() == "batchmon: error: run needs a command, e.g. batchmon run -- python train.py"
        assert "Traceback" not in result.stderr


def test_batch_dim_reaches_the_childs_agent(agent_dir):
    """``--batch-dim N``: the agent in the child takes dimension N of the input as the batch, and says so."""
    code = ("import torch, json\n"
            "from batchmon.agent import handle\n"
            "m = torch.nn.Linear(4, 2); o = torch.optim.SGD(m.parameters(), lr=0.1)\n"
            "m(torch.randn(30, 7, 4)).sum().backward(); o.step()\n"
            "s = handle.current().last_step; print(json.dumps([s.batch_size, s.batch_source]))\n")
    result = run_batchmon("run", "--batch-dim", "1", "--", PY, "-c", code, env={"BATCHMON_DIR": str(agent_dir)},
                          timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1]) == [7, "input dim 1 (BATCHMON_BATCH_DIM)"]


@pytest.mark.parametrize("value", ["-1", "x", "1.5"])
def test_bad_batch_dim_is_a_usage_error(value):
    result = run_batchmon("run", "--batch-dim", value, "--", PY, "-c", "pass")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--batch-dim" in result.stderr.strip().splitlines()[-1]


def test_unknown_program_exits_127_with_one_line():
    result = run_batchmon("run", "--", "no-such-program-batchmon-test", "--flag")
    assert result.returncode == 127
    assert result.stderr.strip().splitlines() == ["batchmon: error: no-such-program-batchmon-test: command not found"]


def test_not_executable_exits_126(tmp_path):
    script = tmp_path / "train.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    script.chmod(0o644)
    result = run_batchmon("run", "--", str(script))
    assert result.returncode == 126 and len(result.stderr.strip().splitlines()) == 1


def _start(child_code: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    proc = subprocess.Popen(batchmon_cmd("run", "--", PY, "-c", child_code), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})},
                            preexec_fn=default_signals)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"  # the child is up and has its handlers
    return proc


SLEEPER = "import time; print('ready', flush=True); time.sleep(120)"
HANDLER = ("import signal, sys, time\n"
           "signal.signal(signal.SIGTERM, lambda *a: (print('child got SIGTERM', flush=True), sys.exit(7)))\n"
           "print('ready', flush=True)\n"
           "time.sleep(120)\n")


def test_sigterm_is_forwarded_to_the_child():
    proc = _start(HANDLER)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 7 and "child got SIGTERM" in out  # the child handled it and chose its code


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 128 + 15), (signal.SIGINT, 128 + 2),
                                        (signal.SIGHUP, 128 + 1)])
def test_death_by_signal_is_reported_as_128_plus_n(sig, code):
    proc = _start(SLEEPER)
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode == code


def test_a_child_killed_by_a_signal_leaves_no_socket_only_its_exit_note(agent_dir):
    """SIGTERM kills the child before its agent can remove its socket: the launcher removes the dead socket
    (nothing listens there) and leaves the exit note, so the folder holds no dead socket without a monitor."""
    code = ("import time, torch\n"
            "m = torch.nn.Linear(2, 2); o = torch.optim.SGD(m.parameters(), lr=0.1)\n"
            "m(torch.randn(3, 2)).sum().backward(); o.step()\n"
            "print('ready', flush=True); time.sleep(120)\n")
    proc = _start(code, env={"BATCHMON_DIR": str(agent_dir)})
    wait_for(lambda: any(agent_dir.glob("*.sock")), timeout=60)
    (sock,) = agent_dir.glob("*.sock")
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode == 128 + 15
    assert not sock.exists()
    assert (agent_dir / f"{sock.stem}.exit").read_text().strip() == "-15"


def test_child_env_puts_bootstrap_first_and_keeps_pythonpath():
    from batchmon.agent.bootstrap import FOLDER
    from batchmon.cli.run import child_env

    env = child_env({"PYTHONPATH": f"/a{os.pathsep}/b", "HOME": "/h"})
    assert env["PYTHONPATH"].split(os.pathsep) == [FOLDER, "/a", "/b"]
    assert env["BATCHMON_AUTO"] == "1" and env["HOME"] == "/h"


def test_python_without_torch_never_loads_it_and_other_sitecustomize_still_runs(tmp_path):
    other = tmp_path / "site"
    other.mkdir()
    (other / "sitecustomize.py").write_text("import builtins\nbuiltins.OTHER_SITECUSTOMIZE = True\n")
    code = "import sys, builtins; print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'), " \
           "getattr(builtins, 'OTHER_SITECUSTOMIZE', False), 'batchmon.agent.bootstrap' in sys.modules)"
    result = run_batchmon("run", "--", PY, "-c", code, env={"PYTHONPATH": str(other)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[] True True"


def test_agent_attaches_to_an_unmodified_script(agent_dir):
    result = run_batchmon("run", "--", PY, str(EXAMPLES / "train_mlp.py"), "--steps", "5", "--report",
                          "--device", "cpu", "--hidden", "16", "--layers", "2", "--batch-size", "8",
                          env={"BATCHMON_DIR": str(agent_dir)}, timeout=180)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["attached"] is True and report["model"] == "Sequential" and report["optimizer"] == ["Adam"]
    assert report["steps"] == 5 and report["batch_size"] == 8
    assert report["components"]["activations"] == 2 * 8 * 16 * 4 + 8 * 10 * 4 + 4  # ReLUs + loss
    assert report["components"]["batch"] == 8 * 64 * 4 + 8 * 8  # inputs and targets
    assert not Path(report["socket"]).exists()  # removed at exit


def test_monitor_connects_to_the_child_during_the_run(agent_dir):
    proc = subprocess.Popen(
        batchmon_cmd("run", "--", PY, str(EXAMPLES / "train_mlp.py"), "--steps", "0", "--sleep", "0.02",
                     "--device", "cpu", "--hidden", "16", "--layers", "1"),
        env={**os.environ, "BATCHMON_DIR": str(agent_dir)}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        text=True, cwd=ROOT)
    try:
        sock = wait_for(lambda: next(iter(agent_dir.glob("*.sock")), None) if agent_dir.exists() else None,
                        what="the child's agent socket")
        reader = Reader(sock)
        reader.until(lambda ms: sum(isinstance(m, Step) for m in ms) >= 3)
        hello = reader.messages[0]
        assert isinstance(hello, Hello) and hello.pid == int(sock.stem) and hello.pid != proc.pid
        assert any(a.endswith("train_mlp.py") for a in hello.argv) and hello.model.cls == "Sequential"
        reader.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
