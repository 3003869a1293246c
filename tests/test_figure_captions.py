"""Captions of the report's figures (bench.report_captions, bench.report_figures, bench.report_hardware)
on synthetic run tables with known answers: sweeps compared at a shared batch, runs that stopped early
kept out of comparisons and named, the LR caption per sweep, throughput and memory never pooled across
sweeps, the memory axis and the throughput log axis, and B_simple beside B_crit.

The numbers are those of the committed results the review checked (results/digits-huge-batch-*,
shapes-gpu, seed-blobs, digits-linear-noise), typed in here so that each test is a closed problem."""

from __future__ import annotations

import math

import matplotlib
import pandas as pd
import pytest

from bench import report_captions as rc
from bench import report_figures as rf
from bench import report_hardware as rh
from bench.fit import critical_batch
from bench.run_facts import V1_CRITERION

NO, WU = "digits-huge-batch-no-warmup", "digits-huge-batch-warmup"


def run(sweep: str, batch: int, seed: int, final: float, *, status: str = "success", steps_to_target=math.nan,
        samples_per_s: float = 1000.0, **extra) -> dict:
    row = {"sweep": sweep, "run_id": f"gbs{batch:06d}-w001-s{seed}", "global_batch_size": batch, "num_workers": 1,
           "per_worker_batch_size": batch, "seed": seed, "status": status, "final_test_acc": final,
           "final_train_acc": final, "gap_acc": 0.0, "steps_to_target": steps_to_target, "target_accuracy": 0.9,
           "samples_per_s": samples_per_s, "peak_lr": 0.1 * batch / 40, "failure_reason": None,
           "failure_lr": math.nan, "failure_peak_lr": math.nan, "failure_before_peak": None,
           "steps_completed": 100.0, "lr_factor": math.nan}
    return {**row, **extra}


def diverged_at_peak(sweep, batch, seed, final, steps, **kw) -> dict:
    return run(sweep, batch, seed, final, status="diverged", failure_lr=2.56, failure_peak_lr=2.56,
               failure_before_peak=False, steps_completed=steps,
               failure_reason="diverged at peak LR 2.56: smoothed training loss 7.193 above the limit 6.953 at step 6",
               **kw)


def v1_warmup_stop(batch, lr, peak, steps, final, **kw) -> dict:
    reason = (f"diverged during warmup at LR {lr:.3g} (peak {peak:.3g} not reached): training loss 30.44 after "
              f"step {steps} (initial 2.307, limit 23.07); {V1_CRITERION}")
    return run("shapes-gpu", batch, 0, final, status="diverged", failure_lr=lr, failure_peak_lr=peak,
               failure_before_peak=True, steps_completed=float(steps), failure_reason=reason, **kw)


@pytest.fixture
def huge() -> pd.DataFrame:
    """Batch 256 and 1024 with and without warmup, three seeds each (final test accuracy as stored)."""
    rows = [run(NO, 256, s, a, steps_to_target=10.0, samples_per_s=t)
            for s, a, t in ((0, 0.972222, 250098), (1, 0.975, 357640), (2, 0.975, 422768))]
    rows += [diverged_at_peak(NO, 1024, 0, 0.1, 8.0, samples_per_s=474723),
             diverged_at_peak(NO, 1024, 1, 0.097222, 8.0, samples_per_s=645570),
             run(NO, 1024, 2, 0.297222, samples_per_s=750701)]
    rows += [run(WU, 256, s, a, steps_to_target=10.0, samples_per_s=t)
             for s, a, t in ((0, 0.969444, 399249), (1, 0.972222, 336980), (2, 0.966667, 365281))]
    rows += [run(WU, 1024, 0, 0.947222, steps_to_target=36.0, samples_per_s=676006),
             run(WU, 1024, 1, 0.680556, samples_per_s=754817), run(WU, 1024, 2, 0.191667, samples_per_s=738334)]
    return pd.DataFrame(rows)


@pytest.fixture
def shapes() -> pd.DataFrame:
    """shapes-gpu (v1): 128 with two seeds, 2048 with one, 4096 and 8192 stopped in warmup at steps 13 and 14."""
    return pd.DataFrame([run("shapes-gpu", 128, 0, 0.9993, samples_per_s=45830),
                         run("shapes-gpu", 128, 1, 0.9988, samples_per_s=42280),
                         run("shapes-gpu", 2048, 0, 0.9978, samples_per_s=403354),
                         v1_warmup_stop(4096, 0.376923, 1.6, 13, 0.0992, samples_per_s=377466),
                         v1_warmup_stop(8192, 1.251429, 3.2, 14, 0.1855, samples_per_s=429666)])


