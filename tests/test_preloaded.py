"""The tests' torch-preloaded fork server (tests/preloaded.py) keeps what the tests that use it rely on from a
fresh interpreter: argv, env, cwd, stdio, exit status, signals, `__main__`, PYTHONPATH and its sitecustomize."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from agent_helpers import ROOT

SHOW = ("import json, os, sys\n"
        "print(json.dumps([sys.argv, os.getcwd(), os.environ.get('ST_X'), 'torch' in sys.modules,\n"
        "                  'batchmon' in sys.modules, sys.path[0]]))\n")


def test_argv_env_cwd_stdio_and_exit_status(preloaded, tmp_path):
    import json

    r = preloaded.run(["-c", SHOW + "sys.stderr.write('to-err'); sys.exit(5)", "a", "b"], cwd=tmp_path,
                      env={**os.environ, "ST_X": "1"})
    assert r.returncode == 5 and r.stderr == "to-err"
    argv, cwd, x, torch_loaded, batchmon_loaded, first = json.loads(r.stdout)
    assert argv == ["-c", "a", "b"] and cwd == str(tmp_path) and x == "1" and first == ""
    assert torch_loaded and not batchmon_loaded  # torch preloaded; no batchmon module in a plain child
    assert preloaded.run(["-c", "import sys; print(sys.stdin.read()[::-1])"], input="abc").stdout == "cba\n"
    assert preloaded.run(["-c", "raise ValueError('x')"]).returncode == 1


def test_script_path_and_module_and_pickled_main_classes(preloaded, tmp_path):
    script = tmp_path / "s.py"
    script.write_text("import pickle, sys\nclass A: pass\nprint(sys.argv, sys.path[0], len(pickle.dumps(A())) > 0)\n")
    r = preloaded.run([str(script), "--flag"])
    assert r.returncode == 0 and r.stdout.strip() == f"[{str(script)!r}, '--flag'] {tmp_path} True"
    r = preloaded.run(["-m", "batchmon", "--help"], cwd=ROOT)
    assert r.returncode == 0 and "usage" in r.stdout.lower()


def test_signals_reach_a_real_process_with_its_own_pid(preloaded):
    code = "import os, time; print(os.getpid(), flush=True); time.sleep(60)"
    for sig, want in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, -signal.SIGINT), (signal.SIGKILL, -9)):
        child = preloaded.popen(["-c", code], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert int(child.stdout.readline()) == child.pid != os.getpid()
        assert child.poll() is None
        child.send_signal(sig)
        assert child.wait(30) == want  # SIGINT: KeyboardInterrupt, then died of SIGINT as CPython does
        child.stdout.close()


def test_pythonpath_and_its_sitecustomize_as_at_interpreter_start(preloaded, tmp_path):
    (tmp_path / "sitecustomize.py").write_text("import builtins\nbuiltins.ST_SITE = True\n")
    (tmp_path / "st_mod.py").write_text("X = 7\n")
    code = "import builtins, st_mod; print(getattr(builtins, 'ST_SITE', False), st_mod.X)"
    r = preloaded.run(["-c", code], env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert r.stdout.strip() == "True 7", r.stderr
    fresh = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(tmp_path)},
                           capture_output=True, text=True, timeout=60)
    assert fresh.stdout == r.stdout  # what a fresh interpreter does with the same environment
    assert preloaded.run(["-c", "import builtins; print(hasattr(builtins, 'ST_SITE'))"]).stdout == "False\n"
