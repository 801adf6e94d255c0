"""Suite-wide set-up.

Signals: a shell that starts the suite in the background (``cmd &`` without job control, ``nohup``) leaves
SIGINT/SIGQUIT/SIGHUP ignored, and children inherit ignored signals through exec. The launcher, recorder and
exporter tests send those signals to real child processes, so the suite restores the defaults first: what they
test is batchmon's handling, not how the suite was started.
"""

from __future__ import annotations

import signal

for _sig, _default in ((signal.SIGINT, signal.default_int_handler), (signal.SIGQUIT, signal.SIG_DFL),
                       (signal.SIGHUP, signal.SIG_DFL)):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, _default)


# ----------------------------------------------------------------------------------------- shared helpers
# Imported by name (`from conftest import wait_until, make_step`): tests/ is on sys.path (rootdir conftest).

import asyncio  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

import pytest  # noqa: E402
from typing import Any, Callable  # noqa: E402

from batchmon.protocol import COMPONENTS, PHASES, Step  # noqa: E402

T_STEP0 = 1_700_000_000.0


def wait_until(predicate: Callable[[], Any], timeout: float = 20.0, what: str = "condition",
               poll: float = 0.01) -> Any:
    """Poll ``predicate()`` until it is truthy and return its value; fail after ``timeout`` seconds. The one way
    tests wait for something another thread or process does (never a fixed sleep as synchronisation)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(poll)


async def wait_until_async(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "condition",
                           poll: float = 0.01) -> Any:
    """wait_until for a test running on an event loop (the loop keeps running while it waits)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(poll)


def make_step(n: int = 7, batch: int | None = 32, *, time: float | None = None, step_seconds: float | None = 0.1,
              components: dict[str, int] | None = None, phases: tuple[int, int, int] | None = None,
              **fields: Any) -> Step:
    """The one Step builder: step ``n`` at ``batch``, 0.1 s apart from T_STEP0, components that grow with the
    batch (activations and batch data); any other Step field (allocated, peak_allocated, reserved,
    device_used, peak_phase, phase_peaks, ...) by keyword, None by default.

    ``phases=(forward, backward, optimizer)``: a step the agent sampled for the peak's phase: the peak reached by
    the end of each phase (cumulative, as the agent sends them) as ``phase_peaks``, and ``peak_phase`` the first
    phase that reached the step's peak, unless given."""
    if phases is not None:
        fields["phase_peaks"] = dict(zip(PHASES, phases))
        fields.setdefault("peak_phase", PHASES[phases.index(max(phases))])
    if components is None:
        components = {name: (i + 1) * 1000 + ((batch or 0) * 10 if name in ("activations", "batch") else 0)
                      for i, name in enumerate(COMPONENTS)}
    return Step(step=n, time=T_STEP0 + n * 0.1 if time is None else time, step_seconds=step_seconds,
                batch_size=batch, components=components, **fields)


#: tests that take ten seconds or more on the 2-core CI box (a full run's --durations, 2026-11-30), marked slow
#: here in one list so that `python -m pytest -m "not slow"` is the fast subset; a module listed whole is slow in
#: every test. Tests may also carry @pytest.mark.slow themselves (tmux, torch.compile, the pattern corpus).
SLOW_TESTS = (
    "test_ddp.py",  # real torchrun jobs
    "test_memory_model_bench.py::test_cpu_smoke_run_writes_json_and_markdown",
    "test_memory_model_bench.py::test_cpu_smoke_with_batchmons_agent_as_the_observer",
    "test_memory_model_lstm.py",
    "test_integrations.py::test_lightning_ddp_every_rank_attaches",
    "test_hub_state.py::test_ingest_never_raises_and_snapshot_always_builds",  # hypothesis
    "test_protocol.py::test_decode_of_typed_garbage_is_a_message_or_protocol_error",  # hypothesis
    "test_agent_socket.py::test_two_agents_in_two_processes",
    "test_agent_socket.py::test_run_dying_of_oom_waits_briefly_for_a_first_monitor",
    "test_replay_streaming.py::test_replay_once_of_a_60mb_recording_stays_under_150mb",
    "test_security.py::test_another_user_cannot_connect_to_the_agent_socket",
    "test_launcher.py::test_monitor_connects_to_the_child_during_the_run",
    "test_launcher.py::test_agent_attaches_to_an_unmodified_script",
    "test_launcher.py::test_batch_dim_reaches_the_childs_agent",
    "test_hub_agent.py::test_hub_with_a_real_attached_training_process",
    "test_agent_examples.py",  # real example training runs
    "test_faults_agent.py::test_monitor_that_never_reads",
    "test_faults_agent_2.py::test_sigpipe_at_default_and_monitors_that_hang_up",
    # real `batchmon run` launches or bench runs of torch processes (2026-12-01's full run, load 3-6: 7-22 s)
    "test_ended_runs.py::test_batchmon_run_tells_the_monitor_its_childs_exit_code_and_signal",
    "test_tui_demo.py::test_demo_runs_from_outside_the_checkout_shows_its_run_and_stops_it_on_quit",
    "test_hook_floor_bench.py::test_hook_floor_breakdown_times_each_kind_alone",
    "test_hook_floor_bench.py::test_hook_floor_writes_the_four_modes",
)


