"""The pattern corpus and its runner: each script plain and under ``batchmon run`` (real subprocesses), compared.

Used by tests/test_patterns.py (CPU, CI) and bench/patterns_run.py (the same on CUDA, a JSON table). A row says:
the agent's steps against the script's own (steps seen), its batch sizes against the script's (batch right),
the losses bit for bit (loss unchanged), and on CUDA whether the six components of every step sum to the
step's peak allocated (components sum to the peak; null on CPU, where there is no allocator peak).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]


@dataclass(frozen=True)
class Pattern:
    name: str
    script: str
    args: tuple[str, ...] = ()
    slow: bool = False  # torch.compile: tens of seconds on a small CPU box
    cpu_args: tuple[str, ...] = ()  # added on the CPU only (the CUDA corpus runs the script as a user would)


PATTERNS = (
    Pattern("word_lm_lstm", "word_lm.py", ("--model", "lstm")),
    Pattern("word_lm_transformer", "word_lm.py", ("--model", "transformer")),
    Pattern("lbfgs", "lbfgs.py"),
    Pattern("grad_accum", "grad_accum.py"),
    Pattern("amp_scaler", "amp_scaler.py"),
    Pattern("gan", "gan.py"),
    Pattern("data_parallel", "data_parallel.py"),
    Pattern("loader_workers_fork", "loader_workers.py", ("--start-method", "fork")),
    Pattern("loader_workers_spawn", "loader_workers.py", ("--start-method", "spawn")),
    Pattern("hf_dict", "hf_dict.py"),
    Pattern("checkpoint", "checkpoint.py"),
    Pattern("ema", "ema.py"),
    # on the CPU: dynamo and AOTAutograd as with inductor (the graphs, the hooks, the saved tensors), without
    # inductor's C++ code generation (most of the CPU test's time); the CUDA corpus compiles with inductor
    Pattern("compiled", "compiled.py", slow=True, cpu_args=("--backend", "aot_eager")),
    Pattern("compiled_after_attach", "compiled.py", ("--compile-after-attach",), slow=True,
            cpu_args=("--backend", "aot_eager")),
)


@dataclass
class Row:
    pattern: str
    ok: bool
    steps_expected: int
    steps_seen: int | None
    batch_right: bool
    loss_unchanged: bool
    components_sum_to_peak: bool | None
    batch_sizes: list[int | None] = field(default_factory=list)
    batch_source: str | None = None
    micro_batches: list[int | None] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


#: runs a command (``argv`` without the interpreter) as ``subprocess.run(..., capture_output=True, text=True)``
PlainRunner = Callable[..., "subprocess.CompletedProcess[str]"]


def run_script(pattern: Pattern, device: str, workdir: Path, attached: bool, timeout: float = 300,
               plain_runner: PlainRunner | None = None, attached_runner: PlainRunner | None = None) -> dict[str, Any]:
    """One run; returns the script's report, plus ``rc`` and ``stderr``. ``plain_runner``: what runs the plain
    (unattached) script instead of a fresh interpreter (the tests' torch-preloaded fork server);
    ``attached_runner``: what runs the script with ``batchmon run``'s environment (its bootstrap first on
    PYTHONPATH, auto-attach on) instead of a real ``batchmon run`` of a fresh interpreter."""
    report = workdir / f"{pattern.name}_{'attached' if attached else 'plain'}.json"
    args = [str(HERE / pattern.script), "--device", device, "--report", str(report), *pattern.args,
            *(pattern.cpu_args if device == "cpu" else ())]
    cmd = [sys.executable, *args]
    if attached:
        cmd = [sys.executable, "-m", "batchmon", "run", "--", *cmd]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("BATCHMON_DIR", str(workdir / "s"))
    if device == "cpu":  # OpenMP's threads sleep between ops instead of spinning: CPU time, not results (both runs)
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if plain_runner is not None and not attached:
        out = plain_runner(args, env=env, cwd=str(workdir), timeout=timeout)
    elif attached_runner is not None and attached:
        from batchmon.cli.run import child_env

        out = attached_runner(args, env=child_env(env), cwd=str(workdir), timeout=timeout)
    else:
        out = subprocess.run(cmd, env=env, cwd=str(workdir), capture_output=True, text=True, timeout=timeout)
    result: dict[str, Any] = {"rc": out.returncode, "stderr": out.stderr[-3000:]}
    if report.exists():
        result.update(json.loads(report.read_text()))
    return result


def compare(pattern: Pattern, plain: dict[str, Any], attached: dict[str, Any]) -> Row:
    problems = []
    for label, run in (("plain", plain), ("attached", attached)):
        if run["rc"] != 0 or "losses" not in run:
            problems.append(f"{label} run failed (rc {run['rc']}): {run['stderr'][-400:]}")
    expected = plain.get("batch_sizes") or []
    agent = attached.get("agent") or {}
    steps = agent.get("steps") or []
    if "losses" in attached and not agent:
        problems.append("no agent attached under batchmon run")
    if agent.get("error"):
        problems.append(f"agent error: {agent['error']}")
    sizes = [s.get("batch_size") for s in steps]
    loss_unchanged = bool(plain.get("losses")) and plain.get("losses") == attached.get("losses")
    batch_right = sizes == expected and bool(expected)
    sources = sorted({s.get("batch_source") for s in steps if s.get("batch_source")})
    want_source = plain.get("expected_source")
    if want_source and not all(src.startswith(want_source) for src in sources):
        problems.append(f"batch source {sources} is not {want_source!r}")
    peaks = [s for s in steps if s.get("peak_allocated") is not None]
    sums: bool | None = None
    if peaks:
        sums = all(sum(s["components"].values()) == s["peak_allocated"] for s in peaks)
    if not loss_unchanged:
        problems.append("losses differ")
    if len(steps) != len(expected):
        problems.append(f"{len(steps)} steps seen, the script took {len(expected)}")
    elif not batch_right:
        problems.append(f"batch sizes {sizes}, the script's {expected}")
    return Row(pattern=pattern.name, ok=not problems and (sums is not False), steps_expected=len(expected),
               steps_seen=len(steps) if agent else None, batch_right=batch_right, loss_unchanged=loss_unchanged,
               components_sum_to_peak=sums, batch_sizes=sizes, batch_source=", ".join(sources) or None,
               micro_batches=[s.get("micro_batches") for s in steps], problems=problems)


def run_pattern(pattern: Pattern, device: str, workdir: Path, parallel: bool = True,
                plain_runner: PlainRunner | None = None, attached_runner: PlainRunner | None = None) -> Row:
    """Plain and attached runs (side by side when ``parallel``: they share nothing but the CPU)."""
    workdir.mkdir(parents=True, exist_ok=True)
    if not parallel:
        return compare(pattern, run_script(pattern, device, workdir, False, plain_runner=plain_runner),
                       run_script(pattern, device, workdir, True, attached_runner=attached_runner))
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(2) as pool:
        plain = pool.submit(run_script, pattern, device, workdir, False, plain_runner=plain_runner)
        attached = pool.submit(run_script, pattern, device, workdir, True, attached_runner=attached_runner)
        return compare(pattern, plain.result(), attached.result())
