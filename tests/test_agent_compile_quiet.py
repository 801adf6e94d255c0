"""torch warns at every compiled-module call while global module hooks exist; the agent's discovery, loss-window
and layout hooks are global for the first forwards, so nanoGPT under `batchmon run` printed that warning twice
(seen on the H200). The agent must add nothing to a script's output, and must leave the warning filters as it
found them once its global hooks are gone."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch_models import TinyLM  # noqa: E402

TESTS = Path(__file__).resolve().parent

SCRIPT = textwrap.dedent("""
    import torch, torch.nn as nn, warnings
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    compiled = torch.compile(model, backend="eager")
    for i in range(12):
        loss = compiled(torch.randn(8, 16)).pow(2).mean()
        opt.zero_grad(); loss.backward(); opt.step()
    print("loss %.6f" % loss.item())
""")


def _run(tmp_path, *prefix: str, source: str = SCRIPT, args: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """``source`` as train.py, run plain (no ``prefix``) or under it (``batchmon run --``) with ``args``."""
    script = tmp_path / "train.py"
    script.write_text(source)
    env = {**os.environ, "BATCHMON_DIR": str(tmp_path / "socks")}
    return subprocess.run([*prefix, sys.executable, str(script), *args], capture_output=True, text=True, env=env,
                          timeout=240, cwd=tmp_path)


@pytest.mark.slow
def test_compiled_script_under_batchmon_run_prints_nothing_more(tmp_path):
    plain = _run(tmp_path)
    attached = _run(tmp_path, sys.executable, "-m", "batchmon", "run", "--")
    assert plain.returncode == attached.returncode == 0, attached.stderr
    assert attached.stdout == plain.stdout
    assert "global hooks" not in attached.stderr
    assert attached.stderr == plain.stderr


def test_the_filter_lives_exactly_as_long_as_the_agents_global_hooks():
    from batchmon.agent import global_hooks

    def ours() -> int:
        return sum(1 for f in warnings.filters
                   if getattr(f[1], "pattern", None) == global_hooks.COMPILE_HOOK_WARNING)

    compiled = torch.compile(torch.nn.Linear(2, 2), backend="eager")  # imports what compile adds filters for
    compiled(torch.ones(1, 2))
    before = list(warnings.filters)
    first = global_hooks.forward_pre(lambda module, args: None)
    second = global_hooks.forward(lambda module, args, out: None, always_call=True)
    assert global_hooks.live() == 2 and ours() == 1
    with warnings.catch_warnings(record=True) as seen:
        compiled(torch.ones(1, 2))
    assert not [w for w in seen if "global hooks" in str(w.message)]
    first.remove()
    first.remove()  # idempotent: one hook, one release
    assert global_hooks.live() == 1 and ours() == 1
    second.remove()
    assert global_hooks.live() == 0 and ours() == 0 and warnings.filters == before
    # a script's own global hook after ours are gone still gets torch's warning
    own = torch.nn.modules.module.register_module_forward_pre_hook(lambda module, args: None)
    try:
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            compiled(torch.ones(1, 2))
        assert [w for w in seen if "global hooks" in str(w.message)]
    finally:
        own.remove()


def test_dynamo_never_compiles_the_agents_eager_wrapper_as_a_frame():
    """After a graph break in a hook dynamo inlined, torch calls the hook again outside the trace with dynamo's
    frame callback set; dynamo compiled eager()'s wrapper as a frame of its own, guarded on the module it was
    called for - the global loss-search hooks meet every module type, so nanoGPT under torch.compile (H200,
    torch 2.11) recompiled it to dynamo's limit and printed "hit config.recompile_limit (8)" into the training's
    output. The wrapper's frame now runs without dynamo (torch_patches._skip_top_level): no compiled entry for
    its code, and the training's steps and losses as without the agent."""
    import batchmon
    from batchmon.agent import torch_patches
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    def train(attached: bool) -> list[float]:
        torch.manual_seed(0)
        model = TinyLM()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        handle = batchmon.attach(model, opt, name="compiled-lm") if attached else None
        compiled = torch.compile(model, backend="eager")
        idx, targets = torch.randint(0, 50, (4, 8)), torch.randint(0, 50, (4, 8))
        losses = []
        try:
            for _ in range(6):
                _, loss = compiled(idx, targets)
                loss.backward()
                opt.step()
                opt.zero_grad()
                losses.append(loss.item())
            if handle is not None:
                assert handle.error is None and len(handle.steps) == 6
        finally:
            if handle is not None:
                batchmon.detach()
        return losses

    torch._dynamo.reset()
    plain = train(False)
    attached = train(True)
    assert attached == plain
    wrapper = torch_patches._root_pre_eager.__code__  # (every eager() wrapper shares its code)
    assert _debug_get_cache_entry_list(wrapper) == []


LM_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, sys.argv[1])  # tests/: the model
    from torch_models import TinyLM
    torch.manual_seed(0)

    model = TinyLM()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # then compiled, as nanoGPT does
    model = torch.compile(model, backend="eager")
    idx, targets = torch.randint(0, 50, (4, 8)), torch.randint(0, 50, (4, 8))
    for i in range(8):
        if i % 4 == 0:  # nanoGPT estimates the loss first, in eval mode without gradients
            model.eval()
            with torch.no_grad():
                print("eval %.6f" % model(idx, targets)[1].item())
            model.train()
        _, loss = model(idx, targets)
        loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)
        print("loss %.6f" % loss.item())
    patches = sys.modules.get("batchmon.agent.torch_patches")
    if patches is not None:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
        print("wrapper frames compiled", len(_debug_get_cache_entry_list(patches._root_pre_eager.__code__)),
              file=sys.stderr)
""")


@pytest.mark.slow
def test_a_script_compiling_its_model_under_batchmon_run_recompiles_nothing_of_the_agents(tmp_path):
    """nanoGPT under `batchmon run` (torch.compile after the optimizer, the loss inside the model, the loss first
    estimated in eval mode without gradients): the first frame dynamo compiled was the agent's hook wrapper, before
    anything traced it, then recompiled for every module type to the limit, with dynamo's warning in the training's
    output (torch 2.11 on the H200, 2.13 here: 8 compiled entries without the mark made at torch.compile). Under
    `batchmon run`: the losses as plain, nothing added to stderr, the wrapper never compiled."""
    plain = _run(tmp_path, source=LM_SCRIPT, args=(str(TESTS),))
    attached = _run(tmp_path, sys.executable, "-m", "batchmon", "run", "--", source=LM_SCRIPT, args=(str(TESTS),))
    assert plain.returncode == attached.returncode == 0, attached.stderr
    assert attached.stdout == plain.stdout
    assert "recompile" not in attached.stderr, attached.stderr
    assert "wrapper frames compiled 0" in attached.stderr, attached.stderr
