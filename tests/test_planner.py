"""bench.planner on synthetic runs whose answers are worked out by hand below, and on a
fixtures_results sweep (measured rows must equal bench.analysis' numbers exactly).

Hand-made measurements (2 seeds each; seed 1 is 0.2 s slower, so the mean is +0.1 s):

    B    W  per-GPU b  steps  samples  time seed0/seed1 (mean)   to-target samples/s   peak GiB = 1 + b/100
    32   1     32       300    9600   3.0  / 3.2  (3.1)          9600 / 3.1   = 3096.77     1.32
    64   1     64       200   12800   2.0  / 2.2  (2.1)         12800 / 2.1   = 6095.24     1.64
    128  1    128       150   19200   1.875/ 2.075 (1.975)      19200 / 1.975 = 9721.52     2.28
    128  2     64       150   19200   1.6667/1.8667 (1.7667)    19200 / 1.7667 = 10867.9    1.64

One time basis: the model scales the to-target throughput (samples to target / time to target),
so r(32) = 3096.77, r(64) = 6095.24, r(128) = 9721.52 per GPU on 1 GPU and
eff(2) = 10867.9 / 2 / r(64) = 0.89151; the steady samples/s column (3200, 6400, 10240, 11520)
is a different basis and is not used. steps follow S_min (1 + B_crit / B) with S_min = 100,
B_crit = 64 exactly. Above 2 GPUs (the largest measured) nothing is known: no time.
"""

from __future__ import annotations

import math

import pandas as pd
import pytest

from bench import analysis
from bench.planner import parse_duration_s, plan_capacity, plan_figure
from bench.records import load_results
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


R = {32: 9600 / 3.1, 64: 12800 / 2.1, 128: 19200 / 1.975}  # to-target samples/s per GPU on 1 GPU
EFF2 = 19200 / (150 * 128 / 11520 + 0.1) / 2 / R[64]  # 0.8915: per-GPU rate on 2 GPUs / r(64)


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
    # b = 256 above 128: to-target samples/s per GPU held at r(128); steps(256) = 100 (1 + 64/256) = 125
    (256, 1, 125 * 256 / R[128], ["steps from the fit", "per-GPU batch 256 above measured 32-128: samples/s per GPU held"]),
    # b = 32 measured on 1 GPU, eff(2) interpolated: measured steps 200 at batch 64
    (64, 2, 200 * 64 / (2 * R[32] * EFF2), []),
    # b = 16 below 32: step time held -> r = r(32) / 2, x 2 GPUs x eff(2); steps measured at 32
    (32, 2, 300 * 32 / (2 * R[32] / 2 * EFF2), ["per-GPU batch 16 below measured 32-128: step time held"]),
    # b = 256 held at r(128) on 2 GPUs; steps(512) = 112.5
    (512, 2, 112.5 * 512 / (2 * R[128] * EFF2), ["steps from the fit", "above measured 32-128"]),
])
def test_extrapolated_rows(plan, b, w, seconds, why):
    row = _row(plan, b, w)
    assert row["source"] == "extrapolated"
    assert row["time_to_target_s"] == pytest.approx(seconds, rel=1e-4)
    assert row["note"].startswith("extrapolated from measured batches 32-128, 1-2 GPUs")
    assert all(reason in row["note"] for reason in why)
    assert row["num_nodes"] == math.ceil(w / 8)


@pytest.mark.parametrize("b, w", [(256, 4), (512, 8), (64, 16)])
def test_nothing_is_known_beyond_the_measured_gpu_counts(plan, b, w):
    """The old planner assumed the last measured efficiency (or 1) there; without a communication
    model the row says that nothing is known and has no time, cost or recommendation."""
    row = _row(plan, b, w)
    assert math.isnan(row["time_to_target_s"]) and math.isnan(row["gpu_hours"]) and not row["meets_deadline"]
    assert f"{w} GPUs beyond measured 1-2: nothing known (no communication model)" in row["note"]
    assert any("nothing known (no communication model)" in a for a in plan.assumptions)


def test_a_communication_model_plugs_in(plan):
    """The seam for bench.comm: efficiency(num_gpus, per_gpu_batch) -> relative per-GPU throughput."""
    result = plan_capacity(_runs_df(), target_accuracy=0.9, max_gpus=4, comm_model=lambda w, b: 0.5)
    assert _row(result, 256, 4)["time_to_target_s"] == pytest.approx(125 * 256 / (4 * R[64] * 0.5), rel=1e-4)
    assert "efficiency from the communication model" in _row(result, 256, 4)["note"]


