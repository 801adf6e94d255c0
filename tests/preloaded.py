"""A fork server that imported torch once, for the tests whose subject is a training script, not its interpreter.

A fresh ``python`` that imports torch costs ~3.4 CPU s on the 2-core CI box, and its first optimizer another
~2.3 (torch._dynamo, sympy); a child forked from this server costs ~0.05 s. The child is a real process with
its own pid: it runs the script (``path``, ``-c code`` or ``-m module``) as ``__main__`` with the argv, env,
cwd and stdio it is given, ends with the script's exit status (``sys.exit``, an exception: 1, a signal: -N as
``subprocess`` reports it) and can be signalled and waited on like a ``subprocess.Popen``.

What it is not: a fresh interpreter. The child imports the first ``sitecustomize`` on its PYTHONPATH as a fresh
interpreter's start does (so ``batchmon run``'s environment attaches the agent: torch is already imported, so its
bootstrap attaches at once instead of through its ``import torch`` hook) and applies OMP_NUM_THREADS; whatever
else is read at interpreter start or at torch's import (other OMP_* variables) comes from the server's start, so
the tests of those behaviours, and of ``batchmon run``'s launch and injection, launch real interpreters; this server runs the plain reference runs and scripts that attach in their own code.
The server imports no batchmon module (a plain run must have none loaded) and runs no torch op before a fork
(OpenMP's thread pool is not fork-safe once started): each child starts its own threads.

Protocol (one unix socket connection per child): the client sends one JSON line {argv, env, cwd} with its stdin,
stdout and stderr as SCM_RIGHTS fds; the server answers ``pid N`` then, when the child has ended, ``status S``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SERVER = r"""
import json, os, runpy, selectors, signal, socket, sys, traceback, types
import torch, torch._dynamo, torch.optim  # the imports every child would pay for (no torch op: no threads)
import numpy

listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
listener.bind(sys.argv[1])
listener.listen(64)
base_path = list(sys.path[1:])  # without the server's own '' (a script gets its folder instead)
print("ready", flush=True)


def child(conn, request, fds):
    listener.close()
    for i, fd in enumerate(fds[:3]):
        os.dup2(fd, i)
    os.closerange(3, 1 << 16)  # nothing of the server's or the client's is left open (conn included)
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    threads = request["env"].get("OMP_NUM_THREADS", "")
    if threads.isdigit() and int(threads) > 0:  # what a fresh interpreter's OpenMP would take from it at start
        torch.set_num_threads(int(threads))
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD):
        signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    sys.stdin = open(0, closefd=False)
    sys.stdout = open(1, "w", buffering=1 if os.isatty(1) else -1, closefd=False)  # as a fresh interpreter's
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    argv = request["argv"]
    extra = [p for p in request["env"].get("PYTHONPATH", "").split(os.pathsep) if p]
    sys.path[:] = [*extra, *base_path]
    sys.modules.pop("sitecustomize", None)
    try:  # as site.py at a fresh interpreter's start: the first sitecustomize on this child's path
        import sitecustomize
    except ImportError as exc:
        if exc.name != "sitecustomize":
            traceback.print_exc()
    except Exception:
        traceback.print_exc()
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path[:] = ["", *extra, *base_path]
            main = types.ModuleType("__main__")  # a module of its own, as `python -c`'s (pickle finds its classes)
            main.__dict__["__builtins__"] = __builtins__
            sys.modules["__main__"] = main
            exec(compile(argv[1], "<string>", "exec"), main.__dict__)
        elif argv[0] == "-m":
            sys.argv = [argv[1], *argv[2:]]
            sys.path[:] = [request["cwd"], *extra, *base_path]
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        else:
            sys.argv = list(argv)
            sys.path[:] = [os.path.dirname(os.path.abspath(argv[0])), *extra, *base_path]
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else (print(e.code, file=sys.stderr), 1)[1])
    except KeyboardInterrupt:
        traceback.print_exc()
        code = -signal.SIGINT  # CPython dies of SIGINT after an uncaught KeyboardInterrupt (after atexit)
    except BaseException:
        traceback.print_exc()
        code = 1
    import atexit, threading
    threading._shutdown()  # as the interpreter's exit: join the non-daemon threads, then the atexit functions
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except Exception:
            pass
    if code == -signal.SIGINT:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    os._exit(code & 0xFF)


