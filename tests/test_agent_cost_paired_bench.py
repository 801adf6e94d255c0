"""bench/agent_cost_paired.py (the in-one-process paired A/B of the agent's cost) runs end to end on the CPU,
in-process (its figures are for the record, not asserted), and its interval for the median is the sign test's."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

pytest.importorskip("torch")

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "agent_cost_paired.py"


def _bench():
    spec = importlib.util.spec_from_file_location("agent_cost_paired", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_median_interval_is_the_sign_tests():
    bench = _bench()
    # n = 20: P(Binomial(20, 1/2) <= 5) = 0.0207 <= 0.025 < P(<= 6): the 6th smallest and the 6th largest
    assert bench.median_interval([float(v) for v in range(20, 0, -1)]) == (6.0, 15.0)
    assert bench.median_interval([1.0, 2.0, 3.0]) == (None, None)  # too few pairs for 95%


def test_cpu_smoke_pairs_attached_and_plain_blocks_in_one_process(tmp_path, capsys):
    bench = _bench()
    out = tmp_path / "p.json"
    assert bench.main(["--cpu-smoke", "--pairs", "6", "--steps", "5", "--warm", "6", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["settings"]["pairs_run"] == 6 and [p["order"] for p in doc["pairs"]] == ["AB", "BA"] * 3
    assert doc["added_main_cpu_us"]["n"] == 6 and doc["added_main_cpu_us"]["median_ci95"][0] is not None
    assert all(p["plain_step_us"] > 0 and p["attached_step_us"] > 0 for p in doc["pairs"])
    assert doc["quiet_share"]["min"] > 0  # the attached blocks' timed steps run quiet (after the warm steps)
    for part in ("added_main_cpu_quiet_step_us", "added_main_cpu_quiet_mean_us", "loud_steps_cpu_per_step_us"):
        assert doc[part]["n"] == 6  # the block's mean split: a quiet step's own cost, what the samples add
    assert all(p["attached_cpu_quiet_median_us"] > 0 and p["plain_cpu_median_us"] > 0 for p in doc["pairs"])
    assert not doc["agent_errors"]
    from batchmon.agent import handle as agent

    assert agent.current() is None  # every attached block detached
    assert "agent_cost_paired mlp on cpu" in capsys.readouterr().out


def test_bad_arguments_are_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        _bench().main(["--pairs", "1"])
    assert exc.value.code == 2
    assert "--pairs >= 2" in capsys.readouterr().err
