"""The OOM post-mortem (issue 16 point 2): the components at the failing moment, the bytes asked for, the pool and
NVML's figure then, and the fit advisor's answer for the failing batch. On the real H200 recording of a GPT that
ran out of memory in its first forward, and on a run that OOMs after steps (its fitted model gives the advice)."""

from __future__ import annotations

import json
from pathlib import Path

from batchmon import memory_model, protocol, records
from batchmon.memory_model import Observation
from batchmon.memory_model.advisor import advise
from batchmon.monitor import step_history
from batchmon.monitor.hub_state import HubState
from batchmon.monitor.render import format_table, snapshot_to_json
from batchmon.monitor.replay import final_snapshot, read_recording
from batchmon.probes.nvml import DeviceMemory, DeviceSample, GpuProcess, NvmlSample
from batchmon.probes.nvml import sample_to_dict as nvml_to_dict
from batchmon.protocol import COMPONENTS, Event
from batchmon.tui.job_panel import job_lines
from batchmon.tui.predict import Predictor
from batchmon.tui.state import WhatIfState
from batchmon.tui.views import job_view, ordered_jobs
from conftest import make_step as full_step
from hub_peer import make_hello, make_step
from test_hub_state import nvml_record

FIXTURES = Path(__file__).parent / "fixtures"
OOM = FIXTURES / "agent_h200_oom.jsonl"


def recorded_oom() -> tuple[dict, dict]:
    """The recording's oom event and NVML's first sample after it, as recorded."""
    event = nvml = None
    for record, _, _ in read_recording(OOM).records():
        if record is None:
            continue
        data = record.get("data") or {}
        if record["kind"] == "agent" and data.get("kind") == "oom":
            event = data
        elif record["kind"] == "nvml" and event is not None and nvml is None:
            nvml = data
    assert event is not None and nvml is not None
    return event, nvml


def test_the_h200_gpt_oom_taken_apart():
    event, nvml = recorded_oom()
    (gpt,) = final_snapshot(OOM).agents
    r = gpt.oom
    assert (r.step, r.batch_size, r.requested_bytes) == (1, 2048, event["requested_bytes"])
    assert {n: r.components[n] for n in COMPONENTS} == event["components"]
    assert r.allocated == sum(event["components"].values()) and r.needed == r.allocated + r.requested_bytes
    dev = nvml["devices"][0]
    (proc,) = dev["processes"]
    assert (r.device_used, r.device_free, r.device_total) == (proc["used"], dev["memory"]["free"],
                                                             dev["memory"]["total"])
    assert r.beyond_allocated == proc["used"] - r.allocated  # cache + context, as NVML saw the process
    # the agent of this recording sends no allocator figures with the error: said, not invented
    assert r.reserved is None and "not reported" in r.reserved_basis and r.fragmentation is None
    assert r.needed > r.device_total - (proc["used"] - r.allocated)  # it could not have fit as it was


def test_the_advice_is_the_advisors_for_the_failing_batch_and_would_have_fit():
    event, nvml = recorded_oom()
    (gpt,) = final_snapshot(OOM).agents
    r = gpt.oom
    # the same failing-step model, built here from the recorded figures, asked of the advisor directly
    six = dict(event["components"])
    six["gradients"] = six["parameters"]
    obs = Observation(step=1, batch_size=2048, components=six,
                      peak_allocated=sum(six.values()) + event["requested_bytes"],
                      device_used=nvml["devices"][0]["processes"][0]["used"])
    model = memory_model.fit([obs], optimizer=None)
    direct = advise(model, capacity=nvml["devices"][0]["memory"]["total"], target_batch=2048)
    assert r.advice == direct[:len(r.advice)] and r.advice
    assert r.advice[0].fits_target and r.advice[0].max_batch >= 2048
    unchanged = next(a for a in r.advice if a.what_if == "as observed")
    assert not unchanged.fits_target and unchanged.max_batch < 2048  # the run as it was does not fit: it OOMed
    assert "failing step alone" in r.advice_basis and "upper bounds" in r.advice_basis


