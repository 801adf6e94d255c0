"""The examples' shared helpers: common.pick_device and memcheck.measured_step/run_steps, on real torch (CPU)."""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn as nn

from agent_helpers import EXAMPLES

sys.path.insert(0, str(EXAMPLES))
import common  # noqa: E402
import memcheck  # noqa: E402


def test_pick_device():
    assert common.pick_device("cpu") == torch.device("cpu")
    expected = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    assert common.pick_device("auto") == expected
    with pytest.raises(SystemExit, match="^--device nonsense: "):  # one line for the user, no traceback
        common.pick_device("nonsense")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="CUDA is not available"):
            common.pick_device("cuda:0")


def _setup(seed: int = 0):  # noqa: ANN202
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(seed)
    batch = lambda: (torch.randn(5, 8, generator=gen), torch.randint(0, 3, (5,), generator=gen))  # noqa: E731
    return model, optimizer, batch


def test_measured_step_is_a_plain_training_step_on_cpu():
    model, optimizer, batch = _setup()
    ref_model, ref_opt, ref_batch = _setup()
    meter = memcheck.Meter(torch.device("cpu"))
    criterion = nn.CrossEntropyLoss()
    for step in (1, 2, 3):
        value = memcheck.measured_step(meter, optimizer, batch, lambda x, y: criterion(model(x), y),
                                       amp=False, first=step == 1, last=step == 3)
        x, y = ref_batch()
        ref_opt.zero_grad(set_to_none=True)
        ref_loss = criterion(ref_model(x), y)
        ref_loss.backward()
        ref_opt.step()
        assert value == ref_loss.item()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), ref_model.parameters()))
    assert all(p.grad is None for p in model.parameters())  # the checked step ends with zero_grad
    assert all(v is None for v in meter.measured.values())  # no CUDA: nothing measured


def test_run_steps_prints_first_tenth_and_last(capsys):
    model, optimizer, batch = _setup()
    criterion = nn.CrossEntropyLoss()
    memcheck.run_steps(memcheck.Meter(torch.device("cpu")), optimizer, 12, batch,
                       lambda x, y: criterion(model(x), y), amp=False)
    steps = [int(line.split()[1]) for line in capsys.readouterr().out.splitlines()]
    assert steps == [1, 10, 12]
