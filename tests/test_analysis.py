"""bench.analysis on synthetic logs with hand-computed answers."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from bench import analysis as an
from bench.records import load_results
from fixtures_results import Eval, RunSpec, make_plan, sweep_config, write_run, write_sweep

# test accuracy per epoch 0..5; 0.80 is first reached (>=, equality counts) after epoch 3
ACCS = [0.30, 0.50, 0.79, 0.80, 0.70, 0.85]


def _run(tmp_path, *, target=0.8, status="success", accs=ACCS, batch=16, seed=0, **kw):
    plan = make_plan("s1", batch, seed=seed, epochs=len(accs) - 1)  # batch 16: 32 steps per epoch
    evals = [Eval(i, a + 0.05, a, 1.0 - a, 1.1 - a) for i, a in enumerate(accs)]
    write_run(tmp_path / "s1", RunSpec(plan, evals, epoch_time_s=0.5, status=status, reason=kw.get("reason")),
              config=sweep_config("s1", target=target))
    return tmp_path / "s1"


def test_to_target_hand_computed(tmp_path):
    df = an.runs_frame(load_results([_run(tmp_path)]))
    row = df.iloc[0]
    assert list(df.columns[:len(an.RUN_COLUMNS)]) == an.RUN_COLUMNS
    assert row.epochs_to_target == 3
    assert row.steps_to_target == 3 * 32  # 500 samples / batch 16 -> 31 full + 1 partial = 32 steps
    # 3 epochs of the 500-sample set (the 32nd step of each epoch is a partial batch of 4; the
    # fixture used to log it as 16 samples, which put the epoch position at 3.07)
    assert row.samples_to_target == 3 * 500
    assert row.time_to_target_s == pytest.approx(1.5)  # 3 epochs x 0.5 s, eval excluded
    assert row.final_test_acc == pytest.approx(0.85) and row.best_test_acc == pytest.approx(0.85)
    assert row.gap_acc == pytest.approx(0.05)
    assert row.gap_loss == pytest.approx(0.1)
    assert row.target_accuracy == 0.8 and row.status == "success"
    # last 20 % of 5 epochs: epochs > 4, i.e. epoch 5 only -> one value -> unknown
    assert math.isnan(row.test_acc_std_last_k)


def test_target_override_and_never_reached_stays(tmp_path):
    records = load_results([_run(tmp_path)])
    assert an.runs_frame(records, target_accuracy=0.84).iloc[0].epochs_to_target == 5
    df = an.runs_frame(records, target_accuracy=0.9)
    assert len(df) == 1
    assert df[["epochs_to_target", "steps_to_target", "time_to_target_s", "samples_to_target"]].isna().all(axis=None)
    table = an.batch_table(df)
    assert table.iloc[0].n_runs == 1 and table.iloc[0].n_reached == 0
    assert math.isnan(table.iloc[0].epochs_to_target_olympic)


def test_incomplete_and_failed_runs_are_listed(tmp_path):
    _run(tmp_path, status="incomplete", seed=1)
    _run(tmp_path, status="diverged", seed=2, reason="loss 1e9 > 10x initial", accs=[0.3, 0.35])
    df = an.runs_frame(load_results([tmp_path / "s1"])).set_index("seed")
    assert df.loc[1, "status"] == "incomplete"
    assert math.isnan(df.loc[1, "final_test_acc"])  # no summary: final values unknown
    assert df.loc[1, "epochs_to_target"] == 3  # but the log says when it got there
    assert "summary.json" in df.loc[1, "failure_reason"]
    assert df.loc[2, "status"] == "diverged" and "10x initial" in df.loc[2, "failure_reason"]
    assert math.isnan(df.loc[2, "epochs_to_target"])


def test_fluctuation_over_last_fifth(tmp_path):
    accs = [0.3] + [0.5] * 7 + [0.80, 0.84]  # 9 epochs: last 20 % = epochs > 7.2 -> epochs 8, 9
    df = an.runs_frame(load_results([_run(tmp_path, accs=accs)]))
    assert df.iloc[0].test_acc_std_last_k == pytest.approx(np.std([0.80, 0.84], ddof=1))


def test_olympic_mean():
    assert an.olympic_mean([10, 12, 14, 30]) == pytest.approx(13.0)  # drop 10 and 30
    assert an.olympic_mean([10, 20]) == pytest.approx(15.0)  # n < 3: plain mean
    assert an.olympic_mean([10, 12, np.nan, 14]) == pytest.approx(12.0)  # NaN ignored: [10,12,14] -> 12
    # MLPerf: one non-converging run counts as slowest and is dropped with the fastest
    assert an.olympic_mean([10, 12, np.nan, 14], missing_as_worst=True) == pytest.approx(13.0)
    assert math.isnan(an.olympic_mean([10, np.nan, np.nan], missing_as_worst=True))
    assert math.isnan(an.olympic_mean([]))


def test_seed_stats():
    df = pd.DataFrame({"sweep": "a", "global_batch_size": [4, 4, 4, 8], "num_workers": 1,
                       "v": [1.0, 2.0, 6.0, np.nan]})
    stats = an.seed_stats(df, "v").set_index("global_batch_size")
    assert stats.loc[4, "mean"] == pytest.approx(3.0)
    assert stats.loc[4, "std"] == pytest.approx(np.std([1, 2, 6], ddof=1))
    assert stats.loc[4, "n"] == 3 and stats.loc[4, "olympic_mean"] == pytest.approx(2.0)
    assert stats.loc[8, "n"] == 0 and stats.loc[8, "n_total"] == 1 and math.isnan(stats.loc[8, "mean"])


def test_fit_recovers_known_curve_with_noise():
    rng = np.random.default_rng(0)
    batch = np.repeat(2.0 ** np.arange(3, 13), 3)  # 8 ... 4096, 3 seeds each
    steps = 500.0 * (1 + 256.0 / batch) * rng.normal(1.0, 0.03, batch.size)
    fit = an.fit_steps_curve(batch, steps)
    assert fit["S_min"] == pytest.approx(500.0, rel=0.05)
    assert fit["B_crit"] == pytest.approx(256.0, rel=0.05)
    assert 0 < fit["S_min_err"] < 25 and 0 < fit["B_crit_err"] < 25
    assert fit["n_points"] == 30 and fit["n_batches"] == 10


def test_fit_exact_and_unknown():
    batch = np.array([4, 16, 64, 256, 1024])
    exact = an.fit_steps_curve(batch, 100 * (1 + 64 / batch))
    assert exact["S_min"] == pytest.approx(100) and exact["B_crit"] == pytest.approx(64)
    one = an.fit_steps_curve([4, 4, 16], [100, 110, np.nan])
    assert math.isnan(one["S_min"]) and one["reason"]
    rising = an.fit_steps_curve([4, 8, 16], [100, 200, 400])  # more steps at larger batch: no fit
    assert math.isnan(rising["B_crit"]) and "plateau" in rising["reason"]


def test_scaling_regimes_on_constructed_curve():
    batch = [1, 2, 4, 8, 16, 32, 64, 128]
    steps = [1024, 512, 256, 160, 120, 115, 114, np.nan]  # per doubling: 2, 2, 1.6, 1.33, 1.04, 1.01
    r = an.scaling_regimes(batch, steps).set_index("global_batch_size")
    assert r.loc[4, "speedup_per_doubling"] == pytest.approx(2.0)
    assert r.loc[8, "speedup_per_doubling"] == pytest.approx(1.6)
    assert pd.isna(r["regime"].iloc[0])  # no segment ends at the smallest batch: no regime of its own
    assert list(r["regime"].iloc[1:-1]) == ["perfect scaling"] * 2 + ["diminishing returns"] * 2 + \
        ["maximal data parallelism"] * 2
    assert pd.isna(r["regime"].iloc[-1])  # never reached: unknown, not a guess
    # a gap of two doublings counts per doubling: 400 -> 100 over 4x is 2x per doubling
    gap = an.scaling_regimes([4, 16], [400, 100]).set_index("global_batch_size")
    assert gap.loc[16, "speedup_per_doubling"] == pytest.approx(2.0)


def _runs_df(rows):
    return pd.DataFrame([{"sweep": "a", "run_id": f"r{i}", **r} for i, r in enumerate(rows)])


def test_speedup_frame():
    df = _runs_df([{"global_batch_size": 4, "num_workers": 1, "steps_to_target": s} for s in (1000, 1200)] +
                  [{"global_batch_size": 16, "num_workers": 1, "steps_to_target": 275},
                   {"global_batch_size": 64, "num_workers": 1, "steps_to_target": np.nan}])
    sp = an.speedup_frame(df).set_index("global_batch_size")
    assert sp.loc[16, "speedup"] == pytest.approx(1100 / 275)  # mean of 1000 and 1200 at batch 4
    assert sp.loc[16, "perfect_speedup"] == 4 and sp.loc[16, "scaling_fraction"] == pytest.approx(1.0)
    assert math.isnan(sp.loc[64, "speedup"]) and sp.loc[64, "n_reached"] == 0


def test_scaling_efficiency():
    df = _runs_df([{"global_batch_size": 64, "num_workers": 1, "samples_per_s": 1000.0},
                   {"global_batch_size": 64, "num_workers": 2, "samples_per_s": 1800.0},
                   {"global_batch_size": 128, "num_workers": 2, "samples_per_s": 3000.0}])
    eff = an.scaling_efficiency(df).set_index(["global_batch_size", "num_workers"])
    assert eff.loc[(64, 2), "scaling_efficiency"] == pytest.approx(0.9)
    assert eff.loc[(64, 2), "samples_per_s_per_worker"] == pytest.approx(900.0)
    assert math.isnan(eff.loc[(128, 2), "scaling_efficiency"])  # no 1-worker run at 128


def test_curves_lr_and_telemetry_frames(tmp_path):
    records = load_results([write_sweep(tmp_path, batches=(4, 64), seeds=(0,), epochs=6)])
    curves = an.curves_frame(records)
    assert len(curves) == 2 * 7 and curves["epoch"].max() == 6
    lr = an.lr_frame(records)
    by_run = {r.run_id: r for r in records}
    for row in lr.itertuples():
        steps_per_epoch = by_run[row.run_id].plan["steps_per_epoch"]
        assert row.epoch == pytest.approx(row.step / steps_per_epoch)
    warm = lr[lr.global_batch_size == 64].sort_values("step")
    assert warm.lr.iloc[0] == pytest.approx(0.01) and warm.lr.iloc[-1] == pytest.approx(0.16)  # warmup to 0.01*64/4
    tele = an.telemetry_frame(records)
    assert tele["gpu_util_pct"].isna().all()  # CPU run: empty cells -> NaN, never 0
    assert tele["cpu_pct"].dtype.kind == "f" or tele["cpu_pct"].dtype.kind == "i"
    assert tele.groupby("run_id")["t_s"].min().eq(0).all()


def test_sweep_end_to_end_fit(tmp_path):
    """Steps-to-target measured from the logs (quantised to whole epochs) still give the curve back."""
    path = write_sweep(tmp_path, batches=(8, 32, 128, 500), seeds=(0,), epochs=120, s_min=100, b_crit=64)
    df = an.runs_frame(load_results([path]))
    assert df["steps_to_target"].notna().all()
    fit = an.fit_steps_curve(df.global_batch_size, df.steps_to_target)
    assert fit["S_min"] == pytest.approx(100, rel=0.1) and fit["B_crit"] == pytest.approx(64, rel=0.1)


def test_empty_and_diverged_values():
    assert list(an.runs_frame([]).columns) == an.RUN_COLUMNS
    assert math.isnan(an.to_float("nan")) and math.isnan(an.to_float(None)) and an.to_float("2.5") == 2.5


def test_critical_batch_compares_b_simple_with_the_fitted_b_crit():
    runs = pd.DataFrame({"noise_scale_b_simple": [40.0, 50.0, 60.0]})
    fit = {"B_crit": 100.0, "reason": None}
    c = an.critical_batch(runs, fit)
    assert (c["B_simple"], c["ratio"], c["agree"], c["why_not"]) == (50.0, 0.5, True, None)
    far = an.critical_batch(runs, {"B_crit": 400.0})
    assert far["agree"] is False and far["why_not"].startswith("they differ by 8.0x")
    none = an.critical_batch(pd.DataFrame({"noise_scale_b_simple": [math.nan]}), fit)
    assert none["agree"] is None and "no run measured the gradient noise scale" in none["why_not"]
    unfit = an.critical_batch(runs, {"B_crit": math.nan, "reason": "fewer than two batch sizes reached the target"})
    assert unfit["why_not"] == "B_crit could not be fitted: fewer than two batch sizes reached the target"
