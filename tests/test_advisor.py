"""The fit advisor (issue 16 point 3): strategies asked of the model's own prediction, ranked for a target batch,
never promising what the prediction does not."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest

from batchmon.memory_model import ParamLayout, WhatIf, advice_for, advice_json, advice_text, advise, fit
from batchmon.memory_model.advisor import AMP_FACTOR, CHECKPOINT_FACTOR
from batchmon.protocol import Step
from test_memory_model import Truth

GIB = 2**30
T = Truth()


def _steps(truth: Truth = T, sizes=(32, 32, 32, 16), seconds=None) -> list[Step]:
    out = []
    for i, b in enumerate(sizes, start=1):
        s = truth.step(i, b)
        if seconds is not None:
            s = dataclasses.replace(s, step_seconds=seconds(b))
        out.append(s)
    return out


@pytest.fixture(scope="module")
def adam_model():
    return fit(_steps(), optimizer="AdamW")


def test_every_largest_batch_is_the_models_own_prediction(adam_model):
    for a in advise(adam_model, capacity=24 * GIB, target_batch=3000):
        assert a.spec is not None
        assert a.max_batch == adam_model.max_batch(24 * GIB, a.spec)
        assert a.what_if and a.factor_basis


def test_the_cheapest_way_to_the_target_comes_first(adam_model):
    target = 3000
    advice = advise(adam_model, capacity=24 * GIB, target_batch=target)
    assert advice[0].fits_target
    flags = [a.fits_target for a in advice]
    assert flags == sorted(flags, reverse=True)  # every strategy that reaches it before any that does not
    reach = [a for a in advice if a.fits_target]
    assert [a.step_time_factor for a in reach] == sorted(a.step_time_factor for a in reach)
    # brute force over the single-GPU what-ifs: nothing that reaches the target is cheaper than the first
    # (accumulation is ~free per sample when not measured, so the cheapest is AMP's factor or 1)
    for acc, amp, ckpt in itertools.product((1, 2, 4, 8), (False, True), (False, True)):
        spec = WhatIf(amp=amp, checkpointing=ckpt, accumulation_steps=acc)
        if (adam_model.max_batch(24 * GIB, spec) or 0) >= target:
            cost = (AMP_FACTOR if amp else 1.0) * (CHECKPOINT_FACTOR if ckpt else 1.0)
            assert advice[0].step_time_factor <= round(cost, 3) + 1e-9
    # and it fits: the prediction at the target under it leaves headroom
    first = advice[0]
    p = adam_model.predict(dataclasses.replace(first.spec, batch_size=target), device_total=24 * GIB)
    assert p.headroom is not None and p.headroom >= 0


def test_never_promises_what_does_not_fit(adam_model):
    plain = adam_model.max_batch(24 * GIB)
    target = plain + 1
    for a in advise(adam_model, capacity=24 * GIB, target_batch=target):
        assert a.fits_target == (a.max_batch is not None and a.max_batch >= target)
        if a.what_if == "as observed":
            assert not a.fits_target
    # a target beyond anything on one GPU: the fewest GPUs that reach it are named, and nothing else claims it
    huge = 10 * adam_model.max_batch(24 * GIB, WhatIf(amp=True, checkpointing=True, accumulation_steps=8))
    advice = advise(adam_model, capacity=24 * GIB, target_batch=huge)
    assert not any(a.fits_target for a in advice if "GPUs" not in a.what_if)


def test_sharding_names_the_gpus_a_target_needs():
    # a model whose fixed part dominates: sharding, not accumulation, is what frees memory
    big = Truth(parameters=6 * GIB, gradients=6 * GIB, optimizer=12 * GIB, act_per_sample=40_000_000)
    # wrapped per block as FSDP2 is used: a root of 1 GiB and 24 blocks of 5/24 GiB (what it gathers at once)
    layout = ParamLayout(root=GIB, largest_unit=5 * GIB // 24, units=24)
    model = fit(_steps(big, (8, 8, 8, 4)), optimizer="AdamW", param_layout=layout)
    device = 28 * GIB
    one_gpu = max((model.max_batch(device, WhatIf(amp=a, checkpointing=c, accumulation_steps=k, optimizer=o)) or 0)
                  for a, c, k, o in itertools.product((False, True), (False, True), (1, 2, 4, 8),
                                                      (None, "sgd-momentum", "sgd")))
    advice = advise(model, capacity=device, target_batch=one_gpu + 1)
    reach = [a for a in advice if a.fits_target]
    assert reach and all("needs" in a.what_if for a in reach)
    fewest = min(a.spec.shards for a in reach)
    assert all(a.spec.shards == fewest for a in reach)
    # a job already on 4 GPUs: sharding over them is offered as is
    on_four = advise(model, capacity=device, target_batch=one_gpu + 1, gpus=4)
    assert any(a.spec.shards == 4 and "needs" not in a.what_if and a.fits_target for a in on_four)


def test_sharding_without_a_layout_is_bounded_by_the_whole_model():
    # how the model would be wrapped is unknown: the whole model's parameters and gradients are counted
    # unsharded once more, so sharding a model whose fixed part dominates promises less than with a layout
    big = Truth(parameters=6 * GIB, gradients=6 * GIB, optimizer=12 * GIB, act_per_sample=40_000_000)
    bare = fit(_steps(big, (8, 8, 8, 4)), optimizer="AdamW")
    laid = fit(_steps(big, (8, 8, 8, 4)), optimizer="AdamW",
               param_layout=ParamLayout(root=GIB, largest_unit=5 * GIB // 24, units=24))
    device = 28 * GIB
    for n in (2, 4, 8):
        assert (bare.max_batch(device, WhatIf(shards=n)) or 0) < (laid.max_batch(device, WhatIf(shards=n)) or 0)
    assert "upper bound" in bare.predict(WhatIf(shards=8), device_total=device).basis
    assert "upper bound" not in laid.predict(WhatIf(shards=8), device_total=device).basis


def test_optimizer_and_amp_options_follow_what_was_observed():
    sgd = fit(_steps(dataclasses.replace(T, optimizer=0)), optimizer="SGD")
    assert not any(a.spec.optimizer for a in advise(sgd, capacity=24 * GIB, target_batch=10**6))
    adam = fit(_steps(), optimizer="AdamW")
    swaps = {a.spec.optimizer for a in advise(adam, capacity=24 * GIB, target_batch=10**6)}
    assert swaps <= {None, "sgd", "sgd-momentum"}
    amp_run = fit(_steps(), optimizer="AdamW", amp=True)
    assert not any(a.spec.amp for a in advise(amp_run, capacity=24 * GIB, target_batch=10**6))


def test_accumulation_factor_is_measured_from_the_step_times():
    # step time 20 ms + 1 ms per sample, at two batch sizes: 4 passes pay the 20 ms four times
    model = fit(_steps(seconds=lambda b: 0.020 + 0.001 * b), optimizer="AdamW")
    assert model.time_line is not None and model.time_line.fixed == pytest.approx(0.020)
    target = 4000  # needs 4 micro-batches without AMP or checkpointing (plain: 1311, 2 steps: 2622)
    rows = advise(model, capacity=24 * GIB, target_batch=target)
    acc4 = next(a for a in rows if a.what_if == "4 accumulation steps")
    assert acc4.fits_target and not any(a.what_if == "2 accumulation steps" and a.fits_target for a in rows)
    expected = (4 * 0.020 + 0.001 * target) / (0.020 + 0.001 * target)
    assert acc4.step_time_factor == pytest.approx(expected, abs=1e-3)
    assert "measured" in acc4.factor_basis
    # one batch size timed: no basis, the factor is the rule of thumb and says so
    unmeasured = fit(_steps(sizes=(32, 32, 32), seconds=lambda b: 0.05), optimizer="AdamW")
    assert unmeasured.time_line is None
    row = next(a for a in advise(unmeasured, capacity=24 * GIB, target_batch=10**5) if a.spec.accumulation_steps > 1)
    assert "estimated" in row.factor_basis


def test_without_a_target_the_list_is_ranked_by_batch_per_cost(adam_model):
    advice = advise(adam_model, capacity=24 * GIB)
    assert advice and all(a.fits_target is None for a in advice)
    scores = [(a.max_batch or 0) / a.step_time_factor for a in advice]
    assert scores == sorted(scores, reverse=True)
    assert not any("needs" in a.what_if for a in advice)  # no GPUs the run does not have, unasked


def test_bad_input_and_front_end_helpers(adam_model):
    with pytest.raises(ValueError):
        advise(adam_model, capacity=GIB, target_batch=0)
    with pytest.raises(ValueError):
        advise(adam_model, capacity=GIB, gpus=0)
    assert advice_for(None, GIB) == () and advice_for(adam_model, None) == ()
    rows = advice_json(advice_for(adam_model, 24 * GIB, target_batch=3000))
    json.dumps(rows)
    assert {"what_if", "max_batch", "step_time_factor", "factor_basis", "micro_batch"} <= set(rows[0])
    for row, a in zip(rows, advice_for(adam_model, 24 * GIB, target_batch=3000), strict=True):
        assert row["micro_batch"] * a.spec.accumulation_steps == a.max_batch  # effective = micro x steps
    assert advice_text(()) is None
    assert "step time x" in advice_text(advise(adam_model, capacity=24 * GIB))


def test_once_json_and_text_carry_the_ranked_advice(adam_model):
    from batchmon.monitor.render import format_table, snapshot_to_json
    from batchmon.snapshot import AgentView
    from test_render import hello, snapshot, unavailable

    steps = _steps()
    pred = adam_model.predict(WhatIf(), device_total=24 * GIB)
    agent = AgentView(key="box:101", source="local", hello=hello(101), last_step=steps[-1], prediction=pred,
                      model=adam_model)
    bare = AgentView(key="box:102", source="local", hello=hello(102), last_step=steps[-1], prediction=pred)
    d = json.loads(json.dumps(snapshot_to_json(snapshot(unavailable(), (agent, bare)))))
    advice = d["agents"][0]["prediction"]["advice"]
    expected = advise(adam_model, capacity=24 * GIB)
    assert [a["what_if"] for a in advice] == [a.what_if for a in expected]
    assert [a["max_batch"] for a in advice] == [a.max_batch for a in expected]
    assert all(isinstance(a["step_time_factor"], float) and a["factor_basis"] for a in advice)
    assert d["agents"][1]["prediction"]["advice"] == []  # no fitted model (a recording's own view): none
    text = format_table(snapshot(unavailable(), (agent,)), width=140)
    assert f"fit advice: {expected[0].what_if}: batch {expected[0].max_batch}" in text