def caption(make, *args):
    with matplotlib.rc_context(rf.rc()):
        return make(*args).caption


# --- H2: sweeps compared at a shared batch ------------------------------------------------------

def test_two_sweeps_are_compared_at_their_shared_batch(huge):
    text = caption(rf.fig_generalisation, huge, rf.Style.for_runs(huge))
    at_1024 = text.split("At batch 1024, ")[1]
    # no warmup: mean of 0.1, 0.0972, 0.2972 = 0.165, std 0.115; with warmup 0.606 +- 0.383
    assert f"{NO} 0.165 ± 0.115 (n = 3); 2 of them stopped early and count at their last evaluation" in at_1024
    assert "the completed run: 0.297 (n = 1); reached 0.9 in 0 of 3 runs" in at_1024
    assert f"{WU} 0.606 ± 0.383 (n = 3); reached 0.9 in 1 of 3 runs" in at_1024
    # gap 0.442 against 2 sqrt(0.115^2/3 + 0.383^2/3) = 0.462: within the spread
    assert ("all runs: the gap (0.442) is within twice its standard error over seeds (0.462; n = 3 and 3): "
            "not a measured difference") in at_1024
    assert "completed runs only: one run on at least one side (n = 1 and 3)" in at_1024
    assert "At batch 256, final test accuracy by sweep" in text  # every shared batch


def test_one_sweep_has_no_comparison_between_sweeps(shapes):
    assert "by sweep" not in caption(rf.fig_generalisation, shapes, rf.Style.for_runs(shapes))


# --- G2: runs that stopped early are named, not compared -----------------------------------------

def test_runs_stopped_in_warmup_are_named_with_the_v1_caveat_and_left_out(shapes):
    text = caption(rf.fig_generalisation, shapes, rf.Style.for_runs(shapes))
    assert text.startswith("Final test accuracy of the completed runs goes from 0.999 at batch 128 to 0.998 at "
                           "batch 2048 (one run on at least one side (n = 2 and 1)")
    assert ("Batch 4096 (1 of 1 run: diverged during warmup at LR 0.377, before its peak 1.6, after 13 steps) and "
            "batch 8192 (1 of 1 run: diverged during warmup at LR 1.25, before its peak 3.2, after 14 steps) stopped "
            "early, both by the v1 criterion on the evaluation-mode training loss, unreliable with BatchNorm early "
            "in training") in text
    assert "0.185" not in text and "0.099" not in text


def test_the_curves_caption_compares_completed_runs_only(shapes):
    rows = []
    for r in shapes.itertuples():
        rows += [{"sweep": r.sweep, "run_id": r.run_id, "global_batch_size": r.global_batch_size, "seed": r.seed,
                  "status": r.status, "epoch": e, "test_acc": a, "train_acc": a} for e, a in ((0, 0.1), (1, r.final_test_acc))]
    text = caption(rf.fig_learning_curves, pd.DataFrame(rows), rf.Style.for_runs(shapes))
    assert text.startswith("Among completed runs, batch 128 ends highest at 0.999 mean test accuracy and batch 2048 "
                           "lowest at 0.998")
    assert "not compared: batch 4096 (1 of 1 run) and batch 8192 (1 of 1 run)" in text


def test_stopped_text_says_the_v1_caveat_per_batch_when_not_all_are_v1(shapes):
    groups = rc.stopped_groups(pd.concat([shapes, pd.DataFrame([diverged_at_peak("shapes-gpu", 1024, 0, 0.1, 8.0)])],
                                          ignore_index=True))
    text = rc.stopped_text(groups, multi=False)
    assert text.startswith("Batch 1024 (1 of 1 run: diverged at the peak LR 2.56, after 8 steps), batch 4096")
    assert text.count("by the v1 criterion") == 2 and "both by" not in text


# --- H3/G3: the LR caption per sweep ------------------------------------------------------------

def lr_rows(sweep: str, batch: int, peak: float, warmup_epochs: int, epochs: int = 12) -> list[dict]:
    steps_per_epoch = 2
    out = []
    for step in range(epochs * steps_per_epoch):
        frac = min(1.0, step / (warmup_epochs * steps_per_epoch)) if warmup_epochs else 1.0
        out.append({"sweep": sweep, "run_id": f"gbs{batch:06d}-w001-s0", "global_batch_size": batch, "seed": 0,
                    "num_workers": 1, "step": step, "epoch": step / steps_per_epoch, "lr": peak * max(frac, 0.1)})
    return out


