"""The memory model against synthetic steps generated from a known linear truth (no torch here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest

from batchmon.memory_model import (FRAG_SURVIVAL, OPTIMIZER_STATES, Observation, ParamLayout, WhatIf, fit, fit_line, optimizer_kind,
                                   predict_from_steps)
from batchmon.protocol import ALL_COMPONENTS, COMPONENTS, Step, decode, encode


@dataclass(frozen=True)
class Truth:
    """A run whose memory is exactly linear in the batch size."""

    parameters: int = 400_000_000
    gradients: int = 400_000_000
    optimizer: int = 800_000_000
    act_per_sample: int = 3_000_000
    act_fixed: int = 0
    batch_per_sample: int = 49_152
    other_fixed: int = 60_000_000
    other_per_sample: int = 700_000
    cache: int = 90_000_000
    context: int = 520_000_000

    def components(self, b: int) -> dict[str, int]:
        return {"parameters": self.parameters, "gradients": self.gradients, "optimizer": self.optimizer,
                "activations": self.act_fixed + self.act_per_sample * b, "batch": self.batch_per_sample * b,
                "other": self.other_fixed + self.other_per_sample * b}

    def step(self, n: int, b: int, *, cache: int | None = None, retries: int = 0, reserved_extra: int = 0) -> Step:
        comps = self.components(b)
        peak = sum(comps.values())
        reserved = peak + (self.cache if cache is None else cache) + reserved_extra
        return Step(step=n, time=1000.0 + n, step_seconds=0.1, batch_size=b, components=comps, allocated=peak // 2,
                    peak_allocated=peak, reserved=reserved, num_alloc_retries=retries, num_ooms=0,
                    device_used=reserved + self.context)


T = Truth()


def test_one_batch_size_reproduces_the_observation_and_scales_the_per_sample_parts():
    model = fit([T.step(1, 16), T.step(2, 16)], optimizer="AdamW")
    assert model is not None
    p16 = model.predict()
    assert p16.batch_size == 16
    for name in COMPONENTS:
        assert p16.components[name] == T.components(16)[name], name
    assert p16.peak_allocated == sum(T.components(16).values())
    assert p16.components["cache"] == T.cache and p16.components["context"] == T.context
    p64 = model.predict(WhatIf(batch_size=64))
    assert p64.components["activations"] == T.act_per_sample * 64
    assert p64.components["batch"] == T.batch_per_sample * 64
    for name in ("parameters", "gradients", "optimizer"):
        assert p64.components[name] == getattr(T, name)
    # 'other' follows the documented one-batch-size rule: split by the fixed : per-sample share
    other16 = T.other_fixed + T.other_per_sample * 16
    fixed = T.parameters + T.gradients + T.optimizer
    variable = (T.act_per_sample + T.batch_per_sample) * 16
    share = variable / (fixed + variable)
    assert p64.components["other"] == round(other16 * (1 - share) + other16 * share * 64 / 16)
    assert "2 steps at batch 16 (steps 1-2)" in p64.basis
    assert "one batch size" in p64.basis


def test_two_or_more_batch_sizes_fit_the_linear_truth_exactly():
    steps = [T.step(1, 32), T.step(2, 32), T.step(3, 32), T.step(4, 8), T.step(5, 48)]
    model = fit(steps, optimizer="Adam")
    for b in (1, 7, 100, 1000, 5000):
        p = model.predict(WhatIf(batch_size=b))
        for name in COMPONENTS:
            assert p.components[name] == T.components(b)[name], (b, name)
        assert p.peak_allocated == sum(T.components(b).values())
        assert p.total == p.peak_allocated + T.cache + T.context
    assert model.basis.startswith("5 steps at batch 8, 32, 48 (steps 1-5)")


def test_second_batch_size_refines_the_prediction():
    truth = Truth(act_fixed=50_000_000)  # a batch-independent saved tensor the one-size rule can't see
    single = fit([truth.step(1, 16), truth.step(2, 16)])
    multi = fit([truth.step(1, 16), truth.step(2, 16), truth.step(3, 24)])
    target = 512
    real = sum(truth.components(target).values())
    err_single = abs(single.predict(WhatIf(batch_size=target)).peak_allocated - real)
    err_multi = abs(multi.predict(WhatIf(batch_size=target)).peak_allocated - real)
    assert err_single > 0
    assert err_multi == 0


def test_fit_line_least_squares_and_fallbacks():
    line = fit_line([(10, 1010), (20, 2010), (30, 3010)])
    assert line.fixed == pytest.approx(10) and line.per_sample == pytest.approx(100)
    assert fit_line([(8, 800), (8, 800)]).per_sample == pytest.approx(100)
    noisy = fit_line([(8, 900), (16, 800)])  # negative slope: noise, kept as a fixed mean
    assert noisy.per_sample == 0 and noisy.fixed == pytest.approx(850)


def _margin_and_max(steps, device):
    model = fit(steps, optimizer="adam")
    p = model.predict(WhatIf(batch_size=2048), device_total=device)
    return p.margin, p.max_batch


def test_margin_rises_with_measured_fragmentation_retries_and_reserved_growth():
    device = 141 * 2**30
    base = [T.step(i, 32, cache=20_000_000) for i in range(2, 5)]
    frag = [T.step(i, 32, cache=400_000_000) for i in range(2, 5)]
    retry = [T.step(i, 32, cache=20_000_000, retries=i) for i in range(2, 5)]  # the counter grows by 2
    growth = [T.step(i, 32, cache=20_000_000, reserved_extra=(i - 2) * 30_000_000) for i in range(2, 5)]
    m_base, b_base = _margin_and_max(base, device)
    m_frag, b_frag = _margin_and_max(frag, device)
    m_retry, b_retry = _margin_and_max(retry, device)
    m_growth, b_growth = _margin_and_max(growth, device)
    assert b_frag < b_base  # more of the pool cached at the observed batch: more fragmentation at the limit
    assert m_retry == m_base + 20_000_000 and b_retry <= b_base  # the cache is kept once more
    assert m_growth >= m_base + 60_000_000 and b_growth <= b_base


def test_at_the_limit_the_cache_shrinks_to_the_fragmentation_share_of_the_pool():
    # no fixed bytes beyond parameters and optimizer state, two batch sizes: the band is the central fit
    L = Truth(gradients=0, other_fixed=0)
    peak32 = sum(L.components(32).values())
    model = fit([L.step(i, 32, cache=400_000_000) for i in range(2, 5)] + [L.step(5, 16, cache=400_000_000)])
    ratio = 400_000_000 / peak32
    device = 141 * 2**30
    # off the limit (the observed batch on a big device, or no device): the cache as measured
    assert model.predict(WhatIf(batch_size=32), device_total=device).components["cache"] == 400_000_000
    assert model.predict(WhatIf(batch_size=32)).components["cache"] == 400_000_000
    # the largest batch: peak + context + FRAG_SURVIVAL x phi x peak fits, one more does not - whole free
    # segments are given back before the allocator raises, so the measured cache is not kept in full there
    mb = model.max_batch(device)
    for b, fits in ((mb, True), (mb + 1, False)):
        p = model.predict(WhatIf(batch_size=b), device_total=device)
        frag = round(FRAG_SURVIVAL * ratio * p.peak_allocated)
        assert p.band.high == p.total
        assert (p.peak_allocated + L.context + frag + p.margin <= device) == fits
        assert p.components["cache"] >= frag
        assert (p.headroom >= 0) == fits
    at = model.predict(WhatIf(batch_size=mb), device_total=device)
    assert at.total + at.margin <= device
    # a device too small for the measured cache at the observed batch, big enough for the fragmentation: the
    # observed batch fits, with less cached
    small = peak32 + L.context + round(FRAG_SURVIVAL * ratio * peak32) + 1000
    p = model.predict(WhatIf(batch_size=32), device_total=small)
    assert p.headroom >= 0 and p.components["cache"] < 400_000_000 and model.max_batch(small) >= 32
    assert model.max_batch(small - 2000) < 32


def test_the_allocators_split_free_bytes_bound_the_fragmentation_kept_at_the_limit():
    """Where the steps carry the allocator's inactive-split peak (Step.inactive_split), its share of the peak
    (psi) bounds what survives the flush at the limit; the smaller of FRAG_SURVIVAL x phi and psi is kept. A
    step without it (an agent that does not send it) keeps FRAG_SURVIVAL x phi; a psi above it changes nothing."""
    from batchmon.protocol import with_added

    L = Truth(gradients=0, other_fixed=0)
    peak32 = sum(L.components(32).values())
    device = 141 * 2**30

    def steps(inactive):
        out = []
        for i, b in ((2, 32), (3, 32), (4, 32), (5, 16)):
            out.append(with_added(L.step(i, b, cache=2_000_000_000), inactive_split=inactive))
        return out

    plain, low, high = fit(steps(None)), fit(steps(peak32 // 100)), fit(steps(peak32))
    phi = 2_000_000_000 / peak32
    assert plain.split_ratio is None and plain.frag_share == pytest.approx(FRAG_SURVIVAL * phi)
    assert low.split_ratio == pytest.approx(0.01, rel=1e-3) and low.frag_share == pytest.approx(0.01, rel=1e-3)
    assert high.frag_share == pytest.approx(FRAG_SURVIVAL * phi)
    assert low.max_batch(device) > plain.max_batch(device) == high.max_batch(device)
    mb = low.max_batch(device)
    p = low.predict(WhatIf(batch_size=mb), device_total=device)
    assert p.components["cache"] >= round(low.frag_share * p.peak_allocated)
    assert p.total + p.margin <= device
    assert any("fragmentation at the limit" in n for n in low.notes)
    assert fit([decode(encode(s)) for s in steps(peak32 // 100)]).frag_share == pytest.approx(low.frag_share)
    assert not any("fragmentation at the limit" in n for n in plain.notes + high.notes)


def test_retries_count_only_their_increase_during_the_observed_steps():
    device = 141 * 2**30
    base = [T.step(i, 32, cache=20_000_000) for i in range(2, 5)]
    old = [T.step(i, 32, cache=20_000_000, retries=431) for i in range(2, 5)]  # an earlier run's retries
    grew = [T.step(i, 32, cache=20_000_000, retries=431 + (i == 4)) for i in range(2, 5)]
    assert fit(old).alloc_retries == 0 and fit(grew).alloc_retries == 1
    assert _margin_and_max(old, device) == _margin_and_max(base, device)
    m_grew, b_grew = _margin_and_max(grew, device)
    assert m_grew == _margin_and_max(base, device)[0] + 20_000_000 and b_grew <= _margin_and_max(base, device)[1]
    assert "allocator retries" in fit(grew).basis and "allocator retries" not in fit(old).basis


def test_context_lowers_the_largest_batch_and_a_stale_reading_bounds_it():
    device = 141 * 2**30
    small, large = Truth(context=300_000_000), Truth(context=900_000_000)
    m_small = fit([small.step(i, 32) for i in range(2, 5)])
    m_large = fit([large.step(i, 32) for i in range(2, 5)])
    assert m_small.context == 300_000_000 and m_large.context == 900_000_000
    p_small = m_small.predict(WhatIf(batch_size=2048), device_total=device)
    p_large = m_large.predict(WhatIf(batch_size=2048), device_total=device)
    assert p_large.total + p_large.margin - (p_small.total + p_small.margin) == 600_000_000
    assert m_large.max_batch(device) < m_small.max_batch(device)
    # an NVML reading taken before the pool grew (device used < reserved, as the agent's 1 s sample can be):
    # not "context 0", but device used - parameters, an upper bound
    stale = [Step.from_dict({**T.step(i, 32).to_dict(), "device_used": 813_000_000}) for i in range(2, 5)]
    model = fit(stale)
    assert model.context == 813_000_000 - T.parameters
    assert "older than the pool" in model.basis
    assert model.max_batch(device) < fit([replace_used(s, None) for s in stale]).max_batch(device)


def replace_used(step: Step, used: int | None) -> Step:
    return Step.from_dict({**step.to_dict(), "device_used": used})


def test_max_batch_solves_at_the_boundaries():
    model = fit([T.step(1, 16), T.step(2, 32)])
    device = 80 * 10**9
    mb = model.max_batch(device)
    assert mb is not None and mb > 32
    at = model.predict(WhatIf(batch_size=mb), device_total=device)
    above = model.predict(WhatIf(batch_size=mb + 1), device_total=device)
    assert at.headroom >= 0 and above.headroom < 0
    assert at.max_batch == mb
    # a device exactly the size of the band's high side + margin at some batch: that batch is the answer
    p = model.predict(WhatIf(batch_size=1000), device_total=6 * 10**9)  # 31x the observed: not far
    exact = p.band.high + p.margin
    assert model.max_batch(exact) == 1000
    assert model.max_batch(exact - 1) == 999
    # not even batch 1 fits: 0; unknown device: None
    tiny = sum(T.components(1).values())
    assert model.max_batch(tiny) == 0
    assert model.predict().max_batch is None and model.predict().headroom is None


def test_max_batch_unknown_when_nothing_grows_with_the_batch():
    steps = [Step(step=1, time=0.0, step_seconds=None, batch_size=8,
                  components={"parameters": 100, "gradients": 100, "optimizer": 0, "activations": 0, "batch": 0,
                              "other": 0})]
    model = fit(steps)
    assert model.max_batch(10**9) is None


def test_margin_override_bytes_and_fraction():
    model = fit([T.step(1, 16), T.step(2, 32)])
    device = 100 * 10**9
    derived = model.max_batch(device)
    assert model.max_batch(device, margin=0) >= derived
    assert model.max_batch(device, margin=10 * 10**9) < derived
    assert model.predict(WhatIf(batch_size=100), device_total=device, margin=0.1).margin == 10 * 10**9


def test_what_if_optimizer_swap_uses_observed_state_bytes():
    model = fit([T.step(1, 16), T.step(2, 32)], optimizer="AdamW")
    per_state = T.optimizer / 2
    for name, k in OPTIMIZER_STATES.items():
        p = model.predict(WhatIf(optimizer=name))
        assert p.components["optimizer"] == round(k * per_state), name
    # SGD observed (no state): states sized like the gradients
    truth = Truth(optimizer=0)
    sgd = fit([truth.step(1, 16), truth.step(2, 32)], optimizer="SGD")
    assert sgd.predict(WhatIf(optimizer="adam")).components["optimizer"] == 2 * truth.gradients
    assert optimizer_kind("FusedAdam") == "adam" and optimizer_kind("torch.optim.AdamW") == "adamw"
    assert optimizer_kind("RMSprop") is None


def test_lazy_adam_state_is_assumed_before_it_exists():
    truth = Truth(optimizer=0)
    model = fit([truth.step(1, 16)], optimizer="Adam")
    assert model.predict().components["optimizer"] == 2 * truth.gradients
    assert "not yet seen" in model.basis


def test_what_if_amp_checkpointing_accumulation_shards_expected_values():
    model = fit([T.step(1, 16), T.step(2, 32)], optimizer="adam")
    base = model.predict(WhatIf(batch_size=256))
    amp = model.predict(WhatIf(batch_size=256, amp=True))
    # no shrink assumed (what autocast lowers is not measured); its 16-bit weight copies are added
    assert amp.components["activations"] == round(T.act_per_sample * 256 + T.gradients / 2)
    assert "saved activations and activation gradients assumed not to shrink" in amp.basis
    for name in ("parameters", "gradients", "optimizer", "batch", "other"):
        assert amp.components[name] == base.components[name]
    # already AMP: the what-if changes nothing
    observed_amp = fit([T.step(1, 16), T.step(2, 32)], amp=True)
    assert observed_amp.predict(WhatIf(batch_size=256, amp=True)).components == base.components

    for layers, factor in ((1, 1.0), (3, 1.0), (4, 0.75), (16, 3 / 16)):
        ck = model.predict(WhatIf(batch_size=256, checkpointing=True, checkpoint_layers=layers))
        assert ck.components["activations"] == round(T.act_per_sample * 256 * factor)
        assert ck.components["batch"] == base.components["batch"]
    default = model.predict(WhatIf(batch_size=256, checkpointing=True))
    assert "12 blocks assumed" in default.basis
    assert default.components["activations"] == round(T.act_per_sample * 256 * 3 / 12)
    assert "outside the blocks" in default.basis

    acc = model.predict(WhatIf(batch_size=256, accumulation_steps=4))
    micro = model.predict(WhatIf(batch_size=64))
    assert acc.micro_batch == 64 and acc.batch_size == 256
    for name in COMPONENTS:
        assert acc.components[name] == micro.components[name]
    odd = model.predict(WhatIf(batch_size=10, accumulation_steps=4))
    assert odd.micro_batch == 3

    # sharding without a parameter layout: the whole model's parameters and gradients counted unsharded once
    # more beside the shards (the upper bound: no wrapping gathers more at once)
    sharded = model.predict(WhatIf(batch_size=256, shards=8))
    assert sharded.components["optimizer"] == round(T.optimizer / 8)
    for name in ("parameters", "gradients"):
        assert sharded.components[name] == round(getattr(T, name) / 8 + T.gradients)
    assert sharded.components["activations"] == base.components["activations"]
    assert "upper bound" in sharded.basis
    # with the layout FSDP2 shards by: the root and two blocks, as parameters and as gradients
    layout = ParamLayout(root=T.gradients // 4, largest_unit=T.gradients // 16, units=12)
    laid = fit([T.step(1, 16), T.step(2, 32)], optimizer="adam", param_layout=layout)
    sharded = laid.predict(WhatIf(batch_size=256, shards=8))
    for name in ("parameters", "gradients"):
        assert sharded.components[name] == round(getattr(T, name) / 8 + T.gradients // 4 + 2 * (T.gradients // 16))
    assert sharded.components["optimizer"] == round(T.optimizer / 8)
    assert "two blocks" in sharded.basis and "upper bound" not in sharded.basis


def test_what_ifs_are_monotonic_in_max_batch():
    model = fit([T.step(1, 16), T.step(2, 32)], optimizer="adam")
    device = 141 * 2**30
    plain = model.max_batch(device)
    # AMP: a lower bound of the gain (issue 13: never above the real largest batch); with no shrink assumed, the
    # weight copies make it a cost on this synthetic run
    assert model.max_batch(device, WhatIf(amp=True)) <= plain
    assert model.max_batch(device, WhatIf(checkpointing=True)) > plain
    assert model.max_batch(device, WhatIf(optimizer="sgd")) > plain
    assert model.max_batch(device, WhatIf(shards=8)) > plain
    acc = model.max_batch(device, WhatIf(accumulation_steps=4))
    assert acc == 4 * plain  # the micro-batch limit, times the steps
    for n in (2, 4, 8):
        assert model.max_batch(device, WhatIf(shards=n * 2)) >= model.max_batch(device, WhatIf(shards=n))
    prev = None
    for b in (1, 10, 100, 1000, 10000):
        total = model.predict(WhatIf(batch_size=b)).total
        assert prev is None or total > prev
        prev = total


def test_bad_what_if_values_raise_value_error():
    model = fit([T.step(1, 16)])
    for bad in (WhatIf(batch_size=0), WhatIf(accumulation_steps=0), WhatIf(shards=0), WhatIf(optimizer="lion"),
                WhatIf(checkpointing=True, checkpoint_layers=0)):
        with pytest.raises(ValueError):
            model.predict(bad, device_total=10**10)


def test_predict_from_steps_and_unusable_steps():
    assert predict_from_steps([], 10**10) is None
    no_batch = Step(step=1, time=0.0, step_seconds=None, batch_size=None, components=T.components(1))
    assert predict_from_steps([no_batch], 10**10) is None
    # steps that went through the protocol codec work the same
    steps = [decode(encode(T.step(n, b))) for n, b in ((3, 16), (4, 16), (9, 8))]
    p = predict_from_steps(steps, 80 * 2**30, WhatIf(batch_size=100), optimizer="AdamW")
    assert p is not None and set(p.components) == set(ALL_COMPONENTS)
    assert p.total == sum(p.components.values())
    assert p.basis.startswith("3 steps at batch 8, 16 (steps 3-9)")
    assert p.max_batch is not None and p.headroom is not None


def test_cpu_steps_without_allocator_figures():
    steps = [Step(step=n, time=0.0, step_seconds=None, batch_size=b, components=T.components(b))
             for n, b in ((1, 4), (2, 8))]
    model = fit(steps)
    p = model.predict(WhatIf(batch_size=20))
    assert p.components == {**T.components(20), "cache": 0, "context": 0}
    assert "no allocator peak" in p.basis


def test_observation_from_step_and_predict_is_cheap():
    obs = Observation.from_step(T.step(5, 16))
    assert obs.cache == T.cache and obs.context == T.context and obs.batch_size == 16
    model = fit([obs, Observation.from_step(T.step(6, 32))])
    import time

    start = time.perf_counter()
    for b in range(1, 201):
        model.predict(WhatIf(batch_size=b), device_total=141 * 2**30)
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5, elapsed  # a UI draws a chart of 200 batch sizes per frame
    assert math.isfinite(model.frag_ratio)


def test_first_step_with_lazy_state_does_not_drag_the_peak_down():
    first = T.step(1, 32)
    low_peak = Step(**{**{k: getattr(first, k) for k in ("step", "time", "step_seconds", "batch_size", "components",
                                                          "allocated", "reserved", "num_alloc_retries", "num_ooms",
                                                          "device_used")},
                       "peak_allocated": first.peak_allocated - T.optimizer})  # state created after backward
    model = fit([low_peak, T.step(2, 32), T.step(3, 16)], optimizer="adam")
    for b in (64, 512):
        assert model.predict(WhatIf(batch_size=b)).peak_allocated == sum(T.components(b).values())


def test_measured_saved_split_derives_checkpointing_and_amp_what_ifs():
    """Without segment peaks (no allocator phases) the derived what-ifs change the components: checkpointing
    drops the bytes saved inside the blocks less their inputs and puts one block's internals twice into 'other'
    (recomputed, and their gradients); AMP sheds what the graph walk says autocast would not keep and adds the
    16-bit weight copies twice. Per sample, on the activations' own basis (the split is in the same bytes)."""
    from batchmon.memory_model import SavedSplit

    steps = [T.step(1, 32), T.step(2, 32), T.step(3, 16)]
    rule = fit(steps, optimizer="AdamW")
    saved = T.act_per_sample * 16  # the split measured at batch 16: 80% inside 12 blocks, inputs 6%, AMP 60%
    split = SavedSplit(batch=16, saved=saved, in_blocks=saved * 8 // 10, block_inputs=saved * 6 // 100, blocks=12,
                       amp_saved=saved * 6 // 10)
    derived = fit(steps, optimizer="AdamW", saved_split=split)
    dropped = T.act_per_sample * (0.8 - 0.06)
    recompute = T.act_per_sample * 0.8 / 12
    p = derived.predict(WhatIf(batch_size=64, checkpointing=True))  # n: the measured block count
    assert p.components["activations"] == round((T.act_per_sample - dropped) * 64)
    assert p.components["other"] == round(rule.lines["other"].at(64) + 2 * recompute * 64)
    assert any("as measured at batch 16" in n for n in p.basis_fields.what_if)
    copies = 0.5 * rule.trainable_bytes
    amp = derived.predict(WhatIf(batch_size=64, amp=True))
    assert amp.components["activations"] == round(copies + T.act_per_sample * 0.6 * 64)
    assert amp.components["other"] == round(rule.lines["other"].at(64) + copies)
    assert any("as measured from the ops that save them" in n for n in amp.basis_fields.what_if)
    # both: checkpointing's drop, and the kept tensors assumed not to shrink under autocast
    both = derived.predict(WhatIf(batch_size=64, amp=True, checkpointing=True))
    assert both.components["activations"] == round(copies + (T.act_per_sample - dropped) * 64)
    # without a split the documented rules, unchanged
    act = rule.lines["activations"]
    assert rule.predict(WhatIf(batch_size=64, checkpointing=True)).components["activations"] == round(act.at(64) * 0.25)
    # nothing measured that a what-if needs (no block, no walk: a compiled graph): the rule again
    none = fit(steps, optimizer="AdamW", saved_split=SavedSplit(16, 1000, 0, 0, 0, None))
    assert none.predict(WhatIf(batch_size=64, amp=True)).components == \
        rule.predict(WhatIf(batch_size=64, amp=True)).components
    assert SavedSplit(16, 0, 0, 0, 3).checkpoint_share(3) is None
