#!/usr/bin/env python3
"""The agent's fixed cost per training step (issue 14 point 1): attached vs plain, and where the time goes.

One process, one model: after a warm-up, rounds alternate (A B B A A B ...) between the agent attached
(``batchmon.attach(model, optimizer)``, defaults, ``detach()`` at the end of the round) and not attached; the
first steps of every round are not timed (``--round-warmup``: a fresh attach measures its first 3 steps fully,
the steady steps are what a training run is made of). Every
step is timed to ``loss.item()`` (a host sync, as training loops log), so a step's time covers the device work.
A monitor reads the agent's socket all along (a separate process, ``--no-reader`` to leave it out), as under a
real ``batchmon`` beside the job, and says its refresh interval on connecting as the monitor does (``--reader-interval``,
default 1 s as ``batchmon``'s: the agent's windows and allocator reads follow it, batchmon.agent.pace). The result: the ratio of the median attached step to the median plain step,
the CPU time per step of the whole process (the agent's socket thread included) and of the main thread alone in
both modes - on a launch-bound GPU step the agent's cost is its main-thread CPU time (it launches nothing on the
device), a figure steadier than the wall clock. ``--armed`` adds a third mode: attached with quiet steady steps
switched off (batchmon.agent.quiet_steps: every hook on every step, as before them), for an in-process A/B of
what the quiet steps save.

Then a profiling pass (attached, not part of the timed rounds): each part of the agent's step path is wrapped
with a perf_counter_ns timer - forward hooks, backward, the optimizer-step end, inside it the counting, the
allocator figures, the message building and the hand-off to the socket thread - and reported in microseconds
per step (inclusive times; a wrapper adds ~0.2 us of its own per call).

    python3 bench/agent_cost.py --model mlp --device cpu --out /tmp/x.json      # tiny MLP, ~100 us steps
    python3 bench/agent_cost.py --model mlp --device cuda --out mlp.json        # 8 x 512 MLP, batch 256, Adam
    python3 bench/agent_cost.py --model resnet18 --device cuda --out rn.json    # 32x32, batch 128, SGD momentum
    python3 bench/agent_cost.py --model gpt2 --device cuda --out gpt2.json      # 124M, batch 8 x 512, AdamW

A model whose library is not installed (torchvision, transformers) is skipped: one line, exit 0, and the
output says so.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]

READER = r"""
import os, socket, sys, time, selectors
d = sys.argv[1]
sel = selectors.DefaultSelector()
seen = {}
lines = 0
while True:
    try:
        names = [n for n in os.listdir(d) if n.endswith('.sock')]
    except FileNotFoundError:
        names = []
    for n in names:
        if n not in seen:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(os.path.join(d, n))
            except OSError:
                s.close(); continue
            if len(sys.argv) > 2 and sys.argv[2]:
                s.sendall(bytes.fromhex(sys.argv[2]))  # its refresh line, as the monitor says it on connecting
            s.setblocking(False)
            seen[n] = s
            sel.register(s, selectors.EVENT_READ, n)
    for key, _ in sel.select(0.05):
        try:
            data = key.fileobj.recv(1 << 16)
        except BlockingIOError:
            continue
        except OSError:
            data = b''
        if not data:
            sel.unregister(key.fileobj); key.fileobj.close(); seen.pop(key.data, None)
        else:
            lines += data.count(b'\n')
            sys.stdout.write(f'{lines}\n'); sys.stdout.flush()