def test_the_lr_caption_says_when_each_sweep_reached_its_peak(huge):
    lr = pd.DataFrame(lr_rows(NO, 256, 0.64, 0) + lr_rows(NO, 1024, 2.56, 0)
                      + lr_rows(WU, 256, 0.64, 0) + lr_rows(WU, 1024, 2.56, 10))
    huge = huge.assign(peak_lr=huge["global_batch_size"] / 400)
    text = caption(rf.fig_lr, lr, huge, rf.Style.for_runs(huge))
    assert (f"{NO}: planned peak LR goes from 0.64 at batch 256 to 2.56 at batch 1024 (4x the LR at 4x the batch), "
            "applied at batch 1024 from the first step.") in text
    assert f"{WU}: planned peak LR goes from 0.64 at batch 256 to 2.56 at batch 1024 (4x the LR at 4x the batch), " \
           "applied at batch 1024 after 10 epoch(s)." in text
    assert f"Diverged at the peak LR: batch 1024 ({NO}; 2 of 3 runs)." in text


def test_the_lr_caption_names_every_run_stopped_before_its_peak(shapes):
    shapes = shapes.assign(peak_lr=shapes["global_batch_size"] * 0.1 / 256)
    lr = pd.DataFrame(lr_rows("shapes-gpu", 128, 0.05, 0) + lr_rows("shapes-gpu", 2048, 0.8, 5)
                      + lr_rows("shapes-gpu", 4096, 1.6, 5, epochs=1) + lr_rows("shapes-gpu", 8192, 3.2, 5, epochs=1))
    text = caption(rf.fig_lr, lr, shapes, rf.Style.for_runs(shapes))
    assert "batch 8192 never applied it (every run stopped in warmup); the largest batch that applied its peak is " \
           "2048, after 5 epoch(s)" in text
    assert ("Batch 4096 (1 of 1 run: diverged during warmup at LR 0.377, before its peak 1.6, after 13 steps) and "
            "batch 8192 (1 of 1 run: diverged during warmup at LR 1.25, before its peak 3.2, after 14 steps) stopped "
            "before applying the peak LR, both by the v1 criterion") in text


# --- H4: throughput and memory per sweep --------------------------------------------------------

def test_throughput_is_compared_within_each_sweep_over_completed_runs(huge):
    text = caption(rh.fig_throughput, huge, rf.an.scaling_efficiency(huge), rf.Style.for_runs(huge))
    # no warmup 256: mean of 250,098 / 357,640 / 422,768 = 343,502; with warmup 367,170 -> 723,052
    assert f"{NO}: throughput of the completed runs goes from 343,502 samples/s at batch 256 to 750,701 at " \
           "batch 1024 (one run on at least one side (n = 3 and 1)" in text
    assert f"{WU}: throughput of the completed runs goes from 367,170 samples/s at batch 256 to 723,052 at " \
           "batch 1024 (the gap (355,882 samples/s) exceeds twice its standard error" in text
    assert "355,336" not in text  # the pooled mean of both sweeps at 256 (the old caption)
    assert f"Batch 1024 ({NO}; 2 of 3 runs: diverged at the peak LR 2.56, after 8 steps each) stopped early" in text


def test_throughput_of_runs_stopped_after_a_few_steps_is_marked(shapes):
    text = caption(rh.fig_throughput, shapes, rf.an.scaling_efficiency(shapes), rf.Style.for_runs(shapes))
    assert "goes from 44,055 samples/s at batch 128 to 403,354 at batch 2048" in text
    assert "after 13 steps" in text and "after 14 steps" in text
    assert "comes from those steps alone and is left out of the comparison" in text


def memory_runs(sweep: str, rss_gib: dict[int, list[float]]) -> list[dict]:
    return [run(sweep, b, s, 0.9, telemetry_kind="cpu", peak_memory_gib=v)
            for b, values in rss_gib.items() for s, v in enumerate(values)]