def test_once_json_carries_the_post_mortem_in_agents_oom():
    oom = snapshot_to_json(final_snapshot(OOM))["agents"][0]["oom"]
    assert {"time", "step", "batch_size", "requested_bytes", "components", "reserved", "advice"} <= set(oom)
    assert set(oom["components"]) == set(protocol.ALL_COMPONENTS)
    first = oom["advice"][0]
    assert {"what_if", "max_batch", "step_time_factor"} <= set(first) and first["fits_target"] is True
    json.dumps(oom)  # plain JSON


def ingest(s: HubState, pid: int, message, t: float = 1.0) -> None:
    s.ingest(records.agent(f"vm:{pid}", {"data": json.loads(protocol.encode(message))}, t=t))


def test_an_oom_after_steps_is_advised_from_the_model_fitted_to_those_steps():
    s = HubState()
    s.ingest(nvml_record())
    ingest(s, 5, make_hello(5, device="cuda:0", nvml_uuid="GPU-1"))
    steps = [make_step(n, batch=16) for n in range(1, 11)]
    for st in steps:
        ingest(s, 5, st)
    before = s.snapshot(2.0).agents[0]
    failing = Event(kind="oom", message="out of memory in backward at step 11", step=11, batch_size=4096,
                    components=dict(steps[-1].components), requested_bytes=1 << 30, time=steps[-1].time + 1)
    ingest(s, 5, failing)
    r = s.snapshot(3.0).agents[0].oom
    model = memory_model.fit(step_history.model_steps(tuple(before.history)), optimizer=before.hello.optimizer)
    total = s.snapshot(3.0).nvml.devices[0].memory.total
    assert r.advice == advise(model, capacity=total, target_batch=4096)[:len(r.advice)]
    assert "fitted to the run's steps" in r.advice_basis and r.batch_size == 4096
    assert r.num_alloc_retries == steps[-1].num_alloc_retries


def test_a_loop_that_catches_ooms_does_not_refit_the_advice_for_each():
    s = HubState()
    s.ingest(nvml_record())
    ingest(s, 5, make_hello(5, device="cuda:0", nvml_uuid="GPU-1"))
    comps = dict(make_step(1).components)
    ingest(s, 5, Event(kind="oom", message="oom", step=1, batch_size=64, components=comps, requested_bytes=1, time=10.0))
    first = s.snapshot(11.0).agents[0].oom
    for i in range(30):
        ingest(s, 5, Event(kind="oom", message="oom", step=1, batch_size=64, components=comps, requested_bytes=2,
                           time=10.01 + i * 0.01))
    again = s.snapshot(12.0).agents[0].oom
    assert again.advice is first.advice and again.requested_bytes == 2 and again.time > first.time


def test_text_and_job_panel_show_the_post_mortem_within_the_width():
    snap = final_snapshot(OOM)
    text = format_table(snap, 100)
    assert "post-mortem: step 1, batch 2048, asked for 6.0 GiB" in text and "what would have fit batch 2048" in text
    assert all(len(line) <= 100 for line in text.splitlines())
    (key, ranks), = ordered_jobs(snap)
    view = job_view(snap, key, ranks, WhatIfState(), Predictor())
    for width in (80, 120, 160):
        for level in ("full", "medium", "compact"):
            lines = [t.plain for t in job_lines(view, width, level)]
            assert lines[0].lstrip().startswith("OOM") and all(len(line) <= width for line in lines), (width, level)
        full = "\n".join(t.plain for t in job_lines(view, width, "full"))
        assert "asked for 6.0 GiB" in full and "what would have fit batch 2048" in full
        assert r"✓ amp" in full or "✓ 2 accumulation" in full


OOM_SCRIPT = """
import sys, torch, batchmon
torch.manual_seed(0)

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    def forward(self, x):
        if x.shape[0] > 16:  # what a CUDA allocator would do at a batch this size: the error type torch raises
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.")
        return self.body(x)

model = Net()
opt = torch.optim.Adam(model.parameters())
batchmon.attach(model, opt, name="oomtest")
print("attached", flush=True)
sys.stdin.readline()
for batch in [8] * 6 + [64]:
    loss = model(torch.randn(batch, 32)).square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
"""


