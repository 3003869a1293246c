"""bench.planner on synthetic runs whose answers are worked out by hand below, and on a
fixtures_results sweep (measured rows must equal bench.analysis' numbers exactly).

Hand-made measurements (2 seeds each; seed 1 is 0.2 s slower, so the mean is +0.1 s):

    B    W  per-GPU b  samples/s  steps  time seed0/seed1 (mean)   peak GiB = 1 + b/100
    32   1     32        3200      300   3.0  / 3.2  (3.1)          1.32
    64   1     64        6400      200   2.0  / 2.2  (2.1)          1.64
    128  1    128       10240      150   1.875/ 2.075 (1.975)       2.28
    128  2     64       11520      150   1.6667/1.8667 (1.7667)     1.64

steps follow S_min (1 + B_crit / B) with S_min = 100, B_crit = 64 exactly; per-GPU rate
r(32) = 3200, r(64) = 6400, r(128) = 10240; eff(2) = 11520 / 2 / r(64) = 0.9, held beyond 2 GPUs.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bench import analysis
from bench.planner import parse_duration_s, plan_capacity, plan_figure
from bench.store import load_results
from fixtures_results import write_sweep

MEASURED = [(32, 1, 3200.0, 300, 3.0), (64, 1, 6400.0, 200, 2.0), (128, 1, 10240.0, 150, 1.875),
            (128, 2, 11520.0, 150, 150 * 128 / 11520)]


def _runs_df() -> pd.DataFrame:
    rows = []
    for b, w, sps, steps, t in MEASURED:
        for seed in (0, 1):
            rows.append({"sweep": "hand", "run_id": f"b{b}-w{w}-s{seed}", "global_batch_size": b, "num_workers": w,
                         "seed": seed, "steps_to_target": float(steps), "time_to_target_s": t + 0.2 * seed,
                         "samples_per_s": sps, "status": "success", "target_accuracy": 0.9,
                         "peak_memory_gib": 1 + b / w / 100})
    return pd.DataFrame(rows)


def _row(result, b, w) -> dict:
    t = result.table
    return t[(t["global_batch_size"] == b) & (t["num_gpus"] == w)].iloc[0].to_dict()


@pytest.fixture(scope="module")
def plan():
    return plan_capacity(_runs_df(), target_accuracy=0.9, max_gpus=16, gpus_per_node=8,
                         gpu_hour_price=2.0, gpu_memory_gib=3.0)


def test_parse_duration():
    assert parse_duration_s("2h") == 7200 and parse_duration_s("90m") == 5400
    assert parse_duration_s("3600s") == 3600 and parse_duration_s("1h30m") == 5400 and parse_duration_s("45") == 45
    with pytest.raises(ValueError, match="2h, 90m"):
        parse_duration_s("two hours")


def test_grid_and_fit(plan):
    assert plan.fit["S_min"] == pytest.approx(100) and plan.fit["B_crit"] == pytest.approx(64)
    # measured batches 32..128 plus 2x and 4x the largest; GPUs 1..16 in powers of two, B % W == 0
    assert sorted(plan.table["global_batch_size"].unique()) == [32, 64, 128, 256, 512]
    assert sorted(plan.table["num_gpus"].unique()) == [1, 2, 4, 8, 16]


def test_measured_rows_are_the_seed_means(plan):
    row = _row(plan, 128, 2)
    assert row["source"] == "measured" and row["note"] == ""
    assert row["time_to_target_s"] == pytest.approx(150 * 128 / 11520 + 0.1)
    assert row["gpu_hours"] == pytest.approx(row["time_to_target_s"] * 2 / 3600)
    assert row["cost"] == pytest.approx(row["gpu_hours"] * 2.0)
    assert row["memory_headroom_gib"] == pytest.approx(3.0 - 1.64)
    assert _row(plan, 32, 1)["time_to_target_s"] == pytest.approx(3.1)


@pytest.mark.parametrize("b, w, seconds, why", [
    # b = 64, r = 6400, eff 0.9 held -> 23040 samples/s; steps(256) = 100 (1 + 64/256) = 125
    (256, 4, 125 * 256 / 23040, ["steps from the fit", "4 GPUs beyond measured 1-2: efficiency 0.9 assumed"]),
    # b = 256 above 128: 10240 samples/s per GPU held; eff(1) = 1 -> 125 x 256 / 10240 = 3.125
    (256, 1, 3.125, ["per-GPU batch 256 above measured 32-128: samples/s per GPU held"]),
    # b = 16 below 32: step time held at 32 / 3200 = 0.01 s -> r = 1600, x 4 x 0.9 = 5760; steps measured at 64
    (64, 4, 200 * 64 / 5760, ["per-GPU batch 16 below measured 32-128: step time held"]),
    # b = 64 -> 8 x 6400 x 0.9 = 46080 samples/s; steps(512) = 112.5
    (512, 8, 112.5 * 512 / 46080, ["steps from the fit"]),
])
def test_extrapolated_rows(plan, b, w, seconds, why):
    row = _row(plan, b, w)
    assert row["source"] == "extrapolated"
    assert row["time_to_target_s"] == pytest.approx(seconds)
    assert row["note"].startswith("extrapolated from measured batches 32-128, 1-2 GPUs")
    assert all(reason in row["note"] for reason in why)
    assert row["num_nodes"] == math.ceil(w / 8)


def test_memory_extrapolated_linearly_and_too_big_rows_excluded(plan):
    row = _row(plan, 256, 1)  # 1 + 256/100 = 3.56 GiB on a 3 GiB GPU
    assert row["peak_memory_gib"] == pytest.approx(3.56) and row["memory_headroom_gib"] == pytest.approx(-0.56)
    assert not row["fits_memory"]


def test_recommendations_without_deadline(plan):
    # fastest: 1.25 s at batch 512 on 8 GPUs (16 GPUs tie at 1.25 s; fewer GPUs win the tie)
    assert (plan.fastest["global_batch_size"], plan.fastest["num_gpus"]) == (512, 8)
    assert plan.fastest["time_to_target_s"] == pytest.approx(1.25)
    # cheapest in GPU-hours: the measured batch 128 on 1 GPU, 1.975 s
    assert (plan.cheapest["global_batch_size"], plan.cheapest["num_gpus"]) == (128, 1)
    # best time per GPU count: 1: 1.975, 2: 1.736 (256), 4: 1.389 (256), 8: 1.25, 16: 1.25 -> stops at 8
    assert plan.gpus_stop_helping == 8
    assert "more GPUs stop helping beyond 8" in plan.recommendation


def test_cheapest_meeting_a_deadline():
    result = plan_capacity(_runs_df(), target_accuracy=0.9, deadline_s=1.5, max_gpus=16, gpu_hour_price=2.0)
    # within 1.5 s: (256, 4) 1.389 s x 4 GPUs = 0.001543 GPU-h is the cheapest; (512, 8) needs 0.002778
    assert (result.cheapest["global_batch_size"], result.cheapest["num_gpus"]) == (256, 4)
    assert result.cheapest["cost"] == pytest.approx(125 * 256 / 23040 * 4 / 3600 * 2.0)
    assert "cheapest within 1.5 s: global batch 256 on 4 GPU(s)" in result.recommendation
    assert "[extrapolated from measured batches 32-128" in result.recommendation
    none = plan_capacity(_runs_df(), target_accuracy=0.9, deadline_s=0.5, max_gpus=16)
    assert none.cheapest is None and "nothing reaches 0.9 within 0.5 s" in none.recommendation


def test_nothing_is_extrapolated_at_or_past_a_batch_that_never_reached_the_target():
    """As shapes-gpu on an H200: 256 diverged on one GPU; the fit over 32..128 would promise
    it (and 512) a few hundred steps, but the optimisation is the same on any GPU count."""
    df = _runs_df()
    diverged = [{"sweep": "hand", "run_id": "b256-w1-s0", "global_batch_size": 256, "num_workers": 1, "seed": 0,
                 "steps_to_target": math.nan, "time_to_target_s": math.nan, "samples_per_s": 12000.0,
                 "status": "diverged", "target_accuracy": 0.9, "peak_memory_gib": 3.56}]
    result = plan_capacity(pd.concat([df, pd.DataFrame(diverged)], ignore_index=True), target_accuracy=0.9,
                           max_gpus=4)
    assert sorted(set(result.table["global_batch_size"])) == [32, 64, 128, 256]  # no 512, 1024 appended
    for w in (1, 2, 4):
        row = _row(result, 256, w)
        assert math.isnan(row["time_to_target_s"]) and not row["meets_deadline"]
    assert "no measured run reached the target, on any GPU count" in _row(result, 256, 2)["note"]
    assert _row(result, 128, 4)["time_to_target_s"] > 0  # below the failure: extrapolated as before
    assert result.fastest["global_batch_size"] <= 128 and result.cheapest["global_batch_size"] <= 128


def test_wrong_target_is_refused():
    with pytest.raises(ValueError, match="target_accuracy=0.8"):
        plan_capacity(_runs_df(), target_accuracy=0.8)


def test_measured_rows_equal_analysis_on_stored_runs(tmp_path):
    sweep = write_sweep(tmp_path, "demo", batches=(4, 16, 64), seeds=(0, 1, 2), workers=(1, 2), epochs=30)
    runs = analysis.runs_frame(load_results([sweep]), target_accuracy=0.8)
    result = plan_capacity(runs, target_accuracy=0.8, max_gpus=4)
    expected = runs.groupby(["global_batch_size", "num_workers"])["time_to_target_s"].mean()
    measured = result.table[result.table["source"] == "measured"]
    assert len(measured) == len(expected) == 6
    for row in measured.itertuples():
        assert row.time_to_target_s == expected[(row.global_batch_size, row.num_gpus)]  # exactly
    fit = analysis.fit_steps_curve(runs["global_batch_size"], runs["steps_to_target"])
    assert result.fit["S_min"] == fit["S_min"] and result.fit["B_crit"] == fit["B_crit"]


def test_plan_figure(plan):
    fig = plan_figure(plan)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "GPUs" and "0.9" in ax.get_ylabel()
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["batch 32", "batch 64", "batch 128", "batch 256", "batch 512", "cheapest"]


def test_cli_plan(tmp_path, capsys):
    import argparse

    from bench import planner

    sweep = write_sweep(tmp_path, "demo", batches=(4, 16, 64), seeds=(0, 1), epochs=30,
                        cluster={"name": "c", "hardware": {"price_per_gpu_hour": 3.0, "gpus_per_node": 8}})
    parser = argparse.ArgumentParser()
    planner.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", str(sweep), "--target-accuracy", "0.8", "--deadline", "90m", "--max-gpus", "8"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "cheapest within 5400 s" in out and "at 3/GPU-h" in out and "measured" in out and "extrapolated" in out