def test_flat_memory_is_called_flat_and_the_axis_does_not_zoom_into_noise():
    rss = {4: [0.8905], 8: [0.8908], 64: [0.8909], 450: [0.8910]}  # seed-blobs: 0.5 MiB over 0.89 GiB
    runs = pd.DataFrame(memory_runs("seed-blobs", rss))
    with matplotlib.rc_context(rf.rc()):
        result = rh.fig_memory(runs, rf.Style.for_runs(runs))
    assert result.caption.startswith("Process RSS (CPU runs) stays flat within 0.51 MiB (0.8905 to 0.891 GiB over "
                                     "per-worker batches 4 to 450; smallest vs largest: one run on at least one side")
    lo, hi = result.figure.axes[0].get_ylim()
    assert lo <= 0.8907 * 0.95 and hi >= 0.8907 * 1.05


def test_memory_is_compared_within_each_sweep():
    runs = pd.DataFrame(memory_runs("a", {256: [0.9001, 0.9002], 1024: [0.9002, 0.9003]})
                        + memory_runs("b", {256: [1.0, 1.02], 1024: [2.0, 2.04]}))
    text = caption(rh.fig_memory, runs, rf.Style.for_runs(runs))
    assert text.startswith("a: process RSS (CPU runs) stays flat within 0.1 MiB (0.9002 to 0.9002 GiB")
    assert "; b: process RSS (CPU runs) goes from 1.01 GiB at per-worker batch 256 to 2.02 GiB at 1024 (the gap " \
           "(1.01 GiB) exceeds twice its standard error" in text


# --- C4: the throughput log axis ----------------------------------------------------------------

def test_log_limits_snap_to_labelled_ticks_with_headroom():
    assert rf._nice_125(473_000, up=True) == 500_000 and rf._nice_125(38_000, up=False) == 20_000
    assert rf._nice_125(200_000, up=True) == 200_000 and rf._nice_125(0.031, up=False) == pytest.approx(0.02)


def test_throughput_points_do_not_touch_the_frame(shapes):
    with matplotlib.rc_context(rf.rc()):
        fig = rh.fig_throughput(shapes, rf.an.scaling_efficiency(shapes), rf.Style.for_runs(shapes)).figure
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylim() == (20_000, 500_000)
    labelled = [t for t in ax.get_yticks() if 20_000 <= t <= 500_000]
    assert labelled == [20_000, 50_000, 100_000, 200_000, 500_000]


# --- L3: B_simple beside B_crit -----------------------------------------------------------------

def noise_runs(per_batch: dict[int, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([{"global_batch_size": b, "noise_scale_b_simple": v} for b, vs in per_batch.items() for v in vs])


def test_a_pooled_median_within_3x_is_not_called_agreement_when_the_batches_span_both_sides():
    # as digits-linear-noise: B_crit 225, per-batch B_simple from 684 at batch 16 down to 36.2 at 1024
    # (here std 408 = sqrt((284^2 + 184^2 + 468^2) / 2) and 14 at 1024)
    c = critical_batch(noise_runs({16: [400.0, 500.0, 1152.0], 128: [116.0, 110.0, 120.0], 1024: [22.2, 36.2, 50.2]}),
                       {"B_crit": 225.0})
    assert c["agree"] is True  # the pooled median, 116, is 0.52x B_crit
    text = rc.noise_scale_text(c)
    assert "B_simple = 116 (median over 9 runs at 3 batch sizes; no interval; per-batch mean from 36.2 ± 14 (n = 3) " \
           "at batch 1024 to 684 ± 408 (n = 3) at batch 16)" in text
    assert ("ratio B_simple / B_crit = 0.52: the pooled median is within 3x of B_crit; per batch it ranges from 36.2 "
            "to 684 (0.161x to 3.04x B_crit)") in text
    assert "they agree" not in text


def test_agreement_needs_every_batch_within_3x_and_single_runs_leave_the_spread_unknown():
    c = critical_batch(noise_runs({256: [426.0], 1024: [316.0]}), {"B_crit": 295.0})  # lm-tiny, one seed
    text = rc.noise_scale_text(c)
    assert "one run per batch: the spread between seeds is unknown" in text
    assert "every batch's B_simple lies within 3x of B_crit (1.07x to 1.44x)" in text
    assert "they agree" not in text  # one seed: no finding, the same standard as everywhere
    assert text.endswith("from single runs (spread unknown) and a B_crit without an interval, so agreement is "
                         "not established")


def test_no_noise_scale_gives_the_reason():
    c = critical_batch(noise_runs({16: [math.nan]}), {"B_crit": 225.0})
    assert rc.noise_scale_text(c).startswith("; no agreement to report: no run measured the gradient noise scale")