# ----------------------------------------------------------------------------- torch processes, counted
# BATCHMON_TEST_TORCH_LOG=FILE python -m pytest ...: every child Python process that imports torch writes a line to
# FILE (the test it ran under), and the summary counts them per file: the suite's dominant cost (~3.4 CPU s each),
# counted deterministically where wall times on a shared box are not. A sitecustomize first on PYTHONPATH logs
# (batchmon run's bootstrap chains to it); a child whose environment drops PYTHONPATH goes uncounted.

TORCH_LOG_SITE = r"""
import os, sys

class _TorchImportLog:
    done = False  # not removed from sys.meta_path: the import system is iterating over it (the next finder,
                  # e.g. batchmon run's bootstrap hook, would be skipped)

    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not self.done:
            self.done = True
            try:
                with open(os.environ["BATCHMON_TEST_TORCH_LOG"], "a") as f:
                    f.write("%d\t%s\t%s\n" % (os.getpid(), os.environ.get("PYTEST_CURRENT_TEST", "-"),
                                               " ".join(sys.argv)[:200].replace("\n", " ")))
            except (KeyError, OSError):
                pass
        return None

if os.environ.get("BATCHMON_TEST_TORCH_LOG"):
    sys.meta_path.insert(0, _TorchImportLog())
"""


def pytest_configure(config: Any) -> None:
    log = os.environ.get("BATCHMON_TEST_TORCH_LOG")
    if not log:
        return
    import tempfile

    folder = tempfile.mkdtemp(prefix="bmtorchlog")
    with open(os.path.join(folder, "sitecustomize.py"), "w") as f:
        f.write(TORCH_LOG_SITE)
    os.environ["PYTHONPATH"] = os.pathsep.join([folder, *filter(None, [os.environ.get("PYTHONPATH")])])


def pytest_terminal_summary(terminalreporter: Any) -> None:
    log = os.environ.get("BATCHMON_TEST_TORCH_LOG")
    if not log or not os.path.exists(log):
        return
    import collections

    per_file: collections.Counter[str] = collections.Counter()
    with open(log) as f:
        for line in f:
            test = line.split("\t")[1]
            per_file[test.split("::")[0] if test != "-" else "(outside a test)"] += 1
    terminalreporter.write_sep("-", f"child processes that imported torch: {sum(per_file.values())} ({log})")
    for name, count in per_file.most_common():
        terminalreporter.write_line(f"{count:4d} {name}")


def pytest_collection_modifyitems(config: Any, items: list[Any]) -> None:
    slow_mark = __import__("pytest").mark.slow
    for item in items:
        node = item.nodeid.removeprefix("tests/")
        if any(node == name or node.startswith(name + "::") or node.startswith(name + "[") for name in SLOW_TESTS):
            item.add_marker(slow_mark)


@pytest.fixture(scope="session")
def preloaded():  # noqa: ANN201 - a pytest fixture
    """The session's torch-preloaded fork server (tests/preloaded.py): a real child process per script, without
    a fresh interpreter's ~3.4 CPU s torch import (and ~2.3 s first optimizer). For the runs whose subject is the
    script's training or its agent, never for what depends on the interpreter's launch (``batchmon run``'s
    injection, sitecustomize, OMP_* variables: the server's are fixed at its start, OMP_WAIT_POLICY=PASSIVE)."""
    from preloaded import ForkServer

    server = ForkServer(env={"OMP_WAIT_POLICY": "PASSIVE"})
    yield server
    server.close()


@pytest.fixture
def utc(monkeypatch):  # noqa: ANN001, ANN201 - a pytest fixture
    """The monitor's header shows local time: pin the zone so an SVG snapshot never depends on it."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()
