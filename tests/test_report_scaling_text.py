"""The steps-to-target wording, the per-batch table and the run tables on synthetic runs with
known answers: regimes stated only with evidence and only as a contiguous span from the smallest
batch (review C1), no regime or previous batch at the smallest batch (C2), batches that some
runs never reached (H1/H5), vs B_crit (G5), the seeds row (C5), a loss target's tables (M1) and
the multi-sweep capacity note (H6)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from bench import analysis as an
from bench import regimes
from bench import report_scaling as rs
from bench import report_tables as rt
from bench.report_text import runs_short_of_plan, seeds_text


def _runs(points: dict[int, list[float]], *, resolution: float = 0.0, sweep: str = "s", target: float = 0.9,
          steps_per_epoch: dict[int, float] | None = None) -> pd.DataFrame:
    """One row per run: batch -> steps-to-target per seed (NaN: never reached, finished at 0.5)."""
    rows = []
    for b, steps in points.items():
        for seed, s in enumerate(steps):
            spe = (steps_per_epoch or {}).get(b, 1.0)
            rows.append({"sweep": sweep, "run_id": f"b{b}-s{seed}", "global_batch_size": b, "num_workers": 1,
                         "seed": seed, "status": "success", "steps_to_target": s,
                         "steps_to_target_resolution": resolution if math.isfinite(s) else math.nan,
                         "epochs_to_target": s / spe, "target_accuracy": target, "final_test_acc": 0.95 if
                         math.isfinite(s) else 0.5, "best_test_acc": 0.96 if math.isfinite(s) else 0.6,
                         "noise_scale_b_simple": math.nan, "target_hold_evals": 3, "lr_factor": 1.0})
    return pd.DataFrame(rows)


PERFECT_THEN_DIMINISHING = {16: [400, 404, 396], 32: [200, 202, 198], 64: [100, 101, 99], 128: [80, 81, 79]}


def test_smallest_batch_has_no_regime():
    r = an.scaling_regimes([16, 32, 64], [400, 200, 100]).set_index("global_batch_size")
    assert pd.isna(r.loc[16, "regime"])  # no segment ends at the smallest batch
    assert r.loc[32, "regime"] == r.loc[64, "regime"] == "perfect scaling"


def test_regimes_stated_with_their_evidence():
    sp = an.speedup_frame(_runs(PERFECT_THEN_DIMINISHING, resolution=1.0)).set_index("global_batch_size")
    assert sp.loc[16, ["regime", "regime_noise", "speedup_noise"]].isna().all()
    assert math.isnan(sp.loc[16, "previous_batch"]) and sp.loc[64, "previous_batch"] == 32
    assert list(sp.loc[[32, 64, 128], "regime"]) == ["perfect scaling", "perfect scaling", "diminishing returns"]
    assert sp.loc[128, "regime_noise"] == "1.25x per doubling; gap beyond seed spread"  # 100 / 80
    span, phrases = regimes.perfect_span(sp.reset_index())
    assert span == 64 and len(phrases) == 3 and phrases[2].startswith("64→128: diminishing returns")


def test_perfect_span_is_contiguous_from_the_smallest_batch():
    # 16 -> 32 diminishing (1.33x), 32 -> 64 perfect (2x): the largest 'perfect' batch is 64, but
    # perfect scaling does not hold from batch 16 up to anything
    runs = _runs({16: [400, 404, 396], 32: [300, 303, 297], 64: [150, 151, 149]}, resolution=1.0)
    sp = an.speedup_frame(runs)
    assert list(sp["regime"].iloc[1:]) == ["diminishing returns", "perfect scaling"]
    assert regimes.perfect_span(sp)[0] is None
    text = rs.regime_sentence(sp)
    assert text.startswith("no segment from the smallest batch is resolved as perfect scaling")
    assert "perfect scaling up to" not in rs._steps_caption(runs, sp, {"s": an.fit_sweep(runs)})


def test_segment_within_spread_or_interval_is_not_resolved():
    # 1.77x per doubling with a 10 % seed spread cannot be told from the 1.8x boundary
    noisy = an.speedup_frame(_runs({16: [330, 366, 401], 32: [186, 207, 228]}, resolution=1.0))
    assert noisy["regime"].iloc[1] == "not resolved"
    assert "vs the 1.8x boundary: within seed spread" in noisy["regime_noise"].iloc[1]
    # a gap no larger than the evaluation interval: not resolved whatever the seeds say
    coarse = an.speedup_frame(_runs({16: [100, 100], 32: [80, 80]}, resolution=25.0))
    assert coarse["regime"].iloc[1] == "not resolved" and "gap within eval interval" in coarse["regime_noise"].iloc[1]
    # one seed: not resolved; the evidence gives the measured label and says the spread is unknown
    one = an.speedup_frame(_runs({128: [1570], 1024: [240]}))
    assert one["regime"].iloc[1] == "not resolved"
    assert "(measured: perfect scaling); spread unknown" in one["regime_noise"].iloc[1]
    assert "no segment from the smallest batch is resolved as perfect scaling" in rs.regime_sentence(one)


def test_partially_reached_batch_is_not_the_batchs_result():
    runs = _runs({256: [28, 25, 31], 1024: [36, np.nan, np.nan]}, steps_per_epoch={256: 7, 1024: 2})
    sp = an.speedup_frame(runs)
    row = sp.set_index("global_batch_size").loc[1024]
    assert row["regime"] == "not resolved" and row["speedup_noise"] == "batch 1024: 1 of 3 runs reached"
    caption = rs._steps_caption(runs, sp, {"s": an.fit_sweep(runs)})
    assert "batch 1024 reached 0.90 test accuracy in 1 of 3 runs (seed 0, epoch 18); the other 2 never did " \
           "(seed 1 ended at 0.500 (best 0.600); seed 2 ended at 0.500 (best 0.600))" in caption
    assert "Only batch 256 reached 0.90 test accuracy in every run" in caption
    assert "Batch 1024 reached" not in caption  # the one run is not presented as the batch's figure
    assert "this rests on batch 1024 (1 of 3 runs reached)" in caption  # the fit's statement says so (H5)
    table = rt.batch_table_html(an.batch_table(runs.assign(peak_lr=0.1, per_worker_batch_size=1)), sp,
                                {"s": an.fit_sweep(runs)})
    assert "36 (1 of 3 runs)" in table


def test_batch_table_baseline_row_and_versus_b_crit():
    runs = _runs(PERFECT_THEN_DIMINISHING, resolution=1.0).assign(peak_lr=0.1, per_worker_batch_size=1)
    runs = pd.concat([runs, _runs({256: [np.nan]}).assign(peak_lr=0.1, per_worker_batch_size=1)], ignore_index=True)
    sp = an.speedup_frame(runs)
    html = rt.batch_table_html(an.batch_table(runs), sp, {})
    first = html.split("<tr>")[2]  # header row, then batch 16
    assert "1.00x (baseline)" in first and "diminishing" not in first and "beyond seed spread" not in first
    fit = {"B_crit": 100.0, "B_crit_lo": 80.0, "B_crit_hi": 120.0, "n_batches": 4, "batch_min": 16, "batch_max": 128}
    assert rt.versus_b_crit(256, fit, n_reached=0) == "—"  # never reached: nothing to place
    assert rt.versus_b_crit(256, fit, n_reached=1) == "beyond B_crit's interval"
    untested = {"B_crit": 49152.0, "B_crit_lo": math.nan, "B_crit_hi": math.nan, "n_batches": 2,
                "batch_min": 1024, "batch_max": 2048}
    assert rt.versus_b_crit(128, untested, n_reached=2).startswith("— (B_crit untested")


def _record(seed: int, batch: int, seeds: list[int], done: bool = True):
    return SimpleNamespace(plan={"seed": seed, "global_batch_size": batch}, summary=object() if done else None,
                           config={"seeds": seeds, "num_workers": [1]})


def test_seeds_row_and_runs_short_of_plan():
    assert seeds_text([_record(0, 256, [0])]) == "seed 0 (1 seed)"
    full = [_record(s, b, [0, 1, 2]) for b in (256, 1024) for s in (0, 1, 2)]
    assert seeds_text(full) == "seeds 0, 1, 2 (3)" and runs_short_of_plan(full) is None
    short = [_record(s, b, [0, 1, 2]) for b in (128, 256, 512) for s in (0, 1)] + \
        [_record(0, b, [0, 1, 2]) for b in (1024, 2048)]
    assert seeds_text(short) == "seeds 0, 1 (2); the config lists 3: 0, 1, 2"
    assert runs_short_of_plan(short) == "128–512: 2 of 3 each; 1024–2048: 1 of 3 each"


def test_loss_target_tables_speak_of_loss_and_tokens():
    runs = _runs({256: [215], 512: [128]}).assign(target_metric="loss", batch_unit="tokens", target_loss=2.8,
                                                   final_test_loss=[2.24, 2.31], samples_per_s=[37969.0, 41068.0],
                                                   time_to_target_s=1.5, failure_reason=None, ends_below_target=False)
    html = rt.runs_table_html(runs, failed_only=False)
    assert "tokens/s" in html and "final validation loss" in html and "2.240" in html
    assert "samples/s" not in html and "test acc" not in html
    assert rt.ended_heading(runs) == "Runs that ended above a target they had reached"
    assert rt.ended_heading(runs.assign(target_metric="accuracy", batch_unit="samples")).endswith("below a target "
                                                                                                  "they had reached")


def test_never_reached_runs_join_the_failures_table():
    runs = _runs({1024: [36, np.nan]}).assign(failure_reason=None, time_to_target_s=1.0, samples_per_s=1.0,
                                              epochs_to_target_sustained=math.nan)
    html = rt.runs_table_html(runs, failed_only=True)
    assert "b1024-s1" in html and "b1024-s0" not in html
    assert "completed; never reached 0.9 test accuracy (final 0.500, best 0.600)" in html


def test_capacity_note_for_several_sweeps_is_complete():
    from bench.report import _capacity_figure
    runs = pd.concat([_runs({256: [28]}, sweep="a"), _runs({256: [30]}, sweep="b")], ignore_index=True)
    note = _capacity_figure(runs, []).caption
    assert note.endswith("run `batchscale plan RESULTS_FOLDER` on one sweep's folder.") and "2 sweeps" in note


@pytest.mark.parametrize("regime_col", [["perfect scaling", "perfect scaling", "diminishing returns"]])
def test_regime_spans_label_each_run_of_one_regime_once(regime_col):
    ok = pd.DataFrame({"global_batch_size": [16, 32, 64, 128], "steps_to_target": [400.0, 200, 100, 80],
                       "regime": [None, *regime_col]})
    assert rs.regime_spans(ok) == [(16, 64, 400.0, 100.0, "perfect scaling"),
                                   (64, 128, 100.0, 80.0, "diminishing returns")]