"""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("mlp", "resnet18", "gpt2"), default="mlp")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--rounds", type=int, default=None, help="rounds per mode (default 16 on cpu, 8 on cuda)")
    p.add_argument("--steps", type=int, default=None,
                   help="timed steps per round (default: about 0.3 s of steps on cpu, 1 s on cuda)")
    p.add_argument("--warmup", type=int, default=30, help="untimed steps first (default 30)")
    p.add_argument("--round-warmup", type=int, default=5,
                   help="untimed steps at the start of every round, both modes (default 5: after an attach the "
                        "first 3 steps are fully measured; the steady steps are what is timed)")
    p.add_argument("--batch-size", type=int, default=None, help="default: mlp 256 (cpu: 32), resnet18 128, gpt2 8")
    p.add_argument("--width", type=int, default=None, help="mlp width (default 512; cpu: 64)")
    p.add_argument("--layers", type=int, default=None, help="mlp layers (default 8; cpu: 3)")
    p.add_argument("--seq-len", type=int, default=512, help="gpt2 sequence length (default 512)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: steadier on a shared box)")
    p.add_argument("--profile-steps", type=int, default=None, help="steps of the profiling pass (default 3 rounds)")
    p.add_argument("--no-reader", action="store_true", help="no monitor process reading the agent's socket")
    p.add_argument("--reader-interval", type=float, default=1.0,
                   help="the refresh interval the reader says, as `batchmon --interval` does (default 1, the "
                        "monitor's default; 0: says nothing, as a monitor older than the refresh line)")
    p.add_argument("--armed", action="store_true",
                   help="a third mode: attached with quiet steady steps off (every hook on every step)")
    p.add_argument("--only", choices=("attached", "plain"), default=None,
                   help="run every round in this one mode, no profiling pass (for an outside sampling profiler, "
                        "e.g. py-spy, one process per mode)")
    p.add_argument("--cpu-smoke", action="store_true", help="a few short rounds: checks the script, not the cost")
    p.add_argument("--out", default=None, help="write the result as JSON here")
    p.add_argument("--table", nargs="+", metavar="JSON", default=None,
                   help="print README's table from result files (one column each: the profile's median us per "
                        "part, the added us and ratio, calls per step) and exit; runs nothing")
    args = p.parse_args(argv)
    if args.cpu_smoke:  # small everything: checks the script, not the cost
        args.device = "cpu"
        args.rounds, args.steps, args.warmup, args.profile_steps, args.round_warmup = 2, 10, 3, 10, 4
        args.batch_size = args.batch_size or 4
        args.seq_len = min(args.seq_len, 32)
    return args


# ------------------------------------------------------------------------------------------------ models


def build(args: argparse.Namespace, torch: Any, device: Any) -> tuple[Any, Any, Any, Callable[[], Any], dict]:
    """(model, optimizer, criterion, make_batch, settings) or raises ModuleNotFoundError for a missing library."""
    nn = torch.nn
    gen = torch.Generator(device="cpu").manual_seed(0)
    if args.model == "mlp":
        cpu = device.type == "cpu"
        width = args.width or (64 if cpu else 512)
        layers = args.layers or (3 if cpu else 8)
        batch = args.batch_size or (32 if cpu else 256)
        mods: list[Any] = []
        for i in range(layers):
            mods += [nn.Linear(width, width), nn.ReLU()]
        mods.append(nn.Linear(width, 10))
        model = nn.Sequential(*mods).to(device)
        # plain SGD: the smallest step a CPU makes of it (issue 14's "~100 us CPU step"; Adam's update alone is
        # ~250 us on the dev box)
        sgd = getattr(args, "optimizer", "adam") == "sgd"
        opt = torch.optim.SGD(model.parameters(), lr=1e-2) if sgd else torch.optim.Adam(model.parameters(), lr=1e-3)
        x = torch.randn(batch, width, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        settings = {"width": width, "layers": layers, "batch_size": batch, "optimizer": "SGD" if sgd else "Adam"}
        return model, opt, nn.CrossEntropyLoss(), lambda: (x, y), settings
    if args.model == "resnet18":
        import torchvision  # noqa: F401 - ModuleNotFoundError means: skip

        batch = args.batch_size or 128
        model = torchvision.models.resnet18(num_classes=10).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        x = torch.randn(batch, 3, 32, 32, generator=gen).to(device)
        y = torch.randint(0, 10, (batch,), generator=gen).to(device)
        settings = {"image": 32, "batch_size": batch, "optimizer": "SGD momentum 0.9"}
        return model, opt, nn.CrossEntropyLoss(), lambda: (x, y), settings
    import transformers  # noqa: F401 - ModuleNotFoundError means: skip

    batch = args.batch_size or 8
    cfg = transformers.GPT2Config() if not args.cpu_smoke else transformers.GPT2Config(
        n_layer=2, n_head=2, n_embd=64, vocab_size=1000, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(cfg).to(device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4)
    ids = torch.randint(0, cfg.vocab_size, (batch, args.seq_len), generator=gen).to(device)

    class LMLoss(nn.Module):
        def forward(self, logits: Any, labels: Any) -> Any:
            return nn.functional.cross_entropy(logits.view(-1, logits.size(-1)), labels.view(-1))

    class Wrapped(nn.Module):
        def __init__(self, inner: Any) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, ids: Any) -> Any:
            return self.inner(input_ids=ids).logits

    settings = {"config": "GPT2Config()" if not args.cpu_smoke else "GPT2Config(2 layers, 64 wide)", "batch_size": batch, "seq_len": args.seq_len, "optimizer": "AdamW"}
    return Wrapped(model), opt, LMLoss(), lambda: (ids, ids), settings


def training_step(model: Any, opt: Any, crit: Any, batch: Callable[[], Any]) -> Callable[[], None]:
    """One training step of ``build``'s parts, to ``loss.item()`` (a host sync, as training loops log): the loop
    every agent-cost bench times (agent_cost_paired.py, agent_cost_callgrind.py and here)."""

    def step() -> None:
        x, y = batch()
        opt.zero_grad(set_to_none=True)
        loss = crit(model(x), y)
        loss.backward()
        opt.step()
        loss.item()

    return step


# ------------------------------------------------------------------------------------------------ profiling


class Timers:
    """perf_counter_ns wrappers around the agent's step-path functions; inclusive ns and calls per part."""

    def __init__(self) -> None:
        self.ns: dict[str, int] = {}
        self.calls: dict[str, int] = {}
        self._undo: list[Callable[[], None]] = []

    def wrap(self, owner: Any, attr: str, part: str) -> None:
        original = getattr(owner, attr, None)
        if original is None:
            return
        clock = time.perf_counter_ns
        ns, calls = self.ns, self.calls
        ns.setdefault(part, 0)
        calls.setdefault(part, 0)

        def timed(*a: Any, **k: Any) -> Any:
            t = clock()
            try:
                return original(*a, **k)
            finally:
                ns[part] += clock() - t
                calls[part] += 1

        had_own = isinstance(owner, type) or attr in getattr(owner, "__dict__", {})
        setattr(owner, attr, timed)
        self._undo.append((lambda: setattr(owner, attr, original)) if had_own
                          else (lambda: delattr(owner, attr)))

    def undo(self) -> None:
        for fn in reversed(self._undo):
            fn()
        self._undo.clear()