def test_a_real_training_process_that_dies_of_an_oom_stays_as_oom_with_its_post_mortem(tmp_path, preloaded):
    """A real agent in a real torch process (CPU: the forward raises torch.OutOfMemoryError at batch 64, as the
    CUDA allocator would), a real hub: the run ends as "oom" after its 6 steps, with its post-mortem. The process
    forks from the session's torch-preloaded server (tests/preloaded.py; the script attaches in its own code)."""
    import os
    import subprocess

    import pytest

    pytest.importorskip("torch")
    from batchmon.monitor.hub import Hub
    from hub_peer import wait_for

    sockdir = protocol.ensure_socket_dir(tmp_path / "sock")
    proc = preloaded.popen(["-c", OOM_SCRIPT], env=dict(os.environ, BATCHMON_DIR=str(sockdir)),
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    hub = Hub(interval=0.05, socket_dir=sockdir).start()
    try:
        assert proc.stdout.readline().strip() == "attached", proc.stderr.read() if proc.poll() is not None else ""
        wait_for(lambda: any(a.hello.pid == proc.pid for a in hub.snapshot().agents), timeout=30, what="hello")
        proc.stdin.write("\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 1 and "OutOfMemoryError" in err  # the script's own exit, unchanged

        def ended():
            found = [a for a in hub.snapshot().agents if a.hello.pid == proc.pid and a.ended is not None]
            return found[0] if found else None

        run = wait_for(ended, timeout=30, what="the run's end")
        assert run.state == "oom" and run.ended.how == "oom" and run.ended.steps == 6
        assert "out of memory in forward at step 7" in run.ended.text
        r = run.oom
        assert (r.step, r.batch_size) == (7, 64) and r.components["parameters"] == (32 * 64 + 64 + 64 * 4 + 4) * 4
        # on the CPU there is no device to fit: said, not guessed (on a GPU: test_the_advice_is_the_advisors_...)
        assert r.device_total is None and r.advice == () and r.advice_basis == "no advice: the device size is unknown"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        hub.stop()


def test_without_the_agents_reserved_it_is_estimated_from_nvml_less_the_measured_context():
    """After steps whose context (device used - reserved) was measured, NVML's figure for the process after the
    error less that context is the pool the error met; fragmentation follows from it, and both say so."""
    s = HubState()
    s.ingest(nvml_record(used=60 << 30, pids=(5,), t=1.0))
    ingest(s, 5, make_hello(5, device="cuda:0", nvml_uuid="GPU-1"))
    comps = {"parameters": 1 << 30, "gradients": 1 << 30, "optimizer": 2 << 30, "activations": 8 << 30,
             "batch": 1 << 20, "other": 1 << 30}
    peak = sum(comps.values())
    ingest(s, 5, full_step(1, 16, time=10.0, components=comps, peak_allocated=peak, allocated=4 << 30,
                           reserved=peak + (512 << 20), device_used=peak + (512 << 20) + (700 << 20),
                           num_alloc_retries=3))
    failing = Event(kind="oom", message="out of memory in forward at step 2", step=2, batch_size=64,
                    components={**comps, "activations": 30 << 30}, requested_bytes=4 << 30, time=50.0)
    ingest(s, 5, failing)
    used_after = sum(failing.components.values()) + (900 << 20) + (700 << 20)  # live + cache + context
    dev = DeviceSample(index=0, name="NVIDIA H200", uuid="GPU-1",
                       memory=DeviceMemory(80 << 30, used_after, 0, (80 << 30) - used_after),
                       utilization=100, temperature=50, power=500.0, processes=(GpuProcess(5, used_after),))
    s.ingest({"t": 51.0, "kind": "nvml", "source": "local",
              "data": nvml_to_dict(NvmlSample(True, None, "550", (dev,), time=51.0))})
    r = s.snapshot(52.0).agents[0].oom
    assert r.reserved_estimated and r.reserved == used_after - (700 << 20)
    assert r.fragmentation == r.reserved - r.allocated == 900 << 20 and r.components["context"] == 700 << 20
    assert r.num_alloc_retries == 3 and "less its context at step 1" in r.reserved_basis
    ingest(s, 5, protocol.Bye(reason="exit", time=53.0))  # the error ended the run: --once shows the post-mortem
    assert s.snapshot(54.0).agents[0].state == "oom" and "reserved ~" in format_table(s.snapshot(54.0), 160)
