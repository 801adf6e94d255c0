"""Public training scripts nobody here wrote, run unmodified: once plain, once under `batchmon run` with a real
`batchmon record` beside it. Reports, per script: exit codes, the script's own loss lines (equal or not),
steps the agent sent, batch sizes and where they came from, components of the last step, events.

The scripts are not in this repository: fetch them into an ignored folder (.ext/, see bench/h200_run.sh stage
`public`), e.g. pytorch/examples (word_language_model, dcgan, imagenet, time_sequence_prediction) and nanoGPT.

    python3 bench/public_scripts.py --root .ext --out results.json [--only NAME ...] [--cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

LOSS_VALUE = re.compile(r"loss[\s:=]+(-?[0-9][0-9.e+-]*)", re.IGNORECASE)
DIGITS = re.compile(r"[0-9]+")
SPACES = re.compile(r"\s+")  # runs of spaces too: scripts pad numbers to a width ("ms/batch  8.12" vs "10.23")


@dataclass
class Case:
    name: str
    cwd: str                      # under --root
    argv: list[str]               # after `python3`
    pattern: str                  # what it exercises
    timeout: float = 150.0        # seconds; a run stopped by it is reported as such (SIGINT first)
    expect_batch: int | None = None
    gpu: bool = True
    env: dict[str, str] = field(default_factory=dict)  # added to both runs, plain and attached


def cases(cpu: bool) -> list[Case]:
    accel = ["--emsize", "32", "--nhid", "32", "--bptt", "20"] if cpu else ["--accel"]
    return [
        Case("wlm-lstm", "word_language_model", ["main.py", *accel, "--epochs", "1", "--save", "/tmp/wlm_lstm.pt"],
             "LSTM LM, manual SGD (p.data.add_), seq-first batches, torch.save(model) at the end", expect_batch=20),
        Case("wlm-lstm-optimizer", "word_language_model",
             ["main.py", *accel, "--epochs", "1", "--use-optimizer", "--save", "/tmp/wlm_opt.pt"],
             "LSTM LM with torch.optim.SGD", expect_batch=20),
        Case("wlm-transformer", "word_language_model",
             ["main.py", *accel, "--epochs", "1", "--model", "Transformer", "--lr", "5", "--save", "/tmp/wlm_tf.pt"],
             "nn.TransformerEncoder, (sequence, batch) inputs, manual SGD, torch.save(model)", expect_batch=20),
        Case("dcgan-fake", "dcgan", ["main.py", "--dataset", "fake", "--niter", "1", *accel, "--manualSeed", "1",
                                     "--outf", "/tmp/dcgan_out"],
             "GAN: two models, two Adam optimizers, DataLoader workers, torch.save(state_dict) per epoch",
             expect_batch=64),
        Case("imagenet-resnet18-dp", "imagenet", ["main.py", "--dummy", "-a", "resnet18", "-b", "128", "--epochs", "1",
                                                   "-p", "20", "--seed", "1"],
             "ImageNet script, DataParallel, DataLoader workers, FakeData (stopped by the timeout)", timeout=75,
             expect_batch=128),
        Case("nanogpt-compile", "nanoGPT", ["train.py", "config/train_shakespeare_char.py", "--max_iters=60",
                                            "--eval_interval=50", "--eval_iters=5", "--log_interval=10",
                                            *(["--device=cpu", "--compile=False", "--batch_size=8",
                                               "--block_size=64", "--n_layer=2", "--n_embd=64", "--n_head=2"]
                                              if cpu else [])],
             "nanoGPT: torch.compile (default), bf16 autocast, GradScaler, grad accumulation 1, checkpoint save",
             timeout=240, expect_batch=8 if cpu else 64),
        Case("nanogpt-eager", "nanoGPT", ["train.py", "config/train_shakespeare_char.py", "--max_iters=60",
                                          "--eval_interval=50", "--eval_iters=5", "--log_interval=10",
                                          "--compile=False",
                                          *(["--device=cpu", "--batch_size=8", "--block_size=64", "--n_layer=2",
                                             "--n_embd=64", "--n_head=2"] if cpu else [])],
             "nanoGPT eager (the compiled run's reference)", timeout=180, expect_batch=8 if cpu else 64),
        Case("sine-lbfgs", "time_sequence_prediction", ["train.py", "--steps", "3"],
             "LBFGS with a closure (many forward/backward per step), CPU, float64", timeout=240, gpu=False,
             # its data file holds a numpy array, which torch >= 2.6 refuses to load by default
             env={"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}),
    ]


@dataclass
class Run:
    rc: int | None
    seconds: float
    timed_out: bool
    losses: list[str]             # every number printed right after the word "loss", in order
    tail: list[str]
    lines: list[str]              # the whole output, digits masked (what the agent may add shows here)


@dataclass
class Result:
    name: str
    pattern: str
    plain: Run
    attached: Run
    losses_equal: bool
    control_losses_equal: bool | None = None   # plain vs plain again: is the script deterministic at all?
    added_lines: list[str] = field(default_factory=list)  # printed only when attached (digits masked)
    steps: int = 0
    hellos: int = 0
    batch_sizes: list[int] = field(default_factory=list)
    batch_sources: list[str] = field(default_factory=list)
    last_components: dict | None = None
    peak_allocated: int | None = None
    components_sum_to_peak: bool | None = None
    events: list[str] = field(default_factory=list)
    expect_batch: int | None = None
    batch_right: bool | None = None


def run(argv: list[str], cwd: Path, env: dict, timeout: float) -> Run:
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    timed_out = False
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        os.killpg(proc.pid, signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
    lines = out.splitlines()
    return Run(proc.returncode, round(time.monotonic() - t0, 1), timed_out,
               [v for ln in lines for v in LOSS_VALUE.findall(ln)], lines[-15:],
               [SPACES.sub(" ", DIGITS.sub("#", ln)) for ln in lines])


def read_recording(path: Path) -> dict:
    out: dict = {"steps": [], "hellos": 0, "events": []}
    for line in path.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("kind") != "agent":
            continue
        data = rec.get("data") or {}
        kind = data.get("type")
        if kind == "hello":
            out["hellos"] += 1
        elif kind == "step":
            out["steps"].append(data)
        elif kind == "event":
            out["events"].append(f"{data.get('kind')}: {str(data.get('message'))[:160]}")
    return out


def measure(case: Case, root: Path, py: str, bm_env: dict, control: bool) -> Result:
    cwd = root / case.cwd
    plain = run([py, *case.argv], cwd, {**os.environ, **case.env}, case.timeout)
    again = run([py, *case.argv], cwd, {**os.environ, **case.env}, case.timeout) if control else None
    with tempfile.TemporaryDirectory(prefix="bm-public-") as tmp:
        env = {**bm_env, **case.env, "BATCHMON_DIR": tmp}
        rec_path = Path(tmp) / "rec.jsonl"
        rec = subprocess.Popen([py, "-m", "batchmon", "record", "-o", str(rec_path), "--interval", "0.5"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (rec_path.exists() and rec_path.stat().st_size):
            time.sleep(0.05)
        attached = run([py, "-m", "batchmon", "run", "--", py, *case.argv], cwd, env, case.timeout)
        # the recorder has the agent's last lines once it saw the bye or the socket closing
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = rec_path.read_text(errors="replace")
            if any(mark in text for mark in ('"agent_eof"', '"agent_gone"', '"type":"bye"')):
                break
            time.sleep(0.1)
        rec.send_signal(signal.SIGTERM)
        rec.wait(10)
        seen = read_recording(rec_path)
    steps = seen["steps"]
    n = min(len(plain.losses), len(attached.losses)) if plain.timed_out or attached.timed_out else None
    res = Result(case.name, case.pattern, plain, attached, plain.losses[:n] == attached.losses[:n],
                 steps=sum(int(d.get("steps", 1)) if isinstance(d, dict) else 1 for d in steps), hellos=seen["hellos"], events=seen["events"][:10], expect_batch=case.expect_batch)
    if again is not None:
        res.control_losses_equal = plain.losses[:n] == again.losses[:n]
    plain_lines = set(plain.lines) | set(again.lines if again else ())
    res.added_lines = sorted({ln for ln in attached.lines if ln not in plain_lines})[:20]
    res.batch_sizes = sorted({s.get("batch_size") for s in steps if s.get("batch_size") is not None})
    res.batch_sources = sorted({str(s.get("batch_source")) for s in steps if s.get("batch_source")})
    if steps:
        last = steps[-1]
        res.last_components = last.get("components")
        res.peak_allocated = last.get("peak_allocated")
        if res.last_components and res.peak_allocated:
            res.components_sum_to_peak = sum(res.last_components.values()) == res.peak_allocated
    if case.expect_batch is not None and steps:
        full = [b for b in res.batch_sizes if b is not None]
        res.batch_right = bool(full) and max(full) == case.expect_batch
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", type=Path, default=Path(".ext"), help="folder holding the fetched scripts")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--only", action="append", default=[], help="run only these cases (repeatable)")
    p.add_argument("--cpu", action="store_true", help="CPU variants (tiny settings)")
    p.add_argument("--control", action="store_true",
                   help="run each script plain twice: tells a script's own run-to-run noise from the agent's doing")
    args = p.parse_args()
    py = sys.executable
    bm_env = os.environ.copy()
    results = []
    for case in cases(args.cpu):
        if args.only and case.name not in args.only:
            continue
        if not (args.root / case.cwd).is_dir():
            print(f"skip {case.name}: {args.root / case.cwd} missing", flush=True)
            continue
        res = measure(case, args.root, py, bm_env, args.control)
        results.append(asdict(res))
        print(f"{case.name}: rc {res.plain.rc}/{res.attached.rc} "
              f"({'timeout' if res.attached.timed_out else 'ended'}), losses equal {res.losses_equal} "
              f"(plain vs plain: {res.control_losses_equal}), added lines {len(res.added_lines)}, "
              f"steps {res.steps}, batch {res.batch_sizes} {res.batch_sources} right={res.batch_right}, "
              f"sum=peak {res.components_sum_to_peak}, events {res.events[:3]}", flush=True)
        for line in res.added_lines[:4]:
            print(f"   + {line[:200]}", flush=True)
        if res.attached.rc not in (0, None) and not res.attached.timed_out:
            print("   attached tail: " + " | ".join(res.attached.tail[-6:]), flush=True)
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
