"""bench.fit: the one estimator of steps(B) = S_min (1 + B_crit / B), its bootstrap interval and
the points a sweep's fit leaves out. Known answers: closed-form sweeps with known noise, and
MLPerf's published ResNet-50 reference convergence points (shipped with mlperf-logging)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bench import fit as bf

RESNET_TRAIN_SAMPLES = 1_281_167  # ImageNet-1k training images: steps = epochs x samples / B


def _simulated(rng, *, batches, seeds, s_min, b_crit, sigma):
    b = np.repeat(np.asarray(batches, float), seeds)
    return b, s_min * (1 + b_crit / b) * np.exp(rng.normal(0.0, sigma, b.size))


def test_interval_covers_the_truth_in_most_simulated_sweeps():
    """60 sweeps of 8 batches x 3 seeds, 5 % log-normal seed noise around S_min = 1000,
    B_crit = 300: the estimate is unbiased to a few per cent and the 95 % interval covers the
    truth in most sweeps. With 3 seeds the bootstrap understates the spread of a mean by
    sqrt(2/3), so the coverage is ~88 %, not 95 % (docs/results.md says so); >= 75 % is required."""
    rng = np.random.default_rng(12345)
    estimates, covered = [], 0
    for k in range(60):
        b, s = _simulated(rng, batches=2.0 ** np.arange(4, 12), seeds=3, s_min=1000, b_crit=300, sigma=0.05)
        fit = bf.fit_steps_curve(b, s, resamples=400, seed=k)
        estimates.append(fit["B_crit"])
        covered += fit["B_crit_lo"] <= 300 <= fit["B_crit_hi"]
        assert fit["B_crit_lo"] < fit["B_crit"] < fit["B_crit_hi"]
    assert np.median(estimates) == pytest.approx(300, rel=0.05)
    assert covered / 60 >= 0.75


def test_exact_points_give_the_parameters_back():
    batch = np.array([4, 16, 64, 256, 1024])
    fit = bf.fit_steps_curve(batch, 100 * (1 + 64 / batch))
    assert fit["S_min"] == pytest.approx(100) and fit["B_crit"] == pytest.approx(64)
    assert fit["rel_rms"] < 1e-6
    assert math.isnan(fit["B_crit_lo"]) and "one run per batch size" in fit["interval_reason"]


def test_seed_counts_do_not_weight_the_fit():
    """Per-run points and per-batch means give the same estimate: a batch with more seeds does
    not pull the curve (the shapes-gpu defect: 2 seeds at small batches, 1 at large)."""
    b = [128, 128, 256, 256, 512, 512, 1024, 2048]
    s = [782, 1173, 392, 588, 392, 294, 245, 125]
    means = pd.Series(s).groupby(b).mean()
    per_run, per_batch = bf.fit_steps_curve(b, s), bf.fit_steps_curve(means.index, means.values)
    assert per_run["B_crit"] == pytest.approx(per_batch["B_crit"], rel=1e-9)
    assert per_run["n_batches_with_spread"] == 3 and per_batch["n_batches_with_spread"] == 0


def test_the_interval_is_reproducible():
    rng = np.random.default_rng(7)
    b, s = _simulated(rng, batches=[32, 64, 128, 256, 512], seeds=2, s_min=500, b_crit=100, sigma=0.1)
    one, two = bf.fit_steps_curve(b, s), bf.fit_steps_curve(b, s)
    assert (one["B_crit_lo"], one["B_crit_hi"]) == (two["B_crit_lo"], two["B_crit_hi"])
    assert one["resamples"] == bf.BOOTSTRAP_RESAMPLES


def _resnet_rcp() -> tuple[list[float], list[float]]:
    mllog = pytest.importorskip("mlperf_logging")
    path = Path(mllog.__file__).parent / "rcp_checker" / "training_3.1.0" / "rcps_resnet.json"
    if not path.is_file():
        pytest.skip("mlperf-logging without the 3.1.0 ResNet RCPs")
    batch, steps = [], []
    for point in json.loads(path.read_text()).values():
        for epochs in point["Epochs to converge"]:
            batch.append(point["BS"])
            steps.append(epochs * RESNET_TRAIN_SAMPLES / point["BS"])
    return batch, steps


def test_mlperf_resnet50_reference_points():
    """The RCPs of MLPerf Training 3.1 (10 batch sizes, 1,632..67,840, 10-28 runs each): the
    estimator puts B_crit at ~47k (the old 1/steps-weighted per-run fit: 45.6k; unweighted:
    41.7k), S_min at ~944 steps, and the means within 4 % rms of the curve."""
    batch, steps = _resnet_rcp()
    fit = bf.fit_steps_curve(batch, steps)
    assert fit["n_batches"] == 10 and fit["n_points"] == len(steps)
    assert fit["B_crit"] == pytest.approx(47_066, rel=0.002)
    assert fit["S_min"] == pytest.approx(944.2, rel=0.002)
    assert fit["rel_rms"] < 0.04
    assert fit["B_crit_lo"] < fit["B_crit"] < fit["B_crit_hi"]
    # many runs per batch and a narrow seed spread (about one epoch): a narrow interval
    assert (fit["B_crit_hi"] - fit["B_crit_lo"]) / fit["B_crit"] < 0.1


def test_no_plateau_in_reach_is_said_not_guessed():
    rising = bf.fit_steps_curve([4, 8, 16], [100, 200, 400])
    assert math.isnan(rising["B_crit"]) and "plateau" in rising["reason"] and "below batch 4" in rising["reason"]
    perfect = bf.fit_steps_curve([4, 8, 16], [400, 200, 100])
    assert math.isnan(perfect["S_min"]) and "1/B throughout" in perfect["reason"]


def _runs(rows):
    return pd.DataFrame([{"sweep": "s", "run_id": f"r{i}", "status": "success", **r} for i, r in enumerate(rows)])


def test_fit_sweep_excludes_and_names_coarse_batches():
    # steps 100 (1 + 64 / B) at 16, 64, 1024: 500, 200, 106.25; batch 256 crossed at steps 150 and
    # 170 (the curve says 125) with the evaluations before them 48 steps earlier: 30 % of the mean
    rows = [{"global_batch_size": 16, "seed": 0, "steps_to_target": 500.0, "steps_to_target_resolution": 20.0},
            {"global_batch_size": 16, "seed": 1, "steps_to_target": 500.0, "steps_to_target_resolution": 20.0},
            {"global_batch_size": 64, "seed": 0, "steps_to_target": 200.0, "steps_to_target_resolution": 50.0},
            {"global_batch_size": 256, "seed": 0, "steps_to_target": 150.0, "steps_to_target_resolution": 48.0},
            {"global_batch_size": 256, "seed": 1, "steps_to_target": 170.0, "steps_to_target_resolution": 48.0},
            {"global_batch_size": 1024, "seed": 0, "steps_to_target": 106.25, "steps_to_target_resolution": 5.0},
            {"global_batch_size": 2048, "seed": 0, "steps_to_target": 50.0, "steps_to_target_resolution": 1.0,
             "status": "damaged"}]
    fit = bf.fit_sweep(_runs(rows))
    assert fit["excluded"] == ["batch 256: mean crossing at step 160, resolved to 48 steps (30%; 2 runs)"]
    assert fit["n_batches"] == 3 and fit["n_points"] == 4  # the damaged run is not a point either
    assert fit["B_crit"] == pytest.approx(64) and fit["S_min"] == pytest.approx(100)
    assert (fit["batch_min"], fit["batch_max"]) == (16, 1024)
    # 25 % is the limit, not beyond it: 50 of 200 is kept
    assert not any("batch 64" in e for e in fit["excluded"])


def test_a_late_seed_does_not_survive_alone():
    """Per run, 300 steps resolved to 98 (33 %) would go and 392 resolved to 98 (25 %) would stay,
    keeping only the slow seed; per batch (98 of the mean 343: 29 %) both go."""
    rows = [{"global_batch_size": 512, "seed": s, "steps_to_target": v, "steps_to_target_resolution": 98.0}
            for s, v in ((0, 392.0), (1, 294.0))]
    rows += [{"global_batch_size": b, "seed": 0, "steps_to_target": v, "steps_to_target_resolution": 1.0}
             for b, v in ((64, 200.0), (1024, 106.25))]
    fit = bf.fit_sweep(_runs(rows))
    assert len(fit["excluded"]) == 1 and fit["excluded"][0].startswith("batch 512:") and fit["n_points"] == 2


def test_fit_sweep_says_when_exclusion_leaves_too_little():
    rows = [{"global_batch_size": b, "seed": 0, "steps_to_target": 100.0, "steps_to_target_resolution": 50.0}
            for b in (16, 64)]
    fit = bf.fit_sweep(_runs(rows))
    assert math.isnan(fit["B_crit"]) and len(fit["excluded"]) == 2
    assert "(after excluding 2 coarsely resolved batch size(s))" in fit["reason"]


def test_seeds_that_agree_exactly_give_no_interval_to_speak_of():
    """Epoch-level evaluation often puts two seeds on the same step: resampling them shows no
    spread, and the zero-width interval is said to say nothing."""
    fit = bf.fit_steps_curve([4, 4, 16, 64], [1700, 1700, 500, 200])
    assert fit["B_crit_lo"] == fit["B_crit_hi"] and "agree exactly" in fit["interval_reason"]