def profile(handle: Any, run_steps: Callable[[int], list[float]], steps: int) -> dict[str, Any]:
    """The step path's parts in us per step, timed on ``steps`` attached steps."""
    from batchmon.agent import step_meter, torch_patches

    t = Timers()
    # wrapped on the instances and modules the step path reaches them through
    t.wrap(handle, "_root_pre", "forward pre hook (agent side)")
    t.wrap(handle, "_root_post", "forward post hook (agent side)")
    t.wrap(handle, "_crit_pre", "loss pre hook (agent side)")
    t.wrap(handle, "_crit_post", "loss post hook (agent side)")
    t.wrap(handle, "_before_backward", "before backward")
    t.wrap(handle, "_after_backward", "after backward")
    meter = handle._meter
    if hasattr(handle, "_step_hook"):
        # before issue 14's steady path: the optimizer's post hook was the bound _on_step registered at attach
        # (wrapping the attribute now would not reach it); the step's end inside it is looked up per call
        t.wrap(handle, "_finish_step", "step end (all of it, inside the optimizer's post hook)")
    else:  # torch_patches' one optimizer post hook looks the agent's _on_step up per call
        t.wrap(handle, "_on_step", "optimizer post hook (agent side: the step's end)")
        t.wrap(handle, "_finish_step", "  step end (all of it)")
    # a quiet step's root pre hook calls the handle's _open_quiet (the meter's method, bound at attach) first
    t.wrap(handle, "_open_quiet", "forward pre hook, quiet step (agent side: StepMeter.open_quiet)")
    t.wrap(meter, "begin_forward", "  forward: batch size, inputs as batch")
    t.wrap(meter, "finish_carried", "  step end: a carried step (the last Step repeated)")
    if hasattr(meter, "finish_quiet"):  # a quiet step's end joins the quiet run (no Step; from the optimizer's hook)
        t.wrap(meter, "finish_quiet", "step end: a quiet step (joins the run: step_runs)")
    t.wrap(meter, "finish", "  step end: measure (counting + message)")
    t.wrap(meter, "static_components", "    counting: parameters/gradients/optimizer")
    t.wrap(meter, "_cuda", "    allocator figures")
    if hasattr(step_meter, "new_step"):
        t.wrap(step_meter, "new_step", "    message building (Step)")
    else:  # the code before issue 14 built it with the dataclass's __init__
        t.wrap(step_meter, "Step", "    message building (Step)")
    t.wrap(handle._out, "step", "  transport hand-off")
    t.wrap(handle._watch, "step_ended", "  loss window bookkeeping")
    t.wrap(torch_patches, "_leaving", "  post hook: exception check")
    per_step: dict[str, list[int]] = {name: [] for name in t.ns}
    times: list[float] = []
    for _ in range(steps):
        before = dict(t.ns)
        times.extend(run_steps(1))
        for name, ns in t.ns.items():
            per_step[name].append(ns - before[name])
    t.undo()
    n = max(1, steps)
    parts = {name: {"us_per_step": round(ns / n / 1e3, 3),
                    "median_us": round(statistics.median(per_step[name]) / 1e3, 3) if per_step[name] else 0.0,
                    "calls_per_step": round(t.calls[name] / n, 3)}
             for name, ns in t.ns.items()}
    top = [k for k in parts if not k.startswith(" ")]
    totals = [sum(per_step[k][i] for k in top) for i in range(steps)]
    return {"steps": steps, "parts": parts,
            "agent_side_us_per_step": round(sum(parts[k]["us_per_step"] for k in top), 3),
            "agent_side_median_us": round(statistics.median(totals) / 1e3, 3) if totals else None,
            "median_step_s_while_profiled": statistics.median(times) if times else None}


