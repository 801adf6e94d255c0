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

import pytest

torch = pytest.importorskip("torch")

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


def _run(tmp_path, *prefix: str) -> subprocess.CompletedProcess:
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "BATCHMON_DIR": str(tmp_path / "socks")}
    return subprocess.run([*prefix, sys.executable, str(script)], capture_output=True, text=True, env=env,
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