def test_one_time_basis_measured_and_extrapolated():
    """The model evaluated at a measured point gives the measured time back, and the steady-state
    samples/s column (a different basis, up to 20 % apart) does not enter: multiplying it by 10
    changes no row."""
    from bench import planner

    df = _runs_df()
    tp = planner._Throughput(planner._measured(df))
    for b, w, _, steps, _ in MEASURED:
        measured = df[(df.global_batch_size == b) & (df.num_workers == w)]["time_to_target_s"].mean()
        assert steps * b / tp.samples_per_s(b, w) == pytest.approx(measured, rel=1e-9)
    fast = plan_capacity(df.assign(samples_per_s=df.samples_per_s * 10), target_accuracy=0.9, max_gpus=2)
    base = plan_capacity(df, target_accuracy=0.9, max_gpus=2)
    pd.testing.assert_series_equal(fast.table["time_to_target_s"], base.table["time_to_target_s"])


def test_memory_extrapolated_linearly_and_too_big_rows_excluded(plan):
    row = _row(plan, 256, 1)  # 1 + 256/100 = 3.56 GiB on a 3 GiB GPU
    assert row["peak_memory_gib"] == pytest.approx(3.56) and row["memory_headroom_gib"] == pytest.approx(-0.56)
    assert not row["fits_memory"]


def test_recommendations_without_deadline(plan):
    # fastest: the measured batch 128 on 2 GPUs, 1.767 s; next: 256 on 2 GPUs, 125 x 256 / (2 r(128) eff(2)) = 1.846 s
    assert (plan.fastest["global_batch_size"], plan.fastest["num_gpus"]) == (128, 2)
    assert plan.fastest["time_to_target_s"] == pytest.approx(150 * 128 / 11520 + 0.1)
    assert "next fastest (batch 256 on 2 GPUs): an extrapolated row has no seed spread" in plan.recommendation
    # cheapest in GPU-hours: the measured batch 128 on 1 GPU, 1.975 s; next: 64 on 1 GPU, 2.1 s. Per run,
    # 1.875/2.075 vs 2.0/2.2 s: gap 0.125 s, std 0.141 each, 2 SE = 0.283 s: within the seed spread
    assert (plan.cheapest["global_batch_size"], plan.cheapest["num_gpus"]) == (128, 1)
    assert "next cheapest (batch 64 on 1 GPU): the gap" in plan.recommendation
    assert "not a measured difference" in plan.recommendation
    # best time per GPU count: 1: 1.975, 2: 1.767 (1.12x per doubling); nothing known beyond 2
    assert plan.gpus_stop_helping is None and "stop helping" not in plan.recommendation


def test_cheapest_meeting_a_deadline():
    result = plan_capacity(_runs_df(), target_accuracy=0.9, deadline_s=1.9, max_gpus=16, gpu_hour_price=2.0)
    # within 1.9 s: (128, 2) 1.767 s x 2 GPUs = 0.000981 GPU-h and (256, 2) 1.846 s x 2 = 0.001026
    assert (result.cheapest["global_batch_size"], result.cheapest["num_gpus"]) == (128, 2)
    assert result.cheapest["cost"] == pytest.approx((150 * 128 / 11520 + 0.1) * 2 / 3600 * 2.0)
    assert "cheapest within 1.9 s: global batch 128 on 2 GPUs: 1.77 s to target" in result.recommendation
    assert "[extrapolated from measured batches 32-128" not in result.recommendation.splitlines()[0]
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
    assert _row(result, 64, 2)["time_to_target_s"] > 0  # below the failure: extrapolated as before
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
    fit = analysis.fit_sweep(runs)  # the report's fit: the same estimator and excluded points
    assert result.fit["S_min"] == fit["S_min"] and result.fit["B_crit"] == fit["B_crit"]
    assert result.fit["excluded"] == fit["excluded"]


def test_plan_figure(plan):
    fig = plan_figure(plan)
    ax = fig.axes[0]
    assert ax.get_xlabel() == "GPUs" and "0.9" in ax.get_ylabel()
    labels = [t.get_text() for t in fig.legends[0].get_texts()]  # beside the axes, hiding no data
    assert labels == ["batch 32", "batch 64", "batch 128", "batch 256", "batch 512", "cheapest"]