def count_calls(run_steps: Callable[[int], list[float]], steps: int) -> dict[str, Any]:
    """Python-level calls per step (sys.setprofile), median over ``steps`` steps: all of them, and batchmon's own
    - the deterministic measure of the step path's work on a box whose clock is shared."""
    import batchmon

    package = str(Path(batchmon.__file__).resolve().parent)
    counts: list[tuple[int, int]] = []
    for _ in range(steps):
        seen = [0, 0]

        def prof(frame: Any, event: str, arg: Any) -> None:
            if event == "call":
                seen[0] += 1
                if frame.f_code.co_filename.startswith(package):
                    seen[1] += 1

        sys.setprofile(prof)
        try:
            run_steps(1)
        finally:
            sys.setprofile(None)
        counts.append((seen[0], seen[1]))
    opcodes: list[int] = []
    for _ in range(steps):  # bytecodes executed in batchmon's frames: its Python work, whatever the clock says
        n = [0]

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                n[0] += 1
            return local

        def tracer(frame: Any, event: str, arg: Any) -> Any:
            if frame.f_code.co_filename.startswith(package):
                frame.f_trace_opcodes = True
                return local
            return None

        sys.settrace(tracer)
        try:
            run_steps(1)
        finally:
            sys.settrace(None)
        opcodes.append(n[0])
    return {"python": statistics.median(c[0] for c in counts), "batchmon": statistics.median(c[1] for c in counts),
            "batchmon_max": max(c[1] for c in counts), "batchmon_bytecodes": statistics.median(opcodes),
            "steps": steps}


