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


def _auto_sweep(**change):
    from bench.config import SweepConfig

    return SweepConfig.model_validate({
        "name": "auto", "workload": "blobs", "lr": {"reference_lr": 0.1, "reference_batch_size": 32}, "epochs": 1,
        "global_batch_sizes": [64, 256], "num_workers": [1], "seeds": [0], "target_accuracy": 0.5,
        "max_micro_batch_size": "auto", **change})


def test_auto_is_never_planned_as_no_cap():
    """Issue 15: plan_sweep used to read 'auto' without the probe's answer as 'no cap' while
    `run --dry-run` refused it; planning it unresolved is now an error, not a silent default."""
    from bench.plan import plan_sweep

    with pytest.raises(PlanError, match=r"max_micro_batch_size: auto needs the memory probe's micro-batches"):
        plan_sweep(_auto_sweep())
    assert [p.micro_batch_size for p in plan_sweep(_auto_sweep(), max_micro_batch_size={64: 64, 256: 128})] == [64, 128]


def test_one_resolver_for_max_micro_batch_size(tmp_path, capsys):
    """resolve_micro_batch is what `run` (and --dry-run) uses: the same answer, the same refusal."""
    from bench.memprobe import fit as memfit
    from bench.cli import main
    from bench.memprobe import resolve_micro_batch
    from bench.plan import plan_sweep

    assert resolve_micro_batch(_auto_sweep(max_micro_batch_size=None), results_dir=tmp_path) is None
    assert resolve_micro_batch(_auto_sweep(max_micro_batch_size=32), results_dir=tmp_path) == 32
    sweep = _auto_sweep()
    with pytest.raises(PlanError, match=r"auto needs a memory probe; run `batchscale probe-memory SWEEP_FILE .*\(SWEEP_FILE: this YAML file\)"):
        resolve_micro_batch(sweep, results_dir=tmp_path)
    path = tmp_path / "auto.yaml"
    path.write_text("name: auto\nworkload: blobs\nlr: {reference_lr: 0.1, reference_batch_size: 32}\nepochs: 1\n"
                    "global_batch_sizes: [64, 256]\ntarget_accuracy: 0.5\nmax_micro_batch_size: auto\n")
    argv = ["run", str(path), "--dry-run", "--results-dir", str(tmp_path)]
    assert main(argv) == 2 and "auto needs a memory probe" in capsys.readouterr().err
    # A probe measured on the CPU that fits 100 samples: 64 runs whole, 256 as 4 x 64.
    probe = memfit.ProbeResult(tries=[memfit.Try(100, True, 1000), memfit.Try(128, False, None)], largest_fit=100,
                               first_fail=128, fixed_bytes=None, per_sample_bytes=None, predicted_largest=None,
                               device="cpu (memory cap)", total_bytes=2000, memory_key=memfit.memory_key(sweep),
                               per_worker_batches=[64, 256], sweep="auto")
    memfit.write_probe(probe, memfit.default_output(sweep, tmp_path))
    micro = resolve_micro_batch(sweep, results_dir=tmp_path, use_gpu=False)
    assert micro == {64: 64, 256: 64}
    assert [(p.micro_batch_size, p.grad_accum_steps) for p in plan_sweep(sweep, max_micro_batch_size=micro)] == \
        [(64, 1), (64, 4)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "per-worker 64 = 1 x 64" in out and "per-worker 256 = 4 x 64" in out
    with pytest.raises(PlanError, match=r"measured on cpu \(memory cap\), but the cluster runs workers on GPUs"):
        resolve_micro_batch(sweep, results_dir=tmp_path, use_gpu=True)
