"""`batchmon run [--] CMD ARGS...`: run a training command with the agent attached, no code change.

The command runs as a child with stdin/stdout/stderr inherited, BATCHMON_AUTO=1 and batchmon's bootstrap
folder first on PYTHONPATH (batchmon.agent.bootstrap: every Python process it starts attaches the agent when it
imports torch). Signals sent to the launcher (SIGINT, SIGTERM, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2) are passed
to the child, except those the terminal sent to the whole foreground process group, which the child already
got once; the exit code is the child's, or 128+N when signal N ended it, as shells report it.

``--batch-dim N`` tells the agent which dimension of the model's input is the batch (BATCHMON_BATCH_DIM in the
child), where the agent cannot find it (batchmon.agent.batch_dim).

This process never imports torch.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
from typing import Mapping, Sequence

from batchmon import protocol
from batchmon.agent.bootstrap import ENV_FLAG, FOLDER
from batchmon.errors import CliError

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2)
SI_KERNEL = 0x80  # si_code of a signal the kernel raised (terminal keys, hangup), not kill()
USAGE = "run needs a command, e.g. batchmon run -- python train.py"


ENV_BATCH_DIM = "BATCHMON_BATCH_DIM"  # read by batchmon.agent.batch_dim (same name; agent/ is not imported here)


def _batch_dim(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``run`` subcommand's options (called by batchmon.cli.main)."""
    parser.add_argument("--batch-dim", type=_batch_dim, metavar="N",
                        help="the batch is dimension N of the model's first tensor input (default: found from the "
                             "model's batch_first layers, else 0)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="[--] CMD ARGS...")


def main(args: argparse.Namespace) -> int:
    cmd = list(getattr(args, "cmd", None) or [])
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd or not cmd[0]:
        raise CliError(USAGE, code=2)
    executable = resolve(cmd[0])
    return run(cmd, executable, child_env(os.environ, getattr(args, "batch_dim", None)))


def child_env(environ: Mapping[str, str], batch_dim: int | None = None) -> dict[str, str]:
    """The child's environment: the agent's bootstrap folder first on PYTHONPATH, auto-attach on."""
    env = dict(environ)
    env[ENV_FLAG] = "1"
    if batch_dim is not None:
        env[ENV_BATCH_DIM] = str(batch_dim)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != FOLDER]
    env["PYTHONPATH"] = os.pathsep.join([FOLDER, *rest])
    return env


def resolve(program: str) -> str:
    """The executable to run, like a shell finds it; CliError 127 when there is none, 126 when not runnable."""
    if os.sep in program:
        if not os.path.exists(program):
            raise CliError(f"{program}: no such file", code=127)
        if os.path.isdir(program) or not os.access(program, os.X_OK):
            raise CliError(f"{program}: not executable", code=126)
        return program
    found = shutil.which(program)
    if found is None:
        raise CliError(f"{program}: command not found", code=127)
    return found


def run(cmd: Sequence[str], executable: str, env: Mapping[str, str]) -> int:
    """Run the child to completion, forwarding signals; returns its exit status shell-style."""
    waited = set(FORWARDED) | {signal.SIGCHLD}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, waited)

    def restore_mask() -> None:  # in the child, before exec: the command gets the mask we started with
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    try:
        try:
            child = subprocess.Popen(list(cmd), executable=executable, env=dict(env), preexec_fn=restore_mask)
        except OSError as exc:
            raise CliError(f"{cmd[0]}: {exc.strerror or exc}", code=126) from None
        while True:
            code = child.poll()
            if code is not None:
                break
            info = signal.sigtimedwait(waited, 0.5)
            if info is None or info.si_signo == signal.SIGCHLD:
                continue
            if info.si_code == SI_KERNEL:
                continue  # from the terminal: the child, in the same foreground process group, has it too
            try:
                child.send_signal(info.si_signo)
            except ProcessLookupError:
                pass
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    leave_exit_note(child.pid, code, env)
    remove_dead_socket(child.pid, env)
    return code if code >= 0 else 128 - code


def remove_dead_socket(pid: int, env: Mapping[str, str]) -> None:
    """A child killed by a signal (SIGTERM, SIGKILL) cannot remove its agent's socket: the launcher, which saw it
    end, removes ``<pid>.sock`` when nothing listens there, so the folder holds no dead socket when no monitor ran
    to clear it (and a script that waits for N sockets is not misled). The exit note stays for monitors."""
    from batchmon.monitor.agent_sockets import AgentConnection, ConnectResult, unlink_stale

    try:
        path = protocol.socket_dir(env) / f"{pid}.sock"
        connection = AgentConnection(pid, path, key="")
        if connection.connect() == ConnectResult.STALE:
            unlink_stale(path)
        connection.close()
    except OSError:
        pass


def leave_exit_note(pid: int, returncode: int, env: Mapping[str, str]) -> None:
    """``<socket folder>/<pid>.exit``: the child's exit status (Popen's returncode) for monitors, which cannot
    see it (an agent's goodbye comes before the exit). Only into a folder that exists and is safe; never changes
    the launcher's exit."""
    try:
        directory = protocol.socket_dir(env)
        protocol.check_socket_dir(directory)
        fd = os.open(directory / f"{pid}.exit", os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, f"{returncode}\n".encode())
        finally:
            os.close(fd)
    except OSError:
        pass