def hook_path_ns(handle: Any, model: Any, crit: Any, opt: Any, x: Any, y: Any, repeats: int = 7,
                 number: int = 2000) -> float:
    """The agent's side of one steady step with torch taken out: its entry points called directly, in a step's
    order, with the step's tensors. Armed (every hook): the root forward's pre and post hooks, the loss's, before
    and after backward, the optimizer's post hook. Quiet (batchmon.agent.quiet_steps): the hook functions torch
    calls - the root's pre hook, its error-only post hook, the optimizer's pre and post hooks - and the backward's
    count (the patched backward's own lines, inline here). Best of ``repeats`` runs of ``number`` steps, ns per
    step: the least noisy clock figure on a shared box."""
    import timeit

    if getattr(handle, "quiet", False):
        from batchmon.agent import torch_patches as tp

        rpre, qpost, spre, spost, meter = tp.root_pre_hook, tp.quiet_post_hook, tp._step_pre, tp._step_post, \
            handle._meter
        qargs: tuple[Any, ...] = (x,)
        none: dict[str, Any] = {}
        if getattr(handle._hooks, "calling", False):  # the root's instance _call_impl: its checks, open_quiet
            opener, ident, compiling = handle._open_quiet, __import__("threading").get_ident, tp._is_compiling
            rpre, qpost = (lambda m, a, k: (compiling(), ident(), opener(m, a))), (lambda m, a, k, r: None)

        def quiet() -> None:
            rpre(model, qargs, none)
            qpost(model, qargs, none, x)
            if meter.step_open:
                meter.backwards += 1
            spre(opt, (), none)
            spost(opt, (), none)

        return min(timeit.repeat(quiet, number=number, repeat=repeats)) / number * 1e9

    pre, post, cpre, cpost = handle._root_pre, handle._root_post, handle._crit_pre, handle._crit_post
    bb, ab, on_step = handle._before_backward, handle._after_backward, handle._on_step
    args, targs = (x,), (x, y)
    empty: dict[str, Any] = {}

    def one() -> None:
        pre(model, args, empty)
        post(model, args, empty, None)
        cpre(crit, targs, empty)
        cpost(crit, None)
        bb()
        ab()
        on_step(opt, (), empty)

    return min(timeit.repeat(one, number=number, repeat=repeats)) / number * 1e9


# ------------------------------------------------------------------------------------------------ main


