"""The plan's arithmetic, checked value by value against the papers' numbers."""

from __future__ import annotations

import math

import pytest

from bench.plan import PlanError, lr_at_step, scaled_lr, split_batch, steps_per_epoch


def test_linear_rule_goyal():
    # Goyal et al. 2017: eta = 0.1 * B / 256.
    assert scaled_lr(0.1, 256, 256, "linear") == pytest.approx(0.1)
    assert scaled_lr(0.1, 256, 8192, "linear") == pytest.approx(3.2)  # k = 32
    assert scaled_lr(0.1, 256, 1024, "linear") == pytest.approx(0.4)


def test_sqrt_and_none_rules():
    assert scaled_lr(0.1, 256, 1024, "sqrt") == pytest.approx(0.2)  # sqrt(4) = 2
    assert scaled_lr(0.1, 256, 8192, "none") == 0.1
    with pytest.raises(PlanError, match="unknown rule"):
        scaled_lr(0.1, 256, 512, "cubic")


def test_goyal_warmup_from_0_1_to_3_2_over_5_epochs():
    # ImageNet: 1,281,167 images; batch 8192 -> 157 steps/epoch (last partial); warmup 5 epochs.
    spe = math.ceil(1_281_167 / 8192)
    warm = 5 * spe
    kw = dict(start_lr=0.1, peak_lr=3.2, warmup_steps=warm, total_steps=90 * spe)
    assert lr_at_step(0, **kw) == pytest.approx(0.1)  # starts at the small-batch LR
    assert lr_at_step(warm // 2, **kw) == pytest.approx(0.1 + 3.1 * (warm // 2) / warm)
    assert lr_at_step(warm, **kw) == pytest.approx(3.2)  # reaches k * eta after 5 epochs
    assert lr_at_step(50 * spe, **kw) == pytest.approx(3.2)  # constant afterwards


def test_step_schedule_divides_at_milestones():
    kw = dict(start_lr=0.1, peak_lr=0.4, warmup_steps=0, total_steps=900, schedule="step",
              steps_per_epoch=10, milestones_epochs=(30, 60, 80), gamma=0.1)
    assert lr_at_step(299, **kw) == pytest.approx(0.4)
    assert lr_at_step(300, **kw) == pytest.approx(0.04)  # epoch 30
    assert lr_at_step(600, **kw) == pytest.approx(0.004)
    assert lr_at_step(850, **kw) == pytest.approx(0.0004)


def test_cosine_after_warmup():
    kw = dict(start_lr=0.1, peak_lr=1.0, warmup_steps=10, total_steps=110, schedule="cosine")
    assert lr_at_step(10, **kw) == pytest.approx(1.0)  # peak at the end of warmup
    assert lr_at_step(60, **kw) == pytest.approx(0.5)  # halfway through the decay
    assert lr_at_step(110, **kw) == pytest.approx(0.0)


def test_split_batch_and_accumulation():
    assert split_batch(256, 8) == (32, 32, 1)
    assert split_batch(8192, 1, 512) == (8192, 512, 16)  # 16 micro-steps of 512
    assert split_batch(1024, 2, 512) == (512, 512, 1)  # fits: no accumulation
    with pytest.raises(PlanError, match=r"450 is not divisible by num_workers 4"):
        split_batch(450, 4)
    with pytest.raises(PlanError, match=r"num_workers x max_micro_batch_size = 2 x 96 = 192"):
        split_batch(1024, 2, 96)


def test_plan_takes_a_micro_batch_per_per_worker_batch():
    from bench.config import SweepConfig
    from bench.plan import plan_sweep

    sweep = SweepConfig.model_validate(dict(
        name="m", workload="blobs", lr=dict(reference_lr=0.1, reference_batch_size=32), epochs=1,
        global_batch_sizes=[64, 256, 480], num_workers=[1, 2], seeds=[0], target_accuracy=0.5))
    plans = plan_sweep(sweep, max_micro_batch_size={64: 64, 256: 64, 480: 80, 128: 32})  # 32, 240: absent
    assert [(p.num_workers, p.per_worker_batch_size, p.micro_batch_size, p.grad_accum_steps) for p in plans] == [
        (1, 64, 64, 1), (1, 256, 64, 4), (1, 480, 80, 6), (2, 32, 32, 1), (2, 128, 32, 4), (2, 240, 240, 1)]


def test_plan_goes_seed_by_seed_within_a_worker_count():
    """A sweep cut short (a device lease ending) has every batch size once before any twice."""
    from bench.config import SweepConfig
    from bench.plan import plan_sweep

    sweep = SweepConfig.model_validate(dict(
        name="m", workload="blobs", lr=dict(reference_lr=0.1, reference_batch_size=32), epochs=1,
        global_batch_sizes=[64, 128], num_workers=[1, 2], seeds=[0, 1], target_accuracy=0.5))
    assert [p.run_id for p in plan_sweep(sweep)] == [
        "gbs000064-w001-s0", "gbs000128-w001-s0", "gbs000064-w001-s1", "gbs000128-w001-s1",
        "gbs000064-w002-s0", "gbs000128-w002-s0", "gbs000064-w002-s1", "gbs000128-w002-s1"]


def test_steps_per_epoch_partial_last_batch():
    assert steps_per_epoch(500, 4) == 125
    assert steps_per_epoch(500, 450) == 2  # 450 + a partial batch of 50
    assert steps_per_epoch(500, 256) == 2
    assert steps_per_epoch(500, 250, num_workers=1) == 2
    assert steps_per_epoch(101, 50, num_workers=2) == 2  # remainder 1 < 2 workers: dropped