parent = os.getppid()
children = {}  # pid -> connection
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ)
while os.getppid() == parent:  # the test session ended (even killed): so does the server
    for key, _ in sel.select(timeout=0.02):
        conn, _ = listener.accept()
        data = b""
        fds = []
        while not data.endswith(b"\n"):
            msg, got, _flags, _addr = socket.recv_fds(conn, 1 << 20, 8)
            if not msg:
                break
            data += msg
            fds += got
        if not data.endswith(b"\n"):
            conn.close()
            continue
        pid = os.fork()
        if pid == 0:
            try:
                child(conn, json.loads(data), fds)
            finally:
                os._exit(70)  # never back into the server's loop
        for fd in fds:
            os.close(fd)
        conn.sendall(b"pid %d\n" % pid)
        children[pid] = conn
    while children:
        pid, status = os.waitpid(-1, os.WNOHANG)
        if pid == 0:
            break
        conn = children.pop(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        try:
            conn.sendall(b"status %d\n" % code)
        except OSError:
            pass
        conn.close()
"""


class Child:
    """The part of ``subprocess.Popen`` the tests use, for a child of the fork server: pid, signals, wait,
    communicate (stdout and stderr read in threads when they are pipes)."""

    def __init__(self, conn: socket.socket, pid: int, stdin: Any, stdout: Any, stderr: Any, args: list[str]) -> None:
        self.args = args
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = stdin
        self.stdout = stdout
        self.stderr = stderr
        self._conn = conn
        self._buf = b""

    def poll(self) -> int | None:
        if self.returncode is None:
            self._conn.setblocking(False)
            try:
                self._read_status()
            except BlockingIOError:
                pass
            finally:
                self._conn.setblocking(True)
        return self.returncode

    def _read_status(self) -> None:
        while not self._buf.endswith(b"\n"):
            data = self._conn.recv(64)
            if not data:
                raise RuntimeError("the fork server went away before the child's status")
            self._buf += data
        word, value = self._buf.split()
        assert word == b"status", self._buf
        self.returncode = int(value)
        self._conn.close()

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            self._conn.settimeout(timeout)
            try:
                self._read_status()
            except socket.timeout:
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0) from None
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[Any, Any]:
        if self.stdin is not None and not self.stdin.closed:
            try:
                self.stdin.close()  # as Popen's: the child sees the end of its input
            except BrokenPipeError:
                pass
        results: dict[str, Any] = {}
        readers = [threading.Thread(target=lambda n=name, f=f: results.__setitem__(n, f.read()), daemon=True)
                   for name, f in (("stdout", self.stdout), ("stderr", self.stderr)) if f is not None]
        for t in readers:
            t.start()
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in readers:
            t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
            if t.is_alive():
                raise subprocess.TimeoutExpired(self.args, timeout or 0.0)
        self.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        for f in (self.stdout, self.stderr):
            if f is not None:
                f.close()
        return results.get("stdout"), results.get("stderr")


class ForkServer:
    """One server process for the session; ``popen``/``run`` fork a child of it per call."""

    def __init__(self, env: dict[str, str] | None = None) -> None:
        self._dir = tempfile.mkdtemp(prefix="bmfs")
        self.path = str(Path(self._dir) / "s")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, self.path], stdout=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})}, start_new_session=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            raise RuntimeError(f"the fork server did not start: {line!r}, exit {self.proc.wait()}")

    def popen(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
              stdin: int | None = None, stdout: int | None = None, stderr: int | None = None,
              text: bool = False) -> Child:
        """Start ``argv`` (without the interpreter: ``["train.py", ...]``, ``["-c", code, ...]`` or ``["-m",
        mod, ...]``) in a forked child; stdio as Popen's (None: this process's, subprocess.PIPE, subprocess.DEVNULL
        or an fd)."""
        ours: list[int] = []  # the child's ends, closed here once sent
        mine: dict[str, Any] = {}

        def end(value: int | None, name: str, fd: int, read: bool) -> int:
            if value is None:
                return fd
            if value == subprocess.DEVNULL:
                ours.append(os.open(os.devnull, os.O_RDWR))
                return ours[-1]
            if value == subprocess.PIPE:
                r, w = os.pipe()
                child_end, my_end = (r, w) if read else (w, r)
                ours.append(child_end)
                mine[name] = os.fdopen(my_end, ("w" if read else "r") + ("" if text else "b"))
                return child_end
            return value

        fds = [end(stdin, "stdin", 0, True), end(stdout, "stdout", 1, False), end(stderr, "stderr", 2, False)]
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(self.path)
        request = {"argv": [str(a) for a in argv], "env": dict(os.environ if env is None else env),
                   "cwd": str(cwd or os.getcwd())}
        socket.send_fds(conn, [json.dumps(request).encode() + b"\n"], fds)
        for fd in ours:
            os.close(fd)
        buf = b""
        while not buf.endswith(b"\n"):
            data = conn.recv(1)
            if not data:
                raise RuntimeError("the fork server closed the connection before the child's pid")
            buf += data
        word, value = buf.split()
        assert word == b"pid", buf
        return Child(conn, int(value), mine.get("stdin"), mine.get("stdout"), mine.get("stderr"), list(argv))

    def run(self, argv: list[str], *, env: dict[str, str] | None = None, cwd: str | os.PathLike[str] | None = None,
            timeout: float | None = None, input: str | None = None) -> subprocess.CompletedProcess[str]:
        """``subprocess.run(..., capture_output=True, text=True)`` in a forked child."""
        child = self.popen(argv, env=env, cwd=cwd, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if input is not None:
            child.stdin.write(input)
            child.stdin.close()
        try:
            out, err = child.communicate(timeout)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
            raise
        return subprocess.CompletedProcess(argv, child.wait(), out, err)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)