def table(paths: list[str]) -> int:
    """README's "What the agent costs a step" table from result files, one column per file."""
    results = []
    for path in paths:
        try:
            results.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as exc:
            print(f"agent_cost: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    names: list[str] = []
    for r in results:
        names += [n for n in r.get("profile", {}).get("parts", {}) if n not in names]
    print("| part of the step path (median us per step) | " + " | ".join(Path(p).name for p in paths) + " |")
    print("| --- |" + " ---: |" * len(paths))
    for name in names:
        cells = []
        for r in results:
            part = r.get("profile", {}).get("parts", {}).get(name)
            cells.append("" if part is None else f"{part['median_us']:.1f}" + (
                f" ({part['calls_per_step']:g} calls)" if part["calls_per_step"] not in (0, 1) else ""))
        print(f"| {name.strip()} | " + " | ".join(cells) + " |")
    rows = [("agent side, inclusive (median step)", lambda r: r.get("profile", {}).get("agent_side_median_us")),
            ("attached - plain, median step (us)", lambda r: r.get("added_us_per_step")),
            ("main thread CPU added per step (us; paired rounds' median)",
             lambda r: (f"{r['main_thread_cpu_s_per_step']['added_us']} "
                        f"({r['main_thread_cpu_s_per_step']['paired_added_us_median']})"
                        if r.get("main_thread_cpu_s_per_step") else None)),
            ("ratio", lambda r: r.get("ratio")),
            ("Python calls per steady step, added (batchmon's own)",
             lambda r: (f"{r['calls_per_step']['python_added']:g} ({r['calls_per_step']['attached']['batchmon']:g})"
                        if r.get("calls_per_step") else None)),
            ("batchmon bytecodes executed per steady step",
             lambda r: r.get("calls_per_step", {}).get("attached", {}).get("batchmon_bytecodes")),
            ("the agent's entry points called directly (us)",
             lambda r: (round(r["calls_per_step"]["hook_path_ns"] / 1e3, 2)
                        if r.get("calls_per_step", {}).get("hook_path_ns") else None))]
    for label, get in rows:
        print(f"| {label} | " + " | ".join("" if get(r) is None else str(get(r)) for r in results) + " |")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        return table(args.table)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("agent_cost: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    try:
        model, opt, crit, batch, settings = build(args, torch, device)
    except ModuleNotFoundError as exc:
        result = {"benchmark": "agent_cost", "model": args.model, "skipped": f"{exc.name} is not installed"}
        print(f"agent_cost: {args.model} skipped: {exc.name} is not installed")
        if args.out:
            Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        return 0

    sock_dir = Path(tempfile.mkdtemp(prefix="bmc")) / "s"
    os.environ["BATCHMON_DIR"] = str(sock_dir)
    import batchmon
    from batchmon import protocol

    protocol.ensure_socket_dir(sock_dir)
    reader = None
    if not args.no_reader:
        said = protocol.refresh_line(args.reader_interval).hex() if args.reader_interval > 0 else ""
        reader = subprocess.Popen([sys.executable, "-c", READER, str(sock_dir), said], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True)

    train = training_step(model, opt, crit, batch)

    def one_step() -> float:
        t = time.perf_counter()
        train()
        return time.perf_counter() - t

    def run_steps(n: int) -> list[float]:
        return [one_step() for _ in range(n)]

    for _ in range(args.warmup):
        one_step()
    round_s = 0.3 if device.type == "cpu" else 1.0  # short rounds on a shared CPU: load swings hit both modes
    if args.steps is None:
        probe = statistics.median(run_steps(10))
        args.steps = int(min(2000, max(20, round_s / max(probe, 1e-6))))
    rounds_n = args.rounds or (16 if device.type == "cpu" else 8)
    modes = ("attached", "plain", "armed") if args.armed else ("attached", "plain")
    times: dict[str, list[float]] = {m: [] for m in modes}
    cpu: dict[str, list[float]] = {m: [] for m in modes}
    main_cpu: dict[str, list[float]] = {m: [] for m in modes}  # the training thread's own CPU time per step
    # (imported only for --armed: costab runs this bench against an older tree's agent, which has no quiet steps)
    switch: Any = None
    if args.armed:
        from batchmon.agent.quiet_steps import QuietSteps as switch

    def keep_armed(self: Any, forwards: int) -> None:
        return None
    rounds: list[dict[str, Any]] = []
    messages = 0
    agent_steps = 0
    for i in range(rounds_n):
        for mode in (args.only,) if args.only else (modes if i % 2 == 0 else tuple(reversed(modes))):
            original = switch.after_carried if switch is not None else None
            if mode == "armed":
                switch.after_carried = keep_armed
            handle = batchmon.attach(model, opt, name="agent_cost") if mode != "plain" else None
            run_steps(args.round_warmup)  # the steady steps are timed: not a new attach's fully measured first ones
            c0, m0 = time.process_time(), time.thread_time()
            round_times = run_steps(args.steps)
            c1, m1 = time.process_time(), time.thread_time()
            quiet = bool(getattr(handle, "quiet", False))
            if handle is not None:
                agent_steps += handle.last_step.step if handle.last_step is not None else 0
                handle.detach()
            if switch is not None:
                switch.after_carried = original
            times[mode].extend(round_times)
            cpu[mode].append((c1 - c0) / args.steps)
            main_cpu[mode].append((m1 - m0) / args.steps)
            rounds.append({"mode": mode, "median_s": statistics.median(round_times), "cpu_s_per_step": cpu[mode][-1],
                           "main_thread_cpu_s_per_step": main_cpu[mode][-1], "quiet_at_end": quiet})

    prof: dict[str, Any] = {"steps": 0, "parts": {}, "agent_side_us_per_step": None, "agent_side_median_us": None,
                            "median_step_s_while_profiled": None}
    calls: dict[str, Any] = {}
    if args.only is None:
        handle = batchmon.attach(model, opt, name="agent_cost_profile")
        run_steps(5)
        prof = profile(handle, run_steps, args.profile_steps or args.steps * 3)
        calls["attached"] = count_calls(run_steps, 20)
        if handle._watch.criterion_ref is not None:
            x, y = batch()
            calls["hook_path_ns"] = round(hook_path_ns(handle, model, crit, opt, x, y), 1)
        handle.detach()
        calls["plain"] = count_calls(run_steps, 20)
        calls["python_added"] = calls["attached"]["python"] - calls["plain"]["python"]
    if reader is not None:
        time.sleep(0.3)
        reader.terminate()
        out, _ = reader.communicate(timeout=10)
        counts = [int(x) for x in out.split()] if out.strip() else [0]
        messages = counts[-1]
    shutil.rmtree(sock_dir.parent, ignore_errors=True)

    def median(values: list[float]) -> float:
        return statistics.median(values) if values else float("nan")

    med_a, med_p = median(times["attached"]), median(times["plain"])
    ratio = med_a / med_p
    cpu_a, cpu_p = median(cpu["attached"]), median(cpu["plain"])
    main_a, main_p = median(main_cpu["attached"]), median(main_cpu["plain"])
    # paired: each iteration's attached round's main-thread CPU minus its plain round's (next to it: same load)
    pairs = []
    for k in range(0, len(rounds) if not args.only else 0, len(modes)):
        group = {r["mode"]: r["main_thread_cpu_s_per_step"] for r in rounds[k:k + len(modes)]}
        if "attached" in group and "plain" in group:
            pairs.append((group["attached"] - group["plain"]) * 1e6)
    result = {
        "benchmark": "agent_cost", "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or
        platform.machine(),
        "ratio": round(ratio, 5),
        "added_us_per_step": round((med_a - med_p) * 1e6, 2),
        "median_step_s": {"attached": med_a, "plain": med_p},
        "cpu_s_per_step": {"attached": cpu_a, "plain": cpu_p, "added_us": round((cpu_a - cpu_p) * 1e6, 2)},
        "main_thread_cpu_s_per_step": {"attached": main_a, "plain": main_p,
                                       "added_us": round((main_a - main_p) * 1e6, 2),
                                       "paired_added_us_median": round(statistics.median(pairs), 2) if pairs else None},
        **({"armed": {"median_step_s": median(times["armed"]), "main_thread_cpu_s_per_step": median(main_cpu["armed"]),
                      "added_us_per_step": round((median(times["armed"]) - med_p) * 1e6, 2),
                      "main_thread_added_us": round((median(main_cpu["armed"]) - main_p) * 1e6, 2)}}
           if args.armed else {}),
        "steps_per_mode": {k: len(v) for k, v in times.items()},
        "agent_steps_seen": agent_steps,
        "monitor_lines_read": messages if reader is not None else None,
        "profile": prof,
        "calls_per_step": calls,
        "rounds": rounds,
        "settings": {"rounds": rounds_n, "steps": args.steps, "warmup": args.warmup, "threads": args.threads,
                     "round_warmup": args.round_warmup,
                     "reader": reader is not None, "reader_interval": args.reader_interval if reader is not None else None, **settings},
        "torch": torch.__version__, "python": platform.python_version(), "time": time.time(),
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"agent_cost {args.model} on {device}: median step {med_a * 1e6:.1f} us attached vs {med_p * 1e6:.1f} us "
          f"plain, ratio {ratio:.4f} (+{(med_a - med_p) * 1e6:.1f} us); CPU per step +{(cpu_a - cpu_p) * 1e6:.1f} us "
          f"(main thread +{(main_a - main_p) * 1e6:.1f} us, paired rounds' median "
          f"{result['main_thread_cpu_s_per_step']['paired_added_us_median']} us); "
          f"{len(times['attached'])}+{len(times['plain'])} steps; monitor read {messages} lines")
    if args.armed:
        armed = result["armed"]
        print(f"  quiet steps off (every hook, every step): +{armed['added_us_per_step']} us a step, main thread "
              f"+{armed['main_thread_added_us']} us")
    print(f"  agent's step path (profiled, inclusive): mean {prof['agent_side_us_per_step']} us/step, "
          f"median step {prof['agent_side_median_us']} us")
    print(f"    {'part':<48} {'mean':>8}    {'median':>8}")
    for name, part in prof["parts"].items():
        if part["calls_per_step"]:
            print(f"    {name:<48} {part['us_per_step']:8.2f} us {part['median_us']:8.2f} us  "
                  f"({part['calls_per_step']:g} calls/step)")
    if calls:
        print(f"  Python calls per step (median of 20): {calls['attached']['python']} attached vs "
              f"{calls['plain']['python']} plain (+{calls['python_added']}); batchmon's own "
              f"{calls['attached']['batchmon']} (at most {calls['attached']['batchmon_max']}: a sampled step), "
              f"{calls['attached']['batchmon_bytecodes']:g} bytecodes executed in them")
        if "hook_path_ns" in calls:
            print(f"  the agent's entry points of one steady step called directly (no torch): "
                  f"{calls['hook_path_ns'] / 1e3:.2f} us (best of 7 x 2000)")
    if args.out:
        print(f"  wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