def test_cli_plan(tmp_path, capsys):
    import argparse

    from bench import planner_cli

    sweep = write_sweep(tmp_path, "demo", batches=(4, 16, 64), seeds=(0, 1), epochs=30,
                        cluster={"name": "c", "hardware": {"price_per_gpu_hour": 3.0, "gpus_per_node": 8}})
    parser = argparse.ArgumentParser()
    planner_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["plan", str(sweep), "--target-accuracy", "0.8", "--deadline", "90m", "--max-gpus", "8"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "cheapest within 90 min" in out and "at 3 per worker-hour" in out and "measured" in out and "extrapolated" in out


@pytest.mark.parametrize("argv, message", [
    (["--target-accuracy", "1.5"], "--target-accuracy '1.5': out of range; must be a test accuracy in (0, 1]"),
    (["--target-accuracy", "nan"], "--target-accuracy 'nan': out of range"),
    (["--target-accuracy", "-5"], "--target-accuracy '-5': out of range"),
    (["--target-accuracy", "high"], "--target-accuracy 'high': not a number"),
    (["--target-accuracy", "0.8", "--gpu-hour-price", "-1"], "--gpu-hour-price '-1': out of range; must be a price >= 0"),
    (["--target-accuracy", "0.8", "--gpu-hour-price", "inf"], "--gpu-hour-price 'inf': out of range"),
    (["--target-accuracy", "0.8", "--max-gpus", "0"], "--max-gpus '0': out of range; must be a whole number >= 1"),
    (["--target-accuracy", "0.8", "--max-gpus", "2.5"], "--max-gpus '2.5': not a whole number"),
    (["--target-accuracy", "0.8", "--gpus-per-node", "0"], "--gpus-per-node '0': out of range"),
    (["--target-accuracy", "0.8", "--deadline", "soon"], "--deadline: duration 'soon': use e.g. 2h"),
    (["--target-accuracy", "0.8", "--deadline=-2h"], "--deadline: duration '-2h': use e.g. 2h"),
    (["--target-accuracy", "0.8", "--deadline", "0"], "--deadline: duration '0': must be a positive, finite time"),
])
def test_cli_plan_refuses_bad_options_in_one_line(tmp_path, capsys, argv, message):
    from bench.cli import main

    sweep = write_sweep(tmp_path, "demo", batches=(4, 16), seeds=(0,), epochs=10)
    assert main(["plan", str(sweep), *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.count("\n") == 1
    assert captured.err.startswith("batchscale: error: " + message)


def test_parse_duration_refuses_what_is_not_a_time():
    for text in ("nan", "inf", "-5", "0", "1h-2m"):
        with pytest.raises(ValueError, match="duration"):
            parse_duration_s(text)


def test_gpu_counts_beyond_those_measured_use_the_step_model(tmp_path):
    """Runs that record their gradient bytes, on a cluster file naming its interconnect: the
    plan gives times beyond the one measured GPU count from bench.stepmodel, and says so;
    without gradient bytes it says that nothing is known there."""
    import json

    from bench.stepmodel import planner_seam

    cluster = {"name": "c", "hardware": {"interconnect": "NVLink 4", "gpus_per_node": 8}}
    sweep = write_sweep(tmp_path, "nv", batches=(16, 64, 256), seeds=(0,), epochs=20, cluster=cluster, v2=True)
    before = load_results([sweep])
    assert planner_seam(before)[0] is None and "gradient" in planner_seam(before)[1][0]
    for summary in sweep.glob("*/summary.json"):
        data = json.loads(summary.read_text())
        summary.write_text(json.dumps({**data, "gradient_bytes": 4_000_000}))
    records = load_results([sweep])
    model, notes = planner_seam(records)
    assert 0 < model(2, 32) < 1 and model(8, 32) < model(2, 32)  # more workers: a longer all-reduce
    runs = analysis.runs_frame(records, target_accuracy=0.8)
    result = plan_capacity(runs, target_accuracy=0.8, max_gpus=4, comm_model=model, comm_notes=notes)
    beyond = result.table[result.table["num_gpus"] == 4]
    assert beyond["time_to_target_s"].notna().all()
    assert any("NVLink" in a for a in result.assumptions)
    plain = plan_capacity(runs, target_accuracy=0.8, max_gpus=4)
    assert plain.table[plain.table["num_gpus"] == 4]["time_to_target_s"].isna().all()
