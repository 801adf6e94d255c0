"""`batchmon predict`: the closed forms, transformer activations, unit parsing, JSON, and clear errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from batchmon.cli.main import main
from batchmon.formulas import formula_breakdown, formula_max_batch, transformer_activations
from batchmon.protocol import COMPONENTS
from batchmon.units import format_bytes, parse_count, parse_size

SEED = ["predict", "--params", "125M", "--layers", "12", "--hidden", "768", "--input-dim", "1024", "--batch", "32"]


def _rows(text: str) -> dict[str, int]:
    rows = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] in COMPONENTS + ("total",) and parts[1].isdigit():
            rows[parts[0]] = int(parts[1])
    return rows


def test_reproduces_the_classic_four_lines_and_adds_gradients(capsys):
    assert main(SEED + ["--optimizer", "adam"]) == 0
    rows = _rows(capsys.readouterr().out)
    n, layers, h, d, b = 125 * 10**6, 12, 768, 1024, 32
    assert rows["parameters"] == n * 4  # Model Memory = N * 4 bytes
    assert rows["activations"] == b * layers * h * 4  # Activation Memory = B * L * H * 4 bytes
    assert rows["optimizer"] == 2 * n * 4  # Optimizer Memory = 2 * N * 4 bytes
    assert rows["batch"] == b * d * 4  # Batch Data Memory = B * D * 4 bytes
    assert rows["gradients"] == n * 4  # what the seed leaves out
    assert rows["other"] == 0
    assert rows["total"] == 4 * n * 4 + b * layers * h * 4 + b * d * 4


def test_json_keys_and_largest_batch(capsys):
    assert main(SEED + ["--device-memory", "141GiB", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert set(doc) >= {"components", "total", "max_batch", "inputs"}
    assert list(doc["components"]) == list(COMPONENTS)
    assert doc["total"] == sum(doc["components"].values())
    device = 141 * 2**30
    fixed = 4 * 125 * 10**6 * 4
    per_sample = 12 * 768 * 4 + 1024 * 4
    assert doc["max_batch"] == (device - fixed) // per_sample
    assert doc["inputs"]["params"] == 125 * 10**6 and doc["inputs"]["device_memory"] == device
    assert main(SEED + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["max_batch"] is None


def test_dtypes_and_optimizers(capsys):
    n = 1_300_000_000
    bf16 = formula_breakdown(n, 24, 2048, 2048, 8, "adamw", "bf16")
    assert bf16["parameters"] == n * 2 and bf16["gradients"] == n * 2 and bf16["optimizer"] == 2 * n * 4
    assert bf16["activations"] == 8 * 24 * 2048 * 2 and bf16["batch"] == 8 * 2048 * 2
    amp = formula_breakdown(n, 24, 2048, 2048, 8, "adam", "amp")
    assert amp["parameters"] == n * 4 and amp["activations"] == 8 * 24 * 2048 * 2 and amp["other"] == n * 2
    assert formula_breakdown(n, 1, 1, 1, 1, "sgd")["optimizer"] == 0
    assert formula_breakdown(n, 1, 1, 1, 1, "sgd-momentum")["optimizer"] == n * 4
    assert main(["predict", "--params", "1.3B", "--layers", "24", "--hidden", "2048", "--input-dim", "2048",
                 "--batch", "8", "--dtype", "bf16", "--optimizer", "adamw", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["components"] == bf16


def test_formula_max_batch_is_the_boundary():
    args = (125 * 10**6, 12, 768, 1024)
    device = 80 * 10**9
    mb = formula_max_batch(*args, device)
    assert sum(formula_breakdown(*args, mb).values()) <= device < sum(formula_breakdown(*args, mb + 1).values())
    assert formula_max_batch(*args, 10**6) == 0


def test_human_table_shows_sizes_and_device(capsys):
    assert main(SEED + ["--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert format_bytes(2 * 125 * 10**6 * 4) in out and "B*L*H*4" in out
    assert "largest batch on 74.5 GiB" in out


@pytest.mark.parametrize("bad, message", [
    (["--params", "abc"], "argument --params: not a count"),
    (["--params", "-5"], "argument --params: expected a positive number"),
    (["--batch", "0"], "argument --batch: expected a positive number"),
    (["--layers", "0"], "argument --layers: expected a positive number"),
    (["--input-dim", "-1"], "argument --input-dim: expected a number >= 0"),
    (["--device-memory", "0"], "argument --device-memory: expected a positive size"),
    (["--device-memory", "0.5B"], "argument --device-memory: '0.5B' is not a whole number of bytes"),
    (["--device-memory", "12XB"], "argument --device-memory: unknown unit"),
    (["--dtype", "fp8"], "argument --dtype: invalid choice"),
    (["--optimizer", "lion"], "argument --optimizer: invalid choice"),
])
def test_bad_values_exit_2_with_one_clear_line(bad, message):
    argv = list(SEED)
    flag = bad[0]
    if flag in argv:
        i = argv.index(flag)
        del argv[i:i + 2]
    proc = subprocess.run([sys.executable, "-m", "batchmon", *argv, *bad], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_units():
    assert parse_count("125M") == 125_000_000
    assert parse_count("1.3B") == 1_300_000_000
    assert parse_count("7e9") == 7_000_000_000 and parse_count("4096") == 4096 and parse_count("2K") == 2000
    assert parse_size("141GiB") == 141 * 2**30
    assert parse_size("80GB") == 80 * 10**9
    assert parse_size("512MiB") == 512 * 2**20 and parse_size("512M") == 512 * 2**20
    assert parse_size("1.5KiB") == 1536 and parse_size("1024") == 1024
    for bad in ("abc", "", "1.3.4", "12XB", "0.5"):
        with pytest.raises(ValueError):
            parse_size(bad)
    for bad in ("1.2345", "M", "-3"):
        with pytest.raises(ValueError):
            parse_count(bad)
    assert format_bytes(1536) == "1.5 KiB" and format_bytes(None) == "-" and format_bytes(12) == "12 B"


GPT2 = ["predict", "--params", "124M", "--layers", "12", "--hidden", "768", "--input-dim", "1024", "--batch", "8"]


def test_transformer_activations_follow_korthikanti_and_their_variants():
    layers, h, a, s, b = 12, 768, 12, 1024, 8
    per_layer = s * b * h * (34 + 5 * a * s / h)  # 16-bit activations, no parallelism, no recompute
    assert transformer_activations(layers, h, a, s, b, "bf16") == round(layers * per_layer)
    assert transformer_activations(layers, h, a, s, b, "amp") == round(layers * per_layer)
    assert transformer_activations(layers, h, a, s, b, "fp32") == round(2 * layers * per_layer)
    flash = transformer_activations(layers, h, a, s, b, "bf16", attention="flash")
    assert flash == layers * 34 * s * b * h  # no s x s matrix: the 5*a*s^2*b term is gone
    full = transformer_activations(layers, h, a, s, b, "bf16", recompute="full")
    assert full == layers * 2 * s * b * h  # only each layer's input is kept
    # the attention term is quadratic in the sequence, the rest linear
    assert transformer_activations(1, h, a, 2 * s, 1) - 2 * transformer_activations(1, h, a, s, 1) == 5 * a * 2 * s * s
    for bad in ({"attention": "sparse"}, {"recompute": "some"}):
        with pytest.raises(ValueError):
            transformer_activations(layers, h, a, s, b, **bad)


def test_cli_with_heads_and_seq_len_gives_transformer_figures_and_largest_batch(capsys):
    assert main(GPT2 + ["--heads", "12", "--seq-len", "1024", "--dtype", "amp", "--device-memory", "24GiB",
                        "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    expected = transformer_activations(12, 768, 12, 1024, 8, "amp")
    assert doc["components"]["activations"] == expected and doc["activations_lower_bound"] is False
    mb = doc["max_batch"]
    args = (124 * 10**6, 12, 768, 1024)
    kw = {"heads": 12, "seq_len": 1024}
    assert sum(formula_breakdown(*args, mb, "adam", "amp", **kw).values()) <= 24 * 2**30
    assert sum(formula_breakdown(*args, mb + 1, "adam", "amp", **kw).values()) > 24 * 2**30
    assert 10 < mb < 100  # a real transformer's order of magnitude, not 580317
    assert main(GPT2 + ["--seq-len", "1024", "--attention", "flash"]) == 0  # flash needs no head count
    out = capsys.readouterr().out
    assert "L*34*s*B*h" in out and "lower bound" not in out


def test_without_seq_len_the_output_says_activations_are_a_lower_bound(capsys):
    assert main(SEED + ["--device-memory", "24GiB"]) == 0
    out = capsys.readouterr().out
    assert "Activations are a lower bound" in out
    assert "largest batch on 24.0 GiB: at most" in out and "real largest batch is smaller" in out
    assert main(SEED + ["--json"]) == 0
    assert json.loads(capsys.readouterr().out)["activations_lower_bound"] is True


def test_no_seed_wording_in_output_or_help():
    for argv in (SEED + ["--device-memory", "24GiB"], ["predict", "--help"], ["--help"]):
        proc = subprocess.run([sys.executable, "-m", "batchmon", *argv], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "seed" not in (proc.stdout + proc.stderr).lower(), argv


@pytest.mark.parametrize("bad, message", [
    (["--params", "1e400"], "argument --params: expected at most"),
    (["--hidden", "1e400"], "argument --hidden: expected at most"),
    (["--device-memory", "1e999"], "argument --device-memory: expected at most"),
    (["--batch", "99999999999999999999"], "argument --batch: expected at most 1,099,511,627,776"),
    (["--input-dim", "1e300"], "argument --input-dim: expected at most"),
    (["--seq-len", "1e400", "--heads", "12"], "argument --seq-len: expected at most"),
    (["--seq-len", "1024"], "--seq-len needs --heads"),
    (["--heads", "12"], "--heads needs --seq-len"),
    (["--attention", "sparse"], "argument --attention: invalid choice"),
])
def test_huge_and_inconsistent_values_exit_2_with_one_clear_line(bad, message):
    argv = list(SEED)
    flag = bad[0]
    if flag in argv:
        i = argv.index(flag)
        del argv[i:i + 2]
    proc = subprocess.run([sys.executable, "-m", "batchmon", *argv, *bad], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sum(1 for line in proc.stderr.splitlines() if "error" in line) == 1
